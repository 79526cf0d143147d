"""Checked loading: weights checked before the build; every backbone tensor from the file."""
import os
import pickle

import pytest

from detectron2.modeling import build_model
from finetune_helpers import FINETUNE, TOY, finetune_cfg
from montage_pretrain.export_format import read_export
from montage_pretrain.loading import backbone_keys, load_and_verify, read_checked_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def rewrite(src, dst, edit):
    """Copies an export with ``edit(data)`` applied."""
    with open(src, "rb") as f:
        data = pickle.load(f)
    edit(data)
    with open(dst, "wb") as f:
        pickle.dump(data, f)
    return str(dst)


def test_read_checked_weights(export_path, tmp_path):
    export = read_checked_weights(finetune_cfg(TOY, "MODEL.WEIGHTS", export_path))
    assert export.path == export_path and export.settings["iteration"] == 5
    assert read_checked_weights(finetune_cfg(TOY, "MODEL.WEIGHTS", "")) is None  # scratch
    with pytest.raises(ValueError, match="FrozenBN but MODEL.WEIGHTS is empty"):
        read_checked_weights(finetune_cfg(TOY, "MODEL.WEIGHTS", "",
                                          "MODEL.RESNETS.NORM", "FrozenBN"))
    with pytest.raises(FileNotFoundError, match="no.pkl does not exist"):
        read_checked_weights(finetune_cfg(TOY, "MODEL.WEIGHTS", str(tmp_path / "no.pkl")))
    with pytest.raises(ValueError, match="INPUT.FORMAT is 'BGR' in the config"):
        read_checked_weights(finetune_cfg(TOY, "MODEL.WEIGHTS", export_path, "INPUT.FORMAT", "BGR"))


def test_load_and_verify_full_export(export_path):
    model = build_model(finetune_cfg())
    summary = load_and_verify(model, export_path)
    assert summary["loaded"] == summary["total"] == 100 and not summary["not_loaded"]
    assert all(k.startswith("backbone.bottom_up.") for k in backbone_keys(model))


def test_load_and_verify_from_memory_does_not_reread(export_path, monkeypatch):
    export = read_export(export_path)
    before = {k: v.copy() for k, v in export.weights.items()}

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the export was unpickled again")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    for _ in range(2):  # the in-memory export stays usable: loading does not consume it
        summary = load_and_verify(build_model(finetune_cfg()), export)
        assert summary["loaded"] == 100
    assert export.weights.keys() == before.keys()
    assert all((export.weights[k] == v).all() for k, v in before.items())


def test_load_and_verify_half_backbone_raises(export_path, tmp_path):
    def drop_half(data):
        for k in [k for k in data["model"] if k.startswith(("res4.", "res5."))]:
            del data["model"][k]

    path = rewrite(export_path, tmp_path / "half.pkl", drop_half)
    with pytest.raises(RuntimeError, match=r"Only 50/100 backbone tensors .*res4"):
        load_and_verify(build_model(finetune_cfg()), path)


def test_load_and_verify_catches_missing_bn_statistics(export_path, tmp_path):
    """FrozenBN fills absent running_mean/var with 0/1 without any 'missing keys' warning."""
    def drop_stats(data):
        for k in [k for k in data["model"] if k.endswith(("running_mean", "running_var"))]:
            del data["model"][k]

    path = rewrite(export_path, tmp_path / "nostats.pkl", drop_stats)
    with pytest.raises(RuntimeError, match=r"running_mean"):
        load_and_verify(build_model(finetune_cfg()), path)


def test_load_and_verify_without_matching_heuristics_raises(export_path, tmp_path):
    path = rewrite(export_path, tmp_path / "plain.pkl",
                   lambda d: d.pop("matching_heuristics"))
    with pytest.raises(RuntimeError, match="0/100"):
        load_and_verify(build_model(finetune_cfg()), read_export(path))


def test_load_and_verify_wrong_depth_raises(export_path):
    cfg = finetune_cfg(TOY, "MODEL.RESNETS.DEPTH", "34")
    with pytest.raises(RuntimeError, match="backbone tensors"):
        load_and_verify(build_model(cfg), export_path)


def test_c4_backbone_keys_include_roi_heads_res5():
    cfg = finetune_cfg(os.path.join(FINETUNE, "faster_rcnn_R_50_C4_1x_montage.yaml"))
    keys = backbone_keys(build_model(cfg))
    assert any(k.startswith("roi_heads.res5.") for k in keys)
    assert any(k.startswith("backbone.res4.") for k in keys)
    assert len(keys) == 265

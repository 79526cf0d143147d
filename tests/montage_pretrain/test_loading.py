"""Checked loading: weights checked before the build; every backbone tensor from the file."""
import os
import pickle

import pytest

from detectron2.modeling import build_model
from finetune_helpers import FINETUNE, TOY, TOY_GN, finetune_cfg
from montage_pretrain import export_format
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
    monkeypatch.setattr(export_format, "load_weight_pickle", no_unpickling)  # the safe reader
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


def test_gn_export_loads_every_tensor_into_gn_detector(gn_export_path):
    """GN export -> GN detector (backbone and FPN GN): every backbone tensor from the file."""
    cfg = finetune_cfg(TOY_GN, "MODEL.WEIGHTS", gn_export_path)
    export = read_checked_weights(cfg)
    assert export.settings["MODEL.RESNETS.NORM"] == "GN"
    model = build_model(cfg)
    assert type(model.backbone.bottom_up.res2[0].conv1.norm).__name__ == "GroupNorm"
    summary = load_and_verify(model, export)
    # R-18 with GN: 20 convs x (weight + norm weight + norm bias), no running statistics
    assert summary["loaded"] == summary["total"] == 60 and not summary["not_loaded"]
    state = model.backbone.bottom_up.state_dict()
    for name, value in export.weights.items():
        assert (state[name].numpy() == value).all(), name


@pytest.mark.parametrize("config,weights,want,have", [
    (TOY_GN, "bn", "BN", "GN"),          # BN export into a GN detector
    (TOY, "gn", "GN", "BN"),             # GN export into a trainable-BN detector
    (os.path.join(FINETUNE, "faster_rcnn_R_50_FPN_1x_montage.yaml"), "gn", "GN", "FrozenBN"),
])
def test_norm_mismatch_is_one_line_naming_both(config, weights, want, have, export_path,
                                               gn_export_path):
    path = {"bn": export_path, "gn": gn_export_path}[weights]
    opts = ["MODEL.WEIGHTS", path]
    if "R_50" in config:  # the R-18 export's shape, so that only the norm differs
        opts += ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    with pytest.raises(ValueError) as e:
        read_checked_weights(finetune_cfg(config, *opts))
    msg = str(e.value)
    assert "\n" not in msg and path in msg
    assert f"MODEL.RESNETS.NORM is {have!r} in the config but the export was pre-trained " \
           f"with {want!r}" in msg
    # the fix names the norm only (the other settings match), and the matching configs
    fix = msg.split("Fix: ")[1]
    assert "MODEL.PIXEL_MEAN" not in fix and "DEPTH" not in fix
    assert ("MODEL.RESNETS.NORM GN" in fix) == (want == "GN")
    assert ("_montage_gn.yaml" in fix) == (want == "GN")

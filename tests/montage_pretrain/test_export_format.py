"""The export's settings contract: reading a .pkl once, settings -> overrides, the config check."""
import os
import pickle

import numpy as np
import pytest

from finetune_helpers import TOY, finetune_cfg
from montage_pretrain.config import merge_config_file
from montage_pretrain.export_format import (
    SETTING_KEYS,
    check_export_settings,
    format_opts,
    read_export,
    settings_to_overrides,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_pickle(path, data):
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


# --- reading ---------------------------------------------------------------------------------
def test_read_export_weights_and_settings(export_path):
    export = read_export(export_path)
    assert export.path == export_path
    assert export.checkpoint["__author__"] == "MontagePretrain"
    assert export.checkpoint["matching_heuristics"] is True
    assert len(export.weights) == 100 and "res5.1.conv2.weight" in export.weights
    assert export.settings["iteration"] == 5
    assert set(SETTING_KEYS) <= set(export.settings)


def test_read_export_other_files_have_no_settings(tmp_path):
    path = write_pickle(tmp_path / "torchvision.pkl",
                        {"model": {"stem.conv1.weight": np.ones(1)}, "__author__": "torchvision",
                         "matching_heuristics": True})
    export = read_export(path)
    assert export.settings is None and list(export.weights) == ["stem.conv1.weight"]


def test_read_export_caffe2_blobs_as_detectron2_reads_them(tmp_path):
    path = write_pickle(tmp_path / "c2.pkl",
                        {"blobs": {"conv1_w": np.ones(1), "conv1_w_momentum": np.ones(2)}})
    export = read_export(path)
    assert list(export.weights) == ["conv1_w"]  # momentum blobs dropped
    assert export.checkpoint["__author__"] == "Caffe2" and export.checkpoint["matching_heuristics"]
    assert export.settings is None


def test_read_export_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match=r"\.pkl"):
        read_export(str(tmp_path / "model_final.pth"))
    with pytest.raises(ValueError, match="not a dict"):
        read_export(write_pickle(tmp_path / "list.pkl", [1, 2]))


# --- settings -> overrides -------------------------------------------------------------------
def test_overrides_freeze_bn_and_keep_gn():
    settings = {"MODEL.RESNETS.NORM": "SyncBN", "INPUT.FORMAT": "RGB",
                "MODEL.BACKBONE.NAME": "build_resnet_backbone"}
    overrides = settings_to_overrides(settings, "w.pkl")
    assert overrides == {"INPUT.FORMAT": "RGB", "MODEL.RESNETS.NORM": "FrozenBN",
                         "MODEL.WEIGHTS": "w.pkl"}
    assert settings_to_overrides({"MODEL.RESNETS.NORM": "GN"})["MODEL.RESNETS.NORM"] == "GN"
    assert format_opts({"MODEL.PIXEL_STD": (1.0, 2.0), "INPUT.FORMAT": "RGB"}) == (
        "MODEL.PIXEL_STD '[1.0, 2.0]' INPUT.FORMAT RGB"
    )


# --- the config check ------------------------------------------------------------------------
def test_settings_match(export_path):
    settings = check_export_settings(finetune_cfg(), read_export(export_path))
    assert settings["iteration"] == 5


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]"], "MODEL.PIXEL_MEAN"),
        (["MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"], "MODEL.PIXEL_STD"),
        (["INPUT.FORMAT", "BGR"], "INPUT.FORMAT"),
        (["MODEL.RESNETS.STRIDE_IN_1X1", "True"], "MODEL.RESNETS.STRIDE_IN_1X1"),
        (["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"],
         "MODEL.RESNETS.DEPTH"),
        (["MODEL.RESNETS.NORM", "GN"], "MODEL.RESNETS.NORM"),
    ],
)
def test_settings_mismatch_is_one_clear_line(export_path, opts, key):
    with pytest.raises(ValueError) as err:
        check_export_settings(finetune_cfg(TOY, *opts), read_export(export_path))
    msg = str(err.value)
    assert "\n" not in msg
    assert key in msg and "in the config but" in msg
    assert f"--weights-config {export_path}.yaml" in msg  # the fix
    if key == "MODEL.PIXEL_MEAN":
        assert "[103.53, 116.28, 123.675]" in msg and "[123.675, 116.28, 103.53]" in msg


def test_other_files_are_not_checked(tmp_path):
    path = write_pickle(tmp_path / "torchvision.pkl",
                        {"model": {"stem.conv1.weight": np.ones(1)}, "__author__": "torchvision",
                         "matching_heuristics": True})
    assert check_export_settings(finetune_cfg(), read_export(path)) is None


def test_weights_config_fixes_a_stock_config(export_path):
    """The export's .yaml sidecar makes a stock BGR/MSRA-style config match."""
    cfg = finetune_cfg(
        TOY, "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]",
        "INPUT.FORMAT", "BGR", "MODEL.RESNETS.STRIDE_IN_1X1", "True",
    )
    merge_config_file(cfg, export_path + ".yaml")
    assert check_export_settings(cfg, read_export(export_path)) is not None
    assert cfg.MODEL.WEIGHTS == os.path.abspath(export_path)

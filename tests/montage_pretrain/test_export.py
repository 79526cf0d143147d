"""The backbone export loads, tensor for tensor, into the stock C4, FPN and Mask R-CNN detectors."""
import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model, build_resnet_backbone
from montage_pretrain.config import add_montage_config, merge_config_file
from montage_pretrain.export import convert_state_dict, export_backbone, main
from montage_pretrain.export_format import (
    FORMAT_VERSION,
    default_export_name,
    read_export,
    settings_to_overrides,
)

FINETUNE = os.path.join(
    os.path.dirname(__file__), "..", "..", "projects", "MontagePretrain", "configs", "finetune"
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def pretrain_cfg(depth=50):
    """A pre-training-like config: plain BN ResNet, torchvision-style RGB input."""
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    return cfg


class PretrainModel(nn.Module):
    """Stand-in for MontageClassifier: ``backbone`` + a dense head + an ERF buffer."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        channels = self.backbone.output_shape()["res5"].channels
        self.head = nn.Conv2d(channels, 5, 1)
        self.register_buffer("erf_weights", torch.rand(4, 7, 7))


def randomise_(module):
    """Sets every weight and BN statistic of ``module`` to random values (in place)."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(17)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            else:
                t.normal_(0.0, 0.1)
    return module


def randomised_model(depth=50, seed=0):
    """A pre-training model whose every backbone weight and BN statistic is random."""
    torch.manual_seed(seed)
    model = PretrainModel(pretrain_cfg(depth))
    randomise_(model.backbone)
    return model


def detector(config, **overrides):
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, os.path.join(FINETUNE, config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return build_model(cfg)


def export_name(detector_key):
    """Name in the export of a detector backbone tensor."""
    for prefix in ("backbone.bottom_up.", "backbone.", "roi_heads."):
        if detector_key.startswith(prefix):
            return detector_key[len(prefix):]
    raise AssertionError(detector_key)


def check_loaded(model, path, expected_prefixes):
    """Loads ``path`` the stock way and checks every backbone tensor changed to the file's."""
    with open(path, "rb") as f:
        exported = pickle.load(f)["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    DetectionCheckpointer(model).load(path)
    after = model.state_dict()
    keys = [k for k in after if k.startswith(expected_prefixes)
            and not k.endswith("num_batches_tracked")]
    assert keys
    for k in keys:
        name = export_name(k)
        assert name in exported, f"{k}: no {name} in the export"
        assert not torch.equal(before[k], after[k]), f"{k} kept its init value"
        np.testing.assert_array_equal(after[k].numpy(), exported[name], err_msg=k)
    return keys


@pytest.fixture(scope="module")
def r50_export(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / default_export_name())
    model = randomised_model(50)
    summary = export_backbone(model, pretrain_cfg(50), path, iteration=123)
    return path, summary, model


def test_convert_state_dict_keeps_backbone_and_bn_stats():
    model = randomised_model(18)
    weights, dropped = convert_state_dict(model.state_dict())
    assert "stem.conv1.weight" in weights and "res5.1.conv2.weight" in weights
    assert "stem.conv1.norm.running_mean" in weights and "res2.0.conv1.norm.running_var" in weights
    assert not any(k.endswith("num_batches_tracked") for k in weights)
    assert not any(k.startswith(("backbone.", "head.")) for k in weights)
    assert {"head.weight", "head.bias", "erf_weights"} <= set(dropped)
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    sd = model.backbone.state_dict()
    np.testing.assert_array_equal(weights["res3.0.shortcut.weight"], sd["res3.0.shortcut.weight"])


def test_convert_state_dict_fpn_and_ddp_prefixes():
    sd = {
        "module.backbone.bottom_up.stem.conv1.weight": torch.ones(2),
        "module.backbone.fpn_lateral2.weight": torch.ones(2),
        "module.head.weight": torch.ones(2),
        "module.backbone.bottom_up.res2.0.conv1.norm.num_batches_tracked": torch.tensor(3),
        "module.backbone.bottom_up.res2.0.conv1.norm.weight": torch.ones(2, dtype=torch.bfloat16),
    }
    weights, dropped = convert_state_dict(sd)
    assert list(weights) == ["stem.conv1.weight", "res2.0.conv1.norm.weight"]
    assert weights["res2.0.conv1.norm.weight"].dtype == np.float32
    assert "module.backbone.fpn_lateral2.weight" in dropped


def test_convert_state_dict_without_backbone_fails():
    with pytest.raises(ValueError, match="backbone"):
        convert_state_dict({"head.weight": torch.ones(1)})


def test_export_file_format(r50_export):
    path, summary, _ = r50_export
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "MontagePretrain" and data["matching_heuristics"] is True
    settings = data["montage"]
    assert settings["format_version"] == FORMAT_VERSION
    assert read_export(path).settings == settings  # what fine-tuning reads back
    assert settings["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert settings["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert settings["INPUT.FORMAT"] == "RGB"
    assert settings["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert settings["MODEL.RESNETS.DEPTH"] == 50 and settings["MODEL.RESNETS.NORM"] == "BN"
    assert settings["MODEL.BACKBONE.NAME"] == "build_resnet_backbone"
    assert settings["iteration"] == 123
    assert summary["num_tensors"] == len(data["model"]) == 265  # 53 convs x 5
    # No temporary files left next to the export.
    assert sorted(os.listdir(os.path.dirname(path))) == [
        default_export_name(), default_export_name() + ".yaml"
    ]


def test_export_yaml_overrides(r50_export):
    path, _, _ = r50_export
    with open(path + ".yaml") as f:
        overrides = yaml.safe_load(f)
    assert overrides["MODEL"]["RESNETS"]["NORM"] == "FrozenBN"
    assert overrides["MODEL"]["WEIGHTS"] == os.path.abspath(path)
    # The sidecar holds exactly the overrides derived from the settings in the .pkl.
    expected = settings_to_overrides(read_export(path).settings, os.path.abspath(path))
    for key, value in expected.items():
        node = overrides
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, path + ".yaml")
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]


@pytest.mark.parametrize(
    "config,prefixes",
    [
        ("faster_rcnn_R_50_C4_1x_montage.yaml", ("backbone.", "roi_heads.res5.")),
        ("faster_rcnn_R_50_FPN_1x_montage.yaml", ("backbone.bottom_up.",)),
        ("mask_rcnn_R_50_FPN_1x_montage.yaml", ("backbone.bottom_up.",)),
    ],
)
def test_export_loads_into_stock_detectors(r50_export, config, prefixes):
    path, _, _ = r50_export
    model = detector(config)
    keys = check_loaded(model, path, prefixes)
    # Every exported tensor found its place: 265 = stem + res2..res5 (res5 in the ROI head for C4).
    assert len(keys) == 265
    if "C4" in config:
        assert any(k.startswith("roi_heads.res5.") for k in keys)


def test_r18_export_loads_into_fpn(tmp_path):
    path = str(tmp_path / "r18.pkl")
    summary = export_backbone(randomised_model(18, seed=1), pretrain_cfg(18), path)
    assert summary["settings"]["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64
    model = detector(
        "demo/faster_rcnn_R_18_FPN_toy.yaml", **{"MODEL.ROI_HEADS.NUM_CLASSES": 3}
    )
    keys = check_loaded(model, path, ("backbone.bottom_up.",))
    assert len(keys) == summary["num_tensors"] == 100  # 20 convs x 5


def test_cli_from_trainer_checkpoint(tmp_path):
    model = randomised_model(18, seed=2)
    cfg = pretrain_cfg(18)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 399, "trainer": {"iteration": 399}},
               ckpt)
    out = tmp_path / "out" / default_export_name()
    summary = main(["--config-file", str(config_file), "--checkpoint", str(ckpt),
                    "--out", str(out), "--weight-scale", "trained"])
    assert summary["settings"]["iteration"] == 399
    assert summary["settings"]["weight_scale"] == "trained"
    with open(out, "rb") as f:
        data = pickle.load(f)
    np.testing.assert_array_equal(
        data["model"]["res4.1.conv2.weight"],
        model.backbone.state_dict()["res4.1.conv2.weight"].numpy(),
    )
    assert os.path.isfile(str(out) + ".yaml")


def test_regnet_export_loads_into_regnet_fpn(tmp_path):
    """Any registered backbone hands over: RegNetX-400MF (montage_pretrain/backbones.py)."""
    from montage_pretrain import backbones  # noqa: F401  (registers the RegNet builders)

    cfg = pretrain_cfg(50)
    cfg.MODEL.BACKBONE.NAME = "build_montage_regnet_backbone"
    cfg.MONTAGE.REGNET = "RegNetX-400MF"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["s4"]
    model = nn.Module()
    model.backbone = randomise_(build_backbone(cfg))
    path = str(tmp_path / "regnet.pkl")
    summary = export_backbone(model, cfg, path)
    assert summary["settings"]["MONTAGE.REGNET"] == "RegNetX-400MF"
    det = detector(
        "faster_rcnn_R_50_FPN_1x_montage.yaml",
        **{
            "MODEL.BACKBONE.NAME": "build_montage_regnet_fpn_backbone",
            "MODEL.RESNETS.OUT_FEATURES": ["s1", "s2", "s3", "s4"],
            "MODEL.FPN.IN_FEATURES": ["s1", "s2", "s3", "s4"],
            "MONTAGE.REGNET": "RegNetX-400MF",
        },
    )
    keys = check_loaded(det, path, ("backbone.bottom_up.",))
    assert len(keys) == summary["num_tensors"]

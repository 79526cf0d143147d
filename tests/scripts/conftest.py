"""Fixtures shared by the script tests."""
import os

import pytest
import torch
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="session")
def load_script(load_module):
    """``load_script("compare")`` imports scripts/compare.py as a module (once per session)."""
    return lambda name: load_module(f"scripts/{name}.py")


@pytest.fixture(scope="session")
def r18_export(tmp_path_factory):
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone
    from montage_pretrain.config import add_montage_config
    from montage_pretrain.export import export_backbone

    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.merge_from_list([
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.RESNETS.NORM", "BN", "MODEL.RESNETS.STRIDE_IN_1X1", "False",
        "MODEL.BACKBONE.FREEZE_AT", "0", "INPUT.FORMAT", "RGB",
        "MODEL.RESNETS.OUT_FEATURES", '["res5"]',  # the stock default ["res4"] prunes res5
        "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
        "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]",
    ])
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    path = str(tmp_path_factory.mktemp("export") / "montage_backbone.pkl")
    export_backbone(model, cfg, path, iteration=0)
    return path

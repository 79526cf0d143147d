"""
RegNet backbones for yacs configs.

Detectron2 ships RegNet (:paper:`dds`) only for LazyConfig; these registered builders make it
selectable with ``MODEL.BACKBONE.NAME`` in both the pre-training config and the fine-tuning
configs (plain, or with FPN on top), so a RegNet pre-trained by Montage hands over like ResNet.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.regnet import RegNet, ResBottleneckBlock, SimpleStem

__all__ = ["REGNET_PRESETS", "build_montage_regnet_backbone", "build_montage_regnet_fpn_backbone"]

# Parameters of the pycls model zoo (as in detectron2/configs/COCO-Detection/*regnet*).
REGNET_PRESETS = {
    "RegNetX-4GF": dict(depth=23, w_a=38.65, w_0=96, w_m=2.43, group_width=40),
    "RegNetY-4GF": dict(depth=22, w_a=31.41, w_0=96, w_m=2.24, group_width=64, se_ratio=0.25),
    "RegNetX-400MF": dict(depth=22, w_a=24.48, w_0=24, w_m=2.54, group_width=16),
}


@BACKBONE_REGISTRY.register()
def build_montage_regnet_backbone(cfg, input_shape: ShapeSpec):
    """RegNet ``cfg.MONTAGE.REGNET`` with outputs ``MODEL.RESNETS.OUT_FEATURES`` (s1..s4)."""
    name = cfg.MONTAGE.REGNET
    if name not in REGNET_PRESETS:
        raise ValueError(f"MONTAGE.REGNET={name!r}: use one of {sorted(REGNET_PRESETS)}")
    out = [f for f in cfg.MODEL.RESNETS.OUT_FEATURES if f.startswith("s")] or ["s4"]
    return RegNet(
        stem_class=SimpleStem,
        stem_width=32,
        block_class=ResBottleneckBlock,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        norm=cfg.MODEL.RESNETS.NORM,
        out_features=out,
        **REGNET_PRESETS[name],
    )


@BACKBONE_REGISTRY.register()
def build_montage_regnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN (``MODEL.FPN.*``) on :func:`build_montage_regnet_backbone` for fine-tuning."""
    bottom_up = build_montage_regnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

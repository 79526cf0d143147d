"""Feature-collapse diagnostics: the participation ratio and its per-stage use on a backbone."""
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_resnet_backbone

from montage_pretrain.diagnostics import participation_ratio, stage_participation_ratios


def test_identical_channels_have_ratio_one():
    base = torch.randn(4, 1, 6, 6)
    scales = torch.linspace(0.5, 3.0, 16).view(1, 16, 1, 1)
    assert participation_ratio(base * scales) == pytest.approx(1.0, abs=1e-6)


def test_independent_equal_variance_channels_have_ratio_near_c():
    torch.manual_seed(0)
    x = torch.randn(64, 8, 16, 16)  # 16384 samples of 8 independent unit-variance channels
    assert participation_ratio(x) == pytest.approx(8.0, rel=0.02)


def test_two_equal_directions_give_two():
    torch.manual_seed(0)
    a, b = torch.randn(2, 32, 1, 8, 8)
    x = torch.cat([a * s for s in (1, 2, 3)] + [b * s for s in (1, 2, 3)], dim=1)
    assert participation_ratio(x) == pytest.approx(2.0, rel=0.02)


def test_constant_features_give_zero():
    assert participation_ratio(torch.ones(2, 5, 3, 3)) == 0.0


def _r18():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0",
                         "MODEL.RESNETS.OUT_FEATURES", '["res2", "res3", "res4", "res5"]'])
    torch.manual_seed(0)
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_stage_ratios_separate_random_from_collapsed_backbone():
    backbone = _r18().eval()
    images = torch.randn(2, 3, 96, 96)
    healthy = stage_participation_ratios(backbone, images)
    assert list(healthy) == ["res2", "res3", "res4", "res5"]
    assert not backbone.training  # the caller's mode is restored
    assert all(v > 4 for v in healthy.values()), healthy
    # Collapse: every output channel of every conv becomes the same filter.
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(m.weight[:1].expand_as(m.weight))
    collapsed = stage_participation_ratios(backbone, images)
    assert all(v < 1.01 for v in collapsed.values()), collapsed


def test_last_feature_health_reads_the_coarsest_output_and_leaves_bn_statistics_alone():
    from montage_pretrain.diagnostics import last_feature_health

    backbone = _r18().eval()
    images = torch.randn(2, 3, 96, 96)
    before = {k: v.clone() for k, v in backbone.named_buffers()}
    healthy = last_feature_health(backbone, images)
    assert not backbone.training
    assert all(torch.equal(v, before[k]) for k, v in backbone.named_buffers())  # restored
    assert healthy["dead"] == 0.0 and healthy["pr"] > 4
    # A negative shift in res5's last BN (what a hot pre-training did): its block's ReLU then
    # zeroes every channel everywhere, and nothing varies.
    with torch.no_grad():
        backbone.res5[-1].conv2.norm.bias.fill_(-100.0)
    collapsed = last_feature_health(backbone, images)
    assert collapsed == {"pr": 0.0, "dead": 1.0}
    # Only res5 changed: the coarsest output is the one measured.
    assert stage_participation_ratios(backbone, images)["res4"] > 4

"""The init-scale rescale of an export: same outputs under BN and FrozenBN, init filter norms."""
import numpy as np
import pytest
import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
import fvcore.nn.weight_init as weight_init
from detectron2.modeling import build_resnet_backbone
from montage_pretrain.export import rescale_export
from montage_pretrain.export_format import read_export
from montage_pretrain.weight_scale import (
    bn_conv_prefixes,
    filter_norms,
    init_filter_norm,
    reset_to_init_scale,
    stage_of,
    stage_scale_summary,
)

from tests.conftest import _r18_pretrain_cfg


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def backbone(norm="BN", seed=0):
    torch.manual_seed(seed)
    return build_resnet_backbone(_r18_pretrain_cfg(norm), ShapeSpec(channels=3))


def inflated_weights(seed=0):
    """An R-18 whose conv filters were blown up 1-20x (as a hot pre-training does), with BN
    statistics that fit those scales; returns the bare-name numpy weights."""
    net = backbone(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.Conv2d) and getattr(m, "norm", None) is not None:
                s = torch.empty(m.weight.shape[0]).uniform_(1.0, 20.0, generator=g)
                m.weight.mul_(s.view(-1, 1, 1, 1))
                m.norm.running_mean.normal_(0.0, 1.0, generator=g).mul_(s)
                m.norm.running_var.uniform_(0.5, 2.0, generator=g).mul_(s ** 2)
                m.norm.weight.uniform_(0.5, 1.5, generator=g)
                m.norm.bias.normal_(0.0, 0.2, generator=g)
    return {k: v.numpy().copy() for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def load(weights, frozen):
    net = backbone(seed=1)
    if frozen:
        net = FrozenBatchNorm2d.convert_frozen_batchnorm(net)
    state = net.state_dict()
    net.load_state_dict({k: torch.as_tensor(weights[k]) if k in weights else v
                         for k, v in state.items()})
    return net


def test_init_filter_norm_is_the_norm_of_detectron2_init():
    for shape in [(64, 3, 7, 7), (128, 64, 3, 3), (512, 256, 1, 1), (256, 512, 3, 3)]:
        w = torch.empty(shape)
        conv = nn.Conv2d(shape[1], shape[0], shape[2])
        conv.weight = nn.Parameter(w)
        weight_init.c2_msra_fill(conv)
        got = filter_norms(conv.weight.detach().numpy()).mean()
        assert got == pytest.approx(init_filter_norm(shape), rel=0.05)


def test_every_resnet_conv_is_found_with_its_bn():
    weights = inflated_weights()
    prefixes = bn_conv_prefixes(weights)
    convs = [k for k, v in weights.items() if k.endswith(".weight") and v.ndim == 4]
    assert len(prefixes) == len(convs) == 20  # stem + 8 blocks x 2 + 3 shortcuts
    assert stage_of("res3.1.conv2") == "res3"
    assert stage_of("backbone.bottom_up.stem.conv1.weight") == "stem"
    assert stage_of("backbone.fpn_lateral2.weight") is None


@pytest.mark.parametrize("frozen", [False, True])
def test_rescale_keeps_the_outputs(frozen):
    weights = inflated_weights()
    rescaled, summary = reset_to_init_scale(weights)
    assert summary["convs"] == 20 and summary["scale_max"] < 1.2
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    a, b = load(weights, frozen), load(rescaled, frozen)
    a.train(not frozen)
    b.train(not frozen)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    for k in out_a:
        # train-mode BN: eps is not scaled (1e-5 against batch variances of a few 3x3 maps)
        assert torch.allclose(out_a[k], out_b[k], rtol=1e-3, atol=1e-3), k
    # and the filters now have the init norm
    for p in bn_conv_prefixes(rescaled):
        w = rescaled[f"{p}.weight"]
        np.testing.assert_allclose(filter_norms(w), init_filter_norm(w.shape), rtol=1e-5)


def test_the_running_statistics_are_needed_for_frozen_bn():
    """Scaling the convs without their statistics would change a FrozenBN detector: the test
    above can fail."""
    weights = inflated_weights()
    rescaled, _ = reset_to_init_scale(weights)
    stale = {k: (weights[k] if "running" in k else v) for k, v in rescaled.items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = load(weights, True).eval()(x), load(stale, True).eval()(x)
    assert not torch.allclose(a["res5"], b["res5"], rtol=1e-2, atol=1e-2)


def test_summary_measures_inflation_and_effective_step():
    net = backbone()
    weights = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    base = stage_scale_summary(weights)
    assert base["res4"]["norm_ratio"] == pytest.approx(1.0, abs=0.05)
    for k in list(weights):
        if k.startswith("stem.conv1.weight"):
            weights[k] = weights[k] * 4.0
    inflated = stage_scale_summary(weights)
    assert inflated["stem"]["norm_ratio"] == pytest.approx(4.0 * base["stem"]["norm_ratio"])
    assert inflated["stem"]["effective_step"] == pytest.approx(
        base["stem"]["effective_step"] / 16.0, rel=1e-6)
    assert inflated["res2"] == base["res2"]


def test_rescale_export_writes_an_export_that_loads(export_path, tmp_path):
    dst = str(tmp_path / "init.pkl")
    summary = rescale_export(export_path, dst)
    src, out = read_export(export_path), read_export(dst)
    assert summary["convs"] == 20
    assert out.settings["weight_scale"] == "init"
    assert set(out.weights) == set(src.weights)
    w = out.weights["res3.0.conv1.weight"]
    np.testing.assert_allclose(filter_norms(w), init_filter_norm(w.shape), rtol=1e-5)
    assert (tmp_path / "init.pkl.yaml").is_file()


def test_export_is_at_init_scale_by_default_and_as_trained_on_request(tmp_path):
    from montage_pretrain.export import export_backbone

    from tests.conftest import _r18_pretrain_cfg as cfg_of

    model = nn.Module()
    model.backbone = backbone()
    with torch.no_grad():
        model.backbone.stem.conv1.weight.mul_(9.0)
        model.backbone.stem.conv1.norm.running_var.mul_(81.0)
    cfg = cfg_of("BN")
    default = read_export(export_backbone(model, cfg, str(tmp_path / "a.pkl"))["path"])
    assert default.settings["weight_scale"] == "init"
    w = default.weights["stem.conv1.weight"]
    np.testing.assert_allclose(filter_norms(w), init_filter_norm(w.shape), rtol=1e-5)
    cfg.MONTAGE.EXPORT_WEIGHT_SCALE = "trained"
    trained = read_export(export_backbone(model, cfg, str(tmp_path / "b.pkl"))["path"])
    assert trained.settings["weight_scale"] == "trained"
    np.testing.assert_array_equal(trained.weights["stem.conv1.weight"],
                                  model.backbone.stem.conv1.weight.detach().numpy())

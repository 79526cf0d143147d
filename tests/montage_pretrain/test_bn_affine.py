"""Dead units of a backbone, and the norm-affine reset that revives them (bn_affine.py)."""
import numpy as np
import pytest
import torch

from montage_pretrain.bn_affine import (
    affine_norm_prefixes,
    dead_channel_fractions,
    reset_bn_affine,
)

from tests.montage_pretrain.test_weight_scale import backbone


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def numpy_weights(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def load(net, weights):
    state = net.state_dict()
    net.load_state_dict({k: torch.as_tensor(weights[k]) if k in weights else v
                         for k, v in state.items()})
    return net


def images(seed=0):
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def killed_res5():
    """An R-18 whose last block's output is dead on every input, as after a hot pre-training:
    the last BN of res5.1 with a small gamma and a shift far below zero."""
    net = backbone()
    with torch.no_grad():
        net.res5[1].conv2.norm.weight.fill_(0.3)
        net.res5[1].conv2.norm.bias.fill_(-50.0)
    return net


def test_prefixes_are_the_backbone_norms_only():
    w = numpy_weights(backbone())
    w["fpn_lateral2.norm.weight"], w["fpn_lateral2.norm.bias"] = np.ones(4), np.zeros(4)
    prefixes = affine_norm_prefixes(w)
    assert "stem.conv1.norm" in prefixes and "res5.1.conv2.norm" in prefixes
    assert "res3.0.shortcut.norm" in prefixes
    assert not any(p.startswith("fpn") for p in prefixes)
    assert len(prefixes) == 20  # stem, 2 x 2 per stage, 3 projection shortcuts


def test_reset_sets_gamma_one_beta_zero_and_keeps_the_rest():
    w = numpy_weights(killed_res5())
    w["res2.0.conv1.norm.bias"] = w["res2.0.conv1.norm.bias"] + 0.5
    new, summary = reset_bn_affine(w)
    for p in affine_norm_prefixes(w):
        assert np.array_equal(new[f"{p}.weight"], np.ones_like(w[f"{p}.weight"]))
        assert np.array_equal(new[f"{p}.bias"], np.zeros_like(w[f"{p}.bias"]))
        assert new[f"{p}.weight"].dtype == w[f"{p}.weight"].dtype
    for k in w:  # conv filters and running statistics untouched; the input not modified
        if not k.endswith(("norm.weight", "norm.bias")):
            assert new[k] is w[k]
    assert w["res5.1.conv2.norm.bias"][0] == -50.0
    assert summary["norms"] == 20
    n5 = w["res5.1.conv2.norm.bias"].size
    total = sum(w[f"{p}.bias"].size for p in affine_norm_prefixes(w))
    expected_beta = (50.0 * n5 + 0.5 * w["res2.0.conv1.norm.bias"].size) / total
    assert summary["beta_dev"] == pytest.approx(expected_beta, rel=1e-5)
    assert summary["gamma_dev"] == pytest.approx(0.7 * n5 / total, rel=1e-5)


def test_a_killed_stage_is_measured_dead_and_the_reset_revives_it():
    net = killed_res5()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dead = dead_channel_fractions(net, images())
    assert sorted(dead) == ["res2.0", "res2.1", "res3.0", "res3.1", "res4.0", "res4.1",
                            "res5.0", "res5.1"]
    assert dead["res5.1"] == 1.0
    assert dead["res4.1"] == 0.0 and dead["res5.0"] == 0.0
    # measuring leaves the running statistics (and the mode) as they were
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training
    revived = load(backbone(seed=1), reset_bn_affine(numpy_weights(net))[0])
    assert dead_channel_fractions(revived, images())["res5.1"] == 0.0


def test_reset_is_nearly_a_no_op_on_an_untrained_net():
    """What a gentle pre-training leaves (gamma ~1, beta ~0): the outputs barely move."""
    net = backbone()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(1e-3)
                m.bias.sub_(1e-3)
    net.eval()
    revived = load(backbone(seed=1), reset_bn_affine(numpy_weights(net))[0]).eval()
    x = images(1)
    with torch.no_grad():
        a, b = net(x)["res5"], revived(x)["res5"]
    assert (a - b).abs().max() / a.abs().max() < 0.05

import pytest
import torch
from torch import nn

from montage_pretrain.erf import compute_erf_maps, erf_region_weights, erf_weight_map
from montage_pretrain.losses import blockwise_weights
from montage_pretrain.montage import MontageTemplate

pytestmark = pytest.mark.usefixtures("few_threads")


def _tiny_net(seed=0):
    """Stride-4 conv net (16x16 input -> 4x4 features) with BN, in eval mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1),
    )
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _setup(size=32, split=0.3, stride=8, seed=0):
    t = MontageTemplate(size, split)
    fh = t.feature_size(stride)
    rmap = t.region_map(fh, fh, stride)
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(fh * fh, size, size, generator=g) ** 4  # uneven, positive
    return t, rmap, maps


def test_weights_sum_to_one_and_clamp():
    t, rmap, maps = _setup()
    for tau in (0.0, 0.5, 0.7, 0.9):
        w = erf_region_weights(maps, t.region_masks(), rmap.flatten(), tau)
        assert w.shape == (rmap.numel(), 4) and w.dtype == torch.float32
        assert torch.allclose(w.sum(1), torch.ones(len(w)), atol=1e-6)
        own = w.gather(1, rmap.flatten()[:, None]).squeeze(1)
        assert (own >= tau - 1e-6).all()
        assert (w >= 0).all()


def test_tau_one_is_blockwise_exactly():
    t, rmap, maps = _setup()
    w = erf_region_weights(maps, t.region_masks(), rmap.flatten(), 1.0)
    wm = erf_weight_map(w, *rmap.shape)
    assert wm.shape == (4,) + tuple(rmap.shape)
    assert torch.equal(wm, blockwise_weights(rmap))


def test_tau_zero_gives_erf_shares_and_proportions():
    t, rmap, maps = _setup()
    masks = t.region_masks()
    share = torch.einsum("phw,ihw->pi", maps.double(), masks.double())
    share = share / share.sum(1, keepdim=True)
    w0 = erf_region_weights(maps, masks, rmap.flatten(), 0.0)
    assert torch.allclose(w0.double(), share, atol=1e-6)
    # with tau = 0.9 the other regions keep their mutual proportions
    w = erf_region_weights(maps, masks, rmap.flatten(), 0.9).double()
    for p, r in enumerate(rmap.flatten().tolist()):
        others = [i for i in range(4) if i != r]
        ratio = w[p, others] / share[p, others]
        assert torch.allclose(ratio, ratio[0].expand(3), rtol=1e-5)


def test_hand_example_and_degenerate_cases():
    masks = torch.zeros(4, 2, 2)
    masks[0, 0, 0] = masks[1, 0, 1] = masks[2, 1, 0] = masks[3, 1, 1] = 1
    maps = torch.tensor([
        [[6.0, 2.0], [1.0, 1.0]],   # own 0: shares .6 .2 .1 .1
        [[0.0, 5.0], [0.0, 0.0]],   # own 1: no mass elsewhere -> others split equally
        [[0.0, 0.0], [0.0, 0.0]],   # own 2: dead position -> own region only
    ])
    w = erf_region_weights(maps, masks, torch.tensor([0, 1, 2]), 0.7)
    assert w[0].tolist() == pytest.approx([0.7, 0.15, 0.075, 0.075])
    assert w[1].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    assert w[2].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0])
    w = erf_region_weights(maps, masks, torch.tensor([1, 0, 2]), 0.7)
    # own 1 has share .2 -> 0.7; others .6 .1 .1 scaled to 0.3
    assert w[0].tolist() == pytest.approx([0.225, 0.7, 0.0375, 0.0375])
    # own 0 has share 0 -> 0.7; all the other mass is in region 1, which gets 0.3
    assert w[1].tolist() == pytest.approx([0.7, 0.3, 0.0, 0.0])


def _brute_force(net, images):
    out_hw = net(images[:1]).shape[-2:]
    P = out_hw[0] * out_hw[1]
    maps = torch.zeros(P, *images.shape[-2:])
    for n in range(images.shape[0]):
        for p in range(P):
            x = images[n : n + 1].clone().requires_grad_(True)
            y = net(x).sum(1).flatten()[p]
            (g,) = torch.autograd.grad(y, x)
            maps[p] += g.abs().sum((0, 1))
    return maps / images.shape[0]


def test_erf_matches_brute_force_and_is_local():
    net = _tiny_net()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = compute_erf_maps(net, images, chunk=5)  # 3 * 16 copies: chunks do not divide it
    assert maps.shape == (16, 16, 16)
    assert torch.allclose(maps, _brute_force(net, images), rtol=1e-4, atol=1e-6)
    # no parameter gradients left behind, the input untouched
    assert all(p.grad is None for p in net.parameters())
    assert not images.requires_grad
    # the ERF of position (0, 0) lies in the top-left quadrant
    g = maps[0]
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    cy, cx = (g * yy).sum() / g.sum(), (g * xx).sum() / g.sum()
    assert cy < 8 and cx < 8
    assert g[8:, :].sum() == 0 and g[:, 8:].sum() == 0  # receptive field of 11 pixels


def test_erf_module_requires_grad_restored():
    net = _tiny_net(1)
    net[0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    images = torch.randn(2, 3, 16, 16)
    maps = compute_erf_maps(net, images, chunk=64, module=net)
    assert torch.allclose(maps, compute_erf_maps(net, images, chunk=7), rtol=1e-5, atol=1e-7)
    assert not net[0].weight.requires_grad
    assert all(p.requires_grad for n, p in net.named_parameters() if n != "0.weight")
    assert all(p.grad is None for p in net.parameters())


def test_erf_under_no_grad_context():
    net = _tiny_net(2)
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        maps = compute_erf_maps(net, images, chunk=16)
    assert maps.sum() > 0

"""
Effective receptive fields (ERF, Luo et al. 2016) of feature positions, and the ERF-adaptive
label weights of Eq. 2 (Sec. 3.3).
"""
import torch
from torch.nn import functional as F

__all__ = ["compute_erf_maps", "erf_region_weights", "erf_weight_map"]


def compute_erf_maps(feature_fn, images, chunk=64, module=None):
    """
    ERF maps of every position of the last feature map, averaged over ``images``:

        G^{jk} = 1/N sum_n sum_ch | d (sum_c X[n, c, j, k]) / d images[n, ch] |

    Instead of one backward pass per (image, position), a batch of input copies is built where
    copy (n, p) back-propagates a one-hot grad_output at position p only; each copy's input
    gradient is then exactly that position's. The N*P copies run in ceil(N*P / chunk) batched
    forward+backward passes.

    This is only correct if the images of a batch do not interact: the caller must put the
    network in eval mode (BatchNorm with running statistics; no batch-dependent layers).

    Only input gradients are computed (``torch.autograd.grad``); parameter ``.grad`` fields are
    left untouched and ``images`` is not modified.

    Args:
        feature_fn (callable): (n, 3, H, W) -> (n, C, h, w), the feature map to analyse.
        images (Tensor): (N, 3, H, W) normalised network input.
        chunk (int): copies per forward/backward pass (memory bound).
        module (nn.Module or None): if given, its parameters' ``requires_grad`` is switched off
            during the computation (no weight-gradient graph: less memory and time) and restored.

    Returns:
        Tensor: (P, H, W) float32 on ``images.device``, P = h*w positions in row-major order.
    """
    n_img, _, H, W = images.shape
    images = images.detach()
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            with torch.no_grad():
                h, w = feature_fn(images[:1]).shape[-2:]
            P = h * w
            maps = torch.zeros(P, H, W, device=images.device, dtype=torch.float32)
            total = n_img * P
            for start in range(0, total, chunk):
                q = torch.arange(start, min(start + chunk, total), device=images.device)
                n, p = q // P, q % P
                x = images[n].clone().requires_grad_(True)
                out = feature_fn(x).float().sum(1).flatten(1)  # (m, P): channels summed
                onehot = F.one_hot(p, P).to(out.dtype)
                (grad,) = torch.autograd.grad(out, x, grad_outputs=onehot)
                maps.index_add_(0, p, grad.float().abs().sum(1))
    finally:
        for p in params:
            p.requires_grad_(True)
    return maps / n_img


def erf_region_weights(erf_maps, region_masks, own_region, tau):
    """
    Label weights of Eq. 2 for every feature position.

    With share_i = sum(G * M_i) / sum(G), the share of ERF mass of position p in region i, and r
    the region containing p::

        w_r = max(tau, share_r)
        w_i = (1 - w_r) * share_i / sum_{i' != r} share_i'     (i != r)

    Eq. 2 as printed gives w_i = share_i / (1 - share_r) for i != r, which sums to 1 over the
    other regions alone, so the weights would sum to 1 + w_r. We keep its proportions but scale
    the other regions to 1 - w_r, so each position's weights sum to 1 (a proper soft label).
    If the other shares are all 0 they split 1 - w_r equally; a position with an all-zero ERF
    (e.g. dead ReLUs) gets its own region only (w_r = 1).

    Args:
        erf_maps (Tensor): (P, H, W) non-negative ERF maps (from :func:`compute_erf_maps`).
        region_masks (Tensor): (4, H, W) {0, 1} region masks of the montage template.
        own_region (Tensor): (P,) int64 region of each position (the flattened region map).
        tau (float): least weight of the own region, in [0, 1].

    Returns:
        Tensor: (P, 4) float32 weights, rows summing to 1; tau = 1 gives one-hot(own_region).
    """
    G = erf_maps.double()
    own = F.one_hot(own_region.to(G.device).long(), 4).double()  # (P, 4)
    mass = torch.einsum("phw,ihw->pi", G, region_masks.to(G))
    total = mass.sum(1, keepdim=True)
    share = torch.where(total > 0, mass / total.clamp(min=1e-300), own)
    w_own = (share * own).sum(1, keepdim=True).clamp(min=float(tau))
    others = share * (1 - own)
    osum = others.sum(1, keepdim=True)
    frac = torch.where(osum > 0, others / osum.clamp(min=1e-300), (1 - own) / 3.0)
    weights = own * w_own + (1 - w_own) * frac
    return weights.float()


def erf_weight_map(weights, feat_h, feat_w):
    """
    Args:
        weights (Tensor): (P, 4) from :func:`erf_region_weights`, P = feat_h * feat_w.

    Returns:
        Tensor: (4, feat_h, feat_w) weight map of each region's label at every position.
    """
    return weights.t().reshape(4, feat_h, feat_w).contiguous()

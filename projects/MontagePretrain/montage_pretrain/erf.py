"""
Effective receptive fields (ERF, Luo et al. 2016) of feature positions, and the ERF-adaptive
label weights of Eq. 2 (Sec. 3.3).
"""
import torch
from torch.nn import functional as F

__all__ = [
    "compute_erf_maps",
    "compute_erf_region_mass",
    "pack_levels",
    "erf_region_weights",
    "erf_weights_from_mass",
    "erf_weight_map",
]


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
    mass = torch.einsum("phw,ihw->pi", G, region_masks.to(G))
    return erf_weights_from_mass(mass, own_region, tau)


def erf_weights_from_mass(mass, own_region, tau):
    """
    Eq. 2 from each position's ERF mass per region (see :func:`erf_region_weights`, which is
    this function applied to ``sum(G * M_i)``).

    Args:
        mass (Tensor): (P, 4) non-negative ERF mass of every position in each region, any unit
            (only the shares matter), e.g. from :func:`compute_erf_region_mass`.
        own_region (Tensor): (P,) int64 region of each position.
        tau (float): least weight of the own region, in [0, 1].

    Returns:
        Tensor: (P, 4) float32 weights, rows summing to 1.
    """
    mass = mass.double()
    own = F.one_hot(own_region.to(mass.device).long(), 4).double()  # (P, 4)
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


def pack_levels(features, levels):
    """
    Several feature maps as one: the channel sum of each level in ``levels``, flattened
    row-major and concatenated in that order, shaped (n, 1, 1, P) with P = sum of h_l * w_l.

    A position's ERF only needs the channel sum of its features, so this packed map lets
    :func:`compute_erf_maps` / :func:`compute_erf_region_mass` treat every position of every
    pyramid level as a position of a single map (one forward pass serves all levels).

    Args:
        features (dict[str, Tensor]): level name -> (n, C_l, h_l, w_l).
        levels (list[str]): the levels to pack, in order.

    Returns:
        Tensor: (n, 1, 1, P) float32.
    """
    sums = [features[k].float().sum(1).flatten(1) for k in levels]
    return torch.cat(sums, 1)[:, None, None, :]


def compute_erf_region_mass(feature_fn, images, region_masks, chunk=64, module=None,
                            images_per_position=None):
    """
    The ERF mass of every position in each region, sum(G^{jk} * M_i), without materialising the
    (P, H, W) maps of :func:`compute_erf_maps` (the same quantity, reduced on the fly): memory
    O(P) instead of O(P * H * W), which matters for the thousands of positions of a pyramid.

    One forward pass per image; its graph then serves ``chunk`` positions per backward pass
    through batched vector-Jacobian products (``is_grads_batched``), each one-hot at one
    position, so each of those input gradients is exactly that position's. As for
    :func:`compute_erf_maps`, the network must be in eval mode.

    Args:
        feature_fn (callable): (n, 3, H, W) -> (n, C, h, w); see :func:`pack_levels` for
            several levels at once.
        images (Tensor): (N, 3, H, W) normalised network input.
        region_masks (Tensor): (R, H, W) {0, 1} masks (the template's 4 regions).
        chunk (int): positions per backward pass (memory bound, as ERF_CHUNK).
        module (nn.Module or None): its parameters' ``requires_grad`` is switched off meanwhile
            (no weight gradients) and restored.
        images_per_position (Tensor or None): (P,) int, 1..N: position q averages over the
            first ``images_per_position[q]`` images only (a cost cap: each position costs one
            backward pass per image); None = all N.

    Returns:
        Tensor: (P, R) float64 on ``images.device``: mean over images of each position's input-
        gradient magnitude (channels summed) inside each region.
    """
    n_img = images.shape[0]
    images = images.detach()
    masks = region_masks.to(images.device, torch.float64)
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    mass, counts, step = None, None, max(int(chunk), 1)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            for i in range(n_img):
                if counts is not None and not bool((counts > i).any()):
                    break  # every position has its images (counts only shrink with i)
                x = images[i : i + 1].clone().requires_grad_(True)
                out = feature_fn(x).float().sum(1).flatten(1)  # (1, P): channels summed
                P = out.shape[1]
                if mass is None:
                    mass = torch.zeros(P, masks.shape[0], device=images.device,
                                       dtype=torch.float64)
                    counts = torch.full((P,), n_img, device=images.device, dtype=torch.long)
                    if images_per_position is not None:
                        counts = images_per_position.to(counts).clamp(1, n_img)
                active = (counts > i).nonzero().flatten()
                for start in range(0, len(active), step):
                    q = active[start : start + step]
                    onehot = F.one_hot(q, P).to(out.dtype)[:, None, :]  # (m, 1, P)
                    (grad,) = torch.autograd.grad(out, x, grad_outputs=onehot,
                                                  is_grads_batched=True, retain_graph=True)
                    g = grad[:, 0].double().abs().sum(1)  # (m, H, W)
                    mass.index_add_(0, q, torch.einsum("mhw,rhw->mr", g, masks))
    finally:
        for p in params:
            p.requires_grad_(True)
    return mass / counts[:, None]

"""
Classification objectives of Montage pre-training (Sec. 3.3): ERF-adaptive dense, block-wise,
global (CutMix-style) and the single-crop baseline.

Shapes: logits (N, K, h, w) with K = C + 1 (last = background); labels (N, 4) int64 in region
order (0 TL, 1 TR, 2 BL, 3 BR), or (N, 1) for the single-crop baseline. All losses are computed
in float32 (log-softmax) whatever the logits' dtype.
"""
import torch
from torch.nn import functional as F

__all__ = [
    "soft_targets",
    "erf_dense_loss",
    "blockwise_loss",
    "global_loss",
    "single_loss",
    "blockwise_weights",
    "level_mean",
]


def blockwise_weights(region_map):
    """
    Args:
        region_map (Tensor): (h, w) int64 region ids 0..3.

    Returns:
        Tensor: (4, h, w) float32 one-hot of each position's own region (Eq. 2 with tau = 1).
    """
    return F.one_hot(region_map.long(), 4).permute(2, 0, 1).float().contiguous()


def soft_targets(labels, weights, num_classes):
    """
    Soft label of every position (Eq. 1): sum_i w_i^{jk} onehot(y_i).

    Args:
        labels (Tensor): (N, 4) int64.
        weights (Tensor): (4, h, w) label weights.
        num_classes (int): K, the number of logits (C + 1 including background), i.e. the
            length of the one-hot vectors.

    Returns:
        Tensor: (N, K, h, w) float32.
    """
    if int(labels.max()) >= num_classes:
        raise ValueError(
            f"label {int(labels.max())} >= num_classes={num_classes}: pass K = C + 1, the number "
            "of logits (background is label C)"
        )
    onehot = F.one_hot(labels.long(), num_classes).float()  # (N, 4, K)
    return torch.einsum("nik,ihw->nkhw", onehot, weights.float())


def _region_onehot(region_map):
    # Every region must own a feature position (MontageTemplate.validate checks it once); not
    # re-checked here, as that would sync the device every step.
    masks = blockwise_weights(region_map)  # (4, h, w)
    return masks, masks.sum((1, 2))


def erf_dense_loss(logits, labels, weights, region_map):
    """
    ERF-adaptive dense classification loss: soft-label cross-entropy at every position, averaged
    within each region ("block-wise average of the loss map"), then over the 4 regions and the
    batch.

    The soft target is a mix of one-hots, so its cross-entropy is computed as
    -sum_i w_i log p(y_i) (4 gathers) rather than by materialising (N, K, h, w) targets;
    repeated labels add up correctly.

    Args:
        logits (Tensor): (N, K, h, w).
        labels (Tensor): (N, 4) int64.
        weights (Tensor): (4, h, w) label weights (:func:`erf_weight_map`; rows sum to 1).
        region_map (Tensor): (h, w) int64 region of each position.

    Returns:
        Tensor: scalar.
    """
    N, K, h, w = logits.shape
    logp = F.log_softmax(logits.float(), dim=1)
    idx = labels.long()[:, :, None, None].expand(N, 4, h, w)
    loss_map = -(weights.float()[None] * logp.gather(1, idx)).sum(1)  # (N, h, w)
    masks, counts = _region_onehot(region_map)
    region_loss = torch.einsum("nhw,ihw->ni", loss_map, masks) / counts  # (N, 4)
    return region_loss.mean()


def blockwise_loss(logits, labels, region_map):
    """
    Block-wise classification: each region's logits are averaged (= average pooling of the
    features then the 1x1 classifier, which is linear) and classified with its hard label;
    mean over regions and batch.

    Args:
        logits (Tensor): (N, K, h, w). labels (Tensor): (N, 4). region_map (Tensor): (h, w).

    Returns:
        Tensor: scalar.
    """
    K = logits.shape[1]
    masks, counts = _region_onehot(region_map)
    pooled = torch.einsum("nkhw,ihw->nik", logits.float(), masks) / counts[:, None]  # (N, 4, K)
    return F.cross_entropy(pooled.reshape(-1, K), labels.long().reshape(-1))


def global_loss(logits, labels, region_areas):
    """
    Global classification (CutMix-style): global average pooling, target = the 4 one-hots mixed
    by the regions' area fractions.

    Args:
        logits (Tensor): (N, K, h, w). labels (Tensor): (N, 4).
        region_areas (Tensor): (4,) area fractions summing to 1.

    Returns:
        Tensor: scalar.
    """
    logp = F.log_softmax(logits.float().mean((2, 3)), dim=1)  # (N, K)
    return -(region_areas.float()[None] * logp.gather(1, labels.long())).sum(1).mean()


def single_loss(logits, labels):
    """
    The no-montage baseline: global average pooling + cross-entropy.

    Args:
        logits (Tensor): (N, K, h, w). labels (Tensor): (N, 1) or (N,).

    Returns:
        Tensor: scalar.
    """
    return F.cross_entropy(logits.float().mean((2, 3)), labels.long().reshape(-1))


def level_mean(level_losses, level_weights=None):
    """
    Mean of per-level losses of pyramid pre-training (each already averaged over its regions):
    sum_l w_l L_l / sum_l w_l.

    Args:
        level_losses (list[Tensor]): one scalar per level.
        level_weights (list[float] or None): non-negative, one per level, positive sum;
            None or empty = equal weights.

    Returns:
        Tensor: scalar.
    """
    if not level_weights:
        return torch.stack(level_losses).mean()
    if len(level_weights) != len(level_losses):
        raise ValueError(f"{len(level_weights)} level weights for {len(level_losses)} levels")
    w = torch.as_tensor(level_weights, dtype=torch.float32, device=level_losses[0].device)
    return (w * torch.stack(level_losses).float()).sum() / w.sum()

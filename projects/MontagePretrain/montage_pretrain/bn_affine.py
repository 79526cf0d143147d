"""
Dead units of an export: measured on images, and revived by resetting the backbone's norm
affine parameters to their init.

Why (issue 20, measured in the project README, "Dead units, and why reviving them is not
enough"): a hot pre-training (300 iterations x 512 montages, LR 0.8, on chess's 2,319-crop bank)
drives the last BN of res5 to a small scale and a negative shift (median gamma 0.27, beta -1.3
in its last block), so that after the block's ReLU 89-94 % of res5's output channels are zero at
every position of every detection image. A channel that never fires passes no gradient.

:func:`reset_bn_affine` sets every norm's ``weight`` (gamma) to 1 and ``bias`` (beta) to 0,
Detectron2's init, and keeps the conv filters and the running statistics (which then no longer
fit a FrozenBN detector). A channel then fires wherever its normalised input is above its mean,
whatever it was before. Measured, it revives every dead unit but barely speeds res5's
fine-tuning up (1.7x, still ~20x slower than a gentle export's): the features under the dead
units are collapsed too, and that is what stalls fine-tuning. It is a diagnostic
(``scripts/diagnose_handoff.py --write-variant bn_reset``), not a default.

Weights are ``{bare name: np.ndarray}`` as in the export (``res5.1.conv2.norm.weight``, ...).
"""
import numpy as np
import torch

from .diagnostics import batch_statistics
from .weight_scale import stage_of

__all__ = ["affine_norm_prefixes", "reset_bn_affine", "dead_channel_fractions"]


def affine_norm_prefixes(weights):
    """
    Backbone norms with an affine pair, e.g. ``res2.0.conv1.norm`` (BN, SyncBN, GN alike; the
    pyramid's and the heads' are left out).

    Args:
        weights (dict[str, array]): bare-name weights.
    Returns:
        list[str]: each ``p`` has ``p.weight`` and ``p.bias`` (1-d, same length).
    """
    out = []
    for name, value in weights.items():
        if not name.endswith(".norm.weight") or np.ndim(value) != 1:
            continue
        p = name[: -len(".weight")]
        if f"{p}.bias" in weights and stage_of(p) is not None:
            out.append(p)
    return out


def reset_bn_affine(weights):
    """
    Args:
        weights (dict[str, np.ndarray]): bare-name weights; not modified.
    Returns:
        tuple(dict, dict): new weights (a new dict; untouched arrays shared) and a summary
        ``{"norms": n, "gamma_dev": mean |gamma - 1|, "beta_dev": mean |beta|}`` over the
        channels before the reset (how far training had moved them).
    """
    out = dict(weights)
    gdev, bdev = [], []
    prefixes = affine_norm_prefixes(weights)
    for p in prefixes:
        g, b = np.asarray(weights[f"{p}.weight"]), np.asarray(weights[f"{p}.bias"])
        gdev.append(np.abs(g.astype(np.float64) - 1.0))
        bdev.append(np.abs(b.astype(np.float64)))
        out[f"{p}.weight"] = np.ones_like(g)
        out[f"{p}.bias"] = np.zeros_like(b)
    return out, dict(
        norms=len(prefixes),
        gamma_dev=float(np.concatenate(gdev).mean()) if gdev else 0.0,
        beta_dev=float(np.concatenate(bdev).mean()) if bdev else 0.0,
    )


@torch.no_grad()
def dead_channel_fractions(backbone, images):
    """
    Fraction of each ResNet block's output channels that are <= 0 at every position of every
    image, with BN on batch statistics (what a trainable-BN detector sees in training).

    Args:
        backbone (nn.Module): a Detectron2 ResNet (``model.backbone.bottom_up`` for FPN).
        images (Tensor): (N, 3, H, W), already normalised by the model's pixel mean / std.
    Returns:
        dict[str, float]: ``{"res2.0": fraction in [0, 1], ...}``, one entry per block.
    """
    maxima, handles = {}, []
    for name, module in backbone.named_modules():
        if name.count(".") == 1 and stage_of(name) not in (None, "stem"):
            handles.append(module.register_forward_hook(
                lambda mod, inp, out, name=name: maxima.__setitem__(name, out.amax(dim=(0, 2, 3)))))
    try:
        with batch_statistics(backbone):  # running stats updated by the forward: restored
            backbone(images)
    finally:
        for h in handles:
            h.remove()
    return {k: float((v <= 0).float().mean()) for k, v in maxima.items()}

"""
Scale of the BN-followed conv weights of an export: measured, and reset to the init's scale
without changing what the network computes.

Why it matters (issue 20, measured in the project README, "Why a pre-trained init lost to random
init"): a conv followed by BN computes the same function for ``w`` and ``s * w`` (BN divides the
scale out; FrozenBN too once its running statistics are scaled with it). But SGD does not see
the same thing: the gradient of a scale-invariant weight is ``1/s`` times smaller and orthogonal
to ``w``, so one step moves its *direction* by ``lr * |g| / |w|``, i.e. an effective step of
``lr / |w|^2``. A short, hot pre-training (large LR, short warm-up) inflates ``|w|`` (the issue
measured the stem at 17.4x its init norm after 12 iterations), and the detector then fine-tunes
those layers hundreds of times more slowly than the same layers from random init: ahead after
a short fine-tuning, behind once random init has had the time to converge.

:func:`reset_to_init_scale` rescales every output filter of every BN-followed conv to the
filter norm of Detectron2's own init (``c2_msra_fill``: Kaiming normal, fan-out, ReLU gain), and
the BN running statistics with it, so that

* a trainable-BN detector computes exactly the same outputs (BN in train mode divides the scale
  out) and a FrozenBN detector too (``mean' = s * mean``, ``var' = s^2 (var + eps) - eps``);
* fine-tuning starts at the effective step size of random init in every layer.

Convs without a BN (the FPN's, GN-normalised ones) are left as they are: GN normalises groups of
channels, so only a per-layer scale would be invariant; the exports tested here carry BN.

Weights are ``{bare name: np.ndarray}`` as in the export (``stem.conv1.weight``,
``res2.0.conv1.norm.running_var``, ...).
"""
import math
import re

import numpy as np

__all__ = [
    "BN_EPS",
    "bn_conv_prefixes",
    "init_filter_norm",
    "filter_norms",
    "stage_of",
    "stage_scale_summary",
    "reset_to_init_scale",
]

# eps of torch's BatchNorm2d and Detectron2's FrozenBatchNorm2d (both 1e-5).
BN_EPS = 1e-5


def bn_conv_prefixes(weights):
    """
    Names of the convs followed by a BN with running statistics, e.g. ``res2.0.conv1``.

    Args:
        weights (dict[str, array]): bare-name weights of an export or a state dict.
    Returns:
        list[str]: each ``p`` has ``p.weight`` (4-d) and ``p.norm.running_mean/var``.
    """
    out = []
    for name, value in weights.items():
        if not name.endswith(".weight") or np.ndim(value) != 4:
            continue
        p = name[: -len(".weight")]
        if f"{p}.norm.running_var" in weights and f"{p}.norm.running_mean" in weights:
            out.append(p)
    return out


def init_filter_norm(shape):
    """
    Expected L2 norm of one output filter under Detectron2's ``c2_msra_fill`` (Kaiming normal,
    mode fan_out, ReLU gain): each of the ``C_in/g * kh * kw`` entries has variance
    ``2 / (C_out * kh * kw)``.

    Args:
        shape (tuple): conv weight shape ``(C_out, C_in / groups, kh, kw)``.
    Returns:
        float: ``sqrt(2 * (C_in / groups) / C_out)``.
    """
    c_out, c_in_per_group = shape[0], shape[1]
    return math.sqrt(2.0 * c_in_per_group / c_out)


def filter_norms(weight):
    """(C_out,) L2 norm of each output filter of a 4-d conv weight (float64)."""
    w = np.asarray(weight, dtype=np.float64)
    return np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(axis=1))


_STAGE = re.compile(r"(?:^|\.)(stem|res\d)(?:\.|$)")


def stage_of(name):
    """``"res3.1.conv2"`` / ``"backbone.bottom_up.res3.1.conv2.weight"`` -> ``"res3"``; None
    for names outside the ResNet stages (FPN, heads)."""
    m = _STAGE.search(name)
    return m.group(1) if m else None


def stage_scale_summary(weights):
    """
    Per ResNet stage: how far the BN-followed conv filters are from their init norm.

    Args:
        weights (dict[str, array]): bare-name weights.
    Returns:
        dict[str, dict]: per stage, ``norm_ratio`` (mean over its convs of the mean filter norm
        divided by :func:`init_filter_norm`), ``norm_ratio_max`` (largest per-conv ratio),
        ``effective_step`` (mean of ``(init / norm)^2`` over the stage's filters: the factor by
        which SGD's effective step ``lr / |w|^2`` differs from random init's) and ``convs``.
    """
    stages = {}
    for p in bn_conv_prefixes(weights):
        stage = stage_of(p)
        if stage is None:
            continue
        w = weights[f"{p}.weight"]
        norms = filter_norms(w)
        target = init_filter_norm(np.shape(w))
        ratio = norms / target
        s = stages.setdefault(stage, dict(ratios=[], steps=[], convs=0))
        s["ratios"].append(float(ratio.mean()))
        s["steps"].extend((1.0 / np.maximum(ratio, 1e-12) ** 2).tolist())
        s["convs"] += 1
    return {
        k: dict(norm_ratio=float(np.mean(v["ratios"])), norm_ratio_max=float(np.max(v["ratios"])),
                effective_step=float(np.mean(v["steps"])), convs=v["convs"])
        for k, v in stages.items()
    }


def reset_to_init_scale(weights, eps=BN_EPS):
    """
    Rescales each output filter of every BN-followed conv to :func:`init_filter_norm`, with the
    BN running statistics, so that BN (train mode) and FrozenBN outputs are unchanged.

    Args:
        weights (dict[str, np.ndarray]): bare-name weights; not modified.
        eps (float): the BN eps the detector uses (1e-5 in torch and Detectron2).
    Returns:
        tuple(dict, dict): the rescaled weights (a new dict; untouched arrays shared), and a
        summary ``{"convs": n, "scale_min": ..., "scale_max": ..., "clamped_var": k}`` (the
        scales applied; ``clamped_var``: channels whose rescaled variance fell below 0 and were
        set to 0, which only happens when a filter shrank below its init norm and its variance
        is under ``eps``).
    """
    out = dict(weights)
    scales, clamped, prefixes = [], 0, bn_conv_prefixes(weights)
    for p in prefixes:
        w = np.asarray(weights[f"{p}.weight"])
        norms = filter_norms(w)
        target = init_filter_norm(w.shape)
        # A filter that is all zeros has no direction to keep: left as it is.
        s = np.where(norms > 0, target / np.maximum(norms, 1e-30), 1.0)
        mean = np.asarray(weights[f"{p}.norm.running_mean"], dtype=np.float64)
        var = np.asarray(weights[f"{p}.norm.running_var"], dtype=np.float64)
        # FrozenBN: (s*y - s*mean) / sqrt(var' + eps) == (y - mean) / sqrt(var + eps)
        # <=> var' = s^2 (var + eps) - eps.
        new_var = s ** 2 * (var + eps) - eps
        clamped += int((new_var < 0).sum())
        dtype = w.dtype
        out[f"{p}.weight"] = (w.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype(dtype)
        out[f"{p}.norm.running_mean"] = (mean * s).astype(weights[f"{p}.norm.running_mean"].dtype)
        out[f"{p}.norm.running_var"] = np.maximum(new_var, 0.0).astype(
            weights[f"{p}.norm.running_var"].dtype)
        scales.append(s)
    allscales = np.concatenate(scales) if scales else np.ones(1)
    return out, dict(convs=len(prefixes), scale_min=float(allscales.min()),
                     scale_max=float(allscales.max()), clamped_var=clamped)

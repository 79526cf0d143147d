"""
Pure box arithmetic for sample selection (paper sec. 3.1): which GT boxes become positives, how
they are enlarged for context, where negatives may be placed (IoU = 0 with every GT box), and how
many negatives each image contributes. No I/O and no global state: every random draw comes from
the ``numpy.random.Generator`` passed in, so results depend only on the inputs and that RNG.

All boxes are ``(K, 4)`` float arrays ``x0 y0 x1 y1`` in source-image pixels (continuous
coordinates: a pixel ``i`` covers ``[i, i + 1)``).
"""

import numpy as np

__all__ = [
    "KEEP",
    "SKIP_REASONS",
    "xywh_to_xyxy",
    "clip_boxes",
    "classify_boxes",
    "count_reasons",
    "intersection_areas",
    "iou",
    "enlarge_boxes",
    "sample_negatives",
    "allocate_negatives",
    "allocate_shortfall",
    "image_rng",
    "snap_size",
]

# Reason codes returned by classify_boxes; index 0 means "usable positive".
KEEP = 0
SKIP_REASONS = ("crowd", "degenerate", "outside", "tiny", "unknown_category")
_REASON_CODE = {name: i + 1 for i, name in enumerate(SKIP_REASONS)}

# Fallback size distribution for negatives in an image without any usable positive box:
# sqrt(area) log-uniform in [2 * min_size, 0.5 * min(image side)], aspect w/h log-uniform in
# [1/3, 3], which puts about 50 % of the draws in S, 18 % in T and 32 % in W.
_FALLBACK_ASPECT = (1.0 / 3.0, 3.0)
# Jitter around a reference (positive) size: scale x [0.5, 2], aspect x [1/1.5, 1.5].
_SCALE_JITTER = (0.5, 2.0)
_ASPECT_JITTER = (1.0 / 1.5, 1.5)
# Candidates drawn per round; after each round without any accepted box the sizes shrink by
# _SHRINK, since large boxes are what usually fails in crowded images.
_ROUND = 32
_SHRINK = 0.7


def image_rng(seed, image_id, pass_index=0):
    """
    Returns the RNG for one image: seeded from ``(seed, image_id, pass_index)`` only, so results
    do not depend on worker count, worker order or which other images are in the build.

    Args:
        seed (int): build seed.
        image_id (int): the image's json id (any int; mapped to 64 unsigned bits).
        pass_index (int): 0 for the main pass, 1, 2, ... for the negative make-up passes.
    """
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFFFFFF, int(pass_index)]
    return np.random.default_rng(np.random.SeedSequence(words))


def xywh_to_xyxy(boxes):
    """
    Converts COCO ``x y w h`` boxes to ``x0 y0 x1 y1``.

    Args:
        boxes (array-like): (K, 4) boxes in pixels.

    Returns:
        ndarray: (K, 4) float64.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = boxes.copy()
    out[:, 2:] = boxes[:, :2] + boxes[:, 2:]
    return out


def clip_boxes(boxes, width, height):
    """
    Clips (K, 4) xyxy boxes to the image ``[0, width] x [0, height]``; returns a new float64 array.
    """
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def classify_boxes(boxes, iscrowd, labels, width, height, min_size):
    """
    Decides which GT boxes become positive samples, and why the others do not.

    Rules, checked in this order: crowd regions are never positives; a box with w <= 0 or h <= 0
    as annotated is ``degenerate``; a box whose part inside the image has no area is ``outside``;
    a box whose clipped min side is below ``min_size`` is ``tiny``; a box whose label is negative
    (category not in the json's list) is ``unknown_category``.

    Args:
        boxes (ndarray): (K, 4) xyxy GT boxes as annotated (may exceed the image).
        iscrowd (ndarray): (K,) bool.
        labels (ndarray): (K,) int contiguous labels, -1 for an unknown category.
        width, height (int): image size in pixels.
        min_size (float): minimum side in pixels of a usable (clipped) box.

    Returns:
        tuple: ``clipped`` (K, 4) float64 boxes clipped to the image, and ``reasons`` (K,) int:
        ``KEEP`` (0) for a positive, else ``1 + SKIP_REASONS.index(reason)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = clip_boxes(boxes, width, height)
    w0, h0 = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    reasons = np.full(len(boxes), KEEP, dtype=np.int64)
    # Assign in reverse priority so the first matching rule wins.
    reasons[np.asarray(labels) < 0] = _REASON_CODE["unknown_category"]
    reasons[np.minimum(cw, ch) < min_size] = _REASON_CODE["tiny"]
    reasons[(cw <= 0) | (ch <= 0)] = _REASON_CODE["outside"]
    # NaN sizes compare False everywhere, so test "not > 0" to catch them as degenerate.
    reasons[~(w0 > 0) | ~(h0 > 0)] = _REASON_CODE["degenerate"]
    reasons[np.asarray(iscrowd, dtype=bool)] = _REASON_CODE["crowd"]
    return clipped, reasons


def count_reasons(reasons):
    """Returns ``{reason: count}`` for every name in SKIP_REASONS from classify_boxes' codes."""
    counts = np.bincount(np.asarray(reasons, dtype=np.int64), minlength=len(SKIP_REASONS) + 1)
    return {name: int(counts[i + 1]) for i, name in enumerate(SKIP_REASONS)}


def intersection_areas(a, b):
    """
    Pairwise intersection areas.

    Args:
        a (ndarray): (N, 4) xyxy boxes.
        b (ndarray): (M, 4) xyxy boxes.

    Returns:
        ndarray: (N, M) float64 areas in pixels^2 (0 where boxes only touch or are disjoint).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return iw.clip(min=0) * ih.clip(min=0)


def iou(a, b):
    """
    Pairwise IoU of (N, 4) and (M, 4) xyxy boxes; returns (N, M) float64 (0 for empty boxes).
    """
    inter = intersection_areas(a, b)
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = ((a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0))[:, None]
    area_b = ((b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0))[None, :]
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def enlarge_boxes(boxes, width, height, enlarge, rng):
    """
    Randomly enlarges positive boxes to include context, then snaps them outwards to whole pixels
    and clips them to the image.

    Width and height get independent factors ``f ~ U(enlarge[0], enlarge[1])`` (so ``f = 1.5``
    means the crop is 1.5x the box along that side before clipping); the added margin
    ``(f - 1) * w`` is split between left and right (top and bottom) by a uniform random share,
    so objects are not always centred. The result always contains the (clipped) input box.

    Args:
        boxes (ndarray): (K, 4) xyxy boxes inside the image.
        width, height (int): image size in pixels.
        enlarge (tuple[float, float]): total enlargement range per side, ``1 <= lo <= hi``.
        rng (numpy.random.Generator): source of the factors (4 draws per box).

    Returns:
        ndarray: (K, 4) float64 integer-valued xyxy crop boxes within ``[0, width] x [0, height]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    k = len(boxes)
    lo, hi = float(enlarge[0]), float(enlarge[1])
    factors = rng.uniform(lo, hi, size=(k, 2))  # (fw, fh)
    shares = rng.uniform(0.0, 1.0, size=(k, 2))  # fraction of the margin going left / top
    size = boxes[:, 2:] - boxes[:, :2]
    margin = (factors - 1.0) * size
    lo_xy = boxes[:, :2] - shares * margin
    hi_xy = boxes[:, 2:] + (1.0 - shares) * margin
    out = np.concatenate([np.floor(lo_xy), np.ceil(hi_xy)], axis=1)
    return clip_boxes(out, width, height)


def _log_uniform(u, lo, hi):
    """Maps uniform [0, 1) draws ``u`` to a log-uniform distribution on [lo, hi)."""
    return lo * (hi / lo) ** u


def sample_negatives(
    gt_boxes, width, height, count, rng, ref_sizes=None, min_size=8, max_tries=None
):
    """
    Draws background boxes that do not overlap any GT box at all (intersection area 0, hence
    IoU = 0; touching edges is allowed). Pass *every* GT box of the image, crowd and tiny ones
    included, so negatives never contain a labelled object.

    Sizes follow the image's own positives: each candidate picks a random reference ``(w, h)``
    from ``ref_sizes`` and jitters its scale by x[0.5, 2] and its aspect by x[1/1.5, 1.5]
    (log-uniform), so negatives land in S, T and W roughly as positives do. Without references a
    log-uniform size/aspect fallback is used. Every round of 32 candidates that places nothing
    shrinks later candidates by 0.7, down to ``min_size``.

    Args:
        gt_boxes (ndarray): (G, 4) xyxy GT boxes (any G >= 0).
        width, height (int): image size in pixels.
        count (int): number of negatives wanted.
        rng (numpy.random.Generator): source of all draws.
        ref_sizes (ndarray or None): (R, 2) reference sizes ``(w, h)`` in pixels.
        min_size (int): minimum side of a negative in pixels.
        max_tries (int or None): candidate budget; default ``64 * count + 256``.

    Returns:
        ndarray: (n, 4) float64 integer-valued xyxy boxes, ``n <= count`` (``n < count`` when the
        try budget ran out: the image has no room left).
    """
    count = int(count)
    if count <= 0 or width < min_size or height < min_size:
        return np.zeros((0, 4), dtype=np.float64)
    if max_tries is None:
        max_tries = 64 * count + 256
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    ref = None if ref_sizes is None else np.asarray(ref_sizes, dtype=np.float64).reshape(-1, 2)
    if ref is not None and len(ref) == 0:
        ref = None
    accepted = []
    tries, shrink = 0, 1.0
    while len(accepted) < count and tries < max_tries:
        n = min(_ROUND, max_tries - tries)
        tries += n
        # One draw per round: (reference index, scale, aspect, x, y) for n candidates.
        u = rng.random((n, 5))
        if ref is not None:
            base = ref[(u[:, 0] * len(ref)).astype(np.int64)]
            scale = _log_uniform(u[:, 1], *_SCALE_JITTER) * shrink
            root_aspect = np.sqrt(_log_uniform(u[:, 2], *_ASPECT_JITTER))
            w, h = base[:, 0] * scale * root_aspect, base[:, 1] * scale / root_aspect
        else:
            lo_side = 2.0 * min_size
            side = _log_uniform(u[:, 1], lo_side, max(0.5 * min(width, height), lo_side)) * shrink
            root_aspect = np.sqrt(_log_uniform(u[:, 2], *_FALLBACK_ASPECT))
            w, h = side * root_aspect, side / root_aspect
        w = np.clip(np.floor(w), min_size, width)
        h = np.clip(np.floor(h), min_size, height)
        x0 = np.floor(u[:, 3] * (width - w + 1))
        y0 = np.floor(u[:, 4] * (height - h + 1))
        cand = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
        free = ~(intersection_areas(cand, gt_boxes) > 0).any(axis=1)
        ok = cand[free]
        if len(ok) == 0:
            shrink = max(shrink * _SHRINK, 1e-3)
            continue
        accepted.extend(ok[: count - len(accepted)])
    if not accepted:
        return np.zeros((0, 4), dtype=np.float64)
    return np.stack(accepted).astype(np.float64)


def allocate_negatives(pos_counts, ratio):
    """
    Splits ``round(ratio * sum(pos_counts))`` negatives over images in proportion to their
    positives, carrying the fractional remainder along the image order (so an image with 3
    positives at ratio 0.1 gets 0 or 1, and every prefix of images gets its fair share +- 0.5).

    Args:
        pos_counts (array-like): (N,) planned positives per image, in image order.
        ratio (float): negatives per positive (0.1 for the paper's 10:1).

    Returns:
        ndarray: (N,) int64 negatives per image.
    """
    pos_counts = np.asarray(pos_counts, dtype=np.float64)
    cum = np.floor(np.cumsum(pos_counts) * float(ratio) + 0.5).astype(np.int64)
    return np.diff(np.concatenate([[0], cum]))


def allocate_shortfall(num_candidates, shortfall):
    """
    Spreads ``shortfall`` extra negatives over ``num_candidates`` images round-robin in image
    order (the first images get one more when it does not divide evenly).

    Returns:
        ndarray: (num_candidates,) int64 extra negatives per candidate image.
    """
    if num_candidates <= 0 or shortfall <= 0:
        return np.zeros(max(num_candidates, 0), dtype=np.int64)
    base, extra = divmod(int(shortfall), int(num_candidates))
    out = np.full(num_candidates, base, dtype=np.int64)
    out[:extra] += 1
    return out


def snap_size(width, height, max_side):
    """
    Returns the stored ``(w, h)`` of a ``width x height`` crop after the optional downscale that
    keeps the aspect ratio and brings the longer side to ``max_side`` (0 = never resize; crops
    are never upscaled).
    """
    if max_side <= 0 or max(width, height) <= max_side:
        return int(width), int(height)
    scale = max_side / float(max(width, height))
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))

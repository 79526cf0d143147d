"""
Writes a PNG contact sheet of random crops from a bank: one row per group (S, T, W), each crop
letterboxed into a square cell and labelled with its class and stored size.
"""

import logging

import cv2
import numpy as np

from .bank import GROUPS, SampleBank

__all__ = ["check_png_path", "write_grid"]

logger = logging.getLogger(__name__)

_HEADER_W = 48  # px column with the group name
_BG = (40, 40, 40)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def check_png_path(path):
    """
    Raises ValueError unless ``path`` ends in ``.png``: OpenCV picks the encoder from the suffix
    and raises a bare "could not find a writer" without one.
    """
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"{path}: the grid is a PNG file; pass a name ending in .png, "
                         f"e.g. --out {path}.png")


def _put_label(img, text, org, scale=0.35):
    """Draws white text on a dark box, readable on any crop."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, 1)
    x, y = org
    cv2.rectangle(img, (x, y - th - 2), (x + tw + 2, y + base), (0, 0, 0), -1)
    cv2.putText(img, text, (x + 1, y - 1), _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)


def _fit(crop, cell):
    """Resizes a (h, w, 3) crop to fit a cell x cell square, centred on a dark background."""
    h, w = crop.shape[:2]
    scale = cell / float(max(h, w))
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = np.full((cell, cell, 3), _BG, dtype=np.uint8)
    y0, x0 = (cell - nh) // 2, (cell - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = cv2.resize(crop, (nw, nh), interpolation=interp)
    return out


def _pick(index, labels, num_classes, count, negatives, rng):
    """
    Picks up to ``count`` of a group's indices: ``negatives`` background ones (more if there are
    too few positives), the rest positives; positives first, each part ascending.
    """
    is_neg = labels[index] == num_classes
    neg, pos = rng.permutation(index[is_neg]), rng.permutation(index[~is_neg])
    n_neg = min(len(neg), max(negatives, count - len(pos)))
    n_pos = min(len(pos), count - n_neg)
    return np.concatenate([np.sort(pos[:n_pos]), np.sort(neg[:n_neg])]).astype(np.int64)


def write_grid(bank_path, out_path, per_group=8, cell=128, seed=0, negatives=2):
    """
    Samples up to ``per_group`` crops of each group and writes them as a PNG grid.

    Args:
        bank_path (str): sample bank.
        out_path (str): PNG to write.
        per_group (int): crops per row.
        cell (int): cell side in pixels.
        seed (int): which crops are picked.
        negatives (int): cells per row shown from background crops (rightmost), so negatives get
            looked at too; the rest are positives.

    Returns:
        tuple[int, int]: (height, width) of the written image.
    """
    check_png_path(out_path)  # before any work
    rng = np.random.default_rng(seed)
    rows = []
    bank = SampleBank(bank_path)
    try:
        num_classes = bank.num_classes
        names = bank.category_names + ["background"]
        labels, sizes = bank.labels, bank.sizes
        for gid, g in enumerate(GROUPS):
            index = bank.group_indices(gid)
            pick = _pick(index, labels, num_classes, per_group, negatives, rng)
            row = np.full((cell, _HEADER_W + per_group * cell, 3), _BG, dtype=np.uint8)
            _put_label(row, g, (10, cell // 2), scale=0.9)
            _put_label(row, f"n={len(index)}", (4, cell // 2 + 22), scale=0.35)
            for j, i in enumerate(pick):
                tile = _fit(cv2.cvtColor(bank.decode(i), cv2.COLOR_RGB2BGR), cell)  # imwrite: BGR
                label = int(labels[i])
                h, w = (int(v) for v in sizes[i])
                _put_label(tile, names[label][:16] if label <= num_classes else str(label), (2, 12))
                _put_label(tile, f"{w}x{h}", (2, cell - 4))
                cv2.rectangle(tile, (0, 0), (cell - 1, cell - 1), (90, 90, 90), 1)
                row[:, _HEADER_W + j * cell : _HEADER_W + (j + 1) * cell] = tile
            if not len(pick):
                _put_label(row, "(empty group)", (_HEADER_W + 8, cell // 2))
            rows.append(row)
    finally:
        bank.close()
    grid = np.concatenate(rows, axis=0)
    if not cv2.imwrite(out_path, grid):
        raise OSError(f"{out_path}: cannot write PNG (check the directory and the .png suffix)")
    logger.info("wrote %s (%dx%d)", out_path, grid.shape[1], grid.shape[0])
    return grid.shape[:2]

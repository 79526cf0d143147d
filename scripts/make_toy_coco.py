#!/usr/bin/env python
"""
Writes the built-in toy COCO-format detection dataset (the project's embedded default, used by
``make toy`` / ``make demo``, the tests and the small experiments)::

    python scripts/make_toy_coco.py --out datasets/toy --seed 0 \
        [--num-train 240 --num-val 60 --size 256 192]

Layout::

    OUT/annotations/instances_train.json   OUT/train/000001.jpg ...
    OUT/annotations/instances_val.json     OUT/val/000001.jpg ...

Defaults (sized for a 2-core CPU; the whole default run takes about 6 s there): 240 train +
60 val images of 256 x 192 px (--size W H, at least 128 96), JPEG quality 90.  Image ids:
train 1..N, val 100001..100000+M (unique across the splits); file names 000001.jpg ...  Rerunning
into the same --out overwrites the json and deletes stale NNNNNN.jpg files of a larger earlier
run.  The output is deterministic: the same arguments give
byte-identical json and images (every image has its own RNG seeded by (seed, split, index); the
json holds no time stamps).

What is drawn:

* 10 categories with non-contiguous ids (to exercise id -> contiguous-label mapping downstream).
  Colours come from ONE shared palette for every category, the background and the distractors,
  so colour says nothing about the category: shape and texture decide.  Textures are
  characteristic per category but shared by some pairs, so shape is always needed::

      id  name       shape                         texture        aspect w/h of the box
       1  star       5-point star                  diagonal       ~1 (lognormal jitter)
       2  ring       annulus                       checker        ~1
       3  cross      plus sign                     dots           ~1
       5  triangle   isosceles triangle            solid+border   ~1
       7  hexagon    regular hexagon               noise          ~1
       9  crescent   circle minus offset circle    h-stripes      ~1
      12  arrow      arrow pointing left/right     checker        1.6 .. 4.5   (W)
      15  capsule    vertical stadium              h-stripes      0.18 .. 0.48 (T)
      18  zigzag     wide zigzag band              solid+border   2.0 .. 4.5   (W)
      22  pillar     column with capital and base  v-stripes      0.18 .. 0.48 (T)

  The squareish categories get a lognormal aspect jitter, so a few of their boxes fall into T or
  W as well (and small rotations move a few tall/wide boxes into S).  Aspect groups follow
  ``builder.bank.group_of``: S = 0.5 <= w/h <= 1.5, T = w/h < 0.5, W = w/h > 1.5.  The
  categories are dealt from shuffled decks, so each split is balanced across categories, and
  the boxes split about S 55 % / T 19 % / W 26 % (the summary prints the actual shares).
* 2..6 objects per image; box sides about 14..160 px (long side 26..100 px for squareish
  objects).  Objects never share a pixel (boxes may overlap, e.g. a star inside a ring), so each
  polygon is exactly the visible part of its object and the box is the exact tight box of the
  polygon: bbox = [min x, min y, max x - min x, max y - min y] of the stored polygon, every box
  lies inside the image (object sizes are in pixels and do not scale with --size).  Circles and
  ellipses are stored as polygons; the ring is one "keyhole" polygon (outer circle, slit, inner
  circle reversed).  At sharp tips (star points, crescent horns) the rasterised mask can stop
  1..4 px short of the polygon's box, as in COCO itself.
* ``iscrowd: 1`` regions in about 5 % of the images (round(0.05 * N) images per split, at least
  one when N >= 10): a dense cluster of 8..16 small objects of one squareish category, annotated
  as one compressed RLE (pycocotools ``mask.encode``), bbox = tight box of the RLE mask.
* Cluttered backgrounds: colour gradient, a low-contrast full-image texture, random lines,
  solid blobs, and unannotated distractors in the same colours/textures (random irregular
  polygons and thick arcs), then mild blur and noise over the whole image.

``area`` is the pixel area of the rasterised segmentation (pycocotools), like COCO's.
"""
import argparse
import json
import math
import os
import re
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from builder.bank import GROUPS, group_of as _group_of  # the project's one definition


DEFAULT_NUM_TRAIN = 240
DEFAULT_NUM_VAL = 60
DEFAULT_SIZE = (256, 192)  # W H
JPEG_QUALITY = 90
CROWD_FRACTION = 0.05
SUB = 4  # cv2 sub-pixel bits for drawing polygons
SUBF = float(1 << SUB)

# One palette shared by objects, background and distractors (RGB).
PALETTE = np.array([
    [220, 40, 40], [40, 160, 60], [40, 80, 220], [235, 200, 30], [200, 60, 200],
    [30, 190, 200], [245, 130, 30], [120, 70, 30], [240, 240, 240], [25, 25, 25],
    [130, 130, 130], [150, 200, 90], [250, 160, 180], [90, 40, 140],
], dtype=np.float32)

# (id, name, texture, aspect kind)
CATEGORIES = [
    (1, "star", "diagonal", "S"),
    (2, "ring", "checker", "S"),
    (3, "cross", "dots", "S"),
    (5, "triangle", "solid_border", "S"),
    (7, "hexagon", "noise", "S"),
    (9, "crescent", "hstripes", "S"),
    (12, "arrow", "checker", "W"),
    (15, "capsule", "hstripes", "T"),
    (18, "zigzag", "solid_border", "W"),
    (22, "pillar", "vstripes", "T"),
]
SUPERCATEGORY = {"S": "compact", "T": "tall", "W": "wide"}
TEXTURES = ("diagonal", "checker", "dots", "solid_border", "noise", "hstripes", "vstripes")
CROWD_CATEGORIES = ("star", "ring", "cross", "triangle", "hexagon")


def group_of(w, h):
    """Group name ("S", "T" or "W") of a w x h box, by the bank's rule."""
    return GROUPS[_group_of(w, h)]


# ----------------------------------------------------------------------------------------------
# shapes: polygons in the unit box [0, 1]^2 (x right, y down)
# ----------------------------------------------------------------------------------------------
def _circle(cx, cy, rx, ry, n, a0=0.0, a1=2 * math.pi):
    t = np.linspace(a0, a1, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def shape_unit(name, rng, aspect=1.0):
    if name == "star":
        n = 5
        rin = rng.uniform(0.38, 0.5)
        t = -math.pi / 2 + np.arange(2 * n) * math.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rin)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == "ring":
        rin = rng.uniform(0.5, 0.65)
        outer = _circle(0, 0, 1, 1, 40)
        inner = _circle(0, 0, rin, rin, 32)[::-1]
        # keyhole: outer circle, slit to the inner circle at angle 0, inner circle reversed
        return np.concatenate([outer, [[1.0, 0.0]], [[rin, 0.0]], inner[:-1], [[rin, 0.0]]])
    if name == "cross":
        a = rng.uniform(0.16, 0.22)
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                         [-a, a], [-1, a], [-1, -a], [-a, -a]], dtype=np.float64)
    if name == "triangle":
        apex = rng.uniform(-0.25, 0.25)
        tri = np.array([[apex, -1], [1, 1], [-1, 1]], dtype=np.float64)
        return tri if rng.random() < 0.7 else tri * [1, -1]
    if name == "hexagon":
        t = np.arange(6) * math.pi / 3 + (math.pi / 6 if rng.random() < 0.5 else 0)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "crescent":
        d, r = rng.uniform(0.35, 0.55), rng.uniform(0.8, 0.95)
        x = (1 - r * r + d * d) / (2 * d)
        y = math.sqrt(max(1 - x * x, 1e-6))
        th = math.atan2(y, x)
        outer = _circle(0, 0, 1, 1, 36, th, 2 * math.pi - th)  # through the left side
        ph = math.atan2(y, x - d)
        t = np.linspace(2 * math.pi - ph, ph, 28)  # inner arc back, through the left side
        inner = np.stack([d + r * np.cos(t), r * np.sin(t)], 1)
        poly = np.concatenate([outer, inner])
        return poly * [-1, 1] if rng.random() < 0.5 else poly
    if name == "arrow":
        s = rng.uniform(0.28, 0.45)  # half shaft thickness
        hx = rng.uniform(0.45, 0.65)  # where the head starts
        poly = np.array([[-1, -s], [hx, -s], [hx, -1], [1, 0], [hx, 1], [hx, s], [-1, s]],
                        dtype=np.float64)
        return poly * [-1, 1] if rng.random() < 0.5 else poly
    if name == "capsule":
        # vertical stadium; `aspect` (box w/h) keeps the end caps round after the stretch
        a = min(max(aspect, 0.05), 0.9)
        top = _circle(0, -1 + a, 1, a, 16, math.pi, 2 * math.pi)
        bot = _circle(0, 1 - a, 1, a, 16, 0, math.pi)
        return np.concatenate([top, [[1, -1 + a]], bot, [[-1, 1 - a]]])
    if name == "zigzag":
        n = int(rng.integers(3, 6))
        t = rng.uniform(0.35, 0.55)  # band thickness (fraction of the height)
        xs = np.linspace(0, 1, n + 1)
        ys = np.where(np.arange(n + 1) % 2 == 0, 0.0, 1.0 - t)
        if rng.random() < 0.5:
            ys = (1.0 - t) - ys
        top = np.stack([xs, ys], 1)
        bot = np.stack([xs, ys + t], 1)[::-1]
        return np.concatenate([top, bot])
    if name == "pillar":
        c = rng.uniform(0.08, 0.14)  # capital/base height
        s = rng.uniform(0.2, 0.3)  # shaft inset
        return np.array([[0, 0], [1, 0], [1, c], [1 - s, c], [1 - s, 1 - c], [1, 1 - c], [1, 1],
                         [0, 1], [0, 1 - c], [s, 1 - c], [s, c], [0, c]], dtype=np.float64)
    raise ValueError(name)


def _normalise(poly):
    lo, hi = poly.min(0), poly.max(0)
    return (poly - lo) / np.maximum(hi - lo, 1e-9)


def sample_box_size(kind, rng, img_w, img_h):
    """(w, h) of the object's box before rotation."""
    if kind == "S":
        a = float(np.clip(math.exp(rng.normal(0.0, 0.3)), 0.42, 2.2))
        long_side = rng.uniform(26, 100)
        w, h = (long_side, long_side / a) if a >= 1 else (long_side * a, long_side)
    elif kind == "T":
        a = rng.uniform(0.18, 0.48)
        h = rng.uniform(50, min(150, 0.85 * img_h))
        w = h * a
    else:  # W
        a = rng.uniform(1.6, 4.5)
        w = rng.uniform(55, min(160, 0.8 * img_w))
        h = w / a
    w, h = max(w, 14.0), max(h, 14.0)
    return min(w, img_w - 4.0), min(h, img_h - 4.0)


def make_polygon(name, kind, rng, img_w, img_h):
    """Polygon of one object, in pixels relative to its own top-left corner (0, 0)."""
    w, h = sample_box_size(kind, rng, img_w, img_h)
    poly = _normalise(shape_unit(name, rng, w / h)) * [w, h]
    max_rot = 12.0 if kind == "S" else 5.0
    ang = math.radians(rng.uniform(-max_rot, max_rot))
    c, s = math.cos(ang), math.sin(ang)
    poly = (poly - [w / 2, h / 2]) @ np.array([[c, s], [-s, c]])
    poly -= poly.min(0)
    return np.round(poly, 2)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
def _colour(rng, exclude=None):
    while True:
        i = int(rng.integers(len(PALETTE)))
        if i != exclude:
            c = PALETTE[i] * rng.uniform(0.85, 1.1) + rng.normal(0, 6, 3)
            return i, np.clip(c, 0, 255).astype(np.float32)


def texture_patch(tex, h, w, rng):
    """(h, w, 3) float texture in two shared-palette colours, and the second colour."""
    i1, c1 = _colour(rng)
    _, c2 = _colour(rng, exclude=i1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy += rng.uniform(0, 20)
    xx += rng.uniform(0, 20)
    p = rng.uniform(4, 8)
    if tex == "diagonal":
        sel = ((xx + yy) // p) % 2 == 0
    elif tex == "hstripes":
        sel = (yy // p) % 2 == 0
    elif tex == "vstripes":
        sel = (xx // p) % 2 == 0
    elif tex == "checker":
        sel = ((xx // p) + (yy // p)) % 2 == 0
    elif tex == "dots":
        q = p + 2
        sel = ((xx % q - q / 2) ** 2 + (yy % q - q / 2) ** 2) > (q * 0.28) ** 2
    elif tex == "noise":
        n = rng.random((max(h // 3, 1) + 1, max(w // 3, 1) + 1)).astype(np.float32)
        n = cv2.resize(n, (w, h), interpolation=cv2.INTER_LINEAR)
        return (c1 * (1 - n[..., None]) + c2 * n[..., None]).astype(np.float32), c2
    elif tex == "solid_border":
        sel = np.ones((h, w), bool)  # the border is drawn by the caller
    else:
        raise ValueError(tex)
    return np.where(sel[..., None], c1, c2).astype(np.float32), c2


def poly_mask(poly, h, w):
    m = np.zeros((h, w), np.uint8)
    pts = np.round(np.asarray(poly) * SUBF).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(m, [pts], 1, lineType=cv2.LINE_8, shift=SUB)
    return m


def paint(img, poly, tex, rng, alpha=1.0):
    """Paints a textured polygon (absolute pixel coords) into img; returns its full-size mask."""
    H, W = img.shape[:2]
    poly = np.asarray(poly, np.float64)
    x0, y0 = (max(int(math.floor(v)) - 1, 0) for v in poly.min(0))
    x1, y1 = int(math.ceil(poly[:, 0].max())) + 2, int(math.ceil(poly[:, 1].max())) + 2
    x1, y1 = min(x1, W), min(y1, H)
    mask = np.zeros((H, W), np.uint8)
    if x1 <= x0 or y1 <= y0:
        return mask
    local = poly_mask(poly - [x0, y0], y1 - y0, x1 - x0)
    mask[y0:y1, x0:x1] = local
    m = local.astype(bool)
    if not m.any():
        return mask
    patch, border_c = texture_patch(tex, y1 - y0, x1 - x0, rng)
    if tex == "solid_border":
        inner = cv2.erode(local, np.ones((5, 5), np.uint8)).astype(bool)
        patch = np.where((m & ~inner)[..., None], border_c, patch)
    region = img[y0:y1, x0:x1]
    if alpha >= 1.0:
        region[m] = patch[m]
    elif m.all():
        region *= 1 - alpha
        region += patch * alpha
    else:
        region[m] = region[m] * (1 - alpha) + patch[m] * alpha
    return mask


def background(rng, H, W):
    _, c1 = _colour(rng)
    _, c2 = _colour(rng)
    c1, c2 = c1 * 0.6 + 60, c2 * 0.6 + 60  # muted
    t = np.linspace(0, 1, W if rng.random() < 0.5 else H, dtype=np.float32)
    g = c1 + (c2 - c1) * t[:, None]
    img = np.broadcast_to(g[None] if len(t) == W else g[:, None], (H, W, 3)).astype(np.float32)
    img = img.copy()
    full = np.array([[0, 0], [W, 0], [W, H], [0, H]], np.float64)
    paint(img, full, TEXTURES[int(rng.integers(len(TEXTURES)))], rng, alpha=rng.uniform(0.12, 0.3))
    for _ in range(int(rng.integers(4, 11))):  # lines
        p = rng.uniform([0, 0, 0, 0], [W, H, W, H]).astype(int)
        cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), _colour(rng)[1].tolist(),
                 int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(int(rng.integers(2, 6))):  # blobs
        c = (int(rng.integers(W)), int(rng.integers(H)))
        ax = (int(rng.integers(8, 40)), int(rng.integers(8, 40)))
        col = _colour(rng)[1]
        ov = img.copy()
        cv2.ellipse(ov, c, ax, float(rng.uniform(0, 180)), 0, 360, col.tolist(), -1, cv2.LINE_AA)
        a = rng.uniform(0.4, 0.9)
        img = img * (1 - a) + ov * a
    return img


def distractors(img, rng):
    """Unannotated clutter in the shared colours and textures."""
    H, W = img.shape[:2]
    for _ in range(int(rng.integers(2, 6))):
        if rng.random() < 0.65:  # jagged splat: many vertices, strong radial jitter, ~isotropic
            n = int(rng.integers(9, 15))
            t = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * math.pi / n)
            r = rng.uniform(0.35, 1.0, n)
            size = rng.uniform(10, 32) * rng.uniform(0.75, 1.33, 2)
            c = rng.uniform([0, 0], [W, H])
            poly = c + np.stack([np.cos(t) * r, np.sin(t) * r], 1) * size
            paint(img, poly, TEXTURES[int(rng.integers(len(TEXTURES)))], rng)
        else:  # thick arc (ring/crescent-like fragment)
            c = (int(rng.integers(W)), int(rng.integers(H)))
            ax = (int(rng.integers(10, 40)), int(rng.integers(10, 40)))
            a0 = float(rng.uniform(0, 360))
            cv2.ellipse(img, c, ax, float(rng.uniform(0, 180)), a0, a0 + rng.uniform(60, 200),
                        _colour(rng)[1].tolist(), int(rng.integers(3, 8)), cv2.LINE_AA)


def crowd_cluster(img, occupied, rng, cat):
    """A dense cluster of small objects of one category; returns its union mask or None."""
    H, W = img.shape[:2]
    cw, ch = rng.uniform(40, 70), rng.uniform(30, 50)
    x0, y0 = rng.uniform(2, W - cw - 2), rng.uniform(2, H - ch - 2)
    union = np.zeros((H, W), np.uint8)
    tex = cat[2]
    for _ in range(int(rng.integers(8, 17))):
        s = rng.uniform(8, 14)
        poly = _normalise(shape_unit(cat[1], rng)) * [s, s * rng.uniform(0.85, 1.15)]
        poly += [x0 + rng.uniform(0, cw - s), y0 + rng.uniform(0, ch - s)]
        union |= paint(img, poly, tex, rng)
    occupied |= cv2.dilate(union, np.ones((3, 3), np.uint8))
    return union


def render_image(rng, W, H, with_crowd, cat_list):
    """
    Draws one image with the objects of ``cat_list`` (category indices, drawn in this order;
    an object that finds no free place in 25 tries is dropped).  Returns (uint8 RGB image,
    list of annotation dicts without ids).
    """
    img = background(rng, H, W)
    distractors(img, rng)
    occupied = np.zeros((H, W), np.uint8)
    anns = []
    if with_crowd:
        names = [c[1] for c in CATEGORIES]
        cat = CATEGORIES[names.index(CROWD_CATEGORIES[int(rng.integers(len(CROWD_CATEGORIES)))])]
        union = crowd_cluster(img, occupied, rng, cat)
        anns.append(dict(category=cat, mask=union, iscrowd=1))
    for k in cat_list:
        cat = CATEGORIES[int(k)]
        for _try in range(25):
            rel = make_polygon(cat[1], cat[3], rng, W, H)
            bw, bh = rel.max(0)
            if bw > W - 2 or bh > H - 2:
                continue
            off = np.round(rng.uniform([1, 1], [W - 1 - bw, H - 1 - bh]), 2)
            poly = np.round(rel + off, 2)
            m = poly_mask(poly, H, W)
            if m.sum() < 30 or (m & occupied).any():
                continue  # objects never share a pixel: masks are the visible parts
            paint(img, poly, cat[2], rng)
            occupied |= cv2.dilate(m, np.ones((3, 3), np.uint8))
            anns.append(dict(category=cat, poly=poly, iscrowd=0))
            break
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9))
    img = img + rng.normal(0, rng.uniform(2, 5), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), anns


def to_coco_ann(a, H, W):
    from pycocotools import mask as mask_utils

    if a["iscrowd"]:
        rle = mask_utils.encode(np.asfortranarray(a["mask"]))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        area = float(mask_utils.area(rle))
        rle["counts"] = rle["counts"].decode("ascii")
        seg = rle
    else:
        poly = a["poly"]
        lo, hi = poly.min(0), poly.max(0)
        bbox = [round(float(lo[0]), 2), round(float(lo[1]), 2),
                round(float(hi[0] - lo[0]), 2), round(float(hi[1] - lo[1]), 2)]
        flat = [round(float(v), 2) for v in poly.reshape(-1)]
        seg = [flat]
        area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(seg, H, W))))
    return {"category_id": a["category"][0], "bbox": bbox, "area": area,
            "segmentation": seg, "iscrowd": int(a["iscrowd"])}


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------
SPLIT_CODE = {"train": 1, "val": 2}
IMAGE_ID_BASE = {"train": 0, "val": 100000}


def make_split(out, split, n, seed, W, H):
    img_dir = out / split
    img_dir.mkdir(parents=True, exist_ok=True)
    names = {f"{i:06d}.jpg" for i in range(1, n + 1)}
    for p in img_dir.iterdir():  # stale images of an earlier, larger run
        if re.fullmatch(r"\d{6}\.jpg", p.name) and p.name not in names:
            p.unlink()
    split_rng = np.random.default_rng([seed, SPLIT_CODE[split], 0])
    n_crowd = int(round(CROWD_FRACTION * n))
    if n >= 10:
        n_crowd = max(n_crowd, 1)
    crowd_idx = set()
    if n:
        crowd_idx = set(split_rng.choice(n, size=min(n_crowd, n), replace=False).tolist())
    # 2..6 objects per image; categories dealt from shuffled decks of all categories, so the
    # per-category counts of a split are balanced (up to the few objects that find no place)
    n_obj = split_rng.integers(2, 7, size=n)
    n_decks = -(-int(n_obj.sum()) // len(CATEGORIES))
    deck = np.concatenate([split_rng.permutation(len(CATEGORIES)) for _ in range(n_decks)]
                          or [np.zeros(0, np.int64)])
    starts = np.concatenate([[0], np.cumsum(n_obj)])
    images, annotations = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLIT_CODE[split], i + 1])
        cats = deck[starts[i]:starts[i + 1]]
        img, anns = render_image(rng, W, H, i in crowd_idx, cats)
        image_id = IMAGE_ID_BASE[split] + i + 1
        file_name = f"{i + 1:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        (img_dir / file_name).write_bytes(buf.tobytes())
        images.append({"id": image_id, "file_name": file_name, "width": W, "height": H,
                       "license": 1})
        for a in anns:
            ann = to_coco_ann(a, H, W)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    coco = {
        "info": {"description": f"Montage toy detection dataset ({split})",
                 "version": "1.0", "year": 2024, "contributor": "scripts/make_toy_coco.py",
                 "date_created": "2024-01-01", "seed": seed},
        "licenses": [{"id": 1, "name": "synthetic, public domain (CC0)", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c[0], "name": c[1], "supercategory": SUPERCATEGORY[c[3]]}
                       for c in CATEGORIES],
    }
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    path = ann_dir / f"instances_{split}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco, separators=(",", ":")))
    os.replace(tmp, path)
    return coco


def summarize(split, coco):
    anns = coco["annotations"]
    boxes = [a for a in anns if not a["iscrowd"]]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_cat = Counter(names[a["category_id"]] for a in boxes)
    groups = Counter(group_of(a["bbox"][2], a["bbox"][3]) for a in boxes)
    nb = max(len(boxes), 1)
    lines = [
        f"[{split}] images {len(coco['images'])}  boxes {len(boxes)}  "
        f"crowd regions {len(anns) - len(boxes)}  "
        f"boxes/image {len(boxes) / max(len(coco['images']), 1):.2f}",
        "  groups  " + "  ".join(f"{g} {groups[g]} ({100.0 * groups[g] / nb:.1f}%)"
                                 for g in GROUPS),
        "  per category  " + "  ".join(f"{names[c['id']]}({c['id']}) {per_cat[c['name']]}"
                                       for c in coco["categories"]),
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Writes the built-in toy COCO detection dataset.",
                                epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output dataset root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    p.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL)
    p.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("W", "H"),
                   help="image width and height in pixels (default %(default)s)")
    args = p.parse_args(argv)
    if args.num_train < 0 or args.num_val < 0:
        p.error("--num-train/--num-val must be >= 0")
    if args.size[0] < 128 or args.size[1] < 96:
        p.error("--size must be at least 128 96 (object boxes are 14..160 px)")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    W, H = args.size
    t0 = time.time()
    cocos = {}
    for split, n in (("train", args.num_train), ("val", args.num_val)):
        cocos[split] = make_split(out, split, n, args.seed, W, H)
    dt = time.time() - t0
    print(f"toy COCO dataset -> {out}  (seed {args.seed}, {W}x{H}, JPEG q{JPEG_QUALITY}, "
          f"{len(CATEGORIES)} categories, {dt:.1f} s)")
    for split, coco in cocos.items():
        print(summarize(split, coco))
    return cocos


if __name__ == "__main__":
    main()

"""
Loads and validates a COCO-style instances json into compact per-image records.

A file that is not a COCO instances json at all raises :class:`CocoFormatError` (fatal). Problems
with single records (a malformed image entry, an annotation of an unknown category, ...) do not
stop loading: each becomes one ``(kind, message)`` entry in ``CocoDataset.problems`` whose message
names the item and the fix; the caller decides whether they are fatal (``--strict``).
"""

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .sampling import xywh_to_xyxy

__all__ = ["CocoFormatError", "ImageRecord", "CocoDataset", "load_coco"]

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("images", "annotations", "categories")


class CocoFormatError(ValueError):
    """Raised when the annotations file cannot be used at all (unreadable, not COCO)."""


@dataclass
class ImageRecord:
    """
    One image and its GT boxes.

    Attributes:
        image_id (int): the json's image "id".
        file_name (str): the json's "file_name" (relative to the image directory).
        path (str): full path of the image file.
        width, height (int): size from the json, in pixels.
        boxes (ndarray): (K, 4) float64 xyxy GT boxes in pixels, as annotated (not clipped).
        labels (ndarray): (K,) int32 contiguous labels; -1 for a category missing from the json.
        iscrowd (ndarray): (K,) bool.
    """

    image_id: int
    file_name: str
    path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray


@dataclass
class CocoDataset:
    """
    A validated dataset.

    Attributes:
        category_ids (list[int]): dataset category ids sorted ascending; label i = category_ids[i].
        category_names (list[str]): names in the same order.
        images (list[ImageRecord]): selected images, in json order.
        num_images_in_json (int): image entries in the json (before --max-images).
        num_annotations (int): annotations of the selected images (crowd and unknown included).
        problems (list[tuple[str, str]]): ``(kind, one-line message)`` per record-level problem.
    """

    category_ids: list
    category_names: list
    images: list
    num_images_in_json: int = 0
    num_annotations: int = 0
    problems: list = field(default_factory=list)


# The bank stores image ids as int64.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value):
    """
    Returns ``value`` as an int when it is a whole number: an int, or an integral float such as
    ``640.0`` (json writers that go through floats emit those); else None.
    """
    if _is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _finite_box(bbox):
    """True when the 4 numbers of an ``[x, y, w, h]`` box and its far corner are all finite."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except OverflowError:  # an int beyond float range
        return False
    # Python's json reads NaN, Infinity and -Infinity; a box with one would clip to a real crop.
    return all(math.isfinite(v) for v in (x, y, w, h, x + w, y + h))


def _read_json(json_path):
    try:
        with open(json_path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CocoFormatError(
            f"{json_path}: annotations file not found; pass the COCO instances json with "
            "--annotations"
        ) from None
    except OSError as e:
        raise CocoFormatError(f"{json_path}: cannot read annotations file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(
            f"{json_path}: not valid JSON ({e}); pass a COCO instances json"
        ) from None


def _load_categories(cats, json_path, problems):
    by_id = {}
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or _as_int(cat.get("id")) is None:
            problems.append(
                (
                    "bad_category",
                    f"categories[{i}]: entry without an integer 'id'; fix or remove it in the json",
                )
            )
            continue
        cat = {**cat, "id": _as_int(cat["id"])}
        if cat["id"] in by_id:
            problems.append(
                (
                    "bad_category",
                    f"category id {cat['id']} appears twice; keep one entry per id in the json",
                )
            )
            continue
        by_id[cat["id"]] = str(cat.get("name", cat["id"]))
    if not by_id:
        raise CocoFormatError(
            f"{json_path}: no usable categories; a COCO instances json lists them under "
            '\'categories\' as {"id": int, "name": str}'
        )
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def _image_problem(img):
    """Returns what makes a json image entry unusable (for its message), or None if usable."""
    if not isinstance(img, dict):
        return "entry is not an object"
    image_id = _as_int(img.get("id"))
    if image_id is None:
        return f"'id' {img.get('id')!r} is not a whole number"
    if not _INT64_MIN <= image_id <= _INT64_MAX:
        return "'id' is outside -2**63 .. 2**63-1 (the bank stores image ids as int64)"
    if not isinstance(img.get("file_name"), str):
        return f"'file_name' {img.get('file_name')!r} is not a string"
    for key in ("width", "height"):
        if key not in img:
            return f"'{key}' is missing"
        value = _as_int(img[key])
        if value is None or value <= 0:
            return f"'{key}' {img[key]!r} is not a whole number of pixels > 0"
    return None


def _load_images(images, max_images, problems):
    """
    Returns the selected image entries (json order, id/width/height as ints), the set of all
    valid ids, and ``{id: index in problems}`` of the rejected entries whose id is a whole number
    (so their annotations are counted in that one line, not reported as orphans).
    """
    selected, all_ids, rejected = [], set(), {}
    for i, img in enumerate(images):
        problem = _image_problem(img)
        if problem is not None:
            image_id = _as_int(img.get("id")) if isinstance(img, dict) else None
            item = f"images[{i}]" if image_id is None else f"image {image_id}"
            if image_id is not None:
                rejected.setdefault(image_id, len(problems))
            problems.append(
                ("bad_image_record", f"{item}: {problem}; fix or remove it in the json")
            )
            continue
        img = {**img, **{k: _as_int(img[k]) for k in ("id", "width", "height")}}
        if img["id"] in all_ids:
            problems.append(
                (
                    "duplicate_image_id",
                    f"image {img['id']}: id used twice in the json; "
                    "the later entry is ignored, give each image a unique id",
                )
            )
            continue
        all_ids.add(img["id"])
        if max_images is None or len(selected) < max_images:
            selected.append(img)
    return selected, all_ids, rejected


def load_coco(json_path, image_dir, max_images=None):
    """
    Reads a COCO instances json and groups its annotations by image.

    Images are kept in json order; ``max_images`` keeps the first N valid entries. An annotation
    with an unknown ``category_id`` keeps its box (label -1) so that negatives still avoid it,
    and is reported as ``unknown_category``.

    Args:
        json_path (str): COCO instances json.
        image_dir (str): directory the images' ``file_name`` are relative to.
        max_images (int or None): keep only the first N images.

    Returns:
        CocoDataset

    Raises:
        CocoFormatError: the file is missing, not JSON, not a COCO instances dict, or has no
            usable category.
    """
    data = _read_json(json_path)
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{json_path}: not a COCO instances json (top level is a {type(data).__name__}, "
            "expected an object with 'images', 'annotations', 'categories')"
        )
    missing = [k for k in _REQUIRED_KEYS if not isinstance(data.get(k), list)]
    if missing:
        raise CocoFormatError(
            f"{json_path}: not a COCO instances json (missing or non-list key(s): "
            f"{', '.join(missing)}); pass an instances file such as "
            "annotations/instances_train2017.json"
        )
    problems = []
    cat_ids, cat_names = _load_categories(data["categories"], json_path, problems)
    label_of = {cid: i for i, cid in enumerate(cat_ids)}
    images, all_ids, rejected = _load_images(data["images"], max_images, problems)
    per_image = {img["id"]: [] for img in images}
    dropped = Counter()  # annotations of rejected image entries, by image id

    for i, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if (
            not isinstance(ann, dict)
            or not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            or "image_id" not in ann
        ):
            problems.append(
                (
                    "bad_annotation",
                    f"annotation {ann_id}: needs 'image_id' and a 4-number "
                    "'bbox' [x, y, w, h]; fix or remove it in the json",
                )
            )
            continue
        image_id = _as_int(ann["image_id"])
        if image_id is None:
            problems.append(
                (
                    "bad_annotation",
                    f"annotation {ann_id}: image_id {ann['image_id']!r} is not a whole number; "
                    "fix or remove it in the json",
                )
            )
            continue
        if image_id not in all_ids and image_id in rejected:  # reported with its image entry
            dropped[image_id] += 1
            continue
        if image_id not in all_ids:
            problems.append(
                (
                    "orphan_annotation",
                    f"annotation {ann_id}: image_id {image_id!r} is "
                    "not in 'images'; add the image entry or drop the annotation",
                )
            )
            continue
        if image_id not in per_image:  # image left out by --max-images
            continue
        if not _finite_box(bbox):
            problems.append(
                (
                    "bad_annotation",
                    f"annotation {ann_id} (image {image_id}): bbox {bbox} has a NaN or infinite "
                    "value; fix the box or remove the annotation in the json",
                )
            )
            continue
        cid = ann.get("category_id")
        label = label_of.get(_as_int(cid), -1)
        if label < 0:
            problems.append(
                (
                    "unknown_category",
                    f"annotation {ann_id} (image {image_id}): "
                    f"category_id {cid!r} is not in 'categories'; add the category or drop "
                    "the annotation (its box still blocks negatives)",
                )
            )
        per_image[image_id].append((bbox, label, bool(ann.get("iscrowd", 0))))

    for image_id, n in dropped.items():
        kind, message = problems[rejected[image_id]]
        problems[rejected[image_id]] = (kind, f"{message} (its {n} annotation(s) are left out)")

    records, num_annotations = [], 0
    for img in images:
        anns = per_image[img["id"]]
        num_annotations += len(anns)
        boxes = xywh_to_xyxy([a[0] for a in anns])
        records.append(
            ImageRecord(
                image_id=img["id"],
                file_name=img["file_name"],
                path=os.path.join(image_dir, img["file_name"]),
                width=img["width"],
                height=img["height"],
                boxes=boxes,
                labels=np.array([a[1] for a in anns], dtype=np.int32),
                iscrowd=np.array([a[2] for a in anns], dtype=bool),
            )
        )
    logger.info(
        "loaded %s: %d categories, %d of %d images, %d annotations",
        json_path,
        len(cat_ids),
        len(records),
        len(data["images"]),
        num_annotations,
    )
    return CocoDataset(
        category_ids=cat_ids,
        category_names=cat_names,
        images=records,
        num_images_in_json=len(data["images"]),
        num_annotations=num_annotations,
        problems=problems,
    )

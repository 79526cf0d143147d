"""
Loads and validates a COCO-style instances json into compact per-image records.

A file that is not a COCO instances json at all raises :class:`CocoFormatError` (fatal). Problems
with single records (a malformed image entry, an annotation of an unknown category, ...) do not
stop loading: each becomes one ``(kind, message)`` entry in ``CocoDataset.problems`` whose message
names the item and the fix; the caller decides whether they are fatal (``--strict``).
"""

import json
import logging
import os
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


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


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
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            problems.append(
                (
                    "bad_category",
                    f"categories[{i}]: entry without an integer 'id'; fix or remove it in the json",
                )
            )
            continue
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


def _load_images(images, max_images, problems):
    """Returns the selected image entries (json order) and the set of all valid ids."""
    selected, all_ids = [], set()
    for i, img in enumerate(images):
        ok = (
            isinstance(img, dict)
            and _is_int(img.get("id"))
            and isinstance(img.get("file_name"), str)
            and _is_int(img.get("width"))
            and _is_int(img.get("height"))
            and img["width"] > 0
            and img["height"] > 0
        )
        if not ok:
            item = f"image {img.get('id')!r}" if isinstance(img, dict) else f"images[{i}]"
            problems.append(
                (
                    "bad_image_record",
                    f"{item}: entry needs integer 'id', 'width', "
                    "'height' > 0 and a 'file_name'; fix or remove it in the json",
                )
            )
            continue
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
    return selected, all_ids


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
    images, all_ids = _load_images(data["images"], max_images, problems)
    per_image = {img["id"]: [] for img in images}

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
        image_id = ann["image_id"]
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
        cid = ann.get("category_id")
        label = label_of.get(cid, -1)
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

"""
Small synthetic COCO datasets for tests, benchmarks and smoke runs (no download needed).

Images are smooth noise with every annotated box painted as a solid, category-coloured
rectangle, so crops are easy to recognise in ``python -m builder show``.
"""

import json
import os

import cv2
import numpy as np

__all__ = ["write_coco", "write_synthetic_coco"]


def _category_color(cid):
    rng = np.random.default_rng(1000 + int(cid))
    return tuple(int(v) for v in rng.integers(40, 256, size=3))


def write_coco(root, images, annotations, categories, split="train", draw=True, seed=0):
    """
    Writes ``root/annotations/instances_<split>.json`` and one JPEG per image under
    ``root/<split>/``.

    Args:
        root (str): dataset directory (created).
        images (list[dict]): COCO image entries (``id``, ``file_name``, ``width``, ``height``).
        annotations (list[dict]): COCO annotations (``bbox`` xywh, ``category_id``, ...); ``id``
            and ``iscrowd`` are filled in when missing.
        categories (list[dict]): COCO categories (``id``, ``name``).
        split (str): file-name split.
        draw (bool): paint the boxes into the images.
        seed (int): background noise seed.

    Returns:
        tuple[str, str]: (json path, image directory).
    """
    ann_dir, img_dir = os.path.join(root, "annotations"), os.path.join(root, split)
    os.makedirs(ann_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    anns = []
    for i, ann in enumerate(annotations):
        anns.append(
            {"id": i + 1, "iscrowd": 0, "area": float(ann["bbox"][2] * ann["bbox"][3]), **ann}
        )
    for img in images:
        h, w = img["height"], img["width"]
        small = rng.integers(60, 200, size=(max(1, h // 8), max(1, w // 8), 3)).astype(np.uint8)
        pixels = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        if draw:
            for ann in anns:
                if ann["image_id"] != img["id"]:
                    continue
                x, y, bw, bh = ann["bbox"]
                x0, y0 = int(np.floor(x)), int(np.floor(y))
                x1, y1 = int(np.ceil(x + bw)), int(np.ceil(y + bh))
                if x1 > x0 and y1 > y0:
                    cv2.rectangle(
                        pixels,
                        (x0, y0),
                        (x1 - 1, y1 - 1),
                        _category_color(ann.get("category_id", 0)),
                        -1,
                    )
        cv2.imwrite(os.path.join(img_dir, img["file_name"]), pixels)
    json_path = os.path.join(ann_dir, f"instances_{split}.json")
    with open(json_path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return json_path, img_dir


def write_synthetic_coco(
    root, num_images=8, size=(160, 120), num_categories=3, objects_per_image=4, seed=0
):
    """
    Writes a random dataset: per image ``objects_per_image`` boxes of mixed aspect (about a
    third each S, T, W) covering a modest part of the image, plus one crowd box and one tiny box.

    Args:
        root (str): dataset directory.
        num_images (int): images to write.
        size (tuple[int, int]): (width, height) of every image.
        num_categories (int): categories with ids 1, 3, 5, ... (non-contiguous on purpose).
        objects_per_image (int): regular GT boxes per image.
        seed (int): layout seed.

    Returns:
        tuple[str, str]: (json path, image directory).
    """
    rng = np.random.default_rng(seed)
    width, height = size
    categories = [{"id": 2 * i + 1, "name": f"cat{2 * i + 1}"} for i in range(num_categories)]
    images, annotations = [], []
    for k in range(num_images):
        image_id = 100 + 7 * k
        images.append(
            {"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height}
        )
        for j in range(objects_per_image):
            aspect = (1.0, 0.3, 2.5)[j % 3]
            side = rng.uniform(0.12, 0.3) * min(width, height)
            bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
            x, y = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
            annotations.append(
                {
                    "image_id": image_id,
                    "bbox": [round(float(v), 2) for v in (x, y, bw, bh)],
                    "category_id": categories[rng.integers(num_categories)]["id"],
                }
            )
        annotations.append(
            {
                "image_id": image_id,
                "bbox": [2.0, 2.0, 20.0, 14.0],
                "iscrowd": 1,
                "category_id": categories[0]["id"],
            }
        )
        annotations.append(
            {
                "image_id": image_id,
                "bbox": [width - 6.0, height - 6.0, 4.0, 4.0],
                "category_id": categories[0]["id"],
            }
        )
    return write_coco(root, images, annotations, categories, seed=seed)

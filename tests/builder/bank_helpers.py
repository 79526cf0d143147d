"""
Shared helpers for the builder tests: tiny synthetic COCO datasets and bank readers.
(A plain module, not conftest.py, so test files can import it by a name unique in the repo.)
"""


import numpy as np

from builder.bank import SampleBank
from builder.cli import main
from builder.testing import write_coco, write_synthetic_coco

CATS = [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}]


def synthetic(tmp_path, num_images=8, objects_per_image=4):
    """A random dataset: returns (json path, image dir)."""
    return write_synthetic_coco(
        str(tmp_path / "data"), num_images=num_images, objects_per_image=objects_per_image
    )


def make_dataset(tmp_path, anns_per_image, size=(200, 160), cats=CATS, draw=True):
    """
    Writes one image per entry of ``anns_per_image`` (a list of annotation lists; bbox xywh,
    image_id is filled in). Returns (json path, image dir, image ids).
    """
    w, h = size
    images, anns = [], []
    for k, image_anns in enumerate(anns_per_image):
        image_id = 10 + k
        images.append({"id": image_id, "file_name": f"img{image_id}.jpg", "width": w, "height": h})
        for a in image_anns:
            anns.append({"category_id": 1, **a, "image_id": image_id})
    json_path, img_dir = write_coco(str(tmp_path / "data"), images, anns, cats, draw=draw)
    return json_path, img_dir, [im["id"] for im in images]


def build(json_path, img_dir, out, *extra):
    """Runs `python -m builder build` in-process; returns the exit status."""
    return main(
        [
            "build",
            "--annotations",
            str(json_path),
            "--images",
            str(img_dir),
            "--out",
            str(out),
            *map(str, extra),
        ]
    )


def read_bank(path):
    """Returns every dataset of a bank as numpy arrays (crops as a list of bytes) plus attrs."""
    bank = SampleBank(path)
    try:
        out = {k: bank.read(k) for k in ("label", "group", "size", "image_id", "box", "crop_box",
                                         "crops", "index/S", "index/T", "index/W")}
        out["attrs"] = bank.attrs
    finally:
        bank.close()
    out["counts"] = out["attrs"]["counts"]
    return out


def assert_same_content(a, b):
    """Banks are equal in every dataset, the categories and the counts."""
    for key in (
        "label",
        "group",
        "size",
        "image_id",
        "box",
        "crop_box",
        "index/S",
        "index/T",
        "index/W",
    ):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["crops"] == b["crops"]
    assert a["counts"] == b["counts"]
    for key in ("category_names", "category_ids", "num_classes", "seed", "encoding"):
        assert a["attrs"][key] == b["attrs"][key], key

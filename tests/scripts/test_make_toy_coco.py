"""Tests of scripts/make_toy_coco.py (the built-in toy COCO dataset). Small runs, CPU, < 20 s."""
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_toy_coco.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_toy_coco", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mtc = _load_script()


def _group(w, h):
    a = w / h
    return "T" if a < 0.5 else ("W" if a > 1.5 else "S")


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    cocos = mtc.main(["--out", str(out), "--seed", "3", "--num-train", "24", "--num-val", "8"])
    return out, cocos


def test_layout_and_valid_coco(toy):
    out, _ = toy
    for split, n in (("train", 24), ("val", 8)):
        path = out / "annotations" / f"instances_{split}.json"
        raw = json.loads(path.read_text())
        for key in ("info", "licenses", "images", "annotations", "categories"):
            assert key in raw, key
        coco = COCO(str(path))
        assert len(coco.imgs) == n
        for img in coco.dataset["images"]:
            assert set(img) >= {"id", "file_name", "width", "height"}
            im = cv2.imread(str(out / split / img["file_name"]))
            assert im is not None and im.shape == (img["height"], img["width"], 3)
            assert (img["width"], img["height"]) == mtc.DEFAULT_SIZE
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for a in coco.dataset["annotations"]:
            assert set(a) >= {"id", "image_id", "category_id", "bbox", "area", "segmentation",
                              "iscrowd"}
            assert a["image_id"] in coco.imgs and a["category_id"] in coco.cats
            assert a["iscrowd"] in (0, 1) and a["area"] > 0
        for c in coco.dataset["categories"]:
            assert set(c) >= {"id", "name", "supercategory"}
    # the two splits have disjoint image ids
    tr = {i["id"] for i in toy[1]["train"]["images"]}
    va = {i["id"] for i in toy[1]["val"]["images"]}
    assert not tr & va
    # jpg files only where the json says
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        i["file_name"] for i in toy[1]["train"]["images"])


def test_categories(toy):
    cats = toy[1]["train"]["categories"]
    ids = [c["id"] for c in cats]
    assert len(cats) >= 8 and len(set(ids)) == len(ids)
    assert ids != list(range(1, len(ids) + 1)), "category ids should be non-contiguous"
    assert len({c["name"] for c in cats}) == len(cats)
    used = {a["category_id"] for a in toy[1]["train"]["annotations"] if not a["iscrowd"]}
    assert used == set(ids), "every category appears in 24 train images"


def test_aspect_groups_all_present(toy):
    boxes = [a["bbox"] for a in toy[1]["train"]["annotations"] if not a["iscrowd"]]
    groups = [_group(w, h) for _, _, w, h in boxes]
    assert 2 * len(toy[1]["train"]["images"]) <= len(boxes) <= 6 * len(toy[1]["train"]["images"])
    for g in "STW":
        assert groups.count(g) >= 0.1 * len(groups), (g, groups.count(g), len(groups))
    if mtc._group_of is not None:  # the script agrees with the project's definition
        assert all(mtc.group_of(w, h) == _group(w, h) for _, _, w, h in boxes)


def test_boxes_inside_and_match_masks(toy):
    out, cocos = toy
    for split, coco_dict in cocos.items():
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        for a in coco_dict["annotations"]:
            img = coco.imgs[a["image_id"]]
            W, H = img["width"], img["height"]
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= W and y + h <= H, a["bbox"]
            assert min(w, h) >= (3 if a["iscrowd"] else 10)
            if not a["iscrowd"]:
                assert isinstance(a["segmentation"], list) and len(a["segmentation"]) == 1
                poly = np.asarray(a["segmentation"][0], np.float64).reshape(-1, 2)
                assert len(poly) >= 3
                lo, hi = poly.min(0), poly.max(0)
                np.testing.assert_allclose([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]],
                                           a["bbox"], atol=0.011)
            m = coco.annToMask(a)
            assert m.shape == (H, W)
            assert abs(float(m.sum()) - a["area"]) <= 0.5
            ys, xs = np.nonzero(m)
            mb = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
            bb = np.array([x, y, x + w, y + h])
            # the rasterised mask lies inside the box (1 px slack) and nearly fills it
            assert (mb[:2] >= bb[:2] - 1).all() and (mb[2:] <= bb[2:] + 1).all()
            inter = np.prod(np.minimum(mb[2:], bb[2:]) - np.maximum(mb[:2], bb[:2]))
            union = np.prod(mb[2:] - mb[:2]) + w * h - inter
            assert inter / union > 0.75, (a["bbox"], mb)
            # a polygon's rasterised area is a good part of its box (it is a solid shape)
            assert a["area"] >= 0.1 * w * h


def test_objects_do_not_share_pixels(toy):
    out, cocos = toy
    coco = COCO(str(out / "annotations" / "instances_train.json"))
    for img_id in list(coco.imgs)[:8]:
        masks = [coco.annToMask(a) for a in coco.imgToAnns[img_id]]
        assert max(int(np.sum(masks, 0).max()), 1) == 1


def test_crowd_regions_in_larger_run(tmp_path):
    cocos = mtc.main(["--out", str(tmp_path), "--seed", "1", "--num-train", "40",
                      "--num-val", "0"])
    crowd = [a for a in cocos["train"]["annotations"] if a["iscrowd"]]
    assert len(crowd) == 2  # round(5 % of 40)
    assert len({a["image_id"] for a in crowd}) == 2
    assert cocos["val"]["images"] == []
    for a in crowd:
        seg = a["segmentation"]
        assert isinstance(seg, dict) and isinstance(seg["counts"], str)
        assert seg["size"] == [192, 256]
        rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        np.testing.assert_allclose(mask_utils.toBbox(rle), a["bbox"])
        assert float(mask_utils.area(rle)) == a["area"]
    COCO(str(tmp_path / "annotations" / "instances_train.json"))


def test_deterministic(tmp_path, capsys):
    args = ["--num-train", "4", "--num-val", "2", "--size", "200", "150"]
    mtc.main(["--out", str(tmp_path / "a"), "--seed", "7"] + args)
    mtc.main(["--out", str(tmp_path / "b"), "--seed", "7"] + args)
    mtc.main(["--out", str(tmp_path / "c"), "--seed", "8"] + args)
    a, b, c = (_files(tmp_path / k) for k in "abc")
    assert len(a) == 2 + 4 + 2
    assert a == b, "same seed must give byte-identical files"
    assert a.keys() == c.keys()
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    for k in a:
        if k.endswith(".jpg"):
            assert a[k] != c[k], k
    img = cv2.imread(str(tmp_path / "a" / "train" / "000001.jpg"))
    assert img.shape == (150, 200, 3)
    text = capsys.readouterr().out
    for word in ("[train]", "[val]", "boxes", "crowd", "groups", "S ", "T ", "W ", "star"):
        assert word in text


def test_rerun_removes_stale_images(tmp_path):
    mtc.main(["--out", str(tmp_path), "--num-train", "3", "--num-val", "1"])
    (tmp_path / "train" / "notes.txt").write_text("keep me")
    mtc.main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1"])
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "000001.jpg", "000002.jpg", "notes.txt"]
    assert len(json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
               ["images"]) == 2

"""
Hardening against bad input: damaged JPEGs that still end in FF D9, banks that are not (whole)
HDF5 files or whose index is damaged, odd json numbers. Each case gives one line naming the item
(file, image id, annotation id, path) and the fix; nothing written before is lost.
"""

import glob
import json
import logging
import os
import shutil

import cv2
import h5py
import numpy as np
import pytest

from bank_helpers import build, make_dataset, read_bank
from builder.bank import BankFormatError, SampleBank
from builder.cli import main
from builder.show import write_grid
from builder.testing import write_synthetic_coco

CHESS = "/work/shared/data/chess/test"


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- damaged JPEG data that still ends in FF D9 ------------------------------------------------


def _damage_jpeg(path, how):
    """
    Damages the entropy-coded data of a baseline JPEG in its middle, keeping the FF D9 end:
    "grey" cuts the scan there (libjpeg fills the rest grey), "garbled" overwrites 48 bytes (no
    FF among them, so no marker) and the rest decodes as garbage.
    """
    data = open(path, "rb").read()
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    mid = (start + len(data) - 2) // 2
    if how == "grey":
        bad = data[:mid] + b"\xff\xd9"
    else:
        bad = data[:mid] + bytes((np.arange(48) * 37 + 5) % 255) + data[mid + 48 :]
    assert bad.endswith(b"\xff\xd9")
    # Silent to OpenCV: an image comes back, but wrong in its lower part.
    clean = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == clean.shape
    assert (np.abs(img.astype(int) - clean).mean(axis=(1, 2)) > 8).sum() > img.shape[0] // 4
    with open(path, "wb") as f:
        f.write(bad)


@pytest.mark.parametrize("how", ["grey", "garbled"])
def test_damaged_jpeg_with_end_marker_is_corrupt_image(tmp_path, caplog, capfd, how):
    json_path, img_dir = write_synthetic_coco(str(tmp_path / "data"), num_images=4,
                                              size=(320, 240))
    names = sorted(os.listdir(img_dir))
    _damage_jpeg(os.path.join(img_dir, names[1]), how)
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out) == 0
    bank = read_bank(out)
    assert bank["counts"]["problems"] == {"corrupt_image": 1}
    assert bank["counts"]["images"]["failed"] == 1 and bank["counts"]["images"]["decoded"] == 3
    bad_id = int(names[1].split(".")[0])
    assert bad_id not in set(bank["image_id"].tolist())  # no crop of the damaged image
    line = [m for m in _warnings(caplog) if names[1] in m]
    assert len(line) == 1 and "Corrupt JPEG data" in line[0] and "json" in line[0]
    capfd.readouterr()
    # --strict: fatal, one line on stderr (libjpeg's own line went into the message), no output
    # and no temp file.
    strict = tmp_path / "s.h5"
    assert build(json_path, img_dir, strict, "--strict") == 1
    err = _one_line(capfd.readouterr().err)
    assert "corrupt_image: 1" in err and "--strict" in err
    assert not strict.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    os.write(2, b"after the build\n")  # stderr (fd 2) is restored after every decode
    assert capfd.readouterr().err == "after the build\n"


def test_damaged_real_jpeg_is_corrupt_image(tmp_path, caplog):
    """The issue's case on a real photo (chess, 640x428): its crops came out grey."""
    files = sorted(glob.glob(os.path.join(CHESS, "*.jpg")))
    if not files:
        pytest.skip(f"real data not found: {CHESS} (see /work/shared/data/README.md)")
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for k, src in enumerate(files[:2]):
        shutil.copy(src, img_dir / f"{k}.jpg")
    _damage_jpeg(str(img_dir / "1.jpg"), "grey")
    images = [{"id": k, "file_name": f"{k}.jpg", "width": 640, "height": 428} for k in range(2)]
    anns = [{"id": 10 * k + j + 1, "image_id": k, "category_id": 1, "iscrowd": 0,
             "bbox": [40.0 + 120 * j, 40.0 + 90 * j, 60.0, 80.0]}
            for k in range(2) for j in range(4)]
    json_path = tmp_path / "a.json"
    json_path.write_text(json.dumps({"images": images, "annotations": anns,
                                     "categories": [{"id": 1, "name": "piece"}]}))
    assert build(json_path, img_dir, tmp_path / "b.h5") == 0
    bank = read_bank(tmp_path / "b.h5")
    assert bank["counts"]["problems"] == {"corrupt_image": 1}
    assert set(bank["image_id"].tolist()) == {0}
    line = [m for m in _warnings(caplog) if str(img_dir / "1.jpg") in m]
    assert len(line) == 1 and "Corrupt JPEG data" in line[0]
    assert build(json_path, img_dir, tmp_path / "s.h5", "--strict") == 1


# --- banks that are not whole HDF5 files, or whose index is damaged ------------------------------


@pytest.fixture
def good_bank(tmp_path):
    json_path, img_dir = write_synthetic_coco(str(tmp_path / "data"), num_images=3)
    out = tmp_path / "good.h5"
    assert build(json_path, img_dir, out) == 0
    return out


def _bad_bank(tmp_path, good_bank, kind):
    path = tmp_path / f"{kind}.h5"
    data = good_bank.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("not a bank\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # index past the last row
        shutil.copy(good_bank, path)
        with h5py.File(path, "a") as h5:
            idx = h5["index/S"][()]
            idx[-1] = len(h5["label"]) + 5
            del h5["index/S"]
            h5["index/S"] = idx
    return path


@pytest.mark.parametrize("kind,expected", [
    ("truncated", "truncated HDF5 file"),
    ("text", "not an HDF5 file"),
    ("empty", "not an HDF5 file"),
    ("index", "index/S holds row"),
])
def test_damaged_bank_one_line_in_info_show_and_reader(tmp_path, good_bank, capsys, kind,
                                                       expected):
    path = _bad_bank(tmp_path, good_bank, kind)
    assert main(["info", str(path)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert str(path) in err and expected in err and ("rebuild" in err or "build --out" in err)
    assert main(["show", str(path), "--out", str(tmp_path / "g.png")]) == 1
    assert _one_line(capsys.readouterr().err) == err
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(BankFormatError) as e:
        SampleBank(str(path)).group_indices(0)
    assert f"builder: error: {e.value}" == err


@pytest.mark.parametrize("kind", ["truncated", "text", "index"])
def test_damaged_bank_as_montage_bank(tmp_path, good_bank, kind):
    """MONTAGE.BANK is read through SampleBank: the same one-line message as `builder info`."""
    data = pytest.importorskip("montage_pretrain.data",
                               reason="pre-training package montage_pretrain not importable")
    path = _bad_bank(tmp_path, good_bank, kind)
    with pytest.raises(BankFormatError) as want:
        SampleBank(str(path)).group_indices(0)
    with pytest.raises(BankFormatError) as e:
        data.MontageStream(str(path))
    assert str(e.value) == str(want.value) and str(path) in str(e.value)


def test_show_out_without_png_suffix(good_bank, tmp_path, capsys):
    out = tmp_path / "grid"
    with pytest.raises(SystemExit) as e:
        main(["show", str(good_bank), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(out) in err and ".png" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"ending in \.png"):
        write_grid(str(good_bank), str(out))
    assert main(["show", str(good_bank), "--out", str(tmp_path / "grid.PNG")]) == 0


# --- json numbers: huge ids, non-finite boxes, float sizes ------------------------------------


def test_image_id_beyond_int64(tmp_path, caplog):
    json_path, img_dir, ids = make_dataset(tmp_path, [[{"bbox": [10, 10, 40, 40]}]] * 3)
    data = json.load(open(json_path))
    for img, new_id in zip(data["images"][:2], (2**63, -(2**63) - 1)):
        for ann in data["annotations"]:
            if ann["image_id"] == img["id"]:
                ann["image_id"] = new_id
        img["id"] = new_id
    json.dump(data, open(json_path, "w"))
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out) == 0
    bank = read_bank(out)
    assert bank["counts"]["problems"] == {"bad_image_record": 2}  # no orphan_annotation
    assert set(bank["image_id"].tolist()) == {ids[2]}
    for bad in (2**63, -(2**63) - 1):
        line = [m for m in _warnings(caplog) if f"image {bad}:" in m]
        assert len(line) == 1 and "int64" in line[0] and "1 annotation(s)" in line[0]


def test_non_finite_box_skipped_and_counted(tmp_path, caplog):
    json_path, img_dir, ids = make_dataset(tmp_path, [[{"bbox": [10, 10, 40, 40]}]])
    data = json.load(open(json_path))
    for k, bbox in enumerate([
        [10, 10, float("inf"), 40],  # json Infinity: would crop the rest of the image
        [10, 10, 40, float("nan")],
        [float("-inf"), 60, 40, 40],
        [1e308, 10, 1e308, 40],  # x + w overflows to infinity
    ]):
        data["annotations"].append({"id": k + 2, "image_id": ids[0], "category_id": 1,
                                    "bbox": bbox})
    json.dump(data, open(json_path, "w"))
    assert "Infinity" in open(json_path).read()  # what json.dump writes and json.load reads
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out, "--neg-ratio", 0) == 0
    bank = read_bank(out)
    assert bank["counts"]["problems"] == {"bad_annotation": 4}
    assert (bank["label"] == 0).sum() == 1
    np.testing.assert_allclose(bank["box"][0], [10, 10, 50, 50])
    msgs = _warnings(caplog)
    for ann_id in (2, 3, 4, 5):
        line = [m for m in msgs if f"annotation {ann_id} (image {ids[0]})" in m]
        assert len(line) == 1 and "NaN or infinite" in line[0] and "json" in line[0]
    assert build(json_path, img_dir, tmp_path / "s.h5", "--strict") == 1


def test_integral_float_sizes_accepted_others_named(tmp_path, caplog):
    json_path, img_dir, ids = make_dataset(tmp_path, [[{"bbox": [10, 10, 40, 40]}]] * 4)
    data = json.load(open(json_path))
    data["images"][0].update(width=200.0, height=160.0)  # whole numbers written as floats
    data["images"][1]["width"] = 200.5
    data["images"][2]["height"] = "160"
    # A rejected entry listed again correctly: the good entry keeps the annotations.
    data["images"].append(dict(data["images"][3]))
    data["images"][3]["width"] = 0
    json.dump(data, open(json_path, "w"))
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out) == 0
    bank = read_bank(out)
    assert bank["counts"]["problems"] == {"bad_image_record": 3}  # no orphan_annotation
    assert set(bank["image_id"].tolist()) == {ids[0], ids[3]}
    msgs = _warnings(caplog)
    assert not [m for m in msgs if "not in 'images'" in m]
    for image_id, field in ((ids[1], "'width' 200.5"), (ids[2], "'height' '160'")):
        line = [m for m in msgs if f"image {image_id}:" in m]
        assert len(line) == 1 and field in line[0] and "whole number" in line[0]
        assert "1 annotation(s)" in line[0]

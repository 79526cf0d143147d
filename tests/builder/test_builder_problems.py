"""Bad input: each problem is one clear line, counted in the summary; --strict fails the build."""

import json
import logging
import os

import pytest

from bank_helpers import build, make_dataset, read_bank, synthetic


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def broken(tmp_path):
    """6 images: one missing, one garbage, one truncated JPEG; returns (json, dir, names)."""
    json_path, img_dir = synthetic(tmp_path, num_images=6)
    names = sorted(os.listdir(img_dir))
    os.remove(os.path.join(img_dir, names[0]))
    with open(os.path.join(img_dir, names[1]), "wb") as f:
        f.write(b"this is not a jpeg")
    path = os.path.join(img_dir, names[2])
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return json_path, img_dir, names


def test_missing_and_corrupt_images_reported(tmp_path, broken, caplog, capsys):
    json_path, img_dir, names = broken
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out) == 0
    c = read_bank(out)["counts"]
    assert c["problems"] == {"corrupt_image": 2, "missing_file": 1}
    assert c["images"]["missing"] == 1 and c["images"]["failed"] == 2
    assert c["images"]["decoded"] == 3
    msgs = _messages(caplog)
    for name in names[:3]:
        line = [m for m in msgs if name in m]
        assert len(line) == 1 and "\n" not in line[0] and "json" in line[0]
    assert any("truncated JPEG" in m for m in msgs)
    assert "problems: corrupt_image 2, missing_file 1" in capsys.readouterr().out


def test_strict_fails_without_output(tmp_path, broken, capsys):
    json_path, img_dir, _ = broken
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out, "--strict") == 1
    err = capsys.readouterr().err
    assert "--strict" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # A corrupt image found only while decoding also stops a --strict build.
    json_path, img_dir = synthetic(tmp_path / "second", num_images=3)
    with open(os.path.join(img_dir, sorted(os.listdir(img_dir))[1]), "wb") as f:
        f.write(b"\xff\xd8 garbage")
    assert build(json_path, img_dir, out, "--strict") == 1
    err = capsys.readouterr().err
    assert "corrupt_image: 1" in err and not out.exists()


@pytest.mark.parametrize(
    "content,expected",
    [
        ("[1, 2, 3]", "top level is a list"),
        ('{"images": [], "annotations": []}', "missing or non-list key(s): categories"),
        ('{"images": [], "categories": [{"id": 1}], "annotations": {}}', "annotations"),
        ("{not json", "not valid JSON"),
    ],
)
def test_not_coco_json(tmp_path, capsys, content, expected):
    path = tmp_path / "x.json"
    path.write_text(content)
    assert build(path, tmp_path, tmp_path / "b.h5") == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and str(path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.h5").exists()


def test_missing_json_file(tmp_path, capsys):
    assert build(tmp_path / "nope.json", tmp_path, tmp_path / "b.h5") == 1
    assert "annotations file not found" in capsys.readouterr().err


def test_unknown_category_reported_and_still_blocks_negatives(tmp_path, caplog):
    anns = [{"bbox": [10, 10, 40, 40]}, {"bbox": [0, 60, 200, 100], "category_id": 99}]
    json_path, img_dir, _ = make_dataset(tmp_path, [anns] * 10)
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out) == 0
    bank = read_bank(out)
    assert bank["counts"]["problems"] == {"unknown_category": 10}
    assert bank["counts"]["annotations"]["skipped"]["unknown_category"] == 10
    assert (bank["label"] < 2).sum() == 10
    neg = bank["box"][bank["label"] == 2]
    assert len(neg) == 1 and neg[0, 3] <= 60  # never inside the unknown-category box
    assert any("category_id 99" in m and "add the category" in m for m in _messages(caplog))
    assert build(json_path, img_dir, tmp_path / "s.h5", "--strict") == 1


def test_bad_records_reported(tmp_path):
    json_path, img_dir, _ = make_dataset(tmp_path, [[{"bbox": [10, 10, 40, 40]}]])
    data = json.load(open(json_path))
    data["images"].append({"id": 77, "file_name": "x.jpg"})  # no width/height
    data["annotations"] += [
        {"id": 900, "image_id": 10, "bbox": [1, 2]},
        {"id": 901, "image_id": 555, "bbox": [1, 2, 3, 4], "category_id": 1},
    ]
    json.dump(data, open(json_path, "w"))
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out) == 0
    assert read_bank(out)["counts"]["problems"] == {
        "bad_annotation": 1,
        "bad_image_record": 1,
        "orphan_annotation": 1,
    }


def test_empty_dataset_fails(tmp_path, capsys):
    json_path, img_dir, _ = make_dataset(tmp_path, [])
    assert build(json_path, img_dir, tmp_path / "b.h5") == 1
    assert "no usable crops" in capsys.readouterr().err
    # Only tiny boxes: nothing usable either.
    json_path, img_dir, _ = make_dataset(tmp_path, [[{"bbox": [5, 5, 4, 4]}]])
    assert build(json_path, img_dir, tmp_path / "b.h5") == 1
    assert "no usable crops" in capsys.readouterr().err
    assert not (tmp_path / "b.h5").exists()


def test_bad_arguments_exit_2(tmp_path):
    for bad in (
        ["--enlarge", "1.5", "1.0"],
        ["--quality", "0"],
        ["--workers", "0"],
        ["--enlarge", "0.5", "1.0"],
    ):
        with pytest.raises(SystemExit) as e:
            build(tmp_path / "a.json", tmp_path, tmp_path / "b.h5", *bad)
        assert e.value.code == 2


def test_size_mismatch_reported_and_boxes_clipped_to_pixels(tmp_path):
    json_path, img_dir, _ = make_dataset(tmp_path, [[{"bbox": [150, 10, 40, 40]}]])
    data = json.load(open(json_path))
    data["images"][0]["width"] = 400  # the file is 200 px wide
    json.dump(data, open(json_path, "w"))
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out, "--neg-ratio", 0) == 0
    bank = read_bank(out)
    assert bank["counts"]["problems"] == {"size_mismatch": 1}
    assert bank["crop_box"][:, 2].max() <= 200
    assert build(json_path, img_dir, tmp_path / "s.h5", "--strict") == 1

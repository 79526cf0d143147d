"""End-to-end rules of `python -m builder build` on tiny synthetic datasets."""

import json
import os

import cv2
import numpy as np

from bank_helpers import assert_same_content, build, make_dataset, read_bank, synthetic
from builder.sampling import intersection_areas
from builder.bank import GROUP_S, GROUP_T, GROUP_W


def _boxes_of(json_path):
    """image_id -> (K, 4) xyxy of every annotation, crowd and tiny included."""
    data = json.load(open(json_path))
    out = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        out.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    return {k: np.array(v) for k, v in out.items()}


def test_bank_layout_and_negative_rules(tmp_path):
    json_path, img_dir = synthetic(tmp_path, num_images=12, objects_per_image=6)
    out = tmp_path / "bank.h5"
    assert build(json_path, img_dir, out, "--seed", 3) == 0
    bank = read_bank(out)
    c = bank["counts"]
    num_classes = bank["attrs"]["num_classes"]
    assert num_classes == 3 and bank["attrs"]["category_ids"] == [1, 3, 5]
    neg = bank["label"] == num_classes
    pos_n, neg_n = int((~neg).sum()), int(neg.sum())
    # 10:1 over the bank, exactly up to rounding.
    assert neg_n == round(0.1 * pos_n) and pos_n == c["samples"]["positives"] == 72
    assert c["annotations"]["skipped"]["crowd"] == 12 and c["annotations"]["skipped"]["tiny"] == 12
    # Negatives: IoU = 0 with every annotation of their image (crowd and tiny boxes included).
    gt = _boxes_of(json_path)
    for box, image_id in zip(bank["box"][neg], bank["image_id"][neg]):
        assert intersection_areas(box[None], gt[image_id]).max() == 0
    np.testing.assert_array_equal(bank["box"][neg], bank["crop_box"][neg])
    # Positives: the crop contains the box and is at most 1.5x (+ pixel snapping) per side.
    box, crop = bank["box"][~neg], bank["crop_box"][~neg]
    assert np.all(crop[:, :2] <= box[:, :2]) and np.all(crop[:, 2:] >= box[:, 2:])
    assert np.all(crop[:, 2:] - crop[:, :2] <= 1.5 * (box[:, 2:] - box[:, :2]) + 2)
    # Index datasets list each group's rows in ascending order and partition the bank.
    allidx = np.concatenate([bank["index/S"], bank["index/T"], bank["index/W"]])
    assert sorted(allidx.tolist()) == list(range(len(bank["label"])))
    for g, name in enumerate("STW"):
        assert np.all(bank["group"][bank[f"index/{name}"]] == g)
        assert np.all(np.diff(bank[f"index/{name}"]) > 0)
    assert len(bank["index/T"]) and len(bank["index/W"]) and len(bank["index/S"])
    # Stored sizes match the encoded crops; everything is at most --max-side.
    for i in range(0, len(bank["crops"]), 7):
        img = cv2.imdecode(np.frombuffer(bank["crops"][i], np.uint8), cv2.IMREAD_COLOR)
        assert img.shape[:2] == tuple(bank["size"][i])
    assert bank["size"].max() <= 256
    assert bank["attrs"]["build_args"]["seed"] == 3
    # Rows are in image order.
    assert np.all(np.diff(bank["image_id"][~neg]) >= 0)


def test_exact_group_boundaries_from_stored_size(tmp_path):
    boxes = [
        [10, 10, 50, 100],
        [70, 10, 150, 100],
        [10, 120, 49, 100],
        [70, 120, 151, 100],
        [10, 230, 149, 299],
    ]
    json_path, img_dir, _ = make_dataset(tmp_path, [[{"bbox": b} for b in boxes]], size=(320, 540))
    full = tmp_path / "full.h5"
    assert (
        build(json_path, img_dir, full, "--enlarge", 1, 1, "--max-side", 0, "--neg-ratio", 0) == 0
    )
    bank = read_bank(full)
    np.testing.assert_array_equal(
        bank["size"], [[100, 50], [100, 150], [100, 49], [100, 151], [299, 149]]
    )
    # w/h = 0.5 and 1.5 are S (inclusive), 0.49 is T, 1.51 is W, 149/299 = 0.498 is T.
    assert bank["group"].tolist() == [GROUP_S, GROUP_S, GROUP_T, GROUP_W, GROUP_T]
    # With --max-side 256, 149x299 is stored as 128x256 (w/h = 0.5): the group follows the
    # stored crop, not the source box.
    small = tmp_path / "small.h5"
    assert build(json_path, img_dir, small, "--enlarge", 1, 1, "--neg-ratio", 0) == 0
    bank = read_bank(small)
    assert bank["size"][4].tolist() == [256, 128] and bank["group"][4] == GROUP_S


def test_skip_reasons_counted(tmp_path):
    anns = [
        {"bbox": [10, 10, 40, 40]},  # positive
        {"bbox": [60, 10, 40, 40], "iscrowd": 1},  # crowd
        {"bbox": [10, 60, 0, 30]},  # degenerate
        {"bbox": [10, 60, 30, -5]},  # degenerate
        {"bbox": [300, 10, 20, 20]},  # outside
        {"bbox": [120, 100, 5, 30]},  # tiny
        {"bbox": [180, 120, 50, 50]},  # partly outside: clipped, kept
    ]
    json_path, img_dir, _ = make_dataset(tmp_path, [anns], draw=False)
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out, "--neg-ratio", 0) == 0
    bank = read_bank(out)
    assert bank["counts"]["annotations"]["skipped"] == {
        "crowd": 1,
        "degenerate": 2,
        "outside": 1,
        "tiny": 1,
        "unknown_category": 0,
    }
    assert len(bank["label"]) == 2
    np.testing.assert_allclose(bank["box"][1], [180, 120, 200, 160])  # clipped to 200 x 160
    assert bank["crop_box"][1, 2] <= 200 and bank["crop_box"][1, 3] <= 160


def test_shortfall_made_up_from_images_with_room(tmp_path):
    # Image 10 is fully covered by 10 boxes (2 x 5 tiles): its negative cannot be placed.
    tiles = [{"bbox": [40 * i, 80 * j, 40, 80]} for i in range(5) for j in range(2)]
    json_path, img_dir, ids = make_dataset(tmp_path, [tiles, [{"bbox": [10, 10, 30, 30]}]])
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out) == 0
    c = read_bank(out)["counts"]["negatives"]
    assert c["target"] == 1 and c["placed_by_pass"] == [0, 1] and c["shortfall"] == 0
    assert c["images_exhausted"] == 1 and c["exhausted_image_ids"] == [ids[0]]
    bank = read_bank(out)
    assert bank["image_id"][bank["label"] == 2].tolist() == [ids[1]]


def test_deterministic_across_runs_and_workers(tmp_path):
    json_path, img_dir = synthetic(tmp_path, num_images=10)
    banks = {}
    for name, args in {
        "a": ("--workers", 1),
        "b": ("--workers", 1),
        "c": ("--workers", 2),
        "d": ("--workers", 1, "--seed", 1),
    }.items():
        assert build(json_path, img_dir, tmp_path / f"{name}.h5", *args) == 0
        banks[name] = read_bank(tmp_path / f"{name}.h5")
    assert_same_content(banks["a"], banks["b"])
    assert_same_content(banks["a"], banks["c"])
    assert not np.array_equal(banks["a"]["crop_box"], banks["d"]["crop_box"])


def test_max_images_and_png_encoding(tmp_path):
    json_path, img_dir = synthetic(tmp_path, num_images=6)
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out, "--max-images", 2, "--encoding", "png") == 0
    bank = read_bank(out)
    assert len(set(bank["image_id"].tolist())) == 2 and bank["attrs"]["encoding"] == "png"
    assert bank["crops"][0][:4] == b"\x89PNG"
    assert bank["counts"]["images"]["selected"] == 2


def test_no_overwrite_and_atomic_output(tmp_path, capsys, monkeypatch):
    json_path, img_dir = synthetic(tmp_path, num_images=3)
    out = tmp_path / "b.h5"
    out.write_bytes(b"precious")
    assert build(json_path, img_dir, out) == 1
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"precious"
    # A build that dies half-way leaves neither the output nor its temp file behind.
    import builder.build as build_mod

    calls = {"n": 0}
    real = build_mod.extract_image

    def dying(task, opts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(task, opts)

    monkeypatch.setattr(build_mod, "extract_image", dying)
    try:
        build(json_path, img_dir, tmp_path / "new.h5")
    except RuntimeError:
        pass
    assert sorted(os.listdir(tmp_path)) == ["b.h5", "data"]
    monkeypatch.undo()
    assert build(json_path, img_dir, out, "--overwrite") == 0
    assert read_bank(out)["attrs"]["format"] == "montage-sample-bank"
    assert sorted(os.listdir(tmp_path)) == ["b.h5", "data"]


def test_writer_handles_single_and_equal_length_crops(tmp_path):
    import h5py

    from builder.bank import check_bank
    from builder.writer import BankWriter

    for crops in ([b"abc"], [b"abc", b"xyz"], [b"a", b"bc", b"def"]):
        out = str(tmp_path / "w.h5")
        n = len(crops)
        with BankWriter(out, chunk_rows=2) as w:
            w.append(
                crops,
                np.zeros(n, np.int32),
                np.zeros(n, np.uint8),
                np.ones((n, 2), np.int32),
                7,
                np.zeros((n, 4), np.float32),
                np.zeros((n, 4), np.float32),
            )
            w.finalize({"num_classes": 1})
        with h5py.File(out, "r") as h5:
            check_bank(h5, out)
            assert [bytes(c) for c in h5["crops"][...]] == crops
            assert h5["image_id"][...].tolist() == [7] * n


def test_killed_build_leaves_no_valid_file(tmp_path):
    """A temp file left by a killed process (no finalize) is never mistaken for a bank."""
    import h5py
    import pytest

    from builder.bank import BankFormatError, check_bank
    from builder.writer import BankWriter

    out = str(tmp_path / "b.h5")
    w = BankWriter(out)
    w.append(
        [b"abc"],
        np.zeros(1, np.int32),
        np.zeros(1, np.uint8),
        np.ones((1, 2), np.int32),
        1,
        np.zeros((1, 4), np.float32),
        np.zeros((1, 4), np.float32),
    )
    w.flush()
    w.h5.close()  # what a SIGKILL leaves behind: data, but no index and no format attribute
    assert not os.path.exists(out) and os.path.exists(w.tmp_path)
    assert w.tmp_path.startswith(out + ".tmp-")
    with h5py.File(w.tmp_path, "r") as h5, pytest.raises(BankFormatError):
        check_bank(h5, w.tmp_path)


def test_stored_group_matches_stored_size(tmp_path):
    from builder.bank import group_of

    json_path, img_dir = synthetic(tmp_path, num_images=6)
    out = tmp_path / "b.h5"
    assert build(json_path, img_dir, out, "--max-side", 32) == 0
    bank = read_bank(out)
    assert bank["size"].max() == 32
    assert [group_of(w, h) for h, w in bank["size"]] == bank["group"].tolist()

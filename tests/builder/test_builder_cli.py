"""`info` and `show` sub-commands."""

import cv2

from bank_helpers import build, synthetic
from builder.cli import main, parse_args


def test_parse_args_defaults():
    args = parse_args(["build", "--annotations", "a.json", "--images", "d", "--out", "b.h5"])
    assert (args.seed, args.workers, args.max_side, args.neg_ratio, args.min_size) == (
        0,
        1,
        256,
        0.1,
        8,
    )
    assert args.enlarge == [1.0, 1.5] and args.encoding == "jpeg" and not args.strict


def test_crop_defaults_declared_once():
    """The CLI, BuildOptions and ExtractOptions share one set of crop defaults."""
    from builder.build import BuildOptions
    from builder.extract import ExtractOptions

    args = parse_args(["build", "--annotations", "a.json", "--images", "d", "--out", "b.h5"])
    build, extract = BuildOptions(), ExtractOptions()
    for key in ("max_side", "quality", "encoding", "min_size", "seed"):
        assert getattr(args, key) == getattr(build, key) == getattr(extract, key), key
    assert tuple(args.enlarge) == tuple(build.enlarge) == tuple(extract.enlarge)


def test_info_and_show(tmp_path, capsys):
    json_path, img_dir = synthetic(tmp_path, num_images=10)
    bank = tmp_path / "b.h5"
    assert build(json_path, img_dir, bank) == 0
    capsys.readouterr()
    assert main(["info", str(bank)]) == 0
    out = capsys.readouterr().out
    assert "samples: 44  positives: 40  negatives: 4  pos:neg = 10.00:1" in out
    for text in (
        "  S:",
        "  T:",
        "  W:",
        "background",
        "cat5",
        "crop size",
        "build args:",
        '"neg_ratio": 0.1',
        "counts:",
        '"tiny": 10',
    ):
        assert text in out, text
    png = tmp_path / "grid.png"
    assert main(["show", str(bank), "--out", str(png), "--per-group", "4", "--cell", "64"]) == 0
    grid = cv2.imread(str(png))
    assert grid.shape == (3 * 64, 48 + 4 * 64, 3)
    assert grid.std() > 10  # crops were drawn, not an empty canvas


def test_info_rejects_non_bank(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.h5")]) == 1
    assert "no such bank file" in capsys.readouterr().err
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    assert main(["show", str(tmp_path / "other.h5"), "--out", str(tmp_path / "g.png")]) == 1
    assert "not a Montage sample bank" in capsys.readouterr().err


def test_show_picks_negatives_rightmost():
    import numpy as np

    from builder.show import _pick

    labels = np.array([0, 1, 3, 0, 3, 3, 2, 1])  # C = 3
    index = np.arange(8)
    rng = np.random.default_rng(0)
    pick = _pick(index, labels, 3, 4, 2, rng)
    assert len(pick) == 4 and (labels[pick] == 3).tolist() == [False, False, True, True]
    # Too few positives: negatives fill the row; too few samples: the row is shorter.
    assert len(_pick(index[2:6], labels, 3, 4, 1, rng)) == 4
    assert len(_pick(index[:2], labels, 3, 4, 2, rng)) == 2

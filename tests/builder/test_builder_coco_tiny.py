"""End to end on the shared coco_tiny subset (skipped when it is not on this machine)."""

import json
import os
import re

import pytest

from bank_helpers import build, read_bank
from builder.cli import main

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CANDIDATES = (
    "/work/shared/data/coco_tiny",
    os.path.join(_REPO, "..", "shared", "data", "coco_tiny"),
)
COCO_TINY = next((p for p in _CANDIDATES if os.path.isdir(os.path.join(p, "train2017"))), None)


@pytest.mark.skipif(
    COCO_TINY is None,
    reason="coco_tiny not found at /work/shared/data/coco_tiny "
    "or ../shared/data/coco_tiny next to the repo; the synthetic tests cover the rules",
)
def test_build_and_info_on_coco_tiny(tmp_path, capsys):
    json_path = os.path.join(COCO_TINY, "annotations", "instances_train2017.json")
    out = tmp_path / "tiny.h5"
    assert (
        build(
            json_path, os.path.join(COCO_TINY, "train2017"), out, "--max-images", 20, "--workers", 2
        )
        == 0
    )
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    m = re.search(r"samples: (\d+)  positives: (\d+)  negatives: (\d+)  pos:neg = ([\d.]+):1", text)
    total, pos, neg, ratio = int(m[1]), int(m[2]), int(m[3]), float(m[4])
    assert total == pos + neg and pos > 50 and neg == round(0.1 * pos) and 9.0 <= ratio <= 11.0
    counts = json.loads(re.search(r"^counts: (.*)$", text, re.M)[1])
    assert counts["images"]["selected"] == 20 and counts["problems"] == {}
    ann = counts["annotations"]
    # Every annotation is either a positive or skipped for a counted reason.
    assert pos == ann["total"] - sum(ann["skipped"].values())
    bank = read_bank(out)
    assert bank["attrs"]["category_names"][0] == "person"
    assert bank["attrs"]["num_classes"] == 80
    for g in "STW":
        assert len(bank[f"index/{g}"]) > 0

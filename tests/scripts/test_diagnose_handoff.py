"""scripts/diagnose_handoff.py: dead res5 units measured, and the bn_reset variant reviving them."""
import json
import pickle

import cv2
import numpy as np
import pytest


@pytest.fixture(scope="module")
def diagnose(load_script):
    return load_script("diagnose_handoff")


def kill_res5(src, dst):
    """``src`` with the last BN of res5 shifted far below zero: res5's output is dead."""
    with open(src, "rb") as f:
        data = pickle.load(f)
    data["model"]["res5.1.conv2.norm.bias"] = np.full_like(data["model"]["res5.1.conv2.norm.bias"],
                                                           -50.0)
    with open(dst, "wb") as f:
        pickle.dump(data, f)


def test_bn_reset_variant_revives_the_dead_units_it_diagnoses(diagnose, r18_export, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (80, 120, 3), np.uint8))
    killed, revived = str(tmp_path / "killed.pkl"), str(tmp_path / "revived.pkl")
    kill_res5(r18_export, killed)
    assert diagnose.main(["--weights", killed, "--write-variant", "init_scale_bn_reset",
                          "--out", revived]) == 0
    with open(revived, "rb") as f:
        data = pickle.load(f)
    assert data["montage"]["variant"] == "init_scale_bn_reset"
    assert data["montage"]["weight_scale"] == "init"
    assert np.all(data["model"]["res5.1.conv2.norm.bias"] == 0)
    assert np.all(data["model"]["stem.conv1.norm.weight"] == 1)

    out = tmp_path / "diag.json"
    assert diagnose.main(["--images", str(images), "--num-images", "2", "--size", "64",
                          "--weights", killed, "--weights", revived, "--json", str(out),
                          "MODEL.ROI_HEADS.NUM_CLASSES", "3"]) == 0
    results = json.loads(out.read_text())["results"]
    random_init = next(v for k, v in results.items() if k.startswith("random init"))
    assert results[killed]["res5"]["dead"] == 1.0
    assert results[revived]["res5"]["dead"] == 0.0
    assert random_init["res5"]["dead"] == 0.0
    assert results[killed]["res4"]["dead"] == 0.0

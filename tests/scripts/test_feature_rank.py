"""scripts/feature_rank.py: random init vs a healthy and a deliberately collapsed export."""
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def collapse(src, dst):
    """Copies the export ``src`` to ``dst`` with every conv's output channels made identical."""
    with open(src, "rb") as f:
        data = pickle.load(f)
    for k, v in data["model"].items():
        if v.ndim == 4:
            data["model"][k] = np.ascontiguousarray(np.broadcast_to(v[:1], v.shape))
    with open(dst, "wb") as f:
        pickle.dump(data, f)


def test_feature_rank_flags_collapsed_export(r18_export, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (80, 120, 3), np.uint8))
    collapsed = str(tmp_path / "collapsed.pkl")
    collapse(r18_export, collapsed)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "scripts/feature_rank.py", "--images", str(images), "--size", "64",
           "--weights", r18_export, "--weights", collapsed, "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in proc.stdout.splitlines() if line.startswith("| ") and "/ " in line}
    ratio = {k: [float(c.split("/")[0]) for c in v[1:]] for k, v in rows.items()}  # v[0]: loaded
    assert len(ratio) == 3, proc.stdout
    assert all(r > 3 for r in ratio[r18_export]), proc.stdout
    assert all(r < 1.05 for r in ratio[collapsed]), proc.stdout


def test_feature_rank_missing_images_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/feature_rank.py", "--images",
                           str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "no .jpg/.png images found" in proc.stderr.strip().splitlines()[-1]

"""Every entry point imports the checkout by itself: run from elsewhere, without PYTHONPATH."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ENTRY_POINTS = [
    "projects/MontagePretrain/train_net.py", "scripts/finetune.py", "scripts/compare.py",
    "scripts/feature_rank.py", "scripts/visualize_erf.py", "scripts/bench_pretrain.py",
    "scripts/bench_gpu.py", "scripts/bench_builder.py", "scripts/make_toy_coco.py",
]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_runs_without_pythonpath(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "usage" in proc.stdout.lower()

"""scripts/gpu_check.sh --dry-run: the device run's every step, at tiny sizes on the CPU."""
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def dry_run(tmp_path, timeout, **env):
    """Runs ``gpu_check.sh OUT --dry-run`` with ``env`` added; asserts it succeeded; -> OUT."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp_path / "work"), **env)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out


def test_gpu_check_dry_run_writes_every_result(tmp_path):
    out = dry_run(tmp_path, 900, OMP_NUM_THREADS="1")
    # At most 8 files come back from the device's $OUT.
    assert sorted(os.listdir(out)) == ["bench.jsonl", "env.json", "experiment.json",
                                       "gpu_check.log", "profile.json", "steps.json",
                                       "tests.json"]
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["env", "tests", "bench", "profile", "experiment"]
    assert all(s["rc"] == 0 and s["wall_s"] <= s["cap_s"] for s in steps)
    assert json.loads((out / "env.json").read_text())["torch"]
    tests = json.loads((out / "tests.json").read_text())
    assert tests["failed"] == 0 and tests["passed"] + tests["skipped"] > 0
    tasks = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert {t["task"] for t in tasks} == {"host", "step", "loader"}
    assert all(t["error"] is None for t in tasks)
    _check_profile(json.loads((out / "profile.json").read_text()))
    exp = json.loads((out / "experiment.json").read_text())
    assert exp["bank"]["num_samples"] > 0 and exp["pretrain"]["iterations"] == 4
    for arm in ("montage", "scratch"):
        assert exp[arm]["bbox"]["AP"] is not None and exp[arm]["iterations_run"] == 4
        assert exp[arm]["loss_finite"] and exp[arm]["loss_trace"][-1][0] == 3
    assert exp["montage"]["backbone_tensors_loaded"] > 0  # fine-tuned from the export
    assert "backbone_tensors_loaded" not in exp["scratch"]


def test_gpu_check_runs_only_the_steps_asked_for(tmp_path):
    # A rerun on the device's leftover minutes: GPU_CHECK_STEPS=env runs env alone.
    out = dry_run(tmp_path, 300, GPU_CHECK_STEPS="env")
    assert sorted(os.listdir(out)) == ["env.json", "gpu_check.log", "steps.json"]
    assert [s["step"] for s in json.loads((out / "steps.json").read_text())] == ["env"]
    assert "step bench: not in GPU_CHECK_STEPS, skipped" in (out / "gpu_check.log").read_text()


def _check_profile(prof):
    """The profile step's summary (tiny CPU run: host times, no kernels)."""
    assert prof["device"] == "cpu" and prof["packed_crops"] and prof["montages_per_step"] == 4
    assert prof["iterations"] == {"warmup": 2, "rate": 3, "profiled": 3}
    rate = prof["rate"]
    assert rate["window"] == 3 and rate["montages_per_s"] > 0
    assert rate["time_min_s"] <= rate["time_median_s"] <= rate["time_max_s"]
    phases = {"data", "h2d_copy", "montage_assembly", "forward", "loss", "backward", "optimizer",
              "hooks", "metrics"}
    assert set(prof["host_ms_per_step"]) == phases
    assert set(prof["phases_ms_per_step"]) == phases | {"idle"}
    for k in ("forward", "backward", "optimizer", "montage_assembly", "h2d_copy"):
        assert prof["host_ms_per_step"][k] > 0, k  # each phase's range was recorded
    assert sum(prof["host_ms_per_step"].values()) <= prof["step_ms"] * 1.01
    # Packed crops: what goes to the device is the pixels (+ offsets, sizes, labels).
    assert 1.0 <= prof["bytes"]["h2d_over_pixels"] <= 1.1
    assert prof["top_kernels"] == [] and prof["device_idle_ms_per_step"] is None


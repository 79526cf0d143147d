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
    # The default steps (tests and bench are opt-in: GPU_CHECK_STEPS); bench's tasks have their
    # own tests, and the suite is what runs here.
    out = dry_run(tmp_path, 900, OMP_NUM_THREADS="1")
    # At most 8 files come back from the device's $OUT.
    assert sorted(os.listdir(out)) == ["env.json", "experiment.json", "gpu_check.log",
                                       "profile.json", "stability.jsonl", "steps.json"]
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["env", "profile", "stability", "experiment"]
    assert all(s["rc"] == 0 and s["wall_s"] <= s["cap_s"] for s in steps)
    assert json.loads((out / "env.json").read_text())["torch"]
    _check_profile(json.loads((out / "profile.json").read_text()))
    stab = json.loads((out / "stability.jsonl").read_text())["results"]
    assert stab["goal_stable"]["pass"] and all(len(r["losses"]) == 3 for r in stab["runs"])
    exp = json.loads((out / "experiment.json").read_text())
    pre = exp["pretrain"]  # the earlier recipe, as sized by the script
    assert pre["iterations"] == 4 and pre["rc"] == 0 and not pre["default_path"]
    assert pre["lr"] == 0.025 and pre["collapse_message"] is None and pre["bank_passes"] == 0
    # the default path: the shipped config sized to the bank (1 pass at the dry run's 4
    # montages: ceil(crops / 16) iterations), warm-up and ERF period scaled with it
    default = exp["pretrain_default"]
    assert default["rc"] == 0 and default["default_path"] and default["bank_passes"] == 1
    assert default["montages"] == 4 and default["lr"] == 0.025 and default["iterations"] >= 2
    assert "SOLVER.MAX_ITER" not in default["opts"]
    # the default exports are at init scale, the as-trained one is not (measured per stage)
    for r in (pre, default):
        assert all(abs(v - 1) < 0.05 for v in r["norm_ratio_default_export"].values())
    assert "pretrain_hot" not in exp  # off unless --hot-lr
    diag = exp["diagnosis"]  # random init + three exports, per stage
    assert len(diag) == 4 and all("res5" in d and "pr" in d["res5"] for d in diag.values())
    runs = {r["arm"]: r for r in exp["runs"]}
    assert sorted(runs) == ["erf", "erf_bank_init", "erf_init", "scratch_bn"]
    assert len(exp["runs"]) == 4
    for r in exp["runs"]:
        assert r["rc"] == 0 and r["bbox"]["AP"] is not None and r["iterations_run"] == 4
        assert r["loss_finite"] and set(r["rel_update_mean"]) >= {"stem", "res5", "fpn"}
    for arm in ("erf_init", "erf_bank_init"):  # fine-tuned from the export
        assert runs[arm]["backbone_tensors_loaded"] > 0
    assert runs["scratch_bn"]["backbone_tensors_loaded"] is None
    assert sorted(p["arm"] for p in exp["paired"]) == ["erf", "erf_bank_init", "erf_init"]


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



def test_experiment_default_jobs_are_nine_runs(load_script):
    """The device experiment's defaults: 2 seeds x scratch_bn / erf_bank_init (the default
    path) / erf_init at the long length, erf (as trained) for seed 0, scratch_bn /
    erf_bank_init at the short length; no hot pre-training unless asked for."""
    exp = load_script("gpu_experiment")
    a = exp.parse_args(["--work", "w", "--out", "o", "--bank", "b", "--train-json", "t",
                        "--train-images", "t", "--val-json", "v", "--val-images", "v"])
    assert a.hot_lr == 0 and a.default_opts == ""
    runs = exp.jobs(a, ("scratch_bn", "erf_bank_init", "erf_init", "erf"))
    assert len(runs) == 9 and len(set(runs)) == 9
    assert sorted(r for r in runs if r[2] == a.ft_iters and r[0] != "erf") == sorted(
        (arm, s, a.ft_iters) for s in (0, 1)
        for arm in ("scratch_bn", "erf_bank_init", "erf_init"))
    assert ("erf", 0, a.ft_iters) in runs and ("erf", 1, a.ft_iters) not in runs
    assert sorted(r for r in runs if r[2] == a.ft_short) == [
        ("erf_bank_init", 0, a.ft_short), ("scratch_bn", 0, a.ft_short)]
    # the default path's pre-training failed (its arm absent): 6 runs
    assert len(exp.jobs(a, ("scratch_bn", "erf_init", "erf"))) == 6

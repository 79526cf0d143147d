"""scripts/benchmark.py at its tiny size on the CPU: every task runs, prints and writes its JSON
record (no timing assertions: the numbers depend on the machine)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def bench(load_module):
    return load_module("scripts/benchmark.py")


def _records(path):
    return {r["task"]: r for r in map(json.loads, path.read_text().splitlines())}


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def _check_rate(r, on_gpu=CUDA):
    assert _positive(r["montages_per_s"])
    assert r["crops_per_s"] == pytest.approx(4 * r["montages_per_s"])
    assert r["hours_64k_x_512"] == pytest.approx(64000 * 512 / r["montages_per_s"] / 3600)
    assert r["windows"] and all(_positive(v) for v in r["windows"])
    assert (r["peak_gpu_mem_gib"] is not None) == on_gpu


def test_host_model_step_loader(bench, tmp_path, capsys):
    """The self-contained path (toy bank built on the spot), four tasks in one run."""
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--task", "loader,step,model,host", "--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for piece in ("== host", "== model", "== step", "== loader", "decode-only floor", "S/T/W",
                  "goal erf / global step time <= 1.05", "goal assembly / erf step < 5 %",
                  "goal (b) / best (a) >= 0.80", "(b') / best (a)", "x decode floor",
                  "== transfer: padded vs packed", "goal packed bytes to the device / pixel bytes",
                  "feeding best (a)", "goal (a) bf16 + channels_last", "R_18_toy.yaml"):
        assert piece in text, piece
    recs = _records(out)
    assert list(recs) == ["host", "model", "step", "loader"]  # the tool's order
    for rec in recs.values():
        assert rec["error"] is None and rec["size"] == "tiny" and rec["env"]["torch"]
        assert rec["bank"]["num_samples"] > 0 and set(rec["bank"]["groups"]) == {"S", "T", "W"}
    host = recs["host"]["results"]
    for key in ("h5_read_ms_per_crop", "decode_ms_per_crop", "hwc_to_chw_ms_per_crop",
                "floor_montages_per_s", "draw_ms_per_montage", "collate_ms_per_batch",
                "shm_copy_ms_per_batch", "montages_per_s_per_core", "padded_bytes_per_montage"):
        assert _positive(host[key]), key
    assert 0 < host["padding_efficiency"] <= 1 and host["padded_batch_shape"][0] == 16
    # Padded vs packed side by side: bytes to the device against the pixels, main-process ms.
    tr = host["transfer"]
    assert _positive(tr["pixel_bytes_per_montage"])
    for name in ("padded", "packed"):
        for key in ("bytes_per_montage", "bytes_over_pixels", "collate_ms", "handoff_ms",
                    "stage_ms", "main_host_ms_per_step"):
            assert _positive(tr[name][key]), (name, key)
    assert 1.0 <= tr["packed"]["bytes_over_pixels"] <= 1.1 < tr["padded"]["bytes_over_pixels"]
    assert tr["packed"]["unpack_ms"] > 0 and tr["padded"]["unpack_ms"] == 0
    assert _positive(tr["packed_over_padded_bytes"]) and tr["packed_over_padded_bytes"] < 1
    assert _positive(tr["packed_over_padded_main_host_ms"])
    assert host["goal_bytes_over_pixels"]["pass"] is True
    model = recs["model"]["results"]
    _check_rate(model["fp32"])
    assert model["best_montages_per_s"] >= model["fp32"]["montages_per_s"]
    step = recs["step"]["results"]
    _check_rate(step["b_full"])
    _check_rate(step["b_trainer"])
    assert 0 <= step["b_full"]["loader_wait_share"] <= 1
    for key in ("erf_step_ms", "global_step_ms", "assembly_ms", "b_trainer_over_best_a"):
        assert _positive(step[key]), key
    for key in ("goal_erf_over_global", "goal_assembly_share", "goal_b_over_best_a"):
        assert _positive(step[key]["value"]) and step[key]["pass"] in (True, False), key
    loader = recs["loader"]["results"]
    _check_rate(loader["workers_1"], on_gpu=False)
    assert _positive(loader["workers_1"]["per_worker_over_floor"])
    assert _positive(loader["workers_needed_for_best_a"])


@pytest.mark.skipif(CUDA, reason="checks the CPU run: bf16 modes are skipped without CUDA")
def test_model_bf16_skipped_without_cuda(bench, tmp_path):
    out = tmp_path / "m.jsonl"
    assert bench.main(["--task", "model", "--quick", "--json", str(out)]) == 0
    model = _records(out)["model"]["results"]
    for key in ("bf16", "bf16_channels_last"):
        assert model[key] == {"skipped": "AMP bf16 runs on CUDA only"}
    assert model["goal_a"] == {"value": None, "goal": ">= 5000", "pass": None}


@pytest.mark.skipif(not CUDA, reason="AMP bf16 and channels_last are measured on CUDA only")
def test_model_bf16_on_cuda(bench, tmp_path):
    out = tmp_path / "m.jsonl"
    assert bench.main(["--task", "model", "--quick", "--json", str(out)]) == 0
    model = _records(out)["model"]["results"]
    for key in ("fp32", "bf16", "bf16_channels_last"):
        _check_rate(model[key])
    assert model["goal_a"]["pass"] in (True, False)


def test_builder(bench, tmp_path, capsys):
    """Builder vs decode floor on a small toy dataset given with --annotations/--images."""
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_toy_coco.py"), "--out",
                    str(tmp_path / "toy"), "--num-train", "6", "--num-val", "0"],
                   check=True, capture_output=True)
    out = tmp_path / "b.jsonl"
    assert bench.main(["--task", "builder", "--quick", "--json", str(out),
                       "--annotations", str(tmp_path / "toy/annotations/instances_train.json"),
                       "--images", str(tmp_path / "toy/train")]) == 0
    text = capsys.readouterr().out
    for piece in ("(a) decode only", "(b) build, 1 worker", "(c) build, 2 workers",
                  "speed-up (b)/(c)", "goal (b)/(a) wall <= 1.5", "full COCO train2017"):
        assert piece in text, piece
    rec = _records(out)["builder"]
    res = rec["results"]
    assert rec["error"] is None and rec["bank"] is None and res["images"] == 6
    for key in ("decode_s", "build_1_worker_s", "build_2_workers_s", "b_over_a_cpu",
                "speedup_b_over_c", "bank_mib", "coco_minutes_1_worker", "pool_start_s"):
        assert _positive(res[key]), key
    assert _positive(res["goal_b_over_a"]["value"])


def test_a_failed_task_keeps_the_others(bench, tmp_path, monkeypatch, capsys):
    """Each record is written when its task ends; a failing task is recorded, rc 1."""
    def boom(b):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench, "task_loader", boom)
    out = tmp_path / "f.jsonl"
    assert bench.main(["--task", "host,loader", "--quick", "--json", str(out)]) == 1
    recs = _records(out)
    assert recs["host"]["error"] is None and recs["host"]["results"]["h5_read_ms_per_crop"] > 0
    assert recs["loader"]["error"] == "RuntimeError: boom" and recs["loader"]["results"] is None
    assert "task loader failed" in capsys.readouterr().err


def test_cli(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args(["--task", "model,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--task", "builder", "--annotations", "a.json"])
    args = bench.parse_args(["--task", "step", "--quick", "--workers", "0,2", "MODEL.X", "1"])
    assert args.task == ["step"] and args.size == "tiny" and args.workers == [0, 2]
    assert args.opts == ["MODEL.X", "1"]
    if not CUDA:
        with pytest.raises(SystemExit):
            bench.parse_args(["--task", "model", "--size", "full"])
    # --help works from any folder (no sys.path set-up needed).
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"),
                          "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and "--task" in res.stdout and "builder" in res.stdout


def test_stability_unnormalised_pyramid_diverges_and_the_shipped_one_does_not(
        load_module, tmp_path, monkeypatch, capsys):
    """Issue 21 at its smallest reproducing size: the demo pyramid with the FPN unnormalised
    (the old config) goes non-finite within 10 iterations at 64 montages and LR 0.8; the shipped
    config (BN in the FPN, folded at export) stays finite at the same settings."""
    bench = load_module("scripts/benchmark.py")
    config = "demo/montage_R_18_FPN_toy.yaml"
    monkeypatch.setitem(bench.STABILITY, "tiny", dict(
        montages=64, size=64, iters=10, warmup=4, lr=0.8,
        runs=[(config, bench.NO_FPN_NORM), (config, ())]))
    out = tmp_path / "stability.jsonl"
    assert bench.main(["--task", "stability", "--quick", "--json", str(out)]) == 0
    old, shipped = json.loads(out.read_text())["results"]["runs"]
    assert old["opts"] == ["MODEL.FPN.NORM", ""] and not old["finite"]
    assert old["stopped_at"] is not None and old["stopped_at"] < 10
    assert shipped["finite"] and len(shipped["losses"]) == 10
    assert "goal every shipped config finite 1 of 1: 1.00 -> PASS" in capsys.readouterr().out

"""scripts/bench_gpu.py at its tiny size (CPU here): table, JSON, finite positive rates."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "scripts", "bench_gpu.py")
MODES = ("a_fp32", "a_bf16", "a_bf16_cl", "b_full", "b_trainer", "c_loader")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_bank(tmp_path_factory):
    """A bank of the built-in toy dataset, 8 images (about 30 crops), built with the real CLI."""
    tmp = tmp_path_factory.mktemp("bench_gpu_bank")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_toy_coco.py"), "--out",
                    str(tmp / "toy"), "--num-train", "8", "--num-val", "0"],
                   check=True, cwd=ROOT, capture_output=True)
    bank = tmp / "bank.h5"
    subprocess.run([sys.executable, "-m", "builder", "build", "--annotations",
                    str(tmp / "toy" / "annotations" / "instances_train.json"), "--images",
                    str(tmp / "toy" / "train"), "--out", str(bank)],
                   check=True, cwd=ROOT, capture_output=True)
    return str(bank)


def _positive(v):
    return v is not None and math.isfinite(v) and v > 0


def _check_mode(m):
    assert _positive(m["montages_per_s"]), m
    assert m["crops_per_s"] == pytest.approx(4 * m["montages_per_s"])
    assert _positive(m["hours_64k_x_512"])
    assert m["hours_64k_x_512"] == pytest.approx(64000 * 512 / m["montages_per_s"] / 3600)
    assert m["windows"] >= 1 and len(m["window_rates"]) == m["windows"]
    assert all(_positive(r) for r in m["window_rates"])


def test_bench_gpu_tiny_all_modes(bench, tmp_path, capsys):
    """The self-contained path (toy bank built on the spot), every mode, table and JSON."""
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    rc = bench.main(["--tiny", "--num-train", "12", "--json", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored
    text = capsys.readouterr().out
    for piece in ("montages/s", "crops/s", "h for 64k x 512", "peak GiB", "ResNet-18",
                  "batch 4 montages/step", "crop long side", "goal (a) AMP bf16 + channels_last",
                  "goal (b) / best (a) >= 0.80", "crops/s per worker", "HDF5 read",
                  "torch " + torch.__version__):
        assert piece in text, piece

    res = json.loads(out.read_text())
    assert set(res) >= {"env", "setup", "bank", "modes", "goals", "data", "notes", "timing_s"}
    assert res["setup"]["tiny"] and res["setup"]["batch"] == 4
    assert res["setup"]["depth"] == 18 and res["setup"]["input_size"] == 96
    assert res["bank"]["samples"] > 0 and res["bank"]["crop_long_side_px"]["max"] > 0
    assert set(res["modes"]) == set(MODES)
    cuda = torch.cuda.is_available()
    for key in MODES:
        m = res["modes"][key]
        if key in ("a_bf16", "a_bf16_cl") and not cuda:
            assert m["skipped"] and m["montages_per_s"] is None
            continue
        assert m["skipped"] is None
        _check_mode(m)
    assert (res["modes"]["b_full"]["peak_gpu_mem_gib"] is not None) == cuda
    bd = res["modes"]["b_full"]["breakdown"]
    assert 0 <= bd["loader_wait_share"] <= 1 and _positive(bd["assembly_ms_per_step"])
    ratio = res["goals"]["ratio_b_over_a_best"]
    assert _positive(ratio["value"]) and ratio["verdict"] in ("PASS", "FAIL")
    assert (res["goals"]["a_amp_channels_last"]["value"] is None) == (not cuda)
    data = res["data"]
    for key in ("h5_read_ms_per_crop", "decode_ms_per_crop", "hwc_to_chw_ms_per_crop",
                "draw_ms_per_montage", "collate_ms_per_batch", "padded_bytes_per_montage",
                "loader_crops_per_s_per_worker", "workers_needed_for_a_best"):
        assert _positive(data[key]), key
    assert 0 < data["padding_efficiency"] <= 1


def test_bench_gpu_given_bank_loader_only(bench, tiny_bank, tmp_path, capsys):
    """--bank and --modes c with in-process loading (0 workers)."""
    out = tmp_path / "c.json"
    assert bench.main(["--tiny", "--bank", tiny_bank, "--modes", "c", "--workers", "0",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"c_loader"}
    _check_mode(res["modes"]["c_loader"])
    assert res["bank"]["path"] == os.path.abspath(tiny_bank)
    assert res["goals"]["ratio_b_over_a_best"]["value"] is None
    assert "(c) loader only, 0 worker(s)" in capsys.readouterr().out


def test_bench_gpu_rejects_unknown_mode(bench):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--modes", "a,x"])

"""scripts/compare.py bookkeeping: the table's mean ± std over seeds, size filtering, merging."""
import json
import os

import pytest


@pytest.fixture(scope="module")
def compare(load_script):
    return load_script("compare")


def rec(variant, seed, ap, pre=150, ft=200):
    return dict(dataset="toy", variant=variant, seed=seed, AP=ap, AP50=2 * ap, AP75=ap / 2,
                pretrain_iters=0 if variant == "scratch" else pre, finetune_iters=ft,
                pretrain_cpu_s=0.0 if variant == "scratch" else 100.0, finetune_cpu_s=300.0)


def test_report_mean_std_over_seeds_and_only_this_size(compare, tmp_path, capsys):
    results = {
        "toy/scratch/seed0": rec("scratch", 0, 10.0), "toy/scratch/seed1": rec("scratch", 1, 12.0),
        "toy/erf/seed0": rec("erf", 0, 14.0), "toy/erf/seed1": rec("erf", 1, 18.0),
        "toy/erf/seed2": rec("erf", 2, 99.0, ft=100),  # another size: must not be averaged in
    }
    compare.report(results, {"toy": dict(note="toy")}, str(tmp_path), 150, {"toy": 200})
    out = capsys.readouterr().out
    scratch = next(line for line in out.splitlines() if line.startswith("| scratch"))
    erf = next(line for line in out.splitlines() if line.startswith("| erf"))
    assert "11.00 ± 1.41" in scratch and "10.00 12.00" in scratch
    assert "16.00 ± 2.83" in erf and "99" not in erf
    assert (tmp_path / "compare_toy.png").stat().st_size > 0
    assert "16.00 ± 2.83" in (tmp_path / "table.md").read_text()


def test_same_size_decides_what_is_rerun(compare):
    assert compare._same_size(rec("erf", 0, 1.0), 150, 200)
    assert not compare._same_size(rec("erf", 0, 1.0), 150, 100)
    assert not compare._same_size(None, 150, 200)
    assert compare._same_size(rec("scratch", 0, 1.0), 0, 200)


def test_fmt(compare):
    assert compare._fmt([1.0]) == "1.00"
    assert compare._fmt([]) == "n/a"
    assert compare._fmt([1.0, 3.0]) == "2.00 ± 1.41"


def test_merge_save_keeps_runs_of_a_parallel_process(compare, tmp_path):
    path = str(tmp_path / "results.json")
    compare.merge_save(path, {"toy/erf/seed0": rec("erf", 0, 1.0)})
    mine = {"toy/erf/seed1": rec("erf", 1, 2.0)}  # a second process that never saw seed0
    merged = compare.merge_save(path, mine)
    with open(path) as f:
        on_disk = json.load(f)
    assert set(on_disk) == set(merged) == {"toy/erf/seed0", "toy/erf/seed1"}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_steps_import_the_checkout_without_pythonpath(compare, tmp_path, monkeypatch):
    # `python scripts/compare.py` from a plain shell: its train_net/finetune steps must still
    # import builder/ and montage_pretrain/ (a missing PYTHONPATH once failed every pre-training).
    monkeypatch.delenv("PYTHONPATH", raising=False)
    import sys
    log = tmp_path / "step.log"
    compare.run([sys.executable, "-c", "import builder.bank, montage_pretrain.losses"], str(log))
    assert "Error" not in log.read_text()

"""scripts/long_protocol.py: lengths, job order, lanes' claims, verdicts, and a mocked run."""
import json
import os

import pytest

from test_compare import FakeSteps, mocked_steps  # same folder (pytest prepends it)


@pytest.fixture(scope="module")
def proto(load_script):
    return load_script("long_protocol")


@pytest.fixture(scope="module")
def compare(proto):
    return proto.C  # the module the protocol calls (mocked below)


def test_auto_lengths_double_up_to_thirty_epochs(proto):
    assert proto.auto_lengths(202, 4) == [200, 400, 800, 1515]  # chess train, 4 a batch
    assert 1515 * 4 / 202 >= 30 > 1514 * 4 / 202
    assert proto.auto_lengths(80, 4) == [200, 400, 600]
    assert proto.auto_lengths(10, 4, first=200) == [200]  # 30 epochs < 200 it: one length


def test_jobs_sweep_every_length_then_the_other_seeds_at_the_longest(proto):
    jobs = proto.jobs([10, 20], seeds=[0, 1, 2], sweep_seeds=[0], arms=["a", "b"])
    assert jobs == [(10, 0, "a"), (10, 0, "b"), (20, 0, "a"), (20, 0, "b"),
                    (20, 1, "a"), (20, 1, "b"), (20, 2, "a"), (20, 2, "b")]
    first = proto.jobs([10, 20, 40], seeds=[0, 1], sweep_seeds=[0], arms=["a"],
                       longest_first=True)
    assert first == [(40, 0, "a"), (40, 1, "a"), (20, 0, "a"), (10, 0, "a")]


def test_a_claimed_job_is_skipped_by_another_lane_and_freed_after(proto, tmp_path):
    job = (200, 0, "erf")
    with proto.claim(str(tmp_path), job) as first:
        assert first
        with proto.claim(str(tmp_path), job) as second:  # another open file: another lane
            assert not second
    with proto.claim(str(tmp_path), job) as again:
        assert again


@pytest.mark.parametrize("diffs,expected", [
    ([1.0, 2.0, 0.5], "pays"), ([1.0], "pays (1 seed)"), ([-1.0, -0.1], "does not pay"),
    ([-2.0, 1.0], "undecided (seeds disagree)"), ([0.0, 0.0], "undecided (seeds disagree)")])
def test_verdict_from_the_signs_of_the_paired_differences(proto, diffs, expected):
    p = dict(n=len(diffs), mean=sum(diffs) / len(diffs), min=min(diffs), max=max(diffs))
    assert proto.verdict(p) == expected
    assert proto.verdict(None) == "not run yet"


def mocked_argv(out, data, *extra):
    """long_protocol.py's arguments for the mocked dataset ``data`` (name "mine"), smoke size."""
    return ["--out", str(out), "--quick", "1", *extra,
            "--train-json", str(data / "train/_annotations.coco.json"),
            "--train-images", str(data / "train"),
            "--val-json", str(data / "valid/_annotations.coco.json"),
            "--val-images", str(data / "valid"), "--name", "mine"]


def test_default_arms_include_the_default_path_and_its_verdict_says_so(proto, compare):
    """The long protocol runs what make pretrain + make finetune give (erf_bank_init) unless
    told otherwise, and its verdict row is marked as the default path's."""
    assert compare.DEFAULT_ARM == "erf_bank_init" and compare.DEFAULT_ARM in compare.ARMS
    assert compare.DEFAULT_ARM in proto.parse_args(["--out", "x"]).arms.split(",")
    assert proto.verdict_label("erf_bank_init") == "erf_bank_init (default path)"
    assert proto.verdict_label("erf_init") == "erf_init"
    assert proto.recipes_note(["scratch_bn", "erf"]) == ""
    assert proto.recipes_note(["erf_bank_init", "erf_long_init", "erf_hot_init"]) == (
        " (erf_bank_init 139 passes over the bank; erf_long_init 1200 it; "
        "erf_hot_init 300 it x 512 montages at 64 px, LR 0.8)")


def test_table3_fine_tunes_random_init_for_the_montage_arms_total_cpu(proto, compare, tmp_path,
                                                                      monkeypatch):
    """--table3 ARM: scratch_bn_long runs once ARM's longest run of its seed is done, for
    ARM's total CPU time at ARM's CPU-s per iteration (fakes: pre-training 100 CPU-s,
    fine-tuning 200: 24 x 300 / 200 = 36 it), with scratch_bn's detector; the report pairs
    them. A --table3 arm that is not pre-trained or not run is refused."""
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid"))
    import montage_pretrain.export as export
    monkeypatch.setattr(export, "rescale_export", lambda src, dst: open(dst, "w").close() or {})
    out = tmp_path / "out"
    argv = mocked_argv(out, data, "--arms", "scratch_bn,erf_init", "--seeds", "0,1",
                       "--sweep-seeds", "0", "--table3", "erf_init", "--longest-first")
    assert proto.main(argv) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    long_runs = {r["seed"]: r for r in results.values() if r["arm"] == "scratch_bn_long"}
    assert sorted(long_runs) == [0, 1]
    for r in long_runs.values():
        assert r["iters"] == 36 and r["matched_to"]["arm"] == "erf_init"
        assert r["settings"]["finetune"]["config"] == compare.FINETUNE_CONFIG
        assert r["settings"]["finetune"]["iters"] == "total CPU of erf_init"
    text = (out / "long_mine_valid.md").read_text()
    assert "Table 3 at equal total CPU time: erf_init (pre-training + 24 it)" in text
    assert "seed 0: 36 it" in text and "Δ AP: +1.99 [+1.99, +1.99]" in text  # 3.024 - 1.036
    for bad in ("scratch_bn", "erf"):  # not pre-trained / not in --arms
        with pytest.raises(SystemExit, match="--table3"):
            proto.main(mocked_argv(out, data, "--arms", "scratch_bn,erf_init",
                                   "--table3", bad, "--report-only"))


def test_mocked_protocol_runs_every_length_once_and_resumes(proto, compare, tmp_path,
                                                           monkeypatch, capsys):
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid"))
    rescaled = []

    def fake_rescale(src, dst):  # the fake export is an empty file
        rescaled.append(dst)
        open(dst, "w").close()
        return {}

    import montage_pretrain.export as export
    monkeypatch.setattr(export, "rescale_export", fake_rescale)
    out = tmp_path / "out"
    argv = mocked_argv(out, data, "--arms", "scratch_bn,erf,erf_init", "--seeds", "0,1",
                       "--sweep-seeds", "0")
    assert proto.main(argv) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    ft = [r for r in results.values() if r["step"] == "finetune"]
    # lengths [12, 24]: 3 arms at both for seed 0, 3 arms at 24 for seed 1
    assert sorted((r["iters"], r["seed"]) for r in ft) == sorted(
        [(12, 0)] * 3 + [(24, 0)] * 3 + [(24, 1)] * 3)
    assert len({r["sid"] for r in ft}) == 6  # a length is a setting; seeds share sids
    pre = [r for r in results.values() if r["step"] == "pretrain"]
    assert len(pre) == 2  # erf and erf_init share one pre-training per seed, every length
    init = [r for r in ft if r["arm"] == "erf_init"]
    assert all(r["weights"].endswith("_init_scale.pkl") for r in init)
    assert all(r["settings"]["finetune"]["weight_scale"] == "init" for r in init)
    assert len(set(rescaled)) == 2  # once per seed
    assert all("SOLVER.CHECKPOINT_PERIOD 200" in r["command"] for r in ft)
    assert all("finetune_net.py --trace-iters 100 " in r["command"] for r in ft)
    text = (out / "long_mine_valid.md").read_text()
    assert "verdict at the longest length (24 it" in text and (out / "long_mine_valid.png").is_file()
    # FakeSteps: AP = 1 (random init) or 3 (export) + 0.5 * seed + iterations / 1000
    verdicts = {c[0]: c[1] for c in (
        [x.strip() for x in line.strip("|").split("|")] for line in text.splitlines()
        if line.startswith("| erf")) if len(c) == 3}
    assert verdicts == {"erf": "pays", "erf_init": "pays"}
    assert "| erf_init | pays           | not measured" in text  # the fakes log no guard

    fake.calls.clear()
    assert proto.main(argv) == 0  # all done: nothing runs
    assert fake.calls == []

    # a run interrupted mid-way resumes from its checkpoint
    victim = next(r for r in ft if r["arm"] == "scratch_bn" and r["seed"] == 1)
    del results[next(k for k, r in results.items() if r is not None and r == victim)]
    with open(out / "results.json", "w") as f:
        json.dump(results, f)
    with open(os.path.join(victim["run_dir"], "last_checkpoint"), "w") as f:
        f.write("model_0000019.pth")
    open(os.path.join(victim["run_dir"], "model_0000019.pth"), "w").close()
    assert proto.main(argv) == 0
    assert [c[0] for c in fake.calls] == ["finetune_net.py"]
    with open(out / "results.json") as f:
        redone = next(r for r in json.load(f).values() if r["step"] == "finetune"
                      and r["arm"] == "scratch_bn" and r["seed"] == 1)
    assert "--resume" in redone["command"] and redone["resumed_from"] == "model_0000019.pth"
    assert not os.path.exists(os.path.join(victim["run_dir"], "model_0000019.pth"))


def test_make_compare_protocol_long_reaches_long_protocol_py(proto):
    import shlex
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = subprocess.run(["make", "-n", "--no-print-directory", "compare", "PROTOCOL=long",
                           "DATASET=chess", "ARMS=scratch_bn,erf_init", "LONG_SEEDS=0,1",
                           "SWEEP_SEEDS=0,2", "LENGTHS=100,300", "LANES=3", "COMPARE_OUT=o"], cwd=root,
                          capture_output=True, text=True, check=True).stdout
    line = next(x for x in text.replace("\\\n", " ").splitlines() if "long_protocol.py" in x)
    words = shlex.split(line)
    args = proto.parse_args(words[words.index("scripts/long_protocol.py") + 1:])
    assert (args.dataset, args.arms, args.seeds, args.sweep_seeds, args.lengths, args.lanes,
            args.out) == ("chess", "scratch_bn,erf_init", "0,1", "0,2", "100,300", 3, "o")
    assert not args.longest_first
    text = subprocess.run(["make", "-n", "--no-print-directory", "compare", "PROTOCOL=long",
                           "LONGEST_FIRST=1"], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    assert "--longest-first" in text


def test_interrupted_pretraining_resumes(proto, compare, tmp_path, monkeypatch):
    """The long protocol's pre-trainings checkpoint 6 times and a rerun resumes an interrupted
    one with --resume (recorded as resumed_from); the intermediate files go once it finishes."""
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid"))
    out = tmp_path / "out"
    argv = mocked_argv(out, data, "--arms", "scratch_bn,erf", "--seeds", "0", "--lengths", "12")
    assert proto.main(argv) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    key, pre = next((k, r) for k, r in results.items() if r["step"] == "pretrain")
    assert "SOLVER.CHECKPOINT_PERIOD 10 " in pre["command"] and "--resume" not in pre["command"]
    # interrupted after its checkpoint at iteration 9: the record and the export are not there,
    # nor the fine-tuning that needs them
    del results[key]
    del results[next(k for k, r in results.items() if r["arm"] == "erf")]
    with open(out / "results.json", "w") as f:
        json.dump(results, f)
    os.remove(pre["export"])
    with open(os.path.join(pre["run_dir"], "last_checkpoint"), "w") as f:
        f.write("model_0000009.pth")
    open(os.path.join(pre["run_dir"], "model_0000009.pth"), "w").close()
    fake.calls.clear()
    assert proto.main(argv) == 0
    assert [c[0] for c in fake.calls] == ["train_net.py", "finetune_net.py"]
    with open(out / "results.json") as f:
        redone = json.load(f)[key]
    assert "train_net.py --resume " in redone["command"]
    assert redone["resumed_from"] == "model_0000009.pth"
    assert not os.path.exists(os.path.join(pre["run_dir"], "model_0000009.pth"))


def test_trained_only_trains_nothing(proto, compare, tmp_path, monkeypatch, capsys):
    """--trained-only (always on for --eval-split test) evaluates finished runs only: nothing
    trained yet, so no step runs and every job is reported as skipped."""
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid"))
    argv = mocked_argv(tmp_path / "out", data, "--arms", "scratch_bn,erf", "--seeds", "0",
                       "--trained-only")
    assert proto.main(argv) == 0
    assert fake.calls == []
    assert capsys.readouterr().out.count("not trained, skipped") == 4  # 2 arms x 2 lengths
    assert "--trained-only" in proto.compare_argv(proto.parse_args(["--eval-split", "test"]))
    assert "--trained-only" not in proto.compare_argv(proto.parse_args([]))


def test_export_health_reports_the_guards_word(proto):
    ok = {"feature_health": {"feature_pr": 30.0, "dead_channels": 0.0, "collapsed": None}}
    bad = {"feature_health": {"feature_pr": 1.2, "dead_channels": 0.9,
                              "collapsed": "pre-training collapsed by iteration 50: ..."}}
    old = {"feature_health": None}
    assert proto.export_health([ok, ok]) == "healthy (2 seeds)"
    assert proto.export_health([ok, bad, old]) == "collapsed (1 of 3 seeds)"
    assert proto.export_health([ok, old]) == "not measured"
    assert proto.export_health([]) == "not measured"


def test_report_pairs_the_default_path_with_scratch_gn_by_seed(proto, compare):
    """The default path against the GN detector from random init: paired by seed, at the
    lengths both ran; no section while they share none."""
    def run(ap):
        return dict(AP=ap)

    values = {compare.DEFAULT_ARM: {10: {0: run(50.0)}, 20: {0: run(74.0), 1: run(73.0)}},
              proto.GN_REF: {20: {0: run(73.0), 1: run(73.5), 2: run(80.0)}}}
    text = "\n".join(proto.against_gn_lines(values, [10, 20], lambda n: n / 10))
    assert "erf_bank_init (default path) − scratch (GN detector" in text
    assert "10 it" not in text  # scratch did not run there
    assert "| 20 it (2 ep) |" in text and "0: +1.00, 1: -0.50" in text
    assert "undecided (seeds disagree)" in text
    assert proto.against_gn_lines({compare.DEFAULT_ARM: values[compare.DEFAULT_ARM]},
                                  [10, 20], lambda n: n) == []

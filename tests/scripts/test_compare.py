"""scripts/compare.py bookkeeping: paired statistics, tables, arguments and Make variables, the
Table 3 arithmetic, merging and resuming (no training: the step runner is mocked)."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def compare(load_script):
    return load_script("compare")


# ---------------------------------------------------------------------------------------------
# Paired statistics and tables
# ---------------------------------------------------------------------------------------------
def test_paired_difference_hand_computed(compare):
    values = {"scratch": {0: {"AP": 10.0}, 1: {"AP": 12.0}, 2: {"AP": 5.0}, 4: {"AP": None}},
              "erf": {0: {"AP": 14.0}, 1: {"AP": 11.0}, 2: {"AP": 9.0},
                      3: {"AP": 50.0},     # no scratch run on seed 3: not paired
                      4: {"AP": 7.0}}}     # scratch AP missing (NaN) on seed 4: not paired
    p = compare.paired(values, "erf", "AP")
    # erf - scratch on seeds 0, 1, 2: +4, -1, +4
    assert p["n"] == 3 and p["per_seed"] == {0: 4.0, 1: -1.0, 2: 4.0}
    assert p["mean"] == pytest.approx(7 / 3) and p["min"] == -1.0 and p["max"] == 4.0
    assert compare._fmt_paired(p) == "+2.33 [-1.00, +4.00]"
    assert compare._fmt_paired(compare.paired({"scratch": {0: {"AP": 1.0}},
                                               "erf": {0: {"AP": 1.5}}}, "erf", "AP")) == "+0.50"
    assert compare.paired(values, "single", "AP") is None
    assert compare._fmt_paired(None) == "n/a"


def test_fmt(compare):
    assert compare._fmt([1.0]) == "1.00"
    assert compare._fmt([]) == "n/a"
    assert compare._fmt([1.0, 3.0, None]) == "2.00 ± 1.41"


def rec(arm, seed, ap, step="finetune", sid="s-ft", dataset="toy", val="v1", pre_cpu=100.0,
        iters=200):
    r = dict(dataset=dataset, arm=arm, seed=seed, step=step, sid=sid, iters=iters,
             pretrain_cpu_s=0.0 if arm.startswith("scratch") else pre_cpu, cpu_s=300.0,
             metrics={val: dict(AP=ap, AP50=2 * ap, AP75=ap / 2)})
    if step == "probe":
        r["metrics"] = {val: {"res4": dict(knn_top1=ap, linear_top1=ap + 1),
                              "res5": dict(knn_top1=ap + 2, linear_top1=ap + 3)}}
    return r


def cells(line):
    return [c.strip() for c in line.split("|")[1:-1]]


def test_report_tables_with_paired_columns_only_this_comparison(compare, tmp_path, capsys):
    results = {
        "a": rec("scratch", 0, 10.0), "b": rec("scratch", 1, 12.0),
        "c": rec("erf", 0, 14.0), "d": rec("erf", 1, 18.0),
        "e": rec("erf", 2, 99.0, sid="other"),          # other settings: not averaged in
        "f": rec("erf", 3, 98.0, val="test-split"),     # another eval split: not shown
        "g": rec("scratch", 0, 40.0, step="probe", sid="s-pr"),
        "h": rec("erf", 0, 45.0, step="probe", sid="s-pr"),
        "i": rec("scratch", 0, 1.0, step="frozen", sid="s-fr"),
        "j": rec("erf", 0, 3.5, step="frozen", sid="s-fr"),
        "legacy": dict(dataset="toy", variant="erf", seed=0, AP=1.0),  # old format: ignored
    }
    sids = {("scratch", "finetune"): "s-ft", ("erf", "finetune"): "s-ft",
            ("scratch", "probe"): "s-pr", ("erf", "probe"): "s-pr",
            ("scratch", "frozen"): "s-fr", ("erf", "frozen"): "s-fr"}
    view = dict(name="toy", val_key="v1", sids=sids, table3=None, title="toy")
    compare.report(results, [view], str(tmp_path))
    out = capsys.readouterr().out
    rows = [cells(line) for line in out.splitlines() if line.startswith("| erf")]
    det, probe, seed0, seed1 = rows
    assert "16.00 ± 2.83" in det and "99" not in str(det) and "98" not in str(det)
    assert "+5.00 [+4.00, +6.00]" in det          # Δ AP: +4 (seed 0), +6 (seed 1)
    assert "+10.00 [+8.00, +12.00]" in det        # Δ AP50
    assert "3.50 (n=1)" in det and "+2.50" in det  # frozen AP (one seed of two) and its Δ
    assert det[-4:] == ["200", "100", "300", "400"]  # it, pre-train, fine-tune, total CPU-s
    assert "45.00" in probe and "+5.00" in probe  # res4 kNN and its Δ
    assert seed0[:4] == ["erf", "0", "14.00", "+4.00"] and seed1[:4] == ["erf", "1", "18.00",
                                                                        "+6.00"]
    scratch = cells(next(line for line in out.splitlines() if line.startswith("| scratch")))
    assert "11.00 ± 1.41" in scratch and "—" in scratch
    assert (tmp_path / "compare_toy.png").stat().st_size > 0
    assert "+5.00 [+4.00, +6.00]" in (tmp_path / "table.md").read_text()


def test_report_table3_line(compare, tmp_path, capsys):
    results = {"a": rec("scratch", 0, 2.0), "b": rec("erf", 0, 6.0),
               "c": rec("scratch_long", 0, 4.0, sid="s-long", iters=267)}
    sids = {("scratch", "finetune"): "s-ft", ("erf", "finetune"): "s-ft",
            ("scratch_long", "finetune"): "s-long"}
    compare.report(results, [dict(name="toy", val_key="v1", sids=sids, table3="erf",
                                  title="toy")], str(tmp_path))
    out = capsys.readouterr().out
    assert "erf − scratch_long AP +2.00, per seed 0: +2.00" in out
    long_row = cells(next(line for line in out.splitlines() if line.startswith("| scratch_long")))
    assert long_row[-4] == "267"


def test_scratch_long_iterations_match_total_cpu(compare):
    # erf: 100 CPU-s pre-training + 200 CPU-s for 200 fine-tuning iterations -> scratch_long
    # gets 300 CPU-s at 1 CPU-s/iteration = 300 iterations
    assert compare.scratch_long_iters(200, 100.0, 200.0) == 300
    assert compare.scratch_long_iters(200, 250.0, 700.0) == 271  # 271.43 rounded
    assert compare.scratch_long_iters(12, 0.0, 50.0) == 12


# ---------------------------------------------------------------------------------------------
# Arguments and Make variables
# ---------------------------------------------------------------------------------------------
def test_parse_preset_and_lists(compare):
    args = compare.parse_args(["--dataset", "chess", "--arms", "scratch, erf", "--seeds",
                               "0,1,2", "--eval-split", "val"])
    assert args.datasets == ["chess"] and args.arms == ["scratch", "erf"]
    assert args.seeds == [0, 1, 2] and args.eval_split == "valid"
    args = compare.parse_args([])
    assert args.datasets == ["toy"] and args.arms == [] and args.seeds == []
    # the earlier spelling (space-separated lists) still works
    args = compare.parse_args(["--datasets", "toy", "coco_tiny", "--variants", "erf", "single",
                               "--seeds", "0", "1"])
    assert args.datasets == ["toy", "coco_tiny"] and args.arms == ["erf", "single"]
    assert args.seeds == [0, 1]


def test_parse_dataset_by_path(compare):
    args = compare.parse_args(["--train-json", "a.json", "--train-images", "a", "--val-json",
                               "b.json", "--val-images", "b", "--table3"])
    assert args.datasets == [] and args.train_json == "a.json" and args.table3 == "erf"
    assert compare.dataset_name("../shared/data/chess/train/_annotations.coco.json") == "chess"
    assert compare.dataset_name("datasets/toy/annotations/instances_train.json") == "toy"
    assert compare._split_label("../shared/data/chess/valid/_annotations.coco.json") == "valid"


@pytest.mark.parametrize("argv", [
    ["--train-json", "a.json"],                                   # the other three missing
    ["--dataset", "toy", "--train-json", "a", "--train-images", "a", "--val-json", "b",
     "--val-images", "b"],                                        # both ways at once
    ["--dataset", "imagenet"], ["--arms", "scratch,moco"], ["--seeds", "0,x"],
    ["--table3", "scratch"], ["--workers", "2"],
])
def test_parse_rejects(compare, argv):
    with pytest.raises(SystemExit):
        compare.parse_args(argv)


def make_compare_argv(*variables):
    """The compare.py arguments `make compare VAR=value ...` would run (make -n)."""
    text = subprocess.run(["make", "-n", "--no-print-directory", "compare", *variables],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout
    text = text.replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "scripts/compare.py" in line)
    words = shlex.split(line)
    return words[words.index("scripts/compare.py") + 1:]


def test_make_variables_reach_compare_py(compare):
    argv = make_compare_argv("DATASET=chess", "ARMS=scratch,erf", "SEEDS=0,1,2",
                             "PRETRAIN_ITERS=30", "FINETUNE_ITERS=40", "INPUT_SIZE=160",
                             "FT_MIN_SIZE=288", "FROZEN=1", "SCRATCH_LONG=1", "PROBES=0",
                             "COMPARE_OUT=/tmp/x", "QUICK=1", "EVAL_SPLIT=test", "CLIP_GRAD=0")
    args = compare.parse_args(argv)
    assert args.datasets == ["chess"] and args.eval_split == "test" and not args.train_json
    assert args.arms == ["scratch", "erf"] and args.seeds == [0, 1, 2]
    assert (args.pretrain_iters, args.finetune_iters, args.input_size, args.ft_min_size) == (
        30, 40, 160, 288)
    assert args.frozen and args.no_probes and args.table3 == "erf" and args.quick == 1
    assert args.out == "/tmp/x" and args.threads == 1 and args.workers in (0, 1)
    assert args.clip_grad == 0


def test_make_dataset_by_path_wins_over_the_preset(compare):
    argv = make_compare_argv("TRAIN_JSON=t.json", "TRAIN_IMAGES=t", "VAL_JSON=v.json",
                             "VAL_IMAGES=v", "COMPARE_NAME=mine")
    args = compare.parse_args(argv)
    assert args.datasets == [] and (args.train_json, args.val_images, args.name) == (
        "t.json", "v", "mine")
    args = compare.parse_args(make_compare_argv())  # nothing given: the preset
    assert args.datasets == ["toy"] and args.out == "output/compare" and not args.frozen
    assert not args.no_probes and args.table3 is None and args.clip_grad == 5.0


# ---------------------------------------------------------------------------------------------
# Running: merge-safe results, resuming (mocked steps)
# ---------------------------------------------------------------------------------------------
def test_merge_save_keeps_runs_of_a_parallel_process(compare, tmp_path):
    path = str(tmp_path / "results.json")
    compare.merge_save(path, {"toy/erf/seed0/finetune@x": rec("erf", 0, 1.0)})
    mine = {"toy/erf/seed1/finetune@x": rec("erf", 1, 2.0)}  # a process that never saw seed0
    merged = compare.merge_save(path, mine)
    with open(path) as f:
        on_disk = json.load(f)
    assert set(on_disk) == set(merged) == {"toy/erf/seed0/finetune@x", "toy/erf/seed1/finetune@x"}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary or lock file left behind


def test_steps_import_the_checkout_without_pythonpath(compare, tmp_path, monkeypatch):
    # `python scripts/compare.py` from a plain shell: its train_net/finetune steps must still
    # import builder/ and montage_pretrain/ (a missing PYTHONPATH once failed every pre-training).
    monkeypatch.delenv("PYTHONPATH", raising=False)
    log = tmp_path / "step.log"
    compare.run([sys.executable, "-c", "import builder.bank, montage_pretrain.losses"], str(log))
    assert "Error" not in log.read_text()


def _coco(path, n_images=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "images": [dict(id=i, file_name=f"{i}.jpg", width=64, height=64) for i in range(n_images)],
        "annotations": [dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 9, 9], area=81,
                             iscrowd=0) for i in range(n_images)],
        "categories": [dict(id=1, name="thing")]}))


class FakeSteps:
    """Stands in for ``compare.run``: writes what each step would write, counts the steps."""

    def __init__(self, export_name):
        self.calls, self.export_name = [], export_name

    def __call__(self, cmd, log_path, env=None):
        assert env["OMP_NUM_THREADS"] == "1"
        opts = dict(zip(cmd, cmd[1:]))
        script = cmd[1] if cmd[1] != "-m" else cmd[2]
        self.calls.append((os.path.basename(script), opts.get("MONTAGE.LOSS") or
                           opts.get("MODEL.WEIGHTS") or opts.get("--weights"),
                           "--eval-only" in cmd))
        if script == "builder":
            open(opts["--out"], "w").close()
        elif script.endswith("train_net.py"):
            assert opts["DATALOADER.NUM_WORKERS"] == "1" and opts["CUDNN_BENCHMARK"] == "False"
            open(os.path.join(opts["OUTPUT_DIR"], self.export_name), "w").close()
        elif script.endswith("finetune_net.py"):
            os.makedirs(opts["OUTPUT_DIR"], exist_ok=True)
            ap = 1.0 if opts["MODEL.WEIGHTS"] == "" else 3.0
            ap += 0.5 * float(opts.get("SEED", 0)) + float(opts.get("SOLVER.MAX_ITER", 0)) / 1000
            with open(os.path.join(opts["OUTPUT_DIR"], "metrics_final.json"), "w") as f:
                json.dump({"bbox": dict(AP=ap, AP50=2 * ap, AP75=ap / 2)}, f)
            open(os.path.join(opts["OUTPUT_DIR"], "model_final.pth"), "w").close()
        elif script.endswith("probe.py"):
            stages = {s: dict(knn_top1=50.0, linear_top1=60.0) for s in ("res4", "res5")}
            with open(opts["--json"], "w") as f:
                json.dump({"results": [dict(weights=opts["--weights"], **stages)]}, f)
        # wall s, CPU s: pre-training 100, fine-tuning 200 -> scratch_long 1.5x the iterations
        return 1.0, 100.0 if script.endswith("train_net.py") else 200.0


def mocked_steps(compare, monkeypatch, tmp_path, fake, splits):
    """Routes compare's steps to ``fake`` and writes a tiny COCO set per split under
    ``tmp_path/data/mine`` (different sizes, so every split's json has its own sha1)."""
    monkeypatch.setattr(compare, "run", fake)
    monkeypatch.setattr(compare, "probe_script_found", lambda: True)
    data = tmp_path / "data" / "mine"
    for n, split in enumerate(splits):
        _coco(data / split / "_annotations.coco.json", n_images=2 + n)
    return data


def test_finished_runs_are_skipped_and_only_what_changed_reruns(compare, tmp_path,
                                                                monkeypatch, capsys):
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid", "test"))
    out = tmp_path / "out"

    def main(split="valid", *extra):
        return compare.main([
            "--out", str(out), "--quick", "1", "--arms", "scratch,erf", "--seeds", "0,1",
            "--train-json", str(data / "train/_annotations.coco.json"),
            "--train-images", str(data / "train"),
            "--val-json", str(data / f"{split}/_annotations.coco.json"),
            "--val-images", str(data / split), "--frozen", "--table3", *extra])

    main()
    steps = [c[0] for c in fake.calls]
    # 1 bank; per seed: erf pre-training, 2 probes, 2 x (fine-tuning + frozen), scratch_long
    assert steps.count("builder") == 1 and steps.count("train_net.py") == 2
    assert steps.count("probe.py") == 4 and steps.count("finetune_net.py") == 10
    with open(out / "results.json") as f:
        results = json.load(f)
    assert len(results) == 2 * (1 + 2 + 4 + 1)
    long = [r for r in results.values() if r["arm"] == "scratch_long"]
    assert {r["iters"] for r in long} == {18}  # 12 * (100 + 200) / 200
    ft = next(r for r in results.values() if r["arm"] == "erf" and r["step"] == "finetune")
    assert ft["settings"]["runtime"]["loader_workers"] == 1
    assert ft["settings"]["runtime"]["omp_num_threads"] == 1
    assert ft["command"].startswith("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ")
    assert "MODEL.BACKBONE.FREEZE_AT" not in ft["command"]
    assert ft["pretrain_cpu_s"] == 100.0 and ft["environment"]["torch"]
    table = capsys.readouterr().out
    assert "scratch_long" in table and "Table 3 view" in table and "Δ AP vs scratch" in table

    fake.calls.clear()
    main()  # everything finished at these settings: nothing runs
    assert fake.calls == []

    main("test")  # another eval split: the trained detectors are evaluated, probes rerun
    assert {c[0] for c in fake.calls} == {"finetune_net.py", "probe.py"}
    assert all(c[2] for c in fake.calls if c[0] == "finetune_net.py")
    assert len(fake.calls) == 2 * (2 + 5)

    fake.calls.clear()
    main("valid", "--finetune-iters", "20")  # another fine-tuning length: no new pre-training
    assert {c[0] for c in fake.calls} == {"finetune_net.py"}
    assert not any(c[2] for c in fake.calls)


def test_handoff_arms_share_pretraining_and_pair_with_their_norm(compare, tmp_path, monkeypatch,
                                                                 capsys):
    """scratch_bn / erf_gn / erf_frozenbn (issue 13): erf_frozenbn fine-tunes erf's own export
    with FrozenBN + FREEZE_AT 2 (no second pre-training), erf_gn pre-trains and fine-tunes with the
    GN configs, and the hand-off table pairs each arm with the scratch detector of its norm."""
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid"))
    out = tmp_path / "out"
    compare.main([
        "--out", str(out), "--quick", "1", "--seeds", "0,1",
        "--arms", "scratch,scratch_bn,erf,erf_gn,erf_frozenbn",
        "--train-json", str(data / "train/_annotations.coco.json"),
        "--train-images", str(data / "train"),
        "--val-json", str(data / "valid/_annotations.coco.json"), "--val-images", str(data / "valid")])
    with open(out / "results.json") as f:
        results = json.load(f)
    pre = [r for r in results.values() if r["step"] == "pretrain"]
    assert sorted({r["arm"] for r in pre}) == ["erf", "erf_gn"] and len(pre) == 4
    gn_pre = next(r for r in pre if r["arm"] == "erf_gn")
    assert "montage_R_18_toy_gn.yaml" in gn_pre["command"] and "MONTAGE.LOSS erf" in gn_pre["command"]
    ft = {(r["arm"], r["seed"]): r for r in results.values() if r["step"] == "finetune"}
    frozenbn, erf = ft[("erf_frozenbn", 0)], ft[("erf", 0)]
    assert frozenbn["weights"] == erf["weights"] != ""           # the same export
    assert frozenbn["pretrain_key"] == erf["pretrain_key"]
    assert "MODEL.RESNETS.NORM FrozenBN MODEL.BACKBONE.FREEZE_AT 2" in frozenbn["command"]
    assert "faster_rcnn_R_18_FPN_toy_gn.yaml" in ft[("erf_gn", 0)]["command"]
    assert ft[("scratch_bn", 0)]["weights"] == "" and \
        "faster_rcnn_R_18_FPN_toy.yaml" in ft[("scratch_bn", 0)]["command"]
    probes = {r["arm"] for r in results.values() if r["step"] == "probe"}
    assert probes == {"scratch", "erf", "erf_gn"}  # scratch_bn / erf_frozenbn: nothing new
    gn_probe = next(r for r in results.values() if r["step"] == "probe" and r["arm"] == "erf_gn")
    assert "faster_rcnn_R_18_FPN_toy_gn.yaml" in gn_probe["command"]

    out_text = capsys.readouterr().out
    assert "hand-off by norm" in out_text
    rows = {c[0]: c for c in map(cells, out_text.splitlines())
            if c and c[0] in ("erf", "erf_gn", "erf_frozenbn", "scratch_bn") and len(c) == 9}
    # FakeSteps: AP = 1 (random init) or 3 (export) + 0.5 * seed + iterations / 1000
    assert rows["erf"][5:7] == ["scratch_bn", "+2.00 [+2.00, +2.00]"]
    assert rows["erf_gn"][5:7] == ["scratch", "+2.00 [+2.00, +2.00]"]
    assert rows["erf_frozenbn"][5:7] == ["scratch_bn", "+2.00 [+2.00, +2.00]"]
    assert rows["scratch_bn"][5:7] == ["—", "—"]


def test_erf_fpn_arm_pretrains_the_pyramid_and_pairs_with_erf(compare, tmp_path, monkeypatch,
                                                              capsys):
    """erf_fpn (backbone + pyramid pre-training): its own pre-training with the FPN demo config and
    the ERF loss, erf's detector config, its own probe, and the paired erf_fpn − erf line."""
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid"))
    out = tmp_path / "out"
    compare.main([
        "--out", str(out), "--quick", "1", "--seeds", "0,1", "--frozen",
        "--arms", "scratch,erf,erf_fpn,erf_fpn_levels",
        "--train-json", str(data / "train/_annotations.coco.json"),
        "--train-images", str(data / "train"),
        "--val-json", str(data / "valid/_annotations.coco.json"),
        "--val-images", str(data / "valid")])
    with open(out / "results.json") as f:
        results = json.load(f)
    pre = {(r["arm"], r["seed"]): r for r in results.values() if r["step"] == "pretrain"}
    assert sorted(pre) == [("erf", 0), ("erf", 1), ("erf_fpn", 0), ("erf_fpn", 1),
                           ("erf_fpn_levels", 0), ("erf_fpn_levels", 1)]
    fpn_pre, erf_pre = pre[("erf_fpn", 0)], pre[("erf", 0)]
    # erf_fpn_levels: erf_fpn with a classifier per level, nothing else different
    levels_pre = pre[("erf_fpn_levels", 0)]
    assert "MONTAGE.FPN.SHARED_HEAD False" in levels_pre["command"]
    assert "SHARED_HEAD" not in fpn_pre["command"] and "opts" not in fpn_pre["settings"]
    assert {k: v for k, v in levels_pre["settings"].items() if k != "opts"} == fpn_pre["settings"]
    assert levels_pre["sid"] != fpn_pre["sid"]
    assert "montage_R_18_FPN_toy.yaml" in fpn_pre["command"]
    assert "MONTAGE.LOSS erf" in fpn_pre["command"]
    # equal pre-training compute: same iterations, canvas and ERF schedule as erf
    for key in ("iters", "input_size", "warmup", "erf_period", "loss"):
        assert fpn_pre["settings"][key] == erf_pre["settings"][key], key
    ft = {(r["arm"], r["seed"], r["step"]): r for r in results.values()
          if r["step"] in ("finetune", "frozen")}
    assert ft[("erf_fpn", 0, "finetune")]["weights"] == fpn_pre["export"] != erf_pre["export"]
    for step in ("finetune", "frozen"):
        assert ft[("erf_fpn", 0, step)]["settings"]["finetune"]["config"] == \
            ft[("erf", 0, step)]["settings"]["finetune"]["config"] == compare.FINETUNE_CONFIG
    assert {r["arm"] for r in results.values() if r["step"] == "probe"} == {
        "scratch", "erf", "erf_fpn", "erf_fpn_levels"}
    text = capsys.readouterr().out
    # FakeSteps: AP = 3 + 0.5 * seed + iterations / 1000 for any export: no difference
    assert "pyramid pre-training: erf_fpn (backbone + FPN) − erf (backbone only), paired: " \
           "AP +0.00 [+0.00, +0.00]" in text
    assert "classifier per level: erf_fpn_levels − erf_fpn (one shared by all levels), paired: " \
           "AP +0.00 [+0.00, +0.00]" in text
    rows = [cells(line) for line in text.splitlines() if line.startswith("| erf_fpn")]
    assert rows and rows[0][1] == "2"  # the detection table has the arm over both seeds
    assert compare.arm_spec("erf_fpn")["ref"] == "scratch_bn"


def test_trained_only_evaluates_what_exists_and_trains_nothing(compare, tmp_path, monkeypatch,
                                                               capsys):
    """--trained-only on another split: eval-only runs and probes for the trained seed; the
    untrained seed is skipped, nothing is pre-trained or fine-tuned."""
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid", "test"))
    out = tmp_path / "out"

    def main(split, seeds, *extra):
        return compare.main([
            "--out", str(out), "--quick", "1", "--arms", "scratch,erf", "--seeds", seeds,
            "--train-json", str(data / "train/_annotations.coco.json"),
            "--train-images", str(data / "train"),
            "--val-json", str(data / f"{split}/_annotations.coco.json"),
            "--val-images", str(data / split), "--frozen", *extra])

    main("valid", "0")
    fake.calls.clear()
    main("test", "0,1", "--trained-only")
    scripts = [c[0] for c in fake.calls]
    assert "train_net.py" not in scripts and "builder" not in scripts
    assert all(c[2] for c in fake.calls if c[0] == "finetune_net.py")  # --eval-only only
    # seed 0: 2 arms x (fine-tuning + frozen) evaluated, 2 probes; seed 1: only scratch's probe
    # (random init: nothing to train)
    assert scripts.count("finetune_net.py") == 4 and scripts.count("probe.py") == 3
    assert "skipped" in capsys.readouterr().out


def test_diverged_fine_tuning_is_recorded_as_ap_zero_and_the_comparison_goes_on(
        compare, tmp_path, monkeypatch, capsys):
    """A fine-tuning that Detectron2 stops as diverged is a result (AP 0, flagged, in the paired
    differences), not a crash; scratch_long is skipped for that seed; another split needs no
    run; a failure of any other kind still stops the comparison."""
    class Diverging(FakeSteps):
        def __call__(self, cmd, log_path, env=None):
            opts = dict(zip(cmd, cmd[1:]))
            if cmd[1].endswith("finetune_net.py") and opts["MODEL.WEIGHTS"].endswith(
                    self.export_name) and opts.get("SEED") == "1" and "--eval-only" not in cmd:
                self.calls.append(("finetune_net.py", "diverged", False))
                with open(log_path, "w") as f:
                    f.write("iter: 39  total_loss: 0.97\niter: 49  total_loss: 2.2\n"
                            "FloatingPointError: Predicted boxes or scores contain Inf/NaN. "
                            "Training has diverged.\n")
                raise compare.StepFailed(cmd, 1, log_path, 2.0, 50.0)
            return super().__call__(cmd, log_path, env)

    fake = Diverging(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid", "test"))
    out = tmp_path / "out"

    def main(split):
        return compare.main([
            "--out", str(out), "--quick", "1", "--arms", "scratch,erf", "--seeds", "0,1",
            "--no-probes", "--train-json", str(data / "train/_annotations.coco.json"),
            "--train-images", str(data / "train"),
            "--val-json", str(data / f"{split}/_annotations.coco.json"),
            "--val-images", str(data / split), "--table3"])

    main("valid")
    text = capsys.readouterr().out
    assert "DIVERGED after iteration 49" in text and "scratch_long skipped" in text
    with open(out / "results.json") as f:
        results = json.load(f)
    bad = next(r for r in results.values()
               if r["arm"] == "erf" and r["seed"] == 1 and r["step"] == "finetune")
    assert bad["diverged"] and bad["diverged_after_iter"] == 49
    assert next(iter(bad["metrics"].values()))["AP"] == 0.0
    assert not any(r["arm"] == "scratch_long" and r["seed"] == 1 for r in results.values())
    det = cells(next(line for line in text.splitlines() if line.startswith("| erf ")))
    # erf AP: seed 0 = 3 + 0 + 12/1000, seed 1 diverged = 0 -> mean 1.506; scratch 1.012, 1.512
    assert det[2] == "1.51 ± 2.13 (1 diverged: AP 0)"
    assert det[3] == "+0.24 [-1.51, +2.00]"  # +2.00 (seed 0), -1.51 (seed 1)

    fake.calls.clear()
    main("test")  # the diverged detector needs no evaluation run
    assert ("finetune_net.py", "diverged", False) not in fake.calls
    with open(out / "results.json") as f:
        bad = next(r for r in json.load(f).values()
                   if r["arm"] == "erf" and r["seed"] == 1 and r["step"] == "finetune")
    assert len(bad["metrics"]) == 2 and all(m["AP"] == 0.0 for m in bad["metrics"].values())

    class Broken(FakeSteps):
        def __call__(self, cmd, log_path, env=None):
            with open(log_path, "w") as f:
                f.write("Traceback ...\nKeyError: 'x'\n")
            raise compare.StepFailed(cmd, 1, log_path, 1.0, 1.0)

    monkeypatch.setattr(compare, "run", Broken(compare.EXPORT_NAME))
    with pytest.raises(SystemExit, match="failed"):
        compare.main(["--out", str(tmp_path / "out2"), "--quick", "1", "--arms", "scratch",
                      "--seeds", "0", "--no-probes",
                      "--train-json", str(data / "train/_annotations.coco.json"),
                      "--train-images", str(data / "train"),
                      "--val-json", str(data / "valid/_annotations.coco.json"),
                      "--val-images", str(data / "valid")])


def test_diverged_flags_only_mark_detection_metrics(compare):
    assert compare._diverged_flag("AP50") == "diverged"
    assert compare._diverged_flag("frozen_AP") == "frozen_diverged"
    assert compare._diverged_flag("res5_linear") is None  # probes do not fine-tune
    runs = [dict(iters=200, pretrain_cpu_s=100.0, finetune_cpu_s=600.0),
            dict(iters=200, pretrain_cpu_s=100.0, finetune_cpu_s=150.0, diverged=True)]
    assert compare._cost_cells(runs) == ["200", "100", "600", "700"]  # the stopped run left out


def test_gradient_clip_is_a_setting_and_off_keeps_the_unclipped_records(compare, tmp_path,
                                                                       monkeypatch):
    fake = FakeSteps(compare.EXPORT_NAME)
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid"))
    out = tmp_path / "out"

    def main(*extra):
        compare.main(["--out", str(out), "--quick", "1", "--arms", "scratch,erf", "--seeds", "0",
                      "--no-probes", "--train-json", str(data / "train/_annotations.coco.json"),
                      "--train-images", str(data / "train"),
                      "--val-json", str(data / "valid/_annotations.coco.json"),
                      "--val-images", str(data / "valid"), *extra])
        with open(out / "results.json") as f:
            return {k: r for k, r in json.load(f).items() if r["step"] == "finetune"}

    off = main("--clip-grad", "0")
    # off: the settings are those of records made before clipping existed (no clip key), and the
    # command turns off whatever clipping the config file has
    plan = dict(train_sha1="x", threads=1, workers=1, pretrain_iters=12, input_size=128,
                finetune_iters=12, ft_min_size=224, table3=None)
    assert compare.finetune_settings(dict(plan, clip_grad=0), "erf", "finetune") == \
        compare.finetune_settings(plan, "erf", "finetune")
    assert all("SOLVER.CLIP_GRADIENTS.ENABLED False" in r["command"] for r in off.values())
    fake.calls.clear()
    clipped = main()  # the default clips: new settings, so both fine-tunings run again
    assert [c[0] for c in fake.calls] == ["finetune_net.py"] * 2
    new = {k: r for k, r in clipped.items() if k not in off}
    assert len(new) == 2 and all(r["settings"]["finetune"]["clip_grad"] == 5.0
                                 for r in new.values())
    assert all("SOLVER.CLIP_GRADIENTS.ENABLED True SOLVER.CLIP_GRADIENTS.CLIP_TYPE norm "
               "SOLVER.CLIP_GRADIENTS.CLIP_VALUE 5.0" in r["command"] for r in new.values())
    fake.calls.clear()
    main("--clip-grad", "0")  # the unclipped records are still there and still match
    assert fake.calls == []


def test_clip_off_resolves_the_toy_configs_to_detectron2_defaults(compare):
    from detectron2.config import get_cfg
    from tests.montage_pretrain.finetune_helpers import TOY, finetune_cfg

    clipping = finetune_cfg().SOLVER.CLIP_GRADIENTS  # the configs clip; compare decides
    assert clipping.ENABLED and clipping.CLIP_TYPE == "norm"
    assert compare.parse_args([]).clip_grad == clipping.CLIP_VALUE  # one value, not two
    off = finetune_cfg(TOY, *compare.clip_opts(0)).SOLVER.CLIP_GRADIENTS
    assert off == get_cfg().SOLVER.CLIP_GRADIENTS  # as resolved before the configs clipped
    on = finetune_cfg(TOY, *compare.clip_opts(2.5)).SOLVER.CLIP_GRADIENTS
    assert (on.ENABLED, on.CLIP_TYPE, on.CLIP_VALUE) == (True, "norm", 2.5)


def test_step_failed_recognises_finetune_nets_one_line(compare, tmp_path):
    """finetune_net.py ends a non-finite run with its own line (montage_pretrain/nonfinite.py):
    that is a divergence to record, like Detectron2's own words; another failure is not."""
    log = tmp_path / "stdout.log"
    log.write_text("iter: 19  total_loss: 1.5\nfinetune_net.py: non-finite loss at iteration 23: "
                   "loss_cls nan; try lower SOLVER.BASE_LR (now 0.01)\n")
    failed = compare.StepFailed(["finetune_net.py"], 1, str(log), 1.0, 2.0)
    assert failed.diverged and failed.last_iter == 19
    log.write_text("iter: 19  total_loss: 1.5\nfinetune_net.py: no such file: x.json\n")
    assert not compare.StepFailed(["finetune_net.py"], 1, str(log), 1.0, 2.0).diverged


def run_arms(compare, tmp_path, monkeypatch, fake, seed, arms):
    """compare.main on a tiny mocked dataset with ``arms`` and one ``seed`` (no probes; the
    init-scale rescale writes an empty file): -> results.json's records."""
    data = mocked_steps(compare, monkeypatch, tmp_path, fake, ("train", "valid"))
    import montage_pretrain.export as export

    monkeypatch.setattr(export, "rescale_export",
                        lambda src, dst: open(dst, "w").close() or {})
    out = tmp_path / "out"
    compare.main(["--out", str(out), "--quick", "1", "--no-probes", "--seeds", str(seed),
                  "--arms", arms, "--train-json", str(data / "train/_annotations.coco.json"),
                  "--train-images", str(data / "train"),
                  "--val-json", str(data / "valid/_annotations.coco.json"),
                  "--val-images", str(data / "valid")])
    with open(out / "results.json") as f:
        return json.load(f)


def test_schedule_arms_pretrain_their_own_recipe(compare, tmp_path, monkeypatch):
    """erf_hot_init / erf_hot_lowstart_init / erf_long_init: each its own pre-training, with its
    recipe in its settings (so in its sid) and its command (batch, LR, iterations, warm-up and
    its start, canvas), handed on at init scale; erf's settings do not change."""
    results = run_arms(compare, tmp_path, monkeypatch, FakeSteps(compare.EXPORT_NAME), 0,
                       "scratch_bn,erf,erf_hot_init,erf_hot_lowstart_init,erf_long_init")
    pre = {r["arm"]: r for r in results.values() if r["step"] == "pretrain"}
    assert sorted(pre) == ["erf", "erf_hot_init", "erf_hot_lowstart_init", "erf_long_init"]
    long_opts = dict(zip(pre["erf_long_init"]["command"].split(),
                         pre["erf_long_init"]["command"].split()[1:]))
    erf_opts = dict(zip(pre["erf"]["command"].split(), pre["erf"]["command"].split()[1:]))
    assert (long_opts["SOLVER.MAX_ITER"], long_opts["SOLVER.WARMUP_ITERS"],
            long_opts["MONTAGE.ERF_PERIOD"]) == ("1200", "15", "50")
    for key in ("MONTAGE.INPUT_SIZE", "--config-file", "MONTAGE.LOSS"):  # erf's recipe otherwise
        assert long_opts[key] == erf_opts[key]
    assert "SOLVER.IMS_PER_BATCH" not in long_opts and "SOLVER.BASE_LR" not in long_opts
    assert len({r["sid"] for r in pre.values()}) == 4
    for arm in ("erf_hot_init", "erf_hot_lowstart_init"):
        opts = dict(zip(pre[arm]["command"].split(), pre[arm]["command"].split()[1:]))
        assert (opts["SOLVER.IMS_PER_BATCH"], opts["SOLVER.BASE_LR"], opts["SOLVER.MAX_ITER"],
                opts["SOLVER.WARMUP_ITERS"], opts["MONTAGE.INPUT_SIZE"]) == (
                    "512", "0.8", "300", "30", "64")
        assert pre[arm]["settings"]["montages"] == 512
    assert "SOLVER.WARMUP_FACTOR" not in pre["erf_hot_init"]["command"]
    assert "SOLVER.WARMUP_FACTOR 0.01" in pre["erf_hot_lowstart_init"]["command"]
    assert pre["erf_hot_init"]["sid"] != pre["erf_hot_lowstart_init"]["sid"]
    assert "SOLVER.IMS_PER_BATCH" not in pre["erf"]["command"]
    assert not {"montages", "lr", "warmup_factor"} & set(pre["erf"]["settings"])
    # The collapse guard warns instead of stopping (a collapsed arm is a result); it only
    # measures, so it is in no settings (the sids of earlier runs stay valid).
    for r in pre.values():
        assert r["command"].endswith("MONTAGE.COLLAPSE.ACTION warn")
        assert "COLLAPSE" not in json.dumps(r["settings"])
        assert r["feature_health"] is None  # the fake steps write no metrics.json
    ft = {r["arm"]: r for r in results.values() if r["step"] == "finetune"}
    assert ft["erf_hot_init"]["weights"].endswith("_init_scale.pkl")
    assert ft["erf_hot_init"]["weights"].startswith(os.path.dirname(pre["erf_hot_init"]["export"]))


def test_bank_schedule_sizes_the_pretraining_to_passes_over_the_bank(compare):
    """passes x crops / (4 crops x montages) iterations, rounded up; warm-up and ERF period at
    the paper's shares (1,250 and 5,000 of 64k); settings without passes unchanged."""
    s = dict(config=compare.PRETRAIN_CONFIG, passes=139)
    r = compare.bank_schedule(dict(s, montages=512), 946_000)
    assert r["iters"] == 64_207  # the paper's 64k: its COCO bank, 512 montages a step
    assert (r["warmup"], r["erf_period"]) == (1254, 5016)
    r = compare.bank_schedule(s, 2319)  # chess's bank at the config's 16 montages
    assert (r["iters"], r["warmup"], r["erf_period"]) == (5037, 98, 394)
    assert compare.bank_schedule(dict(s, passes=1), 65)["iters"] == 2  # rounded up
    plain = dict(config=compare.PRETRAIN_CONFIG, iters=150)
    assert compare.bank_schedule(plain, 2319) is plain


def test_bank_schedule_agrees_with_the_trainers_bank_passes(compare, make_bank, tmp_path):
    """make compare and train_net size a bank-passes schedule alike: bank_size reads the bank
    with the bank's own reader (14 crops here) and the iterations are those of
    MONTAGE.BANK_PASSES for the same config (at least 2 for both); a file that is not a bank
    fails as a bank."""
    from builder.bank import BankFormatError
    from detectron2.config import get_cfg
    from montage_pretrain import add_montage_config, fit_schedule_to_bank

    path = make_bank()
    assert compare.bank_size(path) == 14
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.merge_from_file(os.path.join(compare.ROOT, compare.PRETRAIN_CONFIG))
    for passes in (1, 139, 1000):
        cfg.MONTAGE.BANK_PASSES = passes
        c = cfg.clone()
        fit_schedule_to_bank(c, 14)
        r = compare.bank_schedule(dict(config=compare.PRETRAIN_CONFIG, passes=passes), 14)
        assert r["iters"] == c.SOLVER.MAX_ITER  # 2, 31, 219 (16 montages a step)
    bad = tmp_path / "not_a_bank.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(BankFormatError):
        compare.bank_size(str(bad))


@pytest.mark.parametrize("crops", [723, 1070, 2319, 946_000])
def test_erf_bank_init_is_what_make_pretrain_and_make_finetune_run_by_default(compare, crops):
    """The proof arm is the default path (issue 20): make pretrain's config with nothing on the
    command line sizes itself to the bank exactly as erf_bank_init does (iterations, warm-up,
    ERF period; batch, LR, canvas, loss), exports at init scale as erf_bank_init hands on, and
    make finetune's default detector is erf_bank_init's."""
    from detectron2.config import get_cfg
    from montage_pretrain.config import (add_montage_config, command_line_length,
                                         fit_schedule_to_bank, merge_config_file)

    with open(os.path.join(compare.ROOT, "Makefile")) as f:
        make = dict(re.findall(r"^(PRETRAIN_CONFIG|FINETUNE_CONFIG) \?= (\S+)", f.read(), re.M))
    assert make == dict(PRETRAIN_CONFIG=compare.PRETRAIN_CONFIG,
                        FINETUNE_CONFIG=compare.FINETUNE_CONFIG)
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, os.path.join(compare.ROOT, make["PRETRAIN_CONFIG"]))
    assert command_line_length(cfg, ["MONTAGE.BANK", "bank.h5", "SEED", "0"]) is None
    fit_schedule_to_bank(cfg, crops)
    plan = dict(train_sha1="0" * 40, threads=1, workers=1, pretrain_iters=150,
                input_size=compare.SIZES[0]["input_size"])
    spec = compare.arm_spec("erf_bank_init")
    arm = compare.bank_schedule(compare.pretrain_settings(plan, "erf_bank_init"), crops)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.MONTAGE.ERF_PERIOD) == (
        arm["iters"], arm["warmup"], arm["erf_period"])
    assert (cfg.MONTAGE.INPUT_SIZE, cfg.MONTAGE.LOSS) == (arm["input_size"], arm["loss"])
    assert arm["config"] == make["PRETRAIN_CONFIG"] and not {"montages", "lr"} & set(arm)
    assert cfg.MONTAGE.EXPORT_WEIGHT_SCALE == spec["weight_scale"] == "init"
    assert spec["config"] == make["FINETUNE_CONFIG"] and spec["opts"] == []


def test_erf_bank_init_pretrains_passes_over_the_bank(compare, tmp_path, monkeypatch):
    """erf_bank_init: its sid holds the passes (not the iterations, known only once the bank
    is built); its command and record hold the iterations the bank's size gives."""
    monkeypatch.setattr(compare, "bank_size", lambda path: 640)
    results = run_arms(compare, tmp_path, monkeypatch, FakeSteps(compare.EXPORT_NAME), 0,
                       "scratch_bn,erf,erf_bank_init")
    pre = {r["arm"]: r for r in results.values() if r["step"] == "pretrain"}
    opts = dict(zip(pre["erf_bank_init"]["command"].split(),
                    pre["erf_bank_init"]["command"].split()[1:]))
    iters = -(-139 * 640 // 64)
    assert (opts["SOLVER.MAX_ITER"], opts["SOLVER.WARMUP_ITERS"], opts["MONTAGE.ERF_PERIOD"]) \
        == (str(iters), str(round(iters * 1250 / 64000)), str(round(iters * 5000 / 64000)))
    assert pre["erf_bank_init"]["settings"]["iters"] == iters
    unresolved = {k: v for k, v in pre["erf_bank_init"]["settings"].items()
                  if k not in ("iters", "warmup", "erf_period")}
    assert unresolved["passes"] == 139
    assert compare.sid_of(unresolved) == pre["erf_bank_init"]["sid"]
    assert pre["erf_bank_init"]["sid"] != pre["erf"]["sid"]


def test_handoff_arms_fine_tune_a_variant_of_the_init_scale_export(compare, tmp_path,
                                                                    monkeypatch):
    """erf_reinit_res5_init / erf_reinit_res45_init share erf's pre-training, derive the
    init-scale export, then diagnose_handoff.py's variant of it, seeded by the seed."""
    class Variants(FakeSteps):
        def __call__(self, cmd, log_path, env=None):
            if cmd[1] == "scripts/diagnose_handoff.py":
                opts = dict(zip(cmd, cmd[1:]))
                self.calls.append(("diagnose_handoff.py", opts["--write-variant"],
                                   opts["--seed"]))
                assert opts["--weights"].endswith("_init_scale.pkl")
                open(opts["--out"], "w").close()
                return 1.0, 5.0
            return super().__call__(cmd, log_path, env)

    fake = Variants(compare.EXPORT_NAME)
    results = run_arms(compare, tmp_path, monkeypatch, fake, 1,
                       "scratch_bn,erf_init,erf_reinit_res5_init,erf_reinit_res45_init")
    assert sorted(c for c in fake.calls if c[0] == "diagnose_handoff.py") == [
        ("diagnose_handoff.py", "reinit_res4_res5", "1"), ("diagnose_handoff.py", "reinit_res5", "1")]
    pre = {r["arm"]: r for r in results.values() if r["step"] == "pretrain"}
    assert sorted(pre) == ["erf"]  # shared by the variants
    ft = {r["arm"]: r for r in results.values() if r["step"] == "finetune"}
    assert ft["erf_reinit_res5_init"]["weights"].endswith("_init_scale_reinit_res5_seed1.pkl")
    assert ft["erf_reinit_res45_init"]["weights"].endswith(
        "_init_scale_reinit_res4_res5_seed1.pkl")
    for arm in ("erf_reinit_res5_init", "erf_reinit_res45_init"):
        assert ft[arm]["weights"].startswith(os.path.dirname(pre["erf"]["export"]))
    assert ft["erf_reinit_res5_init"]["settings"]["finetune"]["variant"] == "reinit_res5"
    assert "variant" not in ft["erf_init"]["settings"]["finetune"]
    assert len({r["sid"] for r in ft.values()}) == 4


def test_resumed_cpu_is_scaled_to_the_whole_run(compare):
    """A run resumed from model_0000399.pth measured iterations 400..1514 only."""
    assert compare.resumed_cpu_s(1115.0, 1515, "model_0000399.pth") == (1515.0, True)
    assert compare.resumed_cpu_s(50.0, 100, None) == (50.0, False)
    assert compare.resumed_cpu_s(50.0, 100, "model_final.pth") == (50.0, False)
    # a record: fine-tunings carry iters, pre-trainings their settings' iters
    assert compare.whole_run_cpu_s(dict(cpu_s=10.0, settings=dict(iters=300),
                                        resumed_from="model_0000149.pth")) == (20.0, True)
    assert compare.whole_run_cpu_s(dict(cpu_s=10.0, iters=40)) == (10.0, False)


def test_last_feature_health_reads_the_guards_last_values(compare, tmp_path):
    rows = [{"iteration": 9, "montage/feature_pr": 80.0, "montage/dead_channels": 0.0},
            {"iteration": 19, "total_loss": 2.0},
            {"iteration": 59, "montage/feature_pr": 1.23456, "montage/dead_channels": 0.9}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert compare.last_feature_health(str(tmp_path)) == {"feature_pr": 1.2346,
                                                           "dead_channels": 0.9,
                                                           "collapsed": None}
    (tmp_path / "stdout.log").write_text(
        "[12/05 02:39:34 montage_pretrain.hooks]: WARNING pre-training collapsed by iteration 20: "
        "the last feature map's participation ratio is 2.3. MONTAGE.COLLAPSE.ACTION=warn\n")
    health = compare.last_feature_health(str(tmp_path))
    assert health["collapsed"].startswith("pre-training collapsed by iteration 20: the last")
    assert compare.last_feature_health(str(tmp_path / "missing")) is None

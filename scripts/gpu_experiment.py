#!/usr/bin/env python
"""
The long protocol in one device call (issue 20): does the default Montage hand-off beat the same
detector from random init once fine-tuning is long enough for random init to converge?

    python scripts/gpu_experiment.py --work W --out OUT/experiment.json --bank W/bank.h5 \\
        --train-json ... --train-images ... --val-json ... --val-images ...

scripts/gpu_check.sh's ``experiment`` step calls it (``--dry-run``: tiny sizes on the CPU).

1. Pre-trains R-18 (configs/demo/montage_R_18_toy.yaml at ``--pre-batch`` montages x
   ``--pre-size`` px, warm-up 10 % from the config's 0.25 x LR) twice:
   * at ``--pre-lr`` (the default path: a bounded LR, and the feature-collapse guard at its
     default, ``stop``): its default export (``init``: BN-followed conv filters at their init
     norm, same outputs) is arm ``erf_init``, the same checkpoint exported as trained
     (``montage-export --weight-scale trained``, the hand-off before issue 20) arm ``erf``;
   * at the linear rule's 0.8 x batch / 512 (``--hot-lr``; the GPU check's recipe before the
     guard, which collapsed on chess: project README, "Cause (2), taken apart") with the guard
     at ``warn``, so it exports whatever it becomes: arm ``erf_hot_init``.
   Every export's filter norms against Detectron2's init, the guard's participation-ratio
   readings, and a per-stage diagnosis against random init are recorded.
2. Fine-tunes, all side by side on the device, the toy R-18 FPN detector (trainable BN, FREEZE_AT
   0; only MODEL.WEIGHTS differs between arms): ``scratch_bn`` (random init), ``erf_init`` and
   ``erf_hot_init`` for every ``--seeds`` at ``--ft-iters``; ``erf`` for the first seed; and
   scratch_bn / erf_init for the first seed at ``--ft-short`` too (0 = none): 9 runs with the
   defaults. Every run traces its first 100 iterations (finetune_net.py --trace-iters:
   per-stage relative updates). A pre-training that fails (the guard stopped it) drops its
   arms; the others still run.
3. Writes ``--out`` after each phase: AP per run, loss trace, max loss, the trace summary, and the
   paired difference of each pre-trained arm to scratch_bn per seed and length.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRE_CONFIG = "projects/MontagePretrain/configs/demo/montage_R_18_toy.yaml"
FT_CONFIG = "projects/MontagePretrain/configs/finetune/demo/faster_rcnn_R_18_FPN_toy.yaml"
ARMS = ("scratch_bn", "erf_init", "erf_hot_init", "erf")
STAGES = ("stem", "res2", "res3", "res4", "res5", "fpn")
# The default pre-training's LR, at any batch: at 128 montages R-18 stayed healthy at <= 0.05
# and collapsed at >= 0.1 on the chess and coco_tiny banks (the linear rule gives 0.2 there, 0.8
# at 512); 0.025 is also healthy at 16 montages and for 33 passes over chess (project README,
# "The fix in the default path (part 2)").
PRE_LR = 0.025


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bank", required=True)
    for flag in ("train-json", "train-images", "val-json", "val-images"):
        p.add_argument(f"--{flag}", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", default="True")
    p.add_argument("--pre-batch", type=int, default=512)
    p.add_argument("--pre-size", type=int, default=224)
    p.add_argument("--pre-iters", type=int, default=300)
    p.add_argument("--pre-workers", type=int, default=12)
    p.add_argument("--ft-iters", type=int, default=500)
    p.add_argument("--ft-short", type=int, default=100)
    p.add_argument("--ft-batch", type=int, default=16)
    p.add_argument("--ft-workers", type=int, default=1)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--trace-iters", type=int, default=100)
    p.add_argument("--pre-lr", type=float, default=PRE_LR,
                   help="LR of the default pre-training (arms erf_init, erf), whatever the batch")
    p.add_argument("--hot-lr", type=float, default=-1.0,
                   help="LR of the second pre-training, guard at warn (arm erf_hot_init); "
                        "-1: the linear rule's 0.8 x batch / 512; 0: none")
    p.add_argument("ft_opts", nargs=argparse.REMAINDER, help="extra fine-tuning opts (sizes)")
    return p.parse_args(argv)


def save(path, rec):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, path)


def run_pretraining(a, name, lr, extra=()):
    """One R-18 pre-training at ``lr`` (``extra``: more config opts) into ``work/<name>``:
    (its record, its folder)."""
    d = os.path.join(a.work, name)
    cmd = [sys.executable, "projects/MontagePretrain/train_net.py", "--config-file", PRE_CONFIG,
           "MONTAGE.BANK", a.bank, "OUTPUT_DIR", d, "MODEL.DEVICE", a.device, "SEED", "0",
           "SOLVER.IMS_PER_BATCH", str(a.pre_batch), "SOLVER.BASE_LR", str(lr),
           "SOLVER.MAX_ITER", str(a.pre_iters),
           "SOLVER.WARMUP_ITERS", str(max(1, a.pre_iters // 10)),
           "SOLVER.CHECKPOINT_PERIOD", "1000000", "SOLVER.AMP.ENABLED", a.amp,
           "MONTAGE.INPUT_SIZE", str(a.pre_size), "MONTAGE.CHANNELS_LAST", a.amp,
           "MONTAGE.ERF_PERIOD", str(max(1, a.pre_iters // 2)),
           "DATALOADER.NUM_WORKERS", str(a.pre_workers), "TEST.PRECISE_BN.NUM_ITER", "5"]
    cmd += list(extra)
    t0 = time.time()
    with open(os.path.join(a.work, f"{name}.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    rec = dict(config=PRE_CONFIG, iterations=a.pre_iters, montages=a.pre_batch, size=a.pre_size,
               lr=lr, rc=rc, wall_s=round(time.time() - t0, 1))
    config = os.path.join(d, "config.yaml")  # the run's resolved config: its warm-up start
    if os.path.isfile(config):
        import yaml

        with open(config) as f:
            rec["warmup_factor"] = yaml.safe_load(f)["SOLVER"]["WARMUP_FACTOR"]
    losses = loss_rows(d)
    if losses:
        rec["loss_trace"] = [[it, round(v, 4)] for it, v in losses]
        rec["loss_max"] = max(v for _, v in losses)
    rec["feature_pr_trace"] = [[it, round(v, 2)] for it, v in loss_rows(d, "montage/feature_pr")]
    from montage_pretrain.hooks import collapse_message

    rec["collapse_message"] = collapse_message(os.path.join(a.work, f"{name}.log"))
    return rec, d


def loss_rows(run_dir, key="total_loss"):
    """[(iteration, value of ``key``)] of a Detectron2 run's metrics.json ([] when absent)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(x) for x in f if f'"{key}"' in x]
    return [(r["iteration"], r[key]) for r in rows]


def export_as_trained(run_dir, out):
    """Exports ``run_dir``'s final checkpoint as trained (no init rescale) to ``out``."""
    subprocess.run([sys.executable, "-m", "montage_pretrain.export", "--config-file",
                    os.path.join(run_dir, "config.yaml"), "--checkpoint",
                    os.path.join(run_dir, "model_final.pth"), "--out", out,
                    "--weight-scale", "trained"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return out


def norm_ratios(export_path):
    """{stage: filter norm / Detectron2's init norm} of an export's BN-followed convs."""
    from montage_pretrain.export_format import read_export
    from montage_pretrain.weight_scale import stage_scale_summary

    return {s: round(v["norm_ratio"], 3)
            for s, v in stage_scale_summary(read_export(export_path).weights).items()}


def pretrain(a, rec):
    """The two pre-trainings and their exports (see the module docstring). -> {arm: weight
    file}: scratch_bn always, the arms of each pre-training that finished."""
    weights, diagnosed = {"scratch_bn": ""}, []
    rec["pretrain"], d = run_pretraining(a, "pretrain", a.pre_lr)
    if rec["pretrain"]["rc"] == 0:
        default = os.path.join(d, "montage_backbone.pkl")
        trained = export_as_trained(d, os.path.join(a.work, "montage_backbone_trained.pkl"))
        weights.update(erf_init=default, erf=trained)
        rec["pretrain"]["norm_ratio_as_trained"] = norm_ratios(trained)
        rec["pretrain"]["norm_ratio_default_export"] = norm_ratios(default)
        diagnosed += [trained, default]
    hot_lr = 0.8 * a.pre_batch / 512 if a.hot_lr < 0 else a.hot_lr
    if hot_lr:
        rec["pretrain_hot"], d_hot = run_pretraining(a, "pretrain_hot", hot_lr,
                                                     ["MONTAGE.COLLAPSE.ACTION", "warn"])
        if rec["pretrain_hot"]["rc"] == 0:
            weights["erf_hot_init"] = os.path.join(d_hot, "montage_backbone.pkl")
            # its filters as trained, before the init rescale
            rec["pretrain_hot"]["norm_ratio_as_trained"] = norm_ratios(export_as_trained(
                d_hot, os.path.join(a.work, "montage_backbone_hot_trained.pkl")))
            diagnosed.append(weights["erf_hot_init"])
    # Per stage, the exports against random init on 8 training images (CPU, seconds): filter
    # norms, effective step, BN statistics fit, activation RMS, feature rank, dead units.
    diag = os.path.join(a.work, "diagnosis.json")
    cmd = [sys.executable, "scripts/diagnose_handoff.py", "--images", a.train_images]
    for w in diagnosed:
        cmd += ["--weights", w]
    if diagnosed:
        subprocess.run(cmd + ["--json", diag], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    if os.path.isfile(diag):
        with open(diag) as f:
            rec["diagnosis"] = json.load(f)["results"]
    return weights


def jobs(a, arms=ARMS):
    """(arm, seed, iterations): every arm of ``arms`` but ``erf`` for every seed at
    ``--ft-iters``, ``erf`` (the export as trained, the hand-off before issue 20) for the first
    seed, and scratch_bn / erf_init for the first seed at ``--ft-short`` (0: none)."""
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    out = [(arm, s, a.ft_iters) for s in seeds for arm in arms if arm != "erf"]
    if "erf" in arms:
        out.append(("erf", seeds[0], a.ft_iters))
    if a.ft_short:
        out += [(arm, seeds[0], a.ft_short) for arm in ("scratch_bn", "erf_init")]
    return out


def finetune_all(a, weights, rec):
    procs = []
    for arm, seed, iters in jobs(a, tuple(weights)):
        d = os.path.join(a.work, f"ft_{arm}_s{seed}_{iters}")
        cmd = [sys.executable, "projects/MontagePretrain/finetune_net.py",
               "--trace-iters", str(a.trace_iters), "--config-file", FT_CONFIG,
               "--train-json", a.train_json, "--train-images", a.train_images,
               "--val-json", a.val_json, "--val-images", a.val_images,
               "MODEL.WEIGHTS", weights[arm], "OUTPUT_DIR", d, "SEED", str(seed),
               "MODEL.DEVICE", a.device, "SOLVER.MAX_ITER", str(iters),
               "SOLVER.STEPS", f"({iters * 4 // 5},)", "SOLVER.WARMUP_ITERS", str(iters // 10 + 1),
               "SOLVER.IMS_PER_BATCH", str(a.ft_batch), "SOLVER.BASE_LR", str(a.ft_lr),
               "DATALOADER.NUM_WORKERS", str(a.ft_workers)] + a.ft_opts
        os.makedirs(d, exist_ok=True)
        log = open(os.path.join(d, "stdout.log"), "w")
        procs.append(((arm, seed, iters, d), log,
                      subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
    t0 = time.time()
    runs = []
    for (arm, seed, iters, d), log, proc in procs:  # every pid waited for by name
        rc = proc.wait()
        log.close()
        runs.append(summarize_run(arm, seed, iters, d, rc))
    rec["finetune"] = dict(config=FT_CONFIG, ims_per_batch=a.ft_batch, base_lr=a.ft_lr,
                           side_by_side=len(procs), wall_s_all=round(time.time() - t0, 1))
    rec["runs"] = runs
    rec["paired"] = paired(runs)


def summarize_run(arm, seed, iters, d, rc):
    run = dict(arm=arm, seed=seed, iters=iters, rc=rc)
    path = os.path.join(d, "metrics_final.json")
    if os.path.isfile(path):
        with open(path) as f:
            m = json.load(f)
        run["bbox"] = {k: m["bbox"].get(k) for k in ("AP", "AP50", "AP75")}
        for k in ("s_per_iter", "iterations_run", "backbone_tensors_loaded"):
            run[k] = m.get(k)
    rows = loss_rows(d)
    if rows:
        run["loss_trace"] = [[it, round(v, 4)] for it, v in rows[:: max(1, len(rows) // 12)]]
        run["loss_max"] = max(v for _, v in rows)
        run["loss_finite"] = all(math.isfinite(v) for _, v in rows)
    trace = os.path.join(d, "handoff_trace.json")
    if os.path.isfile(trace):
        with open(trace) as f:
            rows = json.load(f)["rows"]
        run["rel_update_mean"] = {g: statistics.mean(r[g]["rel_update"] for r in rows if g in r)
                                  for g in STAGES if any(g in r for r in rows)}
    return run


def paired(runs):
    """AP of each pre-trained arm minus scratch_bn's, same seed and length."""
    ap = {(r["arm"], r["seed"], r["iters"]): (r.get("bbox") or {}).get("AP") for r in runs}
    out = []
    for (arm, seed, iters), v in sorted(ap.items()):
        ref = ap.get(("scratch_bn", seed, iters))
        if arm != "scratch_bn" and v is not None and ref is not None:
            out.append(dict(arm=arm, seed=seed, iters=iters, delta_AP=round(v - ref, 2)))
    return out


def main(argv=None):
    a = parse_args(argv)
    if a.ft_opts and a.ft_opts[0] == "--":
        a.ft_opts = a.ft_opts[1:]
    os.makedirs(a.work, exist_ok=True)
    rec = dict(arms=list(ARMS))
    weights = pretrain(a, rec)
    save(a.out, rec)
    for name in ("pretrain", "pretrain_hot"):
        if name in rec and rec[name]["rc"]:
            print(f"{name} failed: see", os.path.join(a.work, f"{name}.log"),
                  rec[name].get("collapse_message") or "")
    rec["arms"], rec["jobs"] = list(weights), [list(j) for j in jobs(a, tuple(weights))]
    finetune_all(a, weights, rec)
    save(a.out, rec)
    for r in rec["runs"]:
        print(r["arm"], "seed", r["seed"], r["iters"], "it: AP",
              (r.get("bbox") or {}).get("AP"), "rc", r["rc"])
    for p in rec["paired"]:
        print(f"{p['arm']} - scratch_bn, seed {p['seed']}, {p['iters']} it: {p['delta_AP']:+.2f}")
    pre_ok = all(rec[n]["rc"] == 0 for n in ("pretrain", "pretrain_hot") if n in rec)
    return 0 if pre_ok and all(r["rc"] == 0 for r in rec["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

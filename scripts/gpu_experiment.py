#!/usr/bin/env python
"""
The long protocol in one device call (issue 20): does the default Montage hand-off beat the same
detector from random init once fine-tuning is long enough for random init to converge?

    python scripts/gpu_experiment.py --work W --out OUT/experiment.json --bank W/bank.h5 \\
        --train-json ... --train-images ... --val-json ... --val-images ...

scripts/gpu_check.sh's ``experiment`` step calls it (``--dry-run``: tiny sizes on the CPU).

1. Pre-trains R-18 from configs/demo/montage_R_18_toy.yaml, two runs side by side:
   * the default path, as ``make pretrain`` runs it: the config as shipped (16 montages x 128 px,
     LR 0.025, MONTAGE.BANK_PASSES 139: the schedule sized to the bank, 5,037 iterations on
     chess), the feature-collapse guard at its default (``stop``); only the device, loader
     workers and ``--default-opts`` (the dry run's tiny sizes) are set. Its default export (init
     scale) is arm ``erf_bank_init``, compare's ``DEFAULT_ARM``;
   * the GPU check's earlier recipe: ``--pre-iters`` at ``--pre-batch`` montages x
     ``--pre-size`` px, warm-up 10 % from the config's 0.25 x LR, at ``--pre-lr``: its default
     export is arm ``erf_init``, the same checkpoint exported as trained (``montage-export
     --weight-scale trained``, the hand-off before issue 20) arm ``erf``;
   * with ``--hot-lr`` (off by default), a third at that LR with the guard at ``warn``
     (the linear rule's 0.8 x batch / 512 collapsed on chess: project README, "Cause (2), taken
     apart"): arm ``erf_hot_init``.
   Every export's filter norms against Detectron2's init, the guard's participation-ratio
   readings, and a per-stage diagnosis against random init are recorded.
2. Fine-tunes, all side by side on the device, the toy R-18 FPN detector (trainable BN, FREEZE_AT
   0; only MODEL.WEIGHTS differs between arms): ``scratch_bn`` (random init, started at once,
   while the pre-trainings run), then each pre-trained arm as soon as its pre-training ends:
   ``scratch_bn``, ``erf_bank_init`` and ``erf_init`` (and ``erf_hot_init``) for every
   ``--seeds`` at ``--ft-iters``; ``erf`` for the first seed; and scratch_bn / erf_bank_init
   for the first seed at ``--ft-short`` too (0 = none): 9 runs with the defaults. Every run
   traces its first 100 iterations (finetune_net.py --trace-iters: per-stage relative updates).
   A pre-training that fails (the guard stopped it) drops its arms; the others still run.
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
ARMS = ("scratch_bn", "erf_bank_init", "erf_init", "erf_hot_init", "erf")
SHORT_ARMS = ("scratch_bn", "erf_bank_init")  # the default path and its twin, at --ft-short
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
    p.add_argument("--default-workers", type=int, default=4,
                   help="loader workers of the default-path pre-training (16 montages a step; "
                        "it shares the CPU with the other pre-training and scratch_bn's runs)")
    p.add_argument("--ft-iters", type=int, default=500)
    p.add_argument("--ft-short", type=int, default=100)
    p.add_argument("--ft-batch", type=int, default=16)
    p.add_argument("--ft-workers", type=int, default=1)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--trace-iters", type=int, default=100)
    p.add_argument("--pre-lr", type=float, default=PRE_LR,
                   help="LR of the default pre-training (arms erf_init, erf), whatever the batch")
    p.add_argument("--hot-lr", type=float, default=0.0,
                   help="LR of a third pre-training, guard at warn (arm erf_hot_init); "
                        "-1: the linear rule's 0.8 x batch / 512; 0: none")
    p.add_argument("--default-opts", default="",
                   help="config opts added to the default-path pre-training (the dry run's "
                        "tiny sizes), e.g. 'MONTAGE.BANK_PASSES 1 SOLVER.IMS_PER_BATCH 4'")
    p.add_argument("ft_opts", nargs=argparse.REMAINDER, help="extra fine-tuning opts (sizes)")
    return p.parse_args(argv)


def save(path, rec):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, path)


def run_pretraining(a, name, lr=None, extra=()):
    """One R-18 pre-training into ``work/<name>``: at ``lr`` with the GPU check's recipe
    (``--pre-iters`` x ``--pre-batch`` montages x ``--pre-size`` px), or with ``lr`` None the
    default path (the config as shipped, sized to the bank); ``extra``: more config opts.
    -> (its record, its folder)."""
    d = os.path.join(a.work, name)
    workers = a.pre_workers if lr is not None else a.default_workers
    cmd = [sys.executable, "projects/MontagePretrain/train_net.py", "--config-file", PRE_CONFIG,
           "MONTAGE.BANK", a.bank, "OUTPUT_DIR", d, "MODEL.DEVICE", a.device, "SEED", "0",
           "DATALOADER.NUM_WORKERS", str(workers)]
    if lr is not None:
        cmd += ["SOLVER.IMS_PER_BATCH", str(a.pre_batch), "SOLVER.BASE_LR", str(lr),
                "SOLVER.MAX_ITER", str(a.pre_iters),
                "SOLVER.WARMUP_ITERS", str(max(1, a.pre_iters // 10)),
                "SOLVER.CHECKPOINT_PERIOD", "1000000", "SOLVER.AMP.ENABLED", a.amp,
                "MONTAGE.INPUT_SIZE", str(a.pre_size), "MONTAGE.CHANNELS_LAST", a.amp,
                "MONTAGE.ERF_PERIOD", str(max(1, a.pre_iters // 2)),
                "TEST.PRECISE_BN.NUM_ITER", "5"]
    cmd += list(extra)
    t0 = time.time()
    with open(os.path.join(a.work, f"{name}.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    rec = dict(config=PRE_CONFIG, default_path=lr is None, opts=cmd[cmd.index("SEED"):], rc=rc,
               wall_s=round(time.time() - t0, 1))
    config = os.path.join(d, "config.yaml")  # the run's resolved config: what it ran
    if os.path.isfile(config):
        import yaml

        with open(config) as f:
            c = yaml.safe_load(f)
        rec.update(iterations=c["SOLVER"]["MAX_ITER"], montages=c["SOLVER"]["IMS_PER_BATCH"],
                   size=c["MONTAGE"]["INPUT_SIZE"], lr=c["SOLVER"]["BASE_LR"],
                   warmup=c["SOLVER"]["WARMUP_ITERS"], warmup_factor=c["SOLVER"]["WARMUP_FACTOR"],
                   bank_passes=c["MONTAGE"]["BANK_PASSES"])
    losses = loss_rows(d)
    if losses:
        rec["loss_trace"] = [[it, round(v, 4)] for it, v in losses[:: max(1, len(losses) // 50)]]
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


PRETRAININGS = ("pretrain_default", "pretrain", "pretrain_hot")


def pretrain_default(a, rec):
    """The default path (make pretrain as shipped). -> {arm: weight file}, {} if it failed."""
    rec["pretrain_default"], d = run_pretraining(a, "pretrain_default", None,
                                                 a.default_opts.split())
    if rec["pretrain_default"]["rc"]:
        return {}
    w = os.path.join(d, "montage_backbone.pkl")
    rec["pretrain_default"]["norm_ratio_default_export"] = norm_ratios(w)
    return {"erf_bank_init": w}


def pretrain_short(a, rec):
    """The GPU check's earlier recipe: its default export and the same one as trained."""
    rec["pretrain"], d = run_pretraining(a, "pretrain", a.pre_lr)
    if rec["pretrain"]["rc"]:
        return {}
    default = os.path.join(d, "montage_backbone.pkl")
    trained = export_as_trained(d, os.path.join(a.work, "montage_backbone_trained.pkl"))
    rec["pretrain"]["norm_ratio_as_trained"] = norm_ratios(trained)
    rec["pretrain"]["norm_ratio_default_export"] = norm_ratios(default)
    return {"erf_init": default, "erf": trained}


def pretrain_hot(a, rec):
    """At --hot-lr with the guard at warn (exports whatever it becomes)."""
    hot_lr = 0.8 * a.pre_batch / 512 if a.hot_lr < 0 else a.hot_lr
    rec["pretrain_hot"], d = run_pretraining(a, "pretrain_hot", hot_lr,
                                             ["MONTAGE.COLLAPSE.ACTION", "warn"])
    if rec["pretrain_hot"]["rc"]:
        return {}
    # its filters as trained, before the init rescale
    rec["pretrain_hot"]["norm_ratio_as_trained"] = norm_ratios(export_as_trained(
        d, os.path.join(a.work, "montage_backbone_hot_trained.pkl")))
    return {"erf_hot_init": os.path.join(d, "montage_backbone.pkl")}


def diagnose(a, exports, rec):
    """Per stage, the exports against random init on 8 training images (CPU, seconds): filter
    norms, effective step, BN statistics fit, activation RMS, feature rank, dead units."""
    diag = os.path.join(a.work, "diagnosis.json")
    cmd = [sys.executable, "scripts/diagnose_handoff.py", "--images", a.train_images]
    for w in exports:
        cmd += ["--weights", w]
    if exports:
        subprocess.run(cmd + ["--json", diag], cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    if os.path.isfile(diag):
        with open(diag) as f:
            rec["diagnosis"] = json.load(f)["results"]


def jobs(a, arms=ARMS):
    """(arm, seed, iterations): every arm of ``arms`` but ``erf`` for every seed at
    ``--ft-iters``, ``erf`` (the export as trained, the hand-off before issue 20) for the first
    seed, and SHORT_ARMS (scratch_bn, the default path) for the first seed at ``--ft-short``
    (0: none)."""
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    out = [(arm, s, a.ft_iters) for s in seeds for arm in arms if arm != "erf"]
    if "erf" in arms:
        out.append(("erf", seeds[0], a.ft_iters))
    if a.ft_short:
        out += [(arm, seeds[0], a.ft_short) for arm in SHORT_ARMS if arm in arms]
    return out


def launch(a, arm, seed, iters, weights):
    """Starts one fine-tuning from ``weights`` ("" = random init). -> (job, log, Popen)."""
    d = os.path.join(a.work, f"ft_{arm}_s{seed}_{iters}")
    cmd = [sys.executable, "projects/MontagePretrain/finetune_net.py",
           "--trace-iters", str(a.trace_iters), "--config-file", FT_CONFIG,
           "--train-json", a.train_json, "--train-images", a.train_images,
           "--val-json", a.val_json, "--val-images", a.val_images,
           "MODEL.WEIGHTS", weights, "OUTPUT_DIR", d, "SEED", str(seed),
           "MODEL.DEVICE", a.device, "SOLVER.MAX_ITER", str(iters),
           "SOLVER.STEPS", f"({iters * 4 // 5},)", "SOLVER.WARMUP_ITERS", str(iters // 10 + 1),
           "SOLVER.IMS_PER_BATCH", str(a.ft_batch), "SOLVER.BASE_LR", str(a.ft_lr),
           "DATALOADER.NUM_WORKERS", str(a.ft_workers)] + a.ft_opts
    os.makedirs(d, exist_ok=True)
    log = open(os.path.join(d, "stdout.log"), "w")
    return ((arm, seed, iters, d), log,
            subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))


def run_all(a, rec):
    """scratch_bn's fine-tunings at once; the pre-trainings side by side; each pre-trained
    arm's fine-tunings as soon as its pre-training ends; then waits for every run by its pid.
    -> {arm: weight file} of the arms that ran."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    t0 = time.time()
    weights = {"scratch_bn": ""}
    procs = [launch(a, *job, "") for job in jobs(a, ("scratch_bn",))]
    steps = [pretrain_default, pretrain_short] + ([pretrain_hot] if a.hot_lr else [])
    with ThreadPoolExecutor(len(steps)) as pool:
        for done in as_completed([pool.submit(step, a, rec) for step in steps]):
            made = done.result()
            weights.update(made)
            procs += [launch(a, *job, made[job[0]]) for job in jobs(a, tuple(made))]
    save(a.out, rec)
    diagnose(a, [w for arm, w in weights.items() if w], rec)
    runs = []
    for (arm, seed, iters, d), log, proc in procs:  # every pid waited for by name
        rc = proc.wait()
        log.close()
        runs.append(summarize_run(arm, seed, iters, d, rc))
    rec["finetune"] = dict(config=FT_CONFIG, ims_per_batch=a.ft_batch, base_lr=a.ft_lr,
                           side_by_side=len(procs), wall_s_all=round(time.time() - t0, 1))
    rec["runs"] = runs
    rec["paired"] = paired(runs)
    return weights


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
    weights = run_all(a, rec)
    rec["arms"] = list(weights)
    rec["jobs"] = [list(r[:3]) for r in sorted((r["arm"], r["seed"], r["iters"])
                                                for r in rec["runs"])]
    save(a.out, rec)
    for name in PRETRAININGS:
        if name in rec and rec[name]["rc"]:
            print(f"{name} failed: see", os.path.join(a.work, f"{name}.log"),
                  rec[name].get("collapse_message") or "")
    for r in rec["runs"]:
        print(r["arm"], "seed", r["seed"], r["iters"], "it: AP",
              (r.get("bbox") or {}).get("AP"), "rc", r["rc"])
    for p in rec["paired"]:
        print(f"{p['arm']} - scratch_bn, seed {p['seed']}, {p['iters']} it: {p['delta_AP']:+.2f}")
    pre_ok = all(rec[n]["rc"] == 0 for n in PRETRAININGS if n in rec)
    return 0 if pre_ok and all(r["rc"] == 0 for r in rec["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

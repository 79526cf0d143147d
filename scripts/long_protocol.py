#!/usr/bin/env python
"""
Does Montage pre-training still pay when the detector is fine-tuned to convergence? The long
protocol of ``make compare PROTOCOL=long``: AP against fine-tuning length, one curve per arm.

    python scripts/long_protocol.py --dataset chess --out output/chess_long --lanes 2
    python scripts/long_protocol.py --dataset chess --out output/chess_long --eval-split test
    python scripts/long_protocol.py --train-json ... --train-images ... --val-json ... \\
        --val-images ... --name mine --out output/mine_long

Every run is a step of ``scripts/compare.py`` (same records, sids, resumption, pinned runtime and
detector), at several fine-tuning lengths:

* ``--lengths auto`` (default): 200 iterations, doubled while under ``--epochs`` (30) epochs of
  the training split, then exactly ``--epochs`` epochs (chess, 202 images at 4 a batch:
  200, 400, 800, 1515);
* every arm and ``--sweep-seeds`` (0) at every length; ``--seeds`` (0,1,2) at the longest;
* ``--lanes N`` runs N worker processes that share one job queue: a job is claimed with an
  ``flock`` held while it runs, so a crashed or killed lane frees its jobs; fine-tunings save
  a checkpoint every ``--checkpoint-period`` iterations and resume from it after an interruption
  (another session can finish what one started);
* the report (``long_<name>_<split>.md`` and ``.png``): AP against length per arm (mean, min,
  max over seeds), the paired difference to ``scratch_bn`` (the same detector from random init)
  per length, the same against total CPU time (pre-training + fine-tuning: the paper's Table 3
  view), and a verdict per pre-trained arm at the longest length: pays / does not pay /
  undecided (the paired differences' signs);
* ``--table3 ARM``: the paper's Table 3 at equal total compute, ``scratch_bn_long`` (random init,
  ``scratch_bn``'s detector) fine-tuned for ARM's total CPU time (pre-training + fine-tuning at
  the longest length, same seed; iterations at ARM's CPU-s per fine-tuning iteration) for every
  seed of the longest length, once ARM's run of that seed is done; the report adds ARM −
  scratch_bn_long per seed.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402

# The arms of the long protocol (issue 20): the two scratch detectors, the two recorded
# hand-offs of the trained export, the export at init scale into the same two detectors, and
# the default path (C.DEFAULT_ARM: make pretrain + make finetune as shipped).
LONG_ARMS = ("scratch_bn", "scratch", "erf", "erf_frozenbn", "erf_init", "erf_frozenbn_init",
             C.DEFAULT_ARM)
REF = "scratch_bn"
GN_REF = "scratch"  # the GN detector from random init: the other from-scratch baseline
LONG_REF = "scratch_bn_long"  # --table3: REF's detector for a Montage arm's total CPU time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/compare_long")
    d = p.add_argument_group("data: a preset, or a COCO-format dataset by path")
    d.add_argument("--dataset", default=None, help=f"one of {','.join(C.PRESETS)} (default toy)")
    d.add_argument("--eval-split", default="valid")
    for flag in ("train-json", "train-images", "val-json", "val-images"):
        d.add_argument(f"--{flag}", default="")
    d.add_argument("--name", default="")
    r = p.add_argument_group("what runs")
    r.add_argument("--arms", default=",".join(LONG_ARMS))
    r.add_argument("--seeds", default="0,1,2", help="seeds at the longest length")
    r.add_argument("--sweep-seeds", default="0", help="seeds at every length")
    r.add_argument("--lengths", default="auto",
                   help="comma list of fine-tuning iterations, or auto (see the docstring)")
    r.add_argument("--table3", default="", metavar="ARM",
                   help=f"add {LONG_REF} at the longest length: random init fine-tuned for "
                        "ARM's total CPU time (pre-training + fine-tuning), same seed")
    r.add_argument("--longest-first", action="store_true",
                   help="run the longest length first (the decisive one), then the shorter")
    r.add_argument("--epochs", type=float, default=30.0, help="auto: epochs of the longest")
    r.add_argument("--first", type=int, default=200, help="auto: the shortest length")
    r.add_argument("--ft-min-size", type=int, default=None)
    r.add_argument("--pretrain-iters", type=int, default=None)
    r.add_argument("--clip-grad", type=float, default=5.0)
    r.add_argument("--checkpoint-period", type=int, default=200,
                   help="fine-tuning checkpoint period (resumption), iterations")
    r.add_argument("--trace-iters", type=int, default=100,
                   help="finetune_net.py --trace-iters of every fine-tuning (0 = off)")
    r.add_argument("--lanes", type=int, default=1, help="worker processes sharing the queue")
    r.add_argument("--lane-id", type=int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--report-only", action="store_true", help="run nothing, write the report")
    r.add_argument("--trained-only", action="store_true",
                   help="evaluate finished runs only, train nothing (always so for --eval-split "
                   "test: decide on valid, report on test)")
    r.add_argument("--quick", type=int, default=0, choices=(0, 1))
    e = p.add_argument_group("pinned runtime")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--workers", type=int, default=1, choices=(0, 1))
    e.add_argument("--bank-workers", type=int, default=1)
    return p.parse_args(argv)


def compare_argv(args):
    """The scripts/compare.py arguments of the same data, sizes and runtime."""
    argv = ["--out", args.out, "--quick", str(args.quick), "--eval-split", args.eval_split,
            "--clip-grad", str(args.clip_grad), "--threads", str(args.threads),
            "--workers", str(args.workers), "--bank-workers", str(args.bank_workers),
            "--arms", args.arms, "--seeds", args.seeds, "--no-probes"]
    if args.trained_only or args.eval_split == "test":
        argv += ["--trained-only"]
    if args.train_json:
        argv += ["--train-json", args.train_json, "--train-images", args.train_images,
                 "--val-json", args.val_json, "--val-images", args.val_images]
        if args.name:
            argv += ["--name", args.name]
    else:
        argv += ["--dataset", args.dataset or "toy"]
    for flag in ("ft_min_size", "pretrain_iters"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv


def train_images_used(train_json):
    """Images Detectron2 trains on: those with at least one box (FILTER_EMPTY_ANNOTATIONS)."""
    with open(train_json) as f:
        d = json.load(f)
    return len({a["image_id"] for a in d["annotations"]})


def auto_lengths(num_images, ims_per_batch, epochs=30.0, first=200):
    """``first``, doubled while under ``epochs`` epochs, then ``epochs`` epochs (iterations)."""
    longest = math.ceil(epochs * num_images / ims_per_batch)
    lengths = [first]
    while lengths[-1] * 2 < longest:
        lengths.append(lengths[-1] * 2)
    if longest > lengths[-1]:
        lengths.append(longest)
    return lengths


def jobs(lengths, seeds, sweep_seeds, arms, longest_first=False):
    """(length, seed, arm) in run order: the sweep seeds length by length (every arm at a length
    before the next), then the other seeds at the longest length; ``longest_first``: the
    longest length of every seed first, then the sweep seeds' shorter lengths, longest first."""
    if longest_first:
        out = [(lengths[-1], s, a) for s in sorted(set(sweep_seeds) | set(seeds)) for a in arms]
        return out + [(n, s, a) for n in reversed(lengths[:-1]) for s in sweep_seeds
                      for a in arms]
    out = [(n, s, a) for s in sweep_seeds for n in lengths for a in arms]
    out += [(lengths[-1], s, a) for s in seeds if s not in sweep_seeds for a in arms]
    return out


@contextlib.contextmanager
def claim(out, job):
    """Non-blocking exclusive flock on the job's lock file: yields True when this process holds
    it (released when the process ends, however it ends), False when another lane does."""
    folder = os.path.join(out, "locks")
    os.makedirs(folder, exist_ok=True)
    n, s, a = job
    fd = os.open(os.path.join(folder, f"{a}-seed{s}-{n}it.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Protocol:
    """The plans (one per length) and the shared results of one dataset's long protocol."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.cargs = C.parse_args(compare_argv(dict_args(args, out=self.out)))
        base = C.make_plans(self.cargs, self.out)
        if not base:
            raise SystemExit("no dataset to run (a preset's data folder is missing)")
        self.base = base[0]
        self.arms = C.parse_list(args.arms)
        for arm in self.arms:
            if arm not in C.ARMS:
                raise SystemExit(f"unknown arm {arm}; arms: {', '.join(C.ARMS)}")
        if REF not in self.arms:
            raise SystemExit(f"--arms must include {REF}: every difference is paired to it")
        self.table3 = args.table3
        if self.table3 and (self.table3 not in self.arms or not C.pretrain_arm(self.table3)):
            raise SystemExit(f"--table3 {self.table3}: name a pre-trained arm of --arms")
        self.seeds = C.parse_list(args.seeds, int)
        self.sweep_seeds = C.parse_list(args.sweep_seeds, int)
        self.num_images = train_images_used(self.base["train_json"])
        self.batch = C.config_batch(C.FINETUNE_CONFIG)
        if args.lengths == "auto" and args.quick:  # smoke size
            self.lengths = [12, 24]
        elif args.lengths == "auto":
            self.lengths = auto_lengths(self.num_images, self.batch, args.epochs, args.first)
        else:
            self.lengths = sorted(C.parse_list(args.lengths, int))
        self.results_path = os.path.join(self.out, "results.json")
        self.results = self._read()

    def _read(self):
        if os.path.isfile(self.results_path):
            with open(self.results_path) as f:
                return json.load(f)
        return {}

    def save(self, key=None, rec=None):
        written = {key: rec} if key else {}
        self.results.update(C.merge_save(self.results_path, written))

    def plan(self, length):
        return dict(self.base, finetune_iters=length, arms=list(self.arms),
                    checkpoint_period=self.args.checkpoint_period,
                    trace_iters=self.args.trace_iters, table3=self.table3 or None)

    def report_arms(self):
        return list(self.arms) + ([LONG_REF] if self.table3 else [])

    def comparison(self, length):
        return C.Comparison(self.plan(length), self.out, self.results, self.save)

    def epochs(self, length):
        return length * self.batch / self.num_images

    def queue(self):
        out = jobs(self.lengths, self.seeds, self.sweep_seeds, self.arms, self.args.longest_first)
        if self.table3:  # after everything else: each waits for its seed's Montage run
            out += [(self.lengths[-1], s, LONG_REF)
                    for s in sorted(set(self.seeds) | set(self.sweep_seeds))]
        return out

    def matched_record(self, job):
        """--table3: the finished, not diverged fine-tuning of the Montage arm whose total CPU
        time ``job`` (a LONG_REF job) matches; None while there is none."""
        n, s, _ = job
        cmp = self.comparison(n)
        rec = cmp.done(self.table3, s, "finetune", C.step_sid(cmp.p, self.table3, "finetune"))
        if rec and cmp.val_key in rec.get("metrics", {}) and not rec.get("diverged"):
            return rec
        return None

    def is_done(self, job):
        n, s, a = job
        cmp = self.comparison(n)
        rec = cmp.done(a, s, "finetune", C.step_sid(cmp.p, a, "finetune"))
        return bool(rec and cmp.val_key in rec.get("metrics", {}))

    def run_job(self, job):
        n, s, a = job
        cmp = self.comparison(n)
        if a == LONG_REF:
            return cmp.finetune_matched(a, s, self.matched_record(job))
        pre, weights = None, ""
        if C.pretrain_arm(a):
            # One pre-training per arm and seed, shared by every length: the first lane to get
            # there runs it, the others wait for its record (other pre-trainings go on).
            lock = os.path.join(self.out, "locks", "pretrain", f"{C.pretrain_arm(a)}-seed{s}")
            with C._dir_lock(lock):
                self.results.update(self._read())
                pre = cmp.pretrain(a, s)
            weights = cmp.export_for(a, pre)
        return cmp.finetune(a, s, "finetune", weights, pre)

    def work(self, lane=0):
        """Runs queued jobs until none is left undone and unclaimed."""
        while True:
            self.results.update(self._read())
            ran = False
            for job in self.queue():
                if self.is_done(job):
                    continue
                if job[2] == LONG_REF and not self.matched_record(job):
                    continue  # its Montage run is not done yet (or diverged)
                with claim(self.out, job) as mine:
                    if not mine:
                        continue
                    self.results.update(self._read())
                    if self.is_done(job):
                        continue
                    n, s, a = job
                    what = (f"{self.table3}'s total CPU at {n} it" if a == LONG_REF else
                            f"{n} it ({self.epochs(n):.1f} epochs)")
                    print(f"[lane {lane}] {a} seed {s}: {what}", flush=True)
                    try:
                        self.run_job(job)
                    except C.NotTrained as e:  # --trained-only: skipped, the queue goes on
                        print(f"[lane {lane}] not trained, skipped: {e}", flush=True)
                        continue
                    ran = True
                    break  # re-read the queue: another lane may have finished jobs meanwhile
            if not ran:
                return


def dict_args(args, **changes):
    ns = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(ns, k, v)
    return ns


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def collect(proto):
    """{arm: {length: {seed: row}}} of finished fine-tunings on the eval split."""
    values = {}
    for n in proto.lengths:
        cmp = proto.comparison(n)
        for a in proto.report_arms():
            sid = C.step_sid(cmp.p, a, "finetune")
            for s in sorted(set(proto.seeds) | set(proto.sweep_seeds)):
                rec = cmp.done(a, s, "finetune", sid)
                m = (rec or {}).get("metrics", {}).get(cmp.val_key)
                if m is None:
                    continue
                # A resumed fine-tuning measured only its resumed part: scaled to all of it.
                ft_cpu, estimated = C.whole_run_cpu_s(rec)
                values.setdefault(a, {}).setdefault(n, {})[s] = dict(
                    AP=m["AP"], AP50=m["AP50"], diverged=bool(m.get("diverged")),
                    iters=rec.get("iters", n),
                    cpu=ft_cpu + rec.get("pretrain_cpu_s", 0.0),
                    pretrain_cpu=rec.get("pretrain_cpu_s", 0.0), cpu_estimated=estimated)
    return values


def paired_at(values, arm, n, ref=REF):
    a, r = values.get(arm, {}).get(n, {}), values.get(ref, {}).get(n, {})
    d = {s: a[s]["AP"] - r[s]["AP"] for s in sorted(set(a) & set(r))}
    if not d:
        return None
    v = list(d.values())
    return dict(n=len(v), mean=statistics.mean(v), min=min(v), max=max(v), per_seed=d)


def verdict(p):
    """Whether pre-training pays at a length, from the paired differences' signs."""
    if p is None:
        return "not run yet"
    if p["min"] >= 0 and p["mean"] > 0:
        return "pays" if p["n"] > 1 else "pays (1 seed)"
    if p["max"] < 0:
        return "does not pay" if p["n"] > 1 else "does not pay (1 seed)"
    return "undecided (seeds disagree)"


def recipes_note(arms):
    """The title's note on arms whose pre-training has a recipe of its own (SCHEDULE_ARMS)."""
    own = []
    for a in arms:
        r = C.SCHEDULE_RECIPES.get(a)
        if r:
            own.append(f"{a} {r['passes']} passes over the bank" if "passes" in r else
                       f"{a} {r['iters']} it" + (f" x {r['montages']} montages at {r['input_size']}"
                                                 f" px, LR {r['lr']}" if "montages" in r else ""))
    return f" ({'; '.join(own)})" if own else ""


def verdict_label(arm):
    """The verdict table's name of an arm: the default path (C.DEFAULT_ARM) says so, since its
    verdict is the one that tells a user whether pre-training pays on their data."""
    return f"{arm} (default path)" if arm == C.DEFAULT_ARM else arm


def export_health(pre_records):
    """The feature-collapse guard's word on a pre-trained arm's exports (its pre-training
    records over seeds): "collapsed (k of n seeds)", "healthy (n seeds)", or "not measured"
    (runs from before the guard: ``scripts/collapse_check.py`` measures them)."""
    health = [(r or {}).get("feature_health") for r in pre_records]
    measured = [h for h in health if h]
    collapsed = sum(bool(h.get("collapsed")) for h in measured)
    if collapsed:
        return f"collapsed ({collapsed} of {len(health)} seeds)"
    if measured and len(measured) == len(health):
        return f"healthy ({len(health)} seeds)"
    return "not measured"


def pretrain_records(proto, arm, n):
    """The pre-training records behind ``arm``'s fine-tunings at length ``n`` (one per seed that
    has one)."""
    cmp = proto.comparison(n)
    pre = C.pretrain_arm(arm)
    sid = C.step_sid(cmp.p, pre, "pretrain")
    seeds = sorted(set(proto.seeds) | set(proto.sweep_seeds))
    return [r for r in (cmp.done(pre, s, "pretrain", sid) for s in seeds) if r]


def report(proto):
    from tabulate import tabulate

    values = collect(proto)
    arms = [a for a in proto.report_arms() if a in values]
    name, split = proto.base["name"], proto.base["split"]
    head = ["arm"] + [f"{n} it ({proto.epochs(n):.0f} ep)" for n in proto.lengths]
    ap_rows, d_rows = [], []
    for a in arms:
        row, drow = [a], [a]
        for n in proto.lengths:
            runs = values[a].get(n, {})
            aps = [r["AP"] for r in runs.values()]
            div = sum(r["diverged"] for r in runs.values())
            row.append(C._fmt(aps) + (f" (n={len(aps)})" if len(aps) > 1 else "")
                       + (f" ({div} diverged)" if div else "") if aps else "-")
            drow.append("—" if a == REF else C._fmt_paired(paired_at(values, a, n)))
        ap_rows.append(row)
        d_rows.append(drow)
    longest = proto.lengths[-1]
    verdicts = [[verdict_label(a), verdict(paired_at(values, a, longest)),
                 export_health(pretrain_records(proto, a, longest))] for a in arms
                if C.pretrain_arm(a)]
    cost_rows = []
    for a in arms:
        for n in proto.lengths:
            runs = [r for r in values[a].get(n, {}).values() if not r["diverged"]]
            if runs:
                mark = "≈" if any(r["cpu_estimated"] for r in runs) else ""
                cost_rows.append([a, n, f"{mark}{statistics.mean(r['cpu'] for r in runs):.0f}",
                                  f"{statistics.mean(r['pretrain_cpu'] for r in runs):.0f}",
                                  C._fmt([r["AP"] for r in runs])])
    title = (f"{name} (eval on {split}): Faster R-CNN R-18 FPN fine-tuned for each length "
             f"({proto.batch} images a batch, {proto.num_images} training images; clip "
             f"{proto.args.clip_grad}); pre-training {proto.base['pretrain_iters']} it at "
             f"{proto.base['input_size']} px{recipes_note(arms)}; seeds "
             f"{proto.args.sweep_seeds} at every length, "
             f"{proto.args.seeds} at the longest")
    text = [title, "", "AP (mean ± std over seeds)", "",
            tabulate(ap_rows, headers=head, tablefmt="github", disable_numparse=True), "",
            f"Δ AP vs {REF} (same detector from random init, same seed): mean [min, max]", "",
            tabulate(d_rows, headers=head, tablefmt="github", disable_numparse=True), "",
            f"verdict at the longest length ({longest} it, {proto.epochs(longest):.0f} epochs)",
            "", tabulate(verdicts, headers=["arm", "pre-training", "export (collapse guard)"],
                         tablefmt="github"), "",
            "Table 3 view: total CPU-s (pre-training + fine-tuning) against AP", "",
            tabulate(cost_rows, headers=["arm", "fine-tune it", "total CPU-s",
                                         "pre-train CPU-s", "AP"], tablefmt="github",
                     disable_numparse=True), ""]
    text += against_gn_lines(values, proto.lengths, proto.epochs)
    if proto.table3:
        text += table3_lines(proto, values, longest)
    if any("≈" in row[2] for row in cost_rows):
        text += ["≈: a resumed fine-tuning; its CPU-s measured over the resumed part, scaled to "
                 "all its iterations.", ""]
    print("\n".join(text))
    stem = os.path.join(proto.out, f"long_{name}_{split}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(text))
    chart(proto, values, arms, stem + ".png")
    return values


def against_gn_lines(values, lengths, epochs):
    """The report's section on the default path (C.DEFAULT_ARM, a BN detector) against GN_REF
    (a GN detector from random init, the usual from-scratch recipe), paired by seed at each
    length both ran; [] while they share none."""
    rows = []
    for n in lengths:
        p = paired_at(values, C.DEFAULT_ARM, n, ref=GN_REF)
        if p:
            rows.append([f"{n} it ({epochs(n):.0f} ep)", C._fmt_paired(p),
                         ", ".join(f"{s}: {d:+.2f}" for s, d in p["per_seed"].items()),
                         verdict(p)])
    if not rows:
        return []
    from tabulate import tabulate

    return [f"{C.DEFAULT_ARM} (default path) − {GN_REF} (GN detector from random init), same seed",
            "", tabulate(rows, headers=["length", "Δ AP mean [min, max]", "per seed", "verdict"],
                         tablefmt="github", disable_numparse=True), ""]


def table3_lines(proto, values, longest):
    """The report's Table 3 section: the Montage arm against LONG_REF at equal total CPU time."""
    runs = values.get(LONG_REF, {}).get(longest, {})
    head = (f"Table 3 at equal total CPU time: {proto.table3} (pre-training + {longest} it) − "
            f"{LONG_REF} (random init, the same detector, fine-tuned for that CPU time), "
            "same seed")
    if not runs:
        return [head, "", "not run yet", ""]
    its = ", ".join(f"seed {s}: {r['iters']} it ({proto.epochs(r['iters']):.0f} epochs)"
                    for s, r in sorted(runs.items()))
    p = paired_at(values, proto.table3, longest, ref=LONG_REF)
    if not p:
        return [head, "", f"{LONG_REF}: {its}", "", "Δ AP: n/a (no seed with both)", ""]
    per_seed = ", ".join(f"seed {s} {d:+.2f}" for s, d in p["per_seed"].items())
    return [head, "", f"{LONG_REF}: {its}", "",
            f"Δ AP: {C._fmt_paired(p)} ({per_seed}); {verdict(p)}", ""]


def chart(proto, values, arms, path):
    """AP against fine-tuning epochs and against total CPU-s, one curve per arm."""
    if not arms:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    for i, a in enumerate(arms):
        xs, ys, lo, hi, cx = [], [], [], [], []
        for n in proto.lengths:
            runs = values[a].get(n, {})
            if not runs:
                continue
            aps = [r["AP"] for r in runs.values()]
            xs.append(statistics.mean(proto.epochs(r["iters"]) for r in runs.values()))
            ys.append(statistics.mean(aps))
            lo.append(ys[-1] - min(aps))
            hi.append(max(aps) - ys[-1])
            cx.append(statistics.mean(r["cpu"] for r in runs.values()))
        style = "--" if C.pretrain_arm(a) is None else "-"
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o" + style, color=f"C{i}", capsize=3, label=a)
        ax_c.plot(cx, ys, "o" + style, color=f"C{i}", label=a)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for a_ in (ax, ax_c):
        a_.set_xscale("log")
        a_.xaxis.set_major_formatter(ScalarFormatter())
        a_.xaxis.set_minor_formatter(NullFormatter())  # a narrow range: no crowded minor labels
        a_.set_ylabel(f"box AP ({proto.base['split']})")
        a_.grid(alpha=0.3)
    ax.set_xlabel("fine-tuning epochs (log)")
    ax_c.set_xlabel("total CPU-s: pre-training + fine-tuning (log)")
    ax.set_title(f"{proto.base['name']}: AP against fine-tuning length")
    ax_c.set_title("Table 3 view: AP against total compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    proto = Protocol(args)
    print(f"{proto.base['name']}: lengths {proto.lengths} iterations "
          f"({', '.join(f'{proto.epochs(n):.1f}' for n in proto.lengths)} epochs), arms "
          f"{', '.join(proto.arms)}, {len(proto.queue())} fine-tunings", flush=True)
    if not args.report_only:
        if args.lanes > 1:
            # N copies of this command, each a lane of the same queue.
            argv = [a for a in (argv if argv is not None else sys.argv[1:])]
            cmd = [sys.executable, os.path.abspath(__file__)] + _without_lanes(argv)
            procs = [subprocess.Popen(cmd + ["--lanes", "1", "--lane-id", str(i)])
                     for i in range(args.lanes)]
            codes = [p.wait() for p in procs]
            if any(codes):
                raise SystemExit(f"a lane failed (exit codes {codes}); rerun to continue")
        else:
            proto.work(args.lane_id or 0)
            if args.lane_id is not None:
                return 0  # a lane: the parent writes the report
    proto.results.update(proto._read())
    report(proto)
    return 0


def _without_lanes(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--lanes", "--lane-id"):
            skip = True
            continue
        if a.startswith(("--lanes=", "--lane-id=")):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())

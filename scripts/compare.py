#!/usr/bin/env python
"""
Will Montage pre-training help on this dataset? The paper's comparison on any COCO-format
dataset, at a size a CPU machine can run (``make compare``).

At equal pre-training compute (same iterations x montages x canvas: the same backbone passes
over the same number of pixels), the same detector is fine-tuned with the same schedule from

1. random init (``scratch``, GN as in "Rethinking ImageNet Pre-training"),
2. no-montage crop classification (``single``, the paper's "w/o Montage"),
3. Montage + global label (``global``), 4. Montage + block-wise (``blockwise``),
5. Montage + ERF-adaptive dense classification, tau = 0.7 (``erf``),

for every seed; on demand also the hand-off arms (``scratch_bn``, ``erf_gn``, ``erf_frozenbn``)
and ``erf_fpn``: backbone + pyramid pre-trained together (``MontageFPNClassifier``, ERF loss per
pyramid level), whose export also fills the detector's ``backbone.fpn_*``, fine-tuned with erf's
detector config (its paired baseline, like erf's, is ``scratch_bn``; the report adds the paired
difference erf_fpn − erf); ``erf_fpn_levels`` is erf_fpn with one classifier per pyramid level
(``MONTAGE.FPN.SHARED_HEAD False``; the report adds erf_fpn_levels − erf_fpn); ``erf_init`` /
``erf_frozenbn_init``: erf's export at init scale (the default export) into erf's two detectors;
``erf_hot_init`` / ``erf_hot_lowstart_init``: pre-training schedule ablations (the GPU check's
hot 512-montage recipe at 64 px, warm-up starting at 0.2 or 0.008), init-scale export into erf's
detector (``HOT_RECIPE``; about 40 CPU-minutes of pre-training each); ``erf_long_init``: erf's
recipe 8x longer (1,200 iterations, about 25 CPU-minutes), likewise; ``erf_bank_init``: erf's
recipe sized to the bank as the paper's (``PAPER_PASSES`` passes over it), likewise;
``erf_reinit_res5_init`` / ``erf_reinit_res45_init``: erf_init's export with res5 (res4 + res5)
back at random init. Per arm and seed
it measures full fine-tuning AP; the frozen-backbone kNN and linear probes of the export
(``scripts/probe.py``; random init for ``scratch``), once per pre-training; with ``--frozen``
the AP of the detector trained with the backbone frozen (``MODEL.BACKBONE.FREEZE_AT 5``: FPN and
heads train); with ``--table3`` a ``scratch_long`` arm
fine-tuned for the total CPU time (pre-training + fine-tuning) of a Montage arm on the same seed,
the paper's Table 3 view. Every metric is reported as mean ± std over seeds and as the paired
difference to ``scratch`` on the same seed (mean [min, max] and per seed).

Data: ``--train-json/--train-images/--val-json/--val-images`` (+ ``--name``), or a preset
``--dataset`` (``toy``: built-in, ``coco_tiny`` and ``chess``: from ../shared/data); a preset's
evaluation split is ``--eval-split`` (``valid``; ``test`` is for final tables: it evaluates the
already trained detectors, nothing is retrained).

Output under ``--out``: ``results.json``, ``table.md`` (the printed tables), ``compare_<name>.png``,
``banks/`` (one bank per training json) and ``<name>/<arm>/seed<N>/<step>-<sid>/`` per step (its
``stdout.log``, Detectron2's config.yaml / log.txt / metrics, the export or model_final.pth).
``results.json`` maps ``<name>/<arm>/seed<N>/<step>@<sid>`` (step: pretrain, probe, finetune,
frozen) to a record: ``settings`` (all that decides the result: training-json sha1, pinned runtime
- threads, loader workers, cuDNN flags -, configs, iterations, sizes, the pre-training's settings)
and ``sid``, its hash; ``command`` (with the thread variables), ``wall_s``, ``cpu_s``,
``environment`` (versions, git commit and dirty flag, host), ``config_sha1`` (the resolved config
without per-run keys), and ``metrics`` per evaluation split (key: val-json sha1[:10]; AP, AP50,
AP75, APs/m/l, or the probes' ``res4``/``res5`` top-1 %). Records with equal sid are
comparable; a step whose record is there is skipped, so an interrupted comparison continues where
it stopped, and processes with different ``--seeds`` can share ``--out`` (merged under a lock).

    python scripts/compare.py --out output/compare                        # toy, full size
    python scripts/compare.py --out output/compare_quick --quick 1        # smoke size
    python scripts/compare.py --dataset chess --seeds 0,1,2 --frozen --table3
"""
import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from montage_pretrain.export_format import default_export_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = "projects/MontagePretrain"
PRETRAIN_CONFIG = f"{PROJECT}/configs/demo/montage_R_18_toy.yaml"
FINETUNE_CONFIG = f"{PROJECT}/configs/finetune/demo/faster_rcnn_R_18_FPN_toy.yaml"
SCRATCH_CONFIG = f"{PROJECT}/configs/finetune/demo/faster_rcnn_R_18_FPN_toy_scratch.yaml"
PROBE_SCRIPT = "scripts/probe.py"
# train_net.py exports OUTPUT_DIR/MONTAGE.EXPORT_NAME; these pre-training runs keep the default.
EXPORT_NAME = default_export_name()
PRETRAIN_GN_CONFIG = f"{PROJECT}/configs/demo/montage_R_18_toy_gn.yaml"
# Backbone + pyramid pre-training: same schedule, canvas and montages as PRETRAIN_CONFIG, FPN shaped
# as FINETUNE_CONFIG's (128 channels, res2..res5, no norm) so every backbone.fpn_* key loads.
PRETRAIN_FPN_CONFIG = f"{PROJECT}/configs/demo/montage_R_18_FPN_toy.yaml"
FINETUNE_GN_CONFIG = f"{PROJECT}/configs/finetune/demo/faster_rcnn_R_18_FPN_toy_gn.yaml"
VARIANTS = ("scratch", "single", "global", "blockwise", "erf")
# The hand-off arms (norm of pre-training and detector): scratch with trainable BN (the twin of
# erf's BN detector), ERF pre-trained with GN into the GN detector (the twin of scratch), and
# erf's own export handed to FrozenBN with stem + res2 frozen (the paper's hand-off).
NORM_ARMS = ("scratch_bn", "erf_gn", "erf_frozenbn")
# Beyond the paper: the pyramid pre-trained too (issue: FPN pre-training).
# erf_fpn_levels: the same with one 1x1 classifier per level instead of one shared by all levels.
PYRAMID_ARMS = ("erf_fpn", "erf_fpn_levels")
# Pre-trainings here export as trained (MONTAGE.EXPORT_WEIGHT_SCALE trained), so the records of
# every other arm keep their meaning. These arms fine-tune what train_net.py now exports by
# default: erf's export with every BN-followed conv filter rescaled to its init norm, BN
# statistics with it (output-invariant: montage_pretrain/weight_scale.py), into erf's two
# detectors (issue 20).
SCALE_ARMS = ("erf_init", "erf_frozenbn_init")
# Pre-training schedule ablations (issue 20): the GPU check's hot recipe (512 montages, LR 0.8,
# 300 iterations, warm-up over 30 starting at the paper's 0.2 = WARMUP_FACTOR 0.25) on a 64 px
# canvas the CPU affords, and the same with the warm-up starting at 0.008 (WARMUP_FACTOR 0.01);
# each is pre-trained once and hands its init-scale export to erf's BN detector.
# erf_long_init: erf's own recipe (16 montages, LR 0.025, 128 px, warm-up 15, ERF period 50)
# run 8x longer, 1,200 iterations: its features grow richer with length (README, "Cause (2),
# taken apart"), where the hot recipe's collapse.
HOT_RECIPE = dict(montages=512, lr=0.8, iters=300, warmup=30, input_size=64, erf_period=100)
# erf_bank_init: erf's own recipe sized to the bank as the paper sized its own: 64k iterations x
# 512 montages x 4 crops over a COCO train2017 bank of at most 946k crops (860k boxes + 10 %
# negatives) is >= 139 passes; warm-up and ERF period keep the paper's shares of the schedule
# (1,250 and 5,000 of 64k). On chess's 2,319-crop bank: 5,037 iterations of 16 montages.
PAPER_PASSES = 139
PAPER_SHARES = dict(warmup=1250 / 64000, erf_period=5000 / 64000)
SCHEDULE_RECIPES = {"erf_hot_init": HOT_RECIPE,
                    "erf_hot_lowstart_init": dict(HOT_RECIPE, warmup_factor=0.01),
                    "erf_long_init": dict(iters=1200, warmup=15, erf_period=50),
                    "erf_bank_init": dict(passes=PAPER_PASSES)}
SCHEDULE_ARMS = tuple(SCHEDULE_RECIPES)
# What a user gets from make pretrain + make finetune as shipped (MONTAGE.BANK_PASSES 139 in
# Base-Montage.yaml, init-scale export, the toy R-18 FPN detector): the same recipe as this arm
# (tests/scripts/test_compare.py checks it), which the long protocol's verdict marks.
DEFAULT_ARM = "erf_bank_init"
# Hand-off ablations (issue 20), arm: (the arm whose pre-training it shares, the variant of that
# pre-training's init-scale export that scripts/diagnose_handoff.py --write-variant writes,
# seeded by the arm's seed): the late stages, BN included, back at the detector's random init
# (is a pre-trained late stage worse than a random one?).
HANDOFF_ARMS = {"erf_reinit_res5_init": ("erf", "reinit_res5"),
                "erf_reinit_res45_init": ("erf", "reinit_res4_res5")}
ARMS = VARIANTS + NORM_ARMS + PYRAMID_ARMS + SCALE_ARMS + SCHEDULE_ARMS + tuple(HANDOFF_ARMS)
ARM_ORDER = (("scratch", "scratch_long") + VARIANTS[1:] + PYRAMID_ARMS + NORM_ARMS + SCALE_ARMS
             + SCHEDULE_ARMS + tuple(HANDOFF_ARMS))
# Random init fine-tuned for a Montage arm's total CPU time (the paper's Table 3): scratch's
# detector (compare.py --table3), scratch_bn's (long_protocol.py --table3).
TABLE3_ARMS = ("scratch_long", "scratch_bn_long")
FROZENBN_OPTS = ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2"]


def arm_spec(arm):
    """
    What an arm runs: ``pretrain`` (config, MONTAGE.LOSS) or None, with ``pretrain_opts`` (extra
    config opts, optional); ``pretrain_of``: the arm
    whose pre-training (and probe) it shares; the fine-tuning ``config`` and extra ``opts``;
    whether it has its own ``probe`` and ``frozen`` runs; ``ref``: the scratch arm of the same
    detector norm, its paired baseline in the hand-off table.
    """
    if arm in ("scratch", "scratch_long"):
        return dict(pretrain=None, config=SCRATCH_CONFIG, opts=[], probe=True, frozen=True,
                    ref="scratch")
    if arm in ("scratch_bn", "scratch_bn_long"):  # random init, trainable BN, FREEZE_AT 0
        # (erf's detector); scratch_bn_long: the long protocol's Table 3 twin (TABLE3_ARMS)
        return dict(pretrain=None, config=FINETUNE_CONFIG, opts=[], probe=False, frozen=False,
                    ref="scratch_bn")
    if arm == "erf_gn":
        return dict(pretrain=(PRETRAIN_GN_CONFIG, "erf"), config=FINETUNE_GN_CONFIG, opts=[],
                    probe=True, frozen=True, ref="scratch")
    if arm == "erf_fpn":  # erf's detector, started from backbone + pyramid
        return dict(pretrain=(PRETRAIN_FPN_CONFIG, "erf"), config=FINETUNE_CONFIG, opts=[],
                    probe=True, frozen=True, ref="scratch_bn")
    if arm == "erf_fpn_levels":
        return dict(pretrain=(PRETRAIN_FPN_CONFIG, "erf"),
                    pretrain_opts=["MONTAGE.FPN.SHARED_HEAD", "False"],
                    config=FINETUNE_CONFIG, opts=[], probe=True, frozen=True, ref="scratch_bn")
    if arm == "erf_frozenbn":  # its frozen-backbone run would be erf's: FREEZE_AT 5 either way
        return dict(pretrain_of="erf", config=FINETUNE_CONFIG, opts=list(FROZENBN_OPTS),
                    probe=False, frozen=False, ref="scratch_bn")
    if arm in SCALE_ARMS:
        opts = list(FROZENBN_OPTS) if arm == "erf_frozenbn_init" else []
        return dict(pretrain_of="erf", config=FINETUNE_CONFIG, opts=opts, weight_scale="init",
                    probe=False, frozen=False, ref="scratch_bn")
    if arm in HANDOFF_ARMS:
        of, variant = HANDOFF_ARMS[arm]
        return dict(pretrain_of=of, config=FINETUNE_CONFIG, opts=[], weight_scale="init",
                    variant=variant, probe=False, frozen=False, ref="scratch_bn")
    if arm in SCHEDULE_ARMS:
        return dict(pretrain=(PRETRAIN_CONFIG, "erf"), pretrain_recipe=dict(SCHEDULE_RECIPES[arm]),
                    config=FINETUNE_CONFIG, opts=[], weight_scale="init", probe=False,
                    frozen=False, ref="scratch_bn")
    return dict(pretrain=(PRETRAIN_CONFIG, arm), config=FINETUNE_CONFIG, opts=[], probe=True,
                frozen=True, ref="scratch_bn" if arm == "erf" else "scratch")


def pretrain_arm(arm):
    """The arm under whose name ``arm``'s pre-training is run and recorded (None: scratch)."""
    spec = arm_spec(arm)
    return spec.get("pretrain_of") or (arm if spec.get("pretrain") else None)
SHARED = os.path.join(ROOT, "..", "shared", "data")

# Preset defaults: fine-tuning iterations, fine-tuning shorter side, arms. coco_tiny fine-tunes
# ~2x slower per iteration (larger images): half the iterations and the two rows that matter.
PRESETS = {
    "toy": dict(finetune_iters=200, ft_min_size=224, arms=VARIANTS, splits=("valid",)),
    "coco_tiny": dict(finetune_iters=100, ft_min_size=320, arms=("scratch", "erf"),
                      splits=("valid",)),
    "chess": dict(finetune_iters=200, ft_min_size=320, arms=VARIANTS, splits=("valid", "test")),
}
BY_PATH = dict(finetune_iters=200, ft_min_size=320, arms=VARIANTS)
# Full size (QUICK=0) and smoke size (QUICK=1); montages per pre-training step: the config's 16.
# Probes at smoke size use the first 300 boxes per split.
SIZES = {0: dict(pretrain_iters=150, seeds=(0, 1), input_size=128, probe_max_boxes=None),
         1: dict(pretrain_iters=12, finetune_iters=12, seeds=(0,), input_size=128,
                 probe_max_boxes=300)}

# (key, column label, table) of every reported metric, in column order.
METRICS = [("AP", "AP", "det"), ("AP50", "AP50", "det"), ("AP75", "AP75", "det"),
           ("frozen_AP", "frozen AP", "det"), ("frozen_AP50", "frozen AP50", "det"),
           ("res4_knn", "res4 kNN", "probe"), ("res4_linear", "res4 linear", "probe"),
           ("res5_knn", "res5 kNN", "probe"), ("res5_linear", "res5 linear", "probe")]


# ---------------------------------------------------------------------------------------------
# Arguments and datasets
# ---------------------------------------------------------------------------------------------
def parse_list(text, kind=str):
    """``"0,1, 2"`` -> [0, 1, 2] (with ``kind=int``); "" -> []."""
    return [kind(t) for t in re.split(r"[,\s]+", text.strip()) if t]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/compare")
    p.add_argument("--quick", type=int, default=0, choices=(0, 1), help="1 = smoke size")
    d = p.add_argument_group("data: a preset, or a COCO-format dataset by path")
    d.add_argument("--dataset", "--datasets", nargs="+", default=None,
                   help=f"preset(s), comma list of {','.join(PRESETS)} (default toy)")
    d.add_argument("--eval-split", default="valid", type=lambda s: "valid" if s == "val" else s,
                   help="a preset's evaluation split: valid (decisions) or test (final tables, "
                        "chess); the detectors trained for valid are evaluated, not retrained")
    for flag in ("train-json", "train-images", "val-json", "val-images"):
        d.add_argument(f"--{flag}", default="")
    d.add_argument("--name", default="", help="results key of a dataset by path "
                   "(default: its folder name)")
    d.add_argument("--coco-categories", type=int, default=10,
                   help="coco_tiny: keep the N most frequent categories")
    r = p.add_argument_group("what runs (default: by --quick and the dataset)")
    r.add_argument("--arms", "--variants", nargs="+", default=[],
                   help=f"comma list of {','.join(ARMS)} (default: {','.join(VARIANTS)})")
    r.add_argument("--seeds", nargs="+", default=[], help="comma list of ints")
    r.add_argument("--pretrain-iters", type=int, default=None)
    r.add_argument("--finetune-iters", type=int, default=None)
    r.add_argument("--input-size", type=int, default=None, help="montage canvas (px)")
    r.add_argument("--ft-min-size", type=int, default=None,
                   help="fine-tuning shorter side (INPUT.MIN_SIZE_*; MAX_SIZE scaled)")
    r.add_argument("--no-probes", action="store_true", help="skip the kNN / linear probes")
    r.add_argument("--trained-only", action="store_true",
                   help="train nothing: evaluate (and probe) on --eval-split only what earlier "
                        "runs trained and whose files are still there; e.g. the test split while "
                        "the valid comparison is still running")
    r.add_argument("--frozen", action="store_true",
                   help="add a fine-tuning with the backbone frozen per arm and seed")
    r.add_argument("--table3", nargs="?", const="erf", default=None, metavar="ARM",
                   help="add scratch_long: fine-tuned for the total CPU time of ARM (erf)")
    r.add_argument("--clip-grad", type=float, default=5.0, metavar="NORM",
                   help="gradient-norm clip of every fine-tuning (5.0: the toy fine-tuning "
                        "configs' own); 0 = off, the protocol of results/chess (no clipping)")
    e = p.add_argument_group("pinned runtime (recorded with every run)")
    e.add_argument("--threads", type=int, default=1, help="OMP/MKL/torch threads per step")
    e.add_argument("--workers", type=int, default=1, choices=(0, 1),
                   help="DATALOADER.NUM_WORKERS of pre-training and fine-tuning")
    e.add_argument("--bank-workers", type=int, default=1, help="builder processes")
    args = p.parse_args(argv)

    by_path = [args.train_json, args.train_images, args.val_json, args.val_images]
    if any(by_path):
        if not all(by_path):
            p.error("a dataset by path needs all of --train-json --train-images --val-json "
                    "--val-images")
        if args.dataset:
            p.error("give either --dataset or --train-json/..., not both")
    args.datasets = [] if any(by_path) else parse_list(" ".join(args.dataset or ["toy"]))
    for name in args.datasets:
        if name not in PRESETS:
            p.error(f"unknown --dataset {name}; presets: {', '.join(PRESETS)}")
    args.arms = parse_list(" ".join(args.arms))
    for arm in args.arms:
        if arm not in ARMS:
            p.error(f"unknown arm {arm}; arms: {', '.join(ARMS)} (scratch_long: --table3)")
    try:
        args.seeds = parse_list(" ".join(args.seeds), int)
    except ValueError:
        p.error(f"--seeds {args.seeds}: a comma list of integers, e.g. 0,1,2")
    if args.table3 and (args.table3 not in ARMS or not pretrain_arm(args.table3)):
        p.error(f"--table3 takes a pre-trained arm "
                f"({', '.join(a for a in ARMS if pretrain_arm(a))})")
    return args


def dataset_name(train_json):
    """A results key for a dataset by path: the first folder above the json that is not a
    split or ``annotations`` (``../shared/data/chess/train/x.json`` -> ``chess``)."""
    generic = {"annotations", "annotation", "train", "training", "valid", "val", "validation",
               "test", "images", "train2017", "val2017", "data", "."}
    parts = os.path.normpath(os.path.abspath(train_json)).split(os.sep)[:-1]
    name = next((p for p in reversed(parts) if p and p.lower() not in generic), "custom")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _sha1(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _category_names(json_file):
    with open(json_file) as f:
        return [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]


@contextlib.contextmanager
def _dir_lock(folder):
    """Exclusive lock on ``folder`` (flock on the directory itself: leaves no file behind)."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def subset_coco(src_json, dst_json, keep):
    """Writes ``src_json`` restricted to the categories ``keep`` (ids) and the images holding them."""
    with open(src_json) as f:
        d = json.load(f)
    anns = [a for a in d["annotations"] if a["category_id"] in keep]
    ids = {a["image_id"] for a in anns}
    d["images"] = [im for im in d["images"] if im["id"] in ids]
    d["annotations"] = anns
    d["categories"] = [c for c in d["categories"] if c["id"] in keep]
    os.makedirs(os.path.dirname(dst_json), exist_ok=True)
    tmp = f"{dst_json}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(d, f)
    os.replace(tmp, dst_json)
    return len(d["images"]), len(anns)


def preset_paths(name, out, split, num_categories):
    """(train_json, train_images, val_json, val_images, note) of a preset; None when missing."""
    if split not in PRESETS[name]["splits"]:
        raise SystemExit(f"--eval-split {split}: {name} has {', '.join(PRESETS[name]['splits'])}")
    if name == "toy":
        root = os.path.join(out, "data", "toy")
        with _dir_lock(os.path.join(out, "data")):
            if not os.path.isfile(os.path.join(root, "annotations", "instances_val.json")):
                subprocess.run([sys.executable, "scripts/make_toy_coco.py", "--out", root,
                                "--seed", "0"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return (f"{root}/annotations/instances_train.json", f"{root}/train",
                f"{root}/annotations/instances_val.json", f"{root}/val",
                "built-in toy dataset, 10 categories")
    src = os.path.abspath(os.path.join(SHARED, name))
    if not os.path.isdir(src):
        print(f"skipping {name}: {src} not found")
        return None
    if name == "chess":
        return (f"{src}/train/_annotations.coco.json", f"{src}/train",
                f"{src}/{split}/_annotations.coco.json", f"{src}/{split}",
                "chess pieces, Roboflow export at 640x428")
    train_src = f"{src}/annotations/instances_train2017.json"
    with open(train_src) as f:
        counts = defaultdict(int)
        for a in json.load(f)["annotations"]:
            counts[a["category_id"]] += 1
    keep = set(sorted(counts, key=lambda c: -counts[c])[:num_categories])
    root = os.path.join(out, "data", f"coco_tiny_top{num_categories}")
    with _dir_lock(os.path.join(out, "data")):
        n_tr = subset_coco(train_src, f"{root}/train.json", keep)
        n_va = subset_coco(f"{src}/annotations/instances_val2017.json", f"{root}/val.json", keep)
    return (f"{root}/train.json", f"{src}/train2017", f"{root}/val.json", f"{src}/val2017",
            f"coco_tiny restricted to its {num_categories} most frequent categories "
            f"(train {n_tr[0]} images / {n_tr[1]} boxes, val {n_va[0]} / {n_va[1]})")


def _split_label(val_json):
    """``.../chess/valid/_annotations.coco.json`` -> valid; ``.../annotations/x_val.json`` ->
    x_val: how the table names an evaluation split given by path."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(val_json)))
    return os.path.splitext(os.path.basename(val_json))[0] if folder == "annotations" else folder


def make_plans(args, out):
    """One plan per dataset: paths, fingerprints, sizes, arms, seeds (defaults filled in)."""
    size = SIZES[args.quick]
    if args.datasets:
        sources = []
        for name in args.datasets:
            paths = preset_paths(name, out, args.eval_split, args.coco_categories)
            if paths:
                sources.append((name, PRESETS[name], paths))
    else:
        paths = (args.train_json, args.train_images, args.val_json, args.val_images,
                 f"{args.train_json} / {args.val_json}")
        for path in paths[:4]:
            if not os.path.exists(path):
                raise SystemExit(f"{path} not found (check --train-json/--val-json/...)")
        sources = [(args.name or dataset_name(args.train_json), BY_PATH, paths)]
    plans = []
    for name, defaults, (tj, ti, vj, vi, note) in sources:
        if _category_names(tj) != _category_names(vj):
            raise SystemExit(f"{name}: the categories of {vj} differ from {tj}; the val json "
                             "must be a split of the same dataset (pass all four paths)")
        arms = args.arms or (VARIANTS if args.quick else defaults["arms"])
        if args.table3 and args.table3 not in arms:
            raise SystemExit(f"--table3 {args.table3}: add {args.table3} to --arms")
        plans.append(dict(
            name=name, note=note, train_json=os.path.abspath(tj), train_images=os.path.abspath(ti),
            val_json=os.path.abspath(vj), val_images=os.path.abspath(vi),
            split=args.eval_split if args.datasets else _split_label(vj),
            train_sha1=_sha1(tj), val_sha1=_sha1(vj), arms=list(arms),
            seeds=args.seeds or list(size["seeds"]),
            pretrain_iters=args.pretrain_iters or size["pretrain_iters"],
            finetune_iters=args.finetune_iters or size.get("finetune_iters",
                                                           defaults["finetune_iters"]),
            input_size=args.input_size or size["input_size"],
            ft_min_size=args.ft_min_size or defaults["ft_min_size"],
            probes=not args.no_probes, probe_max_boxes=size["probe_max_boxes"],
            trained_only=args.trained_only,
            frozen=args.frozen, table3=args.table3,
            threads=args.threads, workers=args.workers, bank_workers=args.bank_workers,
            clip_grad=args.clip_grad))
    return plans


# ---------------------------------------------------------------------------------------------
# Settings: what decides a step's result (hashed: sid) - and the run environment
# ---------------------------------------------------------------------------------------------
def sid_of(settings):
    """10-hex id of a settings dict; equal ids = same step at the same settings."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def runtime_settings(plan):
    """Pinned, identical for every step: threads, loader workers, cuDNN flags."""
    return dict(omp_num_threads=plan["threads"], mkl_num_threads=plan["threads"],
                torch_threads=plan["threads"], loader_workers=plan["workers"],
                cudnn_benchmark=False, cudnn_deterministic=False)


def schedule(iters):
    """(warm-up iterations, LR steps) of a fine-tuning of ``iters`` iterations."""
    return min(50, iters // 5), [int(iters * 0.8)]


def ft_size_opts(size):
    """Detectron2 input opts for a fine-tuning shorter side ``size``: the demo config's geometry
    (224: train (192, 224, 256), max 341) scaled to ``size``."""
    delta, max_size = 8 * round(size / 56), round(size * 341 / 224)
    return ["INPUT.MIN_SIZE_TRAIN", f"({size - delta}, {size}, {size + delta})",
            "INPUT.MAX_SIZE_TRAIN", str(max_size), "INPUT.MIN_SIZE_TEST", str(size),
            "INPUT.MAX_SIZE_TEST", str(max_size)]


def clip_opts(clip):
    """Detectron2 opts for a gradient-norm clip of ``clip`` (0: off, whatever the config says,
    with Detectron2's default clip keys, so the resolved config equals an unclipping config's)."""
    if not clip:
        return ["SOLVER.CLIP_GRADIENTS.ENABLED", "False", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
                "value", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0"]
    return ["SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", str(float(clip))]


def pretrain_settings(plan, arm):
    n = plan["pretrain_iters"]
    spec = arm_spec(pretrain_arm(arm))
    config, loss = spec["pretrain"]
    settings = dict(data=dict(train_sha1=plan["train_sha1"], bank_seed=0),
                    runtime=runtime_settings(plan), config=config, loss=loss, iters=n,
                    input_size=plan["input_size"], warmup=max(1, min(30, n // 10)),
                    erf_period=max(1, n // 3))
    if spec.get("pretrain_opts"):  # absent otherwise: the sids of the other arms unchanged
        settings["opts"] = spec["pretrain_opts"]
    # A recipe of its own (SCHEDULE_ARMS): replaces iters, warm-up, size, ERF period; adds the
    # batch, LR and warm-up start, which the other arms take from the config (sids unchanged).
    settings.update(spec.get("pretrain_recipe", {}))
    if "passes" in settings:  # sized at run time from the bank (bank_schedule): same sid
        for key in ("iters", "warmup", "erf_period"):
            settings.pop(key)
    return settings


def config_batch(config):
    """SOLVER.IMS_PER_BATCH of a config file relative to the repo root (resolved with its
    bases): images per fine-tuning step, or montages per pre-training step."""
    from detectron2.config import get_cfg

    from montage_pretrain.config import add_montage_config, merge_config_file

    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, config))
    return cfg.SOLVER.IMS_PER_BATCH


def bank_schedule(settings, num_crops):
    """``settings`` with ``passes`` (passes over the bank) resolved to ``iters`` (ceil of
    passes x crops / (4 crops a montage x montages a step)), and warm-up and ERF period at the
    paper's shares of them; settings without ``passes`` are returned unchanged."""
    if "passes" not in settings:
        return settings
    montages = settings.get("montages") or config_batch(settings["config"])
    from montage_pretrain.config import bank_iterations  # torch and Detectron2: only when used

    iters = bank_iterations(settings["passes"], num_crops, montages)
    return dict(settings, iters=iters, **{k: max(1, round(iters * share))
                                          for k, share in PAPER_SHARES.items()})


def bank_size(path):
    """Crops in a sample bank (HDF5), read and checked by the bank's own reader."""
    from builder.bank import SampleBank

    return len(SampleBank(path))


def finetune_settings(plan, arm, step):
    """Settings of a fine-tuning (``step`` "finetune" or "frozen"); the evaluation split is not
    part of them (a trained detector is evaluated on every split asked for)."""
    spec = arm_spec(arm)
    pre = pretrain_settings(plan, arm) if pretrain_arm(arm) else None
    matched = arm in TABLE3_ARMS  # fine-tuned for the total CPU time of plan's table3 arm
    iters = f"total CPU of {plan['table3']}" if matched else plan["finetune_iters"]
    ft = dict(config=spec["config"], iters=iters, ft_min_size=plan["ft_min_size"],
              frozen=step == "frozen")
    if spec.get("weight_scale"):  # absent otherwise: the sids of the other arms unchanged
        ft["weight_scale"] = spec["weight_scale"]
    if spec.get("variant"):  # likewise
        ft["variant"] = spec["variant"]
    if spec["opts"]:  # absent otherwise: the settings (and sids) of the other arms unchanged
        ft["opts"] = spec["opts"]
    if plan.get("clip_grad"):  # absent when off: the sids of the unclipped records stay valid
        ft["clip_grad"] = plan["clip_grad"]
    if matched:
        ft["matched_to"] = finetune_settings(plan, plan["table3"], "finetune")
    return dict(data=dict(train_sha1=plan["train_sha1"]), runtime=runtime_settings(plan),
                pretrain=pre, finetune=ft)


def probe_settings(plan, arm):
    pre = pretrain_settings(plan, arm) if pretrain_arm(arm) else "random init"
    config = arm_spec(arm)["config"] if pretrain_arm(arm) else FINETUNE_CONFIG
    return dict(data=dict(train_sha1=plan["train_sha1"]), runtime=runtime_settings(plan),
                pretrain=pre, probe=dict(script=PROBE_SCRIPT, config=config,
                                         opts=ft_size_opts(plan["ft_min_size"])[4:],
                                         max_boxes=plan["probe_max_boxes"]))


STEP_SETTINGS = {"pretrain": pretrain_settings, "probe": probe_settings,
                 "finetune": lambda p, a: finetune_settings(p, a, "finetune"),
                 "frozen": lambda p, a: finetune_settings(p, a, "frozen")}


def step_sid(plan, arm, step):
    return sid_of(STEP_SETTINGS[step](plan, arm))


def environment(plan):
    """What is recorded with every run besides its settings: versions, commit, machine."""
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return dict(python=sys.version.split()[0], torch=version("torch"),
                torchvision=version("torchvision"),
                detectron2=version("detectron2") or version("sal-detectron2"),
                git_commit=git("rev-parse", "HEAD"), git_dirty=bool(dirty),
                cpu_count=os.cpu_count(), host=os.uname().nodename,
                env=dict(OMP_NUM_THREADS=str(plan["threads"]),
                         MKL_NUM_THREADS=str(plan["threads"])))


def resolved_config_sha1(config_yaml):
    """sha1 of the config a Detectron2 run dumped (OUTPUT_DIR/config.yaml) without the keys that
    differ per run (OUTPUT_DIR, SEED, MODEL.WEIGHTS, DATASETS): equal across seeds of one arm."""
    try:
        import yaml

        with open(config_yaml) as f:
            cfg = yaml.safe_load(f)
        for key in ("OUTPUT_DIR", "SEED", "DATASETS"):
            cfg.pop(key, None)
        cfg.get("MODEL", {}).pop("WEIGHTS", None)
        cfg.get("MONTAGE", {}).pop("BANK", None)
        return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    except Exception:  # noqa: BLE001  (a record without it is still usable)
        return None


def _last_checkpoint(run_dir):
    """The checkpoint Detectron2's ``last_checkpoint`` file in ``run_dir`` names, or None."""
    path = os.path.join(run_dir, "last_checkpoint")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def resumed_cpu_s(cpu_s, iters, resumed_from):
    """CPU-s of a whole run from that of its resumed part (``resumed_from``: the checkpoint
    ``model_<k>.pth`` it resumed from, iterations 0..k done before), scaled by iterations:
    (estimate, True); ``(cpu_s, False)`` for a run that was not resumed."""
    m = re.fullmatch(r"model_(\d+)\.pth", resumed_from or "")
    done = int(m.group(1)) + 1 if m else 0
    if not done or done >= iters:
        return cpu_s, False
    return cpu_s * iters / (iters - done), True


def whole_run_cpu_s(rec):
    """:func:`resumed_cpu_s` of a pre-training or fine-tuning record, whose ``cpu_s`` is what
    its last command measured: (CPU-s of the whole run, whether it is an estimate)."""
    iters = rec.get("iters") or rec["settings"]["iters"]
    return resumed_cpu_s(rec["cpu_s"], iters, rec.get("resumed_from"))


def last_feature_health(run_dir):
    """The feature-collapse guard's last reading in a pre-training's ``metrics.json``:
    ``{"feature_pr", "dead_channels", "collapsed"}`` (``collapsed``: the guard's message from
    the run's log, or None); None when the run has no reading (guard off, older code)."""
    last = {}
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            for line in f:
                row = json.loads(line)
                for key in ("feature_pr", "dead_channels"):
                    if f"montage/{key}" in row:
                        last[key] = round(row[f"montage/{key}"], 4)
    except (OSError, ValueError):
        return None
    if not last:
        return None
    from montage_pretrain.hooks import collapse_message

    last["collapsed"] = collapse_message(os.path.join(run_dir, "stdout.log"))
    return last


def _remove_intermediate_checkpoints(run_dir):
    """Drops the ``model_<iter>.pth`` files of a finished run: only model_final.pth is kept."""
    for name in os.listdir(run_dir):
        if re.fullmatch(r"model_\d+\.pth", name):
            os.remove(os.path.join(run_dir, name))


# ---------------------------------------------------------------------------------------------
# Running steps
# ---------------------------------------------------------------------------------------------
class StepFailed(SystemExit):
    """A step's command exited non-zero; ``diverged``: Detectron2 stopped a non-finite training
    ("Training has diverged" / non-finite loss), a result to record rather than a crash."""

    def __init__(self, cmd, returncode, log_path, wall, cpu):
        super().__init__(f"failed ({returncode}): {' '.join(cmd)}\n  see {log_path}")
        self.log_path, self.wall, self.cpu = log_path, wall, cpu
        with open(log_path, errors="replace") as f:
            tail = f.read()[-20000:]
        # finetune_net.py's one line (montage_pretrain/nonfinite.py) or Detectron2's own words
        self.diverged = any(s in tail for s in ("non-finite loss at iteration",
                                                "Training has diverged",
                                                "Loss became infinite or NaN"))
        iters = re.findall(r"iter: (\d+)", tail)
        self.last_iter = int(iters[-1]) if iters else None


def run(cmd, log_path, env=None):
    """Runs ``cmd`` with its output in ``log_path``; returns (wall s, CPU s of it and its children).
    Raises :class:`StepFailed` if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise StepFailed(cmd, proc.returncode, log_path, time.time() - start, cpu)
    return time.time() - start, cpu


def merge_save(path, results):
    """
    Writes ``results`` merged into what ``path`` holds now and returns the merged dict: several
    compare.py processes (e.g. one per --seeds) may share --out. Under a lock on the folder, and
    via a temporary file and os.replace, so a reader never sees half a file.
    """
    with _dir_lock(os.path.dirname(path)):
        merged = {}
        if os.path.isfile(path):
            with open(path) as f:
                merged = json.load(f)
        merged.update(results)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(merged, f, indent=1)
        os.replace(tmp, path)
    return merged


def probe_entry(payload, weights):
    """The result of ``weights`` in scripts/probe.py's --json output (``{"results": [{"weights":
    ..., "res4": {...}, ...}, ...]}``; a plain ``{weights: {...}}`` mapping is read too)."""
    if "results" in payload:
        return next(r for r in payload["results"] if r.get("weights") == weights)
    return payload[weights]


def probe_script_found():
    return os.path.isfile(os.path.join(ROOT, PROBE_SCRIPT))


def scratch_long_iters(finetune_iters, pretrain_cpu_s, finetune_cpu_s):
    """Iterations of the scratch_long arm: the same total CPU time as pre-training + fine-tuning
    of the Montage arm, at the Montage arm's CPU-s per fine-tuning iteration."""
    return round(finetune_iters * (pretrain_cpu_s + finetune_cpu_s) / finetune_cpu_s)


# What a diverged fine-tuning scores: no detector, so AP 0 (see Comparison.finetune).
DIVERGED_METRICS = dict(AP=0.0, AP50=0.0, AP75=0.0, APs=None, APm=None, APl=None, diverged=True)


class NotTrained(Exception):
    """--trained-only: a step that would have to train first."""


class Comparison:
    """The steps of one dataset's comparison; ``save(key, record)`` stores each step's record."""

    def __init__(self, plan, out, results, save):
        self.p, self.out, self.results, self.save = plan, out, results, save
        self.py = sys.executable
        self.env = dict(os.environ, OMP_NUM_THREADS=str(plan["threads"]),
                        MKL_NUM_THREADS=str(plan["threads"]))
        self.val_key = plan["val_sha1"][:10]
        self.environment = environment(plan)
        self.pinned = ["DATALOADER.NUM_WORKERS", str(plan["workers"]), "CUDNN_BENCHMARK", "False"]

    # -- bookkeeping ---------------------------------------------------------------------------
    def key(self, arm, seed, step, sid):
        return f"{self.p['name']}/{arm}/seed{seed}/{step}@{sid}"

    def run_dir(self, arm, seed, step, sid):
        d = os.path.join(self.out, self.p["name"], arm, f"seed{seed}", f"{step}-{sid}")
        os.makedirs(d, exist_ok=True)
        return d

    def _record(self, arm, seed, step, sid, settings, cmd, wall, cpu, run_dir, **extra):
        """One step's record: identity, settings (+ sid), command, timings, environment."""
        rec = dict(dataset=self.p["name"], arm=arm, seed=seed, step=step, sid=sid,
                   settings=settings, command=shlex.join(
                       [f"OMP_NUM_THREADS={self.p['threads']}",
                        f"MKL_NUM_THREADS={self.p['threads']}"] + cmd),
                   wall_s=wall, cpu_s=cpu, run_dir=run_dir, train_json=self.p["train_json"],
                   train_images=self.p["train_images"], environment=self.environment,
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        rec.update(extra)
        self.save(self.key(arm, seed, step, sid), rec)
        return rec

    def done(self, arm, seed, step, sid):
        return self.results.get(self.key(arm, seed, step, sid))

    def _split_info(self):
        return dict(split=self.p["split"], val_json=self.p["val_json"],
                    val_images=self.p["val_images"])

    # -- steps ---------------------------------------------------------------------------------
    def bank(self):
        """The sample bank of the training split, built once per training json."""
        banks = os.path.join(self.out, "banks")
        path = os.path.join(banks, f"{self.p['name']}-{self.p['train_sha1'][:10]}.h5")
        with _dir_lock(banks):
            if not os.path.isfile(path):
                run([self.py, "-m", "builder", "build", "--annotations", self.p["train_json"],
                     "--images", self.p["train_images"], "--out", path, "--seed", "0",
                     "--workers", str(self.p["bank_workers"]), "--overwrite"],
                    path[:-3] + ".log", self.env)
        return path

    def pretrain(self, arm, seed):
        """Pre-trains (once per pre-training arm and seed) and exports."""
        arm = pretrain_arm(arm)
        settings = pretrain_settings(self.p, arm)
        sid = sid_of(settings)
        rec = self.done(arm, seed, "pretrain", sid)
        if rec and os.path.isfile(rec["export"]):
            return rec
        if self.p["trained_only"]:
            raise NotTrained(self.key(arm, seed, "pretrain", sid))
        d = self.run_dir(arm, seed, "pretrain", sid)
        bank = self.bank()
        if "passes" in settings:  # recorded resolved, sid unchanged
            settings = bank_schedule(settings, bank_size(bank))
        cmd = [self.py, f"{PROJECT}/train_net.py", "--config-file", settings["config"],
               "MONTAGE.BANK", bank, "MONTAGE.LOSS", settings["loss"],
               "MONTAGE.INPUT_SIZE", str(settings["input_size"]),
               "SOLVER.MAX_ITER", str(settings["iters"]),
               "SOLVER.WARMUP_ITERS", str(settings["warmup"]),
               "SOLVER.CHECKPOINT_PERIOD", str(10 ** 7),
               "MONTAGE.ERF_PERIOD", str(settings["erf_period"]),
               "SEED", str(seed), "OUTPUT_DIR", d] + settings.get("opts", []) + self.pinned
        for key, opt in (("montages", "SOLVER.IMS_PER_BATCH"), ("lr", "SOLVER.BASE_LR"),
                         ("warmup_factor", "SOLVER.WARMUP_FACTOR")):
            if key in settings:  # a recipe of its own (SCHEDULE_ARMS)
                cmd += [opt, str(settings[key])]
        resumed = None
        if self.p.get("checkpoint_period"):
            # Long runs (scripts/long_protocol.py): 6 checkpoints a pre-training, and a rerun
            # resumes an interrupted one from its last (cpu_s then counts the resumed part).
            cmd[cmd.index("SOLVER.CHECKPOINT_PERIOD") + 1] = str(max(10, settings["iters"] // 6))
            resumed = _last_checkpoint(d)
            if resumed:
                cmd.insert(2, "--resume")
        # The export as trained: what every pre-training record holds (the sid predates the
        # init-scale default); arms with a weight_scale derive theirs from it (export_for).
        cmd += ["MONTAGE.EXPORT_WEIGHT_SCALE", "trained"]
        # The feature-collapse guard only measures (same weights either way): here a collapsed
        # arm (the hot recipes) is a result for the table and its verdict, not a stopped run.
        cmd += ["MONTAGE.COLLAPSE.ACTION", "warn"]
        wall, cpu = run(cmd, os.path.join(d, "stdout.log"), self.env)
        # cpu_s: what this command measured; whole_run_cpu_s scales a resumed one.
        extra = dict(resumed_from=resumed) if resumed else {}
        rec = self._record(arm, seed, "pretrain", sid, settings, cmd, wall, cpu, d,
                           export=os.path.join(d, EXPORT_NAME),
                           config_sha1=resolved_config_sha1(os.path.join(d, "config.yaml")),
                           feature_health=last_feature_health(d), **extra)
        if self.p.get("checkpoint_period"):
            _remove_intermediate_checkpoints(d)
        print(f"{self.key(arm, seed, 'pretrain', sid)}: {cpu:.0f} CPU-s", flush=True)
        if (rec.get("feature_health") or {}).get("collapsed"):
            # its fine-tunings still run (a result), but the user must not miss why they lose
            print(f"WARNING {self.key(arm, seed, 'pretrain', sid)}: "
                  f"{rec['feature_health']['collapsed']}", flush=True)
        return rec

    def export_for(self, arm, pre):
        """The weight file ``arm`` fine-tunes from: its pre-training's export, or (arms with a
        ``weight_scale``) that export rescaled, and (arms with a ``variant``) that changed by
        ``scripts/diagnose_handoff.py --write-variant`` seeded by the pre-training's seed; each
        written once next to the export."""
        spec = arm_spec(arm)
        scale = spec.get("weight_scale")
        if not scale:
            return pre["export"]
        from montage_pretrain.export import rescale_export

        path = pre["export"][:-len(".pkl")] + f"_{scale}_scale.pkl"
        with _dir_lock(os.path.dirname(path)):
            if not os.path.isfile(path):
                summary = rescale_export(pre["export"], path)
                print(f"{path}: {summary}", flush=True)
            if not spec.get("variant"):
                return path
            src, path = path, path[:-len(".pkl")] + f"_{spec['variant']}_seed{pre['seed']}.pkl"
            if not os.path.isfile(path):
                run([self.py, "scripts/diagnose_handoff.py", "--weights", src, "--write-variant",
                     spec["variant"], "--seed", str(pre["seed"]), "--out", path,
                     "--config-file", spec["config"]], path[:-len(".pkl")] + ".log", self.env)
        return path

    def probe(self, arm, seed, weights):
        """kNN / linear probes of ``weights`` ("" = random init, seeded) on the eval split."""
        settings = probe_settings(self.p, arm)
        sid = sid_of(settings)
        rec = self.done(arm, seed, "probe", sid)
        if rec and self.val_key in rec.get("metrics", {}):
            return rec
        if not probe_script_found():
            print(f"probes skipped: {PROBE_SCRIPT} not found (or pass --no-probes)")
            return None
        d = self.run_dir(arm, seed, "probe", sid)
        out_json = os.path.join(d, f"probe-{self.val_key}.json")
        cmd = [self.py, PROBE_SCRIPT, "--weights", weights,
               "--train-json", self.p["train_json"], "--train-images", self.p["train_images"],
               "--val-json", self.p["val_json"], "--val-images", self.p["val_images"],
               "--config-file", settings["probe"]["config"], "--threads", str(self.p["threads"]),
               "--seed", str(seed), "--json", out_json]
        if settings["probe"]["max_boxes"]:
            cmd += ["--max-boxes", str(settings["probe"]["max_boxes"])]
        cmd += settings["probe"]["opts"]
        wall, cpu = run(cmd, os.path.join(d, f"stdout-{self.val_key}.log"), self.env)
        with open(out_json) as f:
            entry = probe_entry(json.load(f), weights)
        stages = {s: v for s, v in entry.items() if isinstance(v, dict) and "knn_top1" in v}
        metrics = dict((rec or {}).get("metrics", {}))
        metrics[self.val_key] = dict(self._split_info(), **stages, probe_json=out_json,
                                     wall_s=wall, cpu_s=cpu)
        rec = self._record(arm, seed, "probe", sid, settings, cmd, wall, cpu, d,
                           weights=weights, metrics=metrics)
        line = ", ".join(f"{s} kNN {v['knn_top1']:.1f} linear {v['linear_top1']:.1f}"
                         for s, v in stages.items())
        print(f"{self.key(arm, seed, 'probe', sid)}: {line}", flush=True)
        return rec

    def finetune(self, arm, seed, step, weights="", pre_rec=None, iters=None, matched=None):
        """Fine-tunes (``step`` "finetune" or "frozen") and evaluates on the eval split; a
        detector trained earlier is only evaluated (--eval-only) on a split it has not seen."""
        settings = finetune_settings(self.p, arm, step)
        sid = sid_of(settings)
        iters = iters or self.p["finetune_iters"]
        rec = self.done(arm, seed, step, sid)
        if rec and rec["iters"] == iters:
            if self.val_key in rec["metrics"]:
                return rec
            if rec.get("diverged"):  # no detector: AP 0 on every split
                return self._record_diverged(rec, arm, seed, step, sid)
            if os.path.isfile(rec["model"]):
                return self._evaluate(rec, arm, seed, step, sid)
        if self.p["trained_only"]:
            raise NotTrained(self.key(arm, seed, step, sid))
        d = self.run_dir(arm, seed, step, sid)
        warmup, steps = schedule(iters)
        cmd = self._ft_cmd(settings, d, weights) + [
            "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(tuple(steps)),
            "SOLVER.WARMUP_ITERS", str(warmup), "SEED", str(seed)]
        if step == "frozen":
            cmd += ["MODEL.BACKBONE.FREEZE_AT", "5"]
        resumed = None
        if self.p.get("checkpoint_period"):
            # Long runs (scripts/long_protocol.py): checkpoints, and a rerun resumes an
            # interrupted run from its last one (the data order after it differs).
            cmd += ["SOLVER.CHECKPOINT_PERIOD", str(self.p["checkpoint_period"])]
            resumed = _last_checkpoint(d)
            if resumed:
                cmd.insert(2, "--resume")
        if self.p.get("trace_iters"):  # loss and per-stage updates of the first iterations
            cmd[2:2] = ["--trace-iters", str(self.p["trace_iters"])]
        diverged = None
        try:
            wall, cpu = run(cmd, os.path.join(d, "stdout.log"), self.env)
            metrics = {self.val_key: dict(self._split_info(), **self._bbox(d))}
        except StepFailed as e:
            if not e.diverged:
                raise
            # Detectron2 stopped a non-finite training: the user gets no detector. Recorded as
            # AP 0 (kept in means and paired differences, flagged in the tables), not dropped,
            # which would flatter the arm; the command and log say where it stopped.
            wall, cpu, diverged = e.wall, e.cpu, e.last_iter
            metrics = {self.val_key: dict(self._split_info(), **DIVERGED_METRICS)}
        rec = self._record(
            arm, seed, step, sid, settings, cmd, wall, cpu, d, iters=iters, warmup=warmup,
            lr_steps=steps, weights=weights, model=os.path.join(d, "model_final.pth"),
            pretrain_cpu_s=whole_run_cpu_s(pre_rec)[0] if pre_rec else 0.0,
            pretrain_key=self.key(pre_rec["arm"], seed, "pretrain", pre_rec["sid"])
            if pre_rec else None,
            matched_to=matched, metrics=metrics, diverged=diverged is not None,
            diverged_after_iter=diverged, resumed_from=resumed,
            config_sha1=resolved_config_sha1(os.path.join(d, "config.yaml")))
        m = metrics[self.val_key]
        if self.p.get("checkpoint_period"):
            _remove_intermediate_checkpoints(d)
        if diverged is not None:
            print(f"{self.key(arm, seed, step, sid)}: DIVERGED after iteration {diverged} "
                  f"(recorded as AP 0; {os.path.join(d, 'stdout.log')})", flush=True)
            return rec
        print(f"{self.key(arm, seed, step, sid)}: AP {_num(m['AP'])} AP50 {_num(m['AP50'])} "
              f"({iters} it, pre-train {rec['pretrain_cpu_s']:.0f} CPU-s, "
              f"fine-tune {cpu:.0f} CPU-s)", flush=True)
        return rec

    def _ft_cmd(self, settings, out_dir, weights):
        return [self.py, f"{PROJECT}/finetune_net.py", "--config-file",
                settings["finetune"]["config"], "--train-json", self.p["train_json"],
                "--train-images", self.p["train_images"], "--val-json", self.p["val_json"],
                "--val-images", self.p["val_images"], "--dataset-name",
                "cmp_" + re.sub(r"\W", "_", self.p["name"]), "MODEL.WEIGHTS", weights,
                "OUTPUT_DIR", out_dir] + ft_size_opts(self.p["ft_min_size"]) + self.pinned + \
            clip_opts(settings["finetune"].get("clip_grad", 0)) + \
            settings["finetune"].get("opts", [])

    @staticmethod
    def _bbox(run_dir):
        with open(os.path.join(run_dir, "metrics_final.json")) as f:
            bbox = json.load(f)["bbox"]
        return {k: bbox.get(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}

    def _record_diverged(self, rec, arm, seed, step, sid):
        """A diverged detector on another split: AP 0 there too, nothing to run."""
        rec = dict(rec, metrics=dict(rec["metrics"]))
        rec["metrics"][self.val_key] = dict(self._split_info(), **DIVERGED_METRICS)
        self.save(self.key(arm, seed, step, sid), rec)
        return rec

    def _evaluate(self, rec, arm, seed, step, sid):
        d = os.path.join(rec["run_dir"], f"eval-{self.val_key}")
        cmd = self._ft_cmd(rec["settings"], d, rec["model"])
        cmd.insert(2, "--eval-only")
        wall, cpu = run(cmd, d + ".log", self.env)
        rec = dict(rec, metrics=dict(rec["metrics"]))
        rec["metrics"][self.val_key] = dict(self._split_info(), **self._bbox(d),
                                            eval_command=shlex.join(cmd), wall_s=wall, cpu_s=cpu)
        self.save(self.key(arm, seed, step, sid), rec)
        print(f"{self.key(arm, seed, step, sid)} on {self.p['split']}: "
              f"AP {_num(rec['metrics'][self.val_key]['AP'])}", flush=True)
        return rec

    # -- one seed ------------------------------------------------------------------------------
    def seed(self, seed):
        for arm in self.p["arms"]:
            try:
                self._arm(arm, seed)
            except NotTrained as e:
                print(f"--trained-only: skipped {e} and what follows it for {arm}", flush=True)

    def _arm(self, arm, seed):
        """The steps of one arm and seed: pre-training, probe, fine-tunings, scratch_long."""
        spec, pre, weights = arm_spec(arm), None, ""
        if pretrain_arm(arm):
            pre = self.pretrain(arm, seed)
            weights = self.export_for(arm, pre)
        if self.p["probes"] and spec["probe"]:
            self.probe(arm, seed, weights)
        ft = self.finetune(arm, seed, "finetune", weights, pre)
        if self.p["frozen"] and spec["frozen"]:
            self.finetune(arm, seed, "frozen", weights, pre)
        if arm == self.p["table3"] and ft.get("diverged"):
            print(f"{self.key(arm, seed, 'finetune', ft['sid'])} diverged: no total CPU time to "
                  "match, scratch_long skipped for this seed", flush=True)
        elif arm == self.p["table3"]:
            self.finetune_matched("scratch_long", seed, ft)

    def finetune_matched(self, long_arm, seed, ft):
        """Table 3: fine-tunes ``long_arm`` (random init, one of TABLE3_ARMS) for the total CPU
        time of ``ft``, the finished fine-tuning record of the plan's table3 arm on ``seed``
        (its pre-training + its whole fine-tuning, resumed or not)."""
        ft_cpu, _ = whole_run_cpu_s(ft)
        n = scratch_long_iters(ft["iters"], ft["pretrain_cpu_s"], ft_cpu)
        return self.finetune(long_arm, seed, "finetune", iters=n, matched=dict(
            arm=self.p["table3"], pretrain_cpu_s=ft["pretrain_cpu_s"], finetune_cpu_s=ft_cpu,
            finetune_iters=ft["iters"]))

    def view(self):
        """What :func:`report` needs to select this comparison's records."""
        p = self.p
        sids = {(arm, step): step_sid(p, arm, step) for arm in ARMS
                for step in ("finetune", "frozen", "probe")}
        sids.update({(arm, "pretrain"): step_sid(p, arm, "pretrain") for arm in ARMS
                     if pretrain_arm(arm) == arm})
        if p["table3"]:
            sids[("scratch_long", "finetune")] = step_sid(p, "scratch_long", "finetune")
        return dict(name=p["name"], val_key=self.val_key, sids=sids, table3=p["table3"],
                    title=(f"{p['name']} ({p['note']}; eval on {p['split']}): pre-training "
                           f"{p['pretrain_iters']} it at {p['input_size']} px, fine-tuning "
                           f"{p['finetune_iters']} it at {p['ft_min_size']} px, "
                           f"{p['threads']} thread(s), {p['workers']} loader worker(s)"))


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "results.json")
    results = {}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)

    written = {}

    def save(key=None, rec=None):
        """Records ``rec`` under ``key`` and merges into results.json what this process wrote
        (what other processes wrote there is kept and read back)."""
        if key:
            written[key] = results[key] = rec
        results.update(merge_save(results_path, written))

    views = []
    for plan in make_plans(args, out):
        comparison = Comparison(plan, out, results, save)
        for seed in plan["seeds"]:
            comparison.seed(seed)
        views.append(comparison.view())
    save()  # picks up what parallel processes finished
    report(results, views, out)
    return 0


# ---------------------------------------------------------------------------------------------
# Statistics and tables
# ---------------------------------------------------------------------------------------------
def collect(results, view):
    """{arm: {seed: {metric: value}}} of the records of ``view`` (its sids, its eval split)."""
    values = defaultdict(lambda: defaultdict(dict))
    configs = defaultdict(set)
    for rec in results.values():
        if not isinstance(rec, dict) or rec.get("dataset") != view["name"]:
            continue
        arm, step = rec.get("arm"), rec.get("step")
        if "sid" not in rec or view["sids"].get((arm, step)) != rec["sid"]:  # other settings
            continue
        if rec.get("config_sha1"):
            configs[(arm, step)].add(rec["config_sha1"])
        m = rec.get("metrics", {}).get(view["val_key"])
        if m is None:
            continue
        row = values[arm][rec["seed"]]
        if step == "finetune":
            row.update(AP=m["AP"], AP50=m["AP50"], AP75=m["AP75"], iters=rec["iters"],
                       pretrain_cpu_s=rec["pretrain_cpu_s"], finetune_cpu_s=rec["cpu_s"],
                       diverged=bool(m.get("diverged")))
        elif step == "frozen":
            row.update(frozen_AP=m["AP"], frozen_AP50=m["AP50"],
                       frozen_diverged=bool(m.get("diverged")))
        elif step == "probe":
            for stage in ("res4", "res5"):
                for probe in ("knn", "linear"):
                    row[f"{stage}_{probe}"] = m.get(stage, {}).get(f"{probe}_top1")
    mixed = sorted(f"{a}/{s}" for (a, s), h in configs.items() if len(h) > 1)
    return values, mixed


def paired(values, arm, metric, ref="scratch"):
    """
    Paired difference ``arm - ref`` of ``metric`` over the seeds both have (values not None):
    dict(n, mean, min, max, per_seed={seed: diff}), or None without a common seed.
    """
    a, r = values.get(arm, {}), values.get(ref, {})
    diffs = {s: a[s][metric] - r[s][metric] for s in sorted(set(a) & set(r))
             if a[s].get(metric) is not None and r[s].get(metric) is not None}
    if not diffs:
        return None
    d = list(diffs.values())
    return dict(n=len(d), mean=statistics.mean(d), min=min(d), max=max(d), per_seed=diffs)


def _num(v, signed=False):
    if v is None:
        return "n/a"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _fmt(values):
    """mean ± sample std (one value: the value)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def _fmt_paired(p):
    """``+1.50 [-1.00, +4.00]`` (mean [min, max] over seeds); one seed: the difference."""
    if p is None:
        return "n/a"
    if p["n"] == 1:
        return _num(p["mean"], True)
    return f"{_num(p['mean'], True)} [{_num(p['min'], True)}, {_num(p['max'], True)}]"


def _cost_cells(runs):
    """fine-tune iterations, mean pre-train / fine-tune / total CPU-s of fine-tuning rows."""
    # a diverged run stopped early: its CPU time is not the cost of a fine-tuning
    runs = [r for r in runs if r.get("finetune_cpu_s") is not None and not r.get("diverged")]
    if not runs:
        return ["n/a"] * 4
    pre = statistics.mean(r["pretrain_cpu_s"] for r in runs)
    ft = statistics.mean(r["finetune_cpu_s"] for r in runs)
    return ["/".join(str(i) for i in sorted({r["iters"] for r in runs})), f"{pre:.0f}",
            f"{ft:.0f}", f"{pre + ft:.0f}"]


def _diverged_flag(metric):
    """The flag of a detection metric's run that diverged: ``diverged`` / ``frozen_diverged``;
    None for the probes (no fine-tuning)."""
    if metric.startswith("frozen_"):
        return "frozen_diverged"
    return "diverged" if metric.startswith("AP") else None


def tables(values):
    """
    (headers, rows) of the three tables of :func:`collect`'s values: detection (mean ± std and
    paired difference to scratch per metric, costs), probes (None without probe values), and
    every seed's values and differences.
    """
    arms = [a for a in ARM_ORDER if a in values]
    present = [m for m in METRICS if any(r.get(m[0]) is not None
                                         for a in arms for r in values[a].values())]
    costs = ["fine-tune it", "pre-train CPU-s", "fine-tune CPU-s", "total CPU-s"]

    def summary(metrics, with_costs):
        head = ["arm", "seeds"] + [h for _, label, _ in metrics
                                   for h in (label, f"Δ {label} vs scratch")]
        rows = []
        for arm in arms:
            seeds = values[arm]
            if not any(seeds[s].get(k) is not None for s in seeds for k, _, _ in metrics):
                continue
            n = sum(any(seeds[s].get(k) is not None for k, _, _ in metrics) for s in seeds)
            row = [arm, n]
            for key, _, _ in metrics:
                got = [seeds[s][key] for s in seeds if seeds[s].get(key) is not None]
                flag = _diverged_flag(key)
                div = sum(bool(seeds[s].get(flag)) for s in seeds)
                row += [_fmt(got) + (f" (n={len(got)})" if got and len(got) < n else "")
                        + (f" ({div} diverged: AP 0)" if div else ""),
                        "—" if arm == "scratch" else _fmt_paired(paired(values, arm, key))]
            rows.append(row + (_cost_cells(seeds.values()) if with_costs else []))
        return head + (costs if with_costs else []), rows

    det = summary([m for m in present if m[2] == "det"], True)
    probe = [m for m in present if m[2] == "probe"]
    per_head = ["arm", "seed"] + [h for _, label, _ in present
                                  for h in (label, f"Δ {label}")] + costs
    per_rows = []
    for arm in arms:
        for seed in sorted(values[arm]):
            row = [arm, seed]
            for key, _, _ in present:
                p = None if arm == "scratch" else paired(values, arm, key)
                div = values[arm][seed].get(_diverged_flag(key))
                row += [_num(values[arm][seed].get(key)) + (" (diverged)" if div else ""),
                        "—" if arm == "scratch" else _num(p and p["per_seed"].get(seed), True)]
            per_rows.append(row + _cost_cells([values[arm][seed]]))
    return det, summary(probe, False) if probe else None, (per_head, per_rows)


# (arm, pre-training norm, detector backbone norm) of the hand-off table, in row order.
HANDOFF_ROWS = [("scratch", "-", "GN (+ FPN GN)"), ("erf_gn", "GN", "GN (+ FPN GN)"),
                ("scratch_bn", "-", "BN, trainable"), ("erf", "BN", "BN, trainable"),
                ("erf_frozenbn", "BN", "FrozenBN, FREEZE_AT 2")]


def handoff_table(values):
    """(headers, rows) comparing each hand-off with the scratch detector of its norm; None when
    no hand-off arm (scratch_bn, erf_gn, erf_frozenbn) has results."""
    if not any(a in values for a in NORM_ARMS):
        return None
    head = ["arm", "pre-training norm", "detector norm", "seeds", "AP", "Δ AP vs", "Δ AP",
            "frozen AP", "Δ frozen AP"]
    rows = []
    for arm, pre_norm, det_norm in HANDOFF_ROWS:
        if arm not in values:
            continue
        ref = arm_spec(arm)["ref"]
        cells = []
        for key in ("AP", "frozen_AP"):
            got = [r[key] for r in values[arm].values() if r.get(key) is not None]
            cells += [_fmt(got), "—" if arm == ref else _fmt_paired(paired(values, arm, key, ref))]
        rows.append([arm, pre_norm, det_norm, len(values[arm]), cells[0],
                     "—" if arm == ref else ref, cells[1], cells[2], cells[3]])
    return head, rows


PYRAMID_PAIRS = (("erf_fpn", "erf", "pyramid pre-training: erf_fpn (backbone + FPN) − erf "
                                     "(backbone only)"),
                 ("erf_fpn_levels", "erf_fpn", "classifier per level: erf_fpn_levels − erf_fpn "
                                               "(one shared by all levels)"))


def pyramid_line(values):
    """The pyramid arms, paired on the same seeds: what pre-training the FPN too adds over the
    backbone alone, and a classifier per level over one shared; None without such a pair."""
    lines = []
    for arm, ref, title in PYRAMID_PAIRS:
        if arm not in values or ref not in values:
            continue
        parts = []
        for key, label in (("AP", "AP"), ("frozen_AP", "frozen AP"),
                           ("res5_linear", "res5 linear")):
            p = paired(values, arm, key, ref=ref)
            if p:
                parts.append(f"{label} {_fmt_paired(p)} (per seed {_per_seed(p)})")
        lines.append(f"{title}, paired: " + ("; ".join(parts) or "no common seed yet"))
    return "\n\n".join(lines) or None


def report(results, views, out):
    """Prints and writes (table.md) per dataset: detection AP and probes (mean ± std over seeds,
    paired difference to scratch: mean [min, max]), the per-seed values, and a chart."""
    from tabulate import tabulate

    lines = []
    for view in views:
        values, mixed = collect(results, view)
        det, probe, per_seed = tables(values)
        blocks = [(f"{view['title']}; mean ± std over seeds, Δ = paired difference to "
                   "scratch on the same seed: mean [min, max]", det)]
        if probe:
            blocks.append(("probes of the export (random init for scratch): top-1 % on the "
                           "eval split's boxes, frozen backbone, no fine-tuning", probe))
        blocks.append(("per seed", per_seed))
        text = []
        for head, (headers, rows) in blocks:
            text += [head, "", tabulate(rows, headers=headers, tablefmt="github",
                                        disable_numparse=True), ""]
        if view.get("table3") and "scratch_long" in values:
            p = paired(values, view["table3"], "AP", ref="scratch_long")
            per_seed_text = f", per seed {_per_seed(p)}" if p else ""
            text += [f"Table 3 view (equal total CPU time): {view['table3']} − scratch_long "
                     f"AP {_fmt_paired(p)}{per_seed_text}", ""]
        pyramid = pyramid_line(values)
        if pyramid:
            text += [pyramid, ""]
        handoff = handoff_table(values)
        if handoff:
            text += ["hand-off by norm: Δ = paired difference to the scratch detector of the same "
                     "norm (scratch: GN, scratch_bn: trainable BN), mean [min, max]", "",
                     tabulate(handoff[1], headers=handoff[0], tablefmt="github",
                              disable_numparse=True), ""]
        if mixed:
            text += [f"note: the resolved config differs between seeds in {', '.join(mixed)}"
                     " (a config file changed between runs)", ""]
        print("\n".join(text))
        lines += [f"### {view['name']}", ""] + text
        _chart(values, view, out)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines))


def _per_seed(p):
    return ", ".join(f"{s}: {_num(v, True)}" for s, v in p["per_seed"].items())


def _chart(values, view, out):
    """compare_<name>.png: AP per arm (mean ± std, seeds as dots) and the paired ΔAP."""
    arms = [a for a in ARM_ORDER if a in values and any(
        r.get("AP") is not None for r in values[a].values())]
    if not arms:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, arm in enumerate(arms):
        ap = [r["AP"] for r in values[arm].values() if r.get("AP") is not None]
        ax.bar(i, statistics.mean(ap), yerr=statistics.stdev(ap) if len(ap) > 1 else 0,
               capsize=4, color=f"C{i}")
        ax.scatter([i] * len(ap), ap, color="k", s=10, zorder=3)
        p = paired(values, arm, "AP")
        if p and arm != "scratch":
            ax_d.bar(i, p["mean"], yerr=[[p["mean"] - p["min"]], [p["max"] - p["mean"]]],
                     capsize=4, color=f"C{i}")
            ax_d.scatter([i] * p["n"], list(p["per_seed"].values()), color="k", s=10, zorder=3)
    for a in (ax, ax_d):
        a.set_xticks(range(len(arms)), arms, rotation=20)
    ax_d.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("box AP")
    ax_d.set_ylabel("AP − scratch AP (same seed)")
    ax.set_title(f"{view['name']}: Faster R-CNN R-18 FPN")
    ax_d.set_title("paired difference: mean, [min, max], seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"compare_{view['name']}.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

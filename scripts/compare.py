#!/usr/bin/env python
"""
The paper's central comparison at a size a CPU machine can run (``make compare``).

At equal pre-training compute (same iterations x montages x canvas: the same backbone passes
over the same number of pixels), the same detector is fine-tuned with the same schedule from

1. random init (``scratch``, GN as in "Rethinking ImageNet Pre-training"),
2. no-montage crop classification (``single``, the paper's "w/o Montage"),
3. Montage + global label (``global``), 4. Montage + block-wise (``blockwise``),
5. Montage + ERF-adaptive dense classification, tau = 0.7 (``erf``),

for every seed and dataset; prints one table (mean and spread over seeds of AP, AP50, AP75,
pre-training and fine-tuning CPU-seconds) and writes ``results.json``, ``table.md`` and
``compare_<dataset>.png`` under ``--out``. Finished runs are skipped, so an interrupted
comparison continues where it stopped; processes with different ``--seeds`` can share ``--out``.

    python scripts/compare.py --out output/compare              # full size
    python scripts/compare.py --out output/compare_quick --quick 1   # smoke size
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from montage_pretrain.export_format import default_export_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(ROOT, "projects", "MontagePretrain")
PRETRAIN_CONFIG = os.path.join(PROJECT, "configs/demo/montage_R_18_toy.yaml")
FINETUNE_CONFIG = os.path.join(PROJECT, "configs/finetune/demo/faster_rcnn_R_18_FPN_toy.yaml")
SCRATCH_CONFIG = os.path.join(PROJECT, "configs/finetune/demo/faster_rcnn_R_18_FPN_toy_scratch.yaml")
# train_net.py exports OUTPUT_DIR/MONTAGE.EXPORT_NAME; these pre-training runs keep the default.
EXPORT_NAME = default_export_name()
VARIANTS = ("scratch", "single", "global", "blockwise", "erf")
COCO_TINY = os.path.join(ROOT, "..", "shared", "data", "coco_tiny")

# iterations: (pre-training, fine-tuning); montages per pre-training step come from the config
# The full size is what projects/MontagePretrain/README.md reports (measured: ~80 min for toy
# plus ~35 min for coco_tiny on 2 CPU cores, two processes, one per seed). coco_tiny fine-tunes
# ~2x slower per iteration (larger images), so it gets half the iterations and only the two
# rows that matter most (scratch, erf).
SIZES = {0: dict(pretrain_iters=150, finetune_iters=dict(toy=200, coco_tiny=100), seeds=(0, 1),
                 variants=dict(toy=VARIANTS, coco_tiny=("scratch", "erf"))),
         1: dict(pretrain_iters=12, finetune_iters=dict(toy=12, coco_tiny=12), seeds=(0,),
                 variants=dict(toy=VARIANTS, coco_tiny=VARIANTS))}
# coco_tiny images are ~640x480: fine-tune at ~320 px so the CPU schedule stays short.
COCO_INPUT = ["INPUT.MIN_SIZE_TRAIN", "(288, 320, 352)", "INPUT.MAX_SIZE_TRAIN", "533",
              "INPUT.MIN_SIZE_TEST", "320", "INPUT.MAX_SIZE_TEST", "533"]


def run(cmd, log_path):
    """Runs ``cmd`` with its output in ``log_path``; returns (wall s, CPU s of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n  see {log_path}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.time() - start, cpu


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
    with open(dst_json, "w") as f:
        json.dump(d, f)
    return len(d["images"]), len(anns)


def prepare_datasets(names, out, num_categories):
    """Returns {name: dict(train_json, train_images, val_json, val_images, note)}."""
    py, data = sys.executable, {}
    for name in names:
        if name == "toy":
            root = os.path.join(out, "data", "toy")
            if not os.path.isfile(os.path.join(root, "annotations", "instances_val.json")):
                subprocess.run([py, "scripts/make_toy_coco.py", "--out", root, "--seed", "0"],
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            data[name] = dict(
                train_json=f"{root}/annotations/instances_train.json", train_images=f"{root}/train",
                val_json=f"{root}/annotations/instances_val.json", val_images=f"{root}/val",
                note="built-in toy dataset, 10 categories")
        elif name == "coco_tiny":
            src = os.path.abspath(COCO_TINY)
            if not os.path.isdir(src):
                print(f"skipping coco_tiny: {src} not found")
                continue
            with open(f"{src}/annotations/instances_train2017.json") as f:
                counts = defaultdict(int)
                for a in json.load(f)["annotations"]:
                    counts[a["category_id"]] += 1
            keep = set(sorted(counts, key=lambda c: -counts[c])[:num_categories])
            root = os.path.join(out, "data", f"coco_tiny_top{num_categories}")
            n_tr = subset_coco(f"{src}/annotations/instances_train2017.json",
                               f"{root}/train.json", keep)
            n_va = subset_coco(f"{src}/annotations/instances_val2017.json", f"{root}/val.json", keep)
            data[name] = dict(
                train_json=f"{root}/train.json", train_images=f"{src}/train2017",
                val_json=f"{root}/val.json", val_images=f"{src}/val2017",
                note=f"coco_tiny restricted to its {num_categories} most frequent categories "
                     f"(train {n_tr[0]} images / {n_tr[1]} boxes, val {n_va[0]} / {n_va[1]})")
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/compare")
    parser.add_argument("--quick", type=int, default=0, help="1 = smoke size")
    parser.add_argument("--datasets", nargs="+", default=["toy", "coco_tiny"])
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: all on toy, scratch and erf on coco_tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--coco-categories", type=int, default=10,
                        help="coco_tiny: keep the N most frequent categories")
    parser.add_argument("--pretrain-iters", type=int, default=None)
    parser.add_argument("--finetune-iters", type=int, default=None)
    args = parser.parse_args(argv)
    size = dict(SIZES[args.quick])
    seeds = args.seeds or size["seeds"]
    pre_iters = args.pretrain_iters or size["pretrain_iters"]
    ft_sizes = {d: args.finetune_iters or n for d, n in size["finetune_iters"].items()}
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    datasets = prepare_datasets(args.datasets, out, args.coco_categories)
    results_path = os.path.join(out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}

    def save():
        results.update(merge_save(results_path, results))

    for dname, d in datasets.items():
        bank = os.path.join(out, dname, "bank.h5")
        if not os.path.isfile(bank):
            os.makedirs(os.path.dirname(bank), exist_ok=True)
            run([py, "-m", "builder", "build", "--annotations", d["train_json"], "--images",
                 d["train_images"], "--out", bank, "--seed", "0", "--overwrite"],
                os.path.join(out, dname, "bank.log"))
        extra = COCO_INPUT if dname == "coco_tiny" else []
        ft_iters = ft_sizes[dname]
        for seed in seeds:
            for variant in args.variants or size["variants"][dname]:
                key = f"{dname}/{variant}/seed{seed}"
                if _same_size(results.get(key), pre_iters if variant != "scratch" else 0, ft_iters):
                    continue  # finished earlier at this size
                run_dir = os.path.join(out, dname, variant, f"seed{seed}")
                os.makedirs(run_dir, exist_ok=True)
                rec = dict(dataset=dname, variant=variant, seed=seed, pretrain_cpu_s=0.0,
                           pretrain_wall_s=0.0, pretrain_iters=0, finetune_iters=ft_iters)
                weights, config = "", SCRATCH_CONFIG
                if variant != "scratch":
                    warm = max(1, min(30, pre_iters // 10))
                    wall, cpu = run([py, os.path.join(PROJECT, "train_net.py"), "--config-file",
                                     PRETRAIN_CONFIG, "MONTAGE.BANK", bank, "MONTAGE.LOSS", variant,
                                     "SOLVER.MAX_ITER", str(pre_iters), "SOLVER.WARMUP_ITERS",
                                     str(warm), "SOLVER.CHECKPOINT_PERIOD", str(10 ** 7),
                                     "MONTAGE.ERF_PERIOD", str(max(1, pre_iters // 3)),
                                     "SEED", str(seed), "OUTPUT_DIR", f"{run_dir}/pretrain"],
                                    f"{run_dir}/pretrain.log")
                    rec.update(pretrain_cpu_s=cpu, pretrain_wall_s=wall, pretrain_iters=pre_iters)
                    weights, config = f"{run_dir}/pretrain/{EXPORT_NAME}", FINETUNE_CONFIG
                steps = str((int(ft_iters * 0.8),))
                wall, cpu = run([py, os.path.join(PROJECT, "finetune_net.py"), "--config-file",
                                 config, "--train-json", d["train_json"], "--train-images",
                                 d["train_images"], "--val-json", d["val_json"], "--val-images",
                                 d["val_images"], "--dataset-name", f"cmp_{dname}",
                                 "MODEL.WEIGHTS", weights, "SOLVER.MAX_ITER", str(ft_iters),
                                 "SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS",
                                 str(min(50, ft_iters // 5)), "SEED", str(seed),
                                 "OUTPUT_DIR", f"{run_dir}/finetune"] + extra,
                                f"{run_dir}/finetune.log")
                with open(f"{run_dir}/finetune/metrics_final.json") as f:
                    bbox = json.load(f)["bbox"]
                rec.update(finetune_cpu_s=cpu, finetune_wall_s=wall,
                           **{k: bbox[k] for k in ("AP", "AP50", "AP75")})
                results[key] = rec
                save()
                print(f"{key}: AP {rec['AP']:.2f} AP50 {rec['AP50']:.2f} "
                      f"(pre-train {rec['pretrain_cpu_s']:.0f} CPU-s, fine-tune {cpu:.0f} CPU-s)",
                      flush=True)
    save()  # picks up what parallel processes finished
    report(results, datasets, out, pre_iters, ft_sizes)
    return 0


def merge_save(path, results):
    """
    Writes ``results`` merged into what ``path`` holds now and returns the merged dict: several
    compare.py processes (e.g. one per --seeds) may share --out. Written via a temporary file and
    os.replace, so a reader never sees half a file.
    """
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


def _same_size(rec, pre_iters, ft_iters):
    """True when ``rec`` is a finished run with these pre-training / fine-tuning lengths."""
    return bool(rec) and rec["pretrain_iters"] == pre_iters and rec["finetune_iters"] == ft_iters


def _fmt(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def report(results, datasets, out, pre_iters, ft_sizes):
    """Prints and writes the table (mean ± std over seeds) and one bar chart per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tabulate import tabulate

    lines = []
    for dname, d in datasets.items():
        rows, bars, ft_iters = [], [], ft_sizes[dname]
        for variant in VARIANTS:
            recs = [r for r in results.values() if r["dataset"] == dname
                    and r["variant"] == variant and _same_size(
                        r, pre_iters if variant != "scratch" else 0, ft_iters)]
            if not recs:
                continue
            ap = [r["AP"] for r in recs]
            rows.append([variant, _fmt(ap), _fmt([r["AP50"] for r in recs]),
                         _fmt([r["AP75"] for r in recs]),
                         f"{statistics.mean(r['pretrain_cpu_s'] for r in recs):.0f}",
                         f"{statistics.mean(r['finetune_cpu_s'] for r in recs):.0f}",
                         " ".join(f"{a:.2f}" for a in ap)])
            bars.append((variant, ap))
        head = (f"{dname}: {d['note']}; pre-training {pre_iters} it, fine-tuning {ft_iters} it, "
                f"mean ± std over seeds")
        table = tabulate(rows, headers=["init", "AP", "AP50", "AP75", "pre-train CPU-s",
                                        "fine-tune CPU-s", "AP per seed"], tablefmt="github")
        print(head + "\n" + table + "\n")
        lines += [f"### {head}", "", table, ""]
        if bars:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            names = [b[0] for b in bars]
            means = [statistics.mean(b[1]) for b in bars]
            errs = [statistics.stdev(b[1]) if len(b[1]) > 1 else 0 for b in bars]
            ax.bar(names, means, yerr=errs, capsize=4,
                   color=["grey", "tab:blue", "tab:orange", "tab:green", "tab:red"][:len(names)])
            for i, b in enumerate(bars):
                ax.scatter([i] * len(b[1]), b[1], color="k", s=10, zorder=3)
            ax.set_ylabel("box AP")
            ax.set_title(f"{dname}: Faster R-CNN R-18 FPN, {ft_iters} it fine-tuning")
            fig.tight_layout()
            fig.savefig(os.path.join(out, f"compare_{dname}.png"), dpi=110)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

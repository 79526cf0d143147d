#!/usr/bin/env python
"""
Frozen-backbone probes of backbone exports: kNN and linear top-1 accuracy of the res4/res5
RoIAlign features of every GT box (montage_pretrain/probes.py). Unlike fine-tuning AP at CPU
scale, the numbers are bitwise equal on a rerun with the same --threads on the same machine.

    python scripts/probe.py --weights output/demo/pretrain/montage_backbone.pkl --weights "" \\
        --train-json datasets/toy/annotations/instances_train.json \\
        --train-images datasets/toy/train \\
        --val-json datasets/toy/annotations/instances_val.json --val-images datasets/toy/val \\
        [--config-file CFG] [--max-boxes N] [--threads 1] [--json probes.json] [KEY VALUE ...]

``--weights ""`` is random init (seeded with --seed). The reference set is the train split's
non-crowd boxes, the queries the val split's; KEY VALUE pairs override the detector config, e.g.
``INPUT.MIN_SIZE_TEST 160 INPUT.MAX_SIZE_TEST 240`` for smaller (faster) inputs.
"""
import argparse
import json
import logging
import os
import sys
import time

from tabulate import tabulate

from montage_pretrain.probes import DEFAULT_CONFIG, probe_exports


def _check_files(args):
    """One-line error naming the first missing input and the fix."""
    for weights in args.weights:
        if weights and "://" not in weights and not os.path.isfile(weights):
            raise SystemExit(
                f"--weights {weights}: file not found; pass a backbone export (e.g. "
                "output/demo/pretrain/montage_backbone.pkl, written by make pretrain) or "
                "--weights \"\" for random init"
            )
    for flag, path, isdir, fix in (
        ("--train-json", args.train_json, False, "a COCO instances json (make toy writes one)"),
        ("--train-images", args.train_images, True, "the folder of the train json's images"),
        ("--val-json", args.val_json, False, "a COCO instances json (make toy writes one)"),
        ("--val-images", args.val_images, True, "the folder of the val json's images"),
        ("--config-file", args.config_file, False, "a Detectron2 detector config"),
    ):
        if flag == "--config-file" and "://" in path:
            continue
        if not (os.path.isdir(path) if isdir else os.path.isfile(path)):
            kind = "folder" if isdir else "file"
            raise SystemExit(f"{flag} {path}: {kind} not found; pass {fix}")


def _name(result):
    return result["weights"] or f"random init (seed {result['seed']})"


def format_table(results, stages):
    """Rows = weights, columns = kNN / linear top-1 (%) per stage."""
    headers = ["weights"]
    for stage in stages:
        headers += [f"{stage} kNN", f"{stage} linear"]
    headers.append("backbone tensors loaded")
    rows = []
    for r in results:
        row = [_name(r)]
        for stage in stages:
            row += [f"{r[stage]['knn_top1']:.2f}", f"{r[stage]['linear_top1']:.2f}"]
        row.append(r["backbone_tensors_loaded"] or "-")
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github")


def _write_json(path, payload):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", action="append", required=True,
                        help="backbone export .pkl, or \"\" for random init; repeatable")
    parser.add_argument("--train-json", required=True, help="COCO json of the reference split")
    parser.add_argument("--train-images", required=True, help="image folder of --train-json")
    parser.add_argument("--val-json", required=True, help="COCO json of the query split")
    parser.add_argument("--val-images", required=True, help="image folder of --val-json")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="detector config")
    parser.add_argument("--stages", default="res4,res5",
                        help="bottom-up stages to probe, comma-separated")
    parser.add_argument("--max-boxes", type=int, default=None,
                        help="at most N boxes per split (the first in image-id order)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    parser.add_argument("--seed", type=int, default=0, help="random-init and linear-probe seed")
    parser.add_argument("--k", type=int, default=20, help="neighbours of the kNN probe")
    parser.add_argument("--epochs", type=int, default=100, help="linear-probe full-batch steps")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        raise SystemExit(f"config overrides come in KEY VALUE pairs; got {args.opts}")
    args.stages = [s for s in args.stages.split(",") if s]
    _check_files(args)

    # The detector's heads, FPN and RPN stay random: Detectron2 lists them as a warning.
    logging.getLogger("fvcore.common.checkpoint").setLevel(logging.ERROR)
    start = time.perf_counter()
    try:
        results = probe_exports(
            args.weights, args.train_json, args.train_images, args.val_json, args.val_images,
            config_file=args.config_file, stages=tuple(args.stages), max_boxes=args.max_boxes,
            opts=tuple(args.opts), threads=args.threads, seed=args.seed, k=args.k,
            epochs=args.epochs)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"probe.py: {e}") from None
    wall = time.perf_counter() - start
    first = results[0]
    stage0 = first[args.stages[0]]
    print(f"top-1 % of {stage0['num_val']} val boxes against {stage0['num_train']} train boxes "
          f"({first['num_classes']} classes; kNN k={first['k']}, linear {first['epochs']} "
          f"epochs), images {first['image_size'][0]}/{first['image_size'][1]} px, "
          f"{first['threads']} thread(s)")
    print(format_table(results, args.stages))
    print(f"wall {wall:.1f}s (features {first['seconds']['features']:.1f}s for "
          f"{len(results)} weight file(s))")
    if args.json:
        _write_json(args.json, {"results": results, "wall_s": wall, "argv": sys.argv[1:]
                                if argv is None else list(argv)})
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

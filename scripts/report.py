#!/usr/bin/env python
"""
Prints the COCO AP table of one or more fine-tuning runs.

    python scripts/report.py "Montage=output/demo/finetune" "scratch=output/demo/scratch/finetune"

Each argument is NAME=DIR where DIR holds the ``metrics_final.json`` written by
``projects/MontagePretrain/finetune_net.py``. ``--json OUT`` also writes the rows as JSON.
"""
import argparse
import json
import os
import sys

from tabulate import tabulate

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def load_row(name, run_dir):
    """Returns [name, AP, ..., wall s] from RUN_DIR/metrics_final.json (bbox task)."""
    path = os.path.join(run_dir, "metrics_final.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: not found; run the fine-tuning stage for {name!r} first")
    with open(path) as f:
        metrics = json.load(f)
    bbox = metrics.get("bbox", metrics)
    return [name] + [bbox.get(k, float("nan")) for k in COLUMNS] + [metrics.get("wall_s")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=DIR")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.runs:
        name, _, run_dir = spec.partition("=")
        rows.append(load_row(name, run_dir))
    headers = ["run"] + list(COLUMNS) + ["finetune s"]
    print(tabulate(rows, headers=headers, floatfmt=".1f"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(headers, r)) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

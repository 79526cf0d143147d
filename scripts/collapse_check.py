#!/usr/bin/env python
"""
The feature-collapse guard's measurement (``MONTAGE.COLLAPSE``) on finished pre-training runs,
for instance runs made before the guard existed:

    python scripts/collapse_check.py output/demo/pretrain [more run folders ...] [--json out.json]

For each run folder (its ``config.yaml`` and ``model_final.pth``, or ``--checkpoint NAME``) it
builds the model of the config at random init (seeded by the config's SEED), measures the
participation ratio (PR) and the dead-channel fraction of the backbone's coarsest output on the
guard's fixed montage set, loads the checkpoint, measures again, and prints the ratio and the
guard's verdict (collapsed below ``MONTAGE.COLLAPSE.MIN_PR_RATIO`` of random init's PR, or with
``MAX_DEAD`` of the channels dead). Runs on
the CPU; a few seconds per run. Exits 1 when any run has collapsed.
"""
import argparse
import json
import os
import sys

import torch
from tabulate import tabulate

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from montage_pretrain.config import add_montage_config, merge_config_file
from montage_pretrain.hooks import FeatureCollapseHook, is_collapsed, montage_feature_health


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="pre-training OUTPUT_DIRs (config.yaml + checkpoint)")
    p.add_argument("--checkpoint", default="model_final.pth", help="checkpoint file in each run")
    p.add_argument("--bank", help="the bank, when the config's MONTAGE.BANK has moved")
    p.add_argument("--num-images", type=int, help="montages (default: MONTAGE.COLLAPSE.NUM_IMAGES)")
    p.add_argument("--json", help="also write the rows here")
    return p.parse_args(argv)


def check_run(run, checkpoint, bank=None, num_images=None):
    """-> {"run", "random_pr", "pr", "ratio", "dead", "collapsed"} of one run folder."""
    config, weights = os.path.join(run, "config.yaml"), os.path.join(run, checkpoint)
    for path in (config, weights):
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: not found; pass a pre-training OUTPUT_DIR (config.yaml and "
                             f"{checkpoint}), or --checkpoint NAME")
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, config)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if bank:
        cfg.MONTAGE.BANK = bank
    if num_images:
        cfg.MONTAGE.COLLAPSE.NUM_IMAGES = num_images
    if not os.path.isfile(cfg.MONTAGE.BANK):
        raise SystemExit(f"{cfg.MONTAGE.BANK}: the run's bank is gone; pass --bank path/to/bank.h5")
    torch.manual_seed(max(cfg.SEED, 0))
    model = build_model(cfg)
    batch = FeatureCollapseHook.montages(cfg)
    random = montage_feature_health(model, batch)
    DetectionCheckpointer(model).load(weights)
    trained = montage_feature_health(model, batch)
    ratio = trained["pr"] / random["pr"] if random["pr"] > 0 else 0.0
    return dict(run=run, random_pr=round(random["pr"], 2), pr=round(trained["pr"], 2),
                ratio=round(ratio, 3), dead=round(trained["dead"], 3),
                collapsed=is_collapsed(trained, random["pr"], cfg.MONTAGE.COLLAPSE.MIN_PR_RATIO,
                                       cfg.MONTAGE.COLLAPSE.MAX_DEAD))


def main(argv=None):
    args = parse_args(argv)
    rows = [check_run(r, args.checkpoint, args.bank, args.num_images) for r in args.runs]
    print(tabulate([[r["run"], r["random_pr"], r["pr"], r["ratio"], r["dead"],
                     "COLLAPSED" if r["collapsed"] else "ok"] for r in rows],
                   headers=["run", "PR random init", "PR trained", "ratio", "dead", "guard"],
                   tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["collapsed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

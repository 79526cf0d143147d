#!/usr/bin/env python
"""
Checks pre-trained backbones for feature collapse before fine-tuning them: prints, for random
init and each export, the participation ratio (effective number of channel directions, see
montage_pretrain/diagnostics.py) of every backbone stage on a few detection images.

    python scripts/feature_rank.py --images datasets/toy/val \
        --weights output/demo/pretrain/montage_backbone.pkl [--weights other.pkl ...]

A healthy export stays within a small factor of random init; one that scores 1-4 at every stage
has collapsed (seen with a pre-training learning rate 4x the linearly scaled one) and will
fine-tune worse than random init.
"""
import argparse
import glob
import logging
import os
import sys


import cv2
import numpy as np
import torch
from tabulate import tabulate

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from montage_pretrain.config import merge_config_file
from montage_pretrain.diagnostics import stage_participation_ratios
from montage_pretrain.export_format import default_export_name
from montage_pretrain.loading import load_and_verify

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_ROOT, "projects/MontagePretrain/configs/finetune/demo/"
                                     "faster_rcnn_R_18_FPN_toy.yaml")


def load_images(folder, num, size, fmt):
    """(N, 3, size, size) float images: shorter side resized to ``size``, centre-cropped."""
    paths = sorted(p for p in glob.glob(os.path.join(folder, "*"))
                   if p.lower().endswith((".jpg", ".jpeg", ".png")))[:num]
    if not paths:
        raise SystemExit(f"{folder}: no .jpg/.png images found; pass --images <image folder>")
    out = []
    for path in paths:
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"{path}: cannot be decoded; remove it or point --images elsewhere")
        h, w = img.shape[:2]
        s = size / min(h, w)
        img = cv2.resize(img, (max(size, round(w * s)), max(size, round(h * s))))
        y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        img = img[y:y + size, x:x + size]
        if fmt == "RGB":
            img = img[:, :, ::-1]
        out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float())
    return torch.stack(out)


def load_config(config_file, opts):
    cfg = get_cfg()
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def build(cfg, weights):
    """The detector of ``cfg`` on CPU, with ``weights`` loaded and verified ('' = init)."""
    model = build_model(cfg)
    loaded = ""
    if weights:
        summary = load_and_verify(model, weights)  # raises unless the whole backbone loaded
        loaded = f"{summary['loaded']}/{summary['total']}"
    return model, loaded


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="detector config")
    parser.add_argument("--weights", action="append", default=[], help="backbone export(s)")
    parser.add_argument("--images", required=True, help="folder of detection images")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="square input side, px")
    parser.add_argument("--frozen-stats", action="store_true",
                        help="use stored BN statistics (FrozenBN hand-off) instead of batch ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init row")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)
    for w in args.weights:
        if not os.path.isfile(w):
            raise SystemExit(f"{w}: not found; pass a backbone export ({default_export_name()})")

    # The heads, FPN and RPN of the detector stay random: Detectron2 lists them as a warning.
    logging.getLogger("fvcore.common.checkpoint").setLevel(logging.ERROR)
    cfg = load_config(args.config_file, args.opts)
    raw = load_images(args.images, args.num_images, args.size, cfg.INPUT.FORMAT)

    rows, header = [], None
    for weights in [""] + args.weights:
        torch.manual_seed(args.seed)
        model, loaded = build(cfg, weights)
        images = (raw - model.pixel_mean) / model.pixel_std
        backbone = getattr(model.backbone, "bottom_up", model.backbone)
        ratios = stage_participation_ratios(backbone, images, batch_stats=not args.frozen_stats)
        header = header or list(ratios)
        channels = {k: v.channels for k, v in backbone.output_shape().items()}
        rows.append([weights or f"random init (seed {args.seed})", loaded or "-"]
                    + [f"{ratios[k]:.1f} / {channels[k]}" for k in header])
    print(f"participation ratio / channels ({'stored' if args.frozen_stats else 'batch'} BN "
          f"statistics, {len(images)} images at {args.size} px)")
    print(tabulate(rows, headers=["weights", "backbone tensors loaded"] + header, tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

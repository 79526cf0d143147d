#!/usr/bin/env python
"""
Draws, for pre-training checkpoints, the ERF of the top-left region (the paper's Fig. 5) and a
montage with its ERF-adaptive soft-label weight maps (Eq. 2), as PNGs.

    python scripts/visualize_erf.py --run output/demo/pretrain [--run other_run ...] --out viz/

Each --run is a pre-training OUTPUT_DIR (``config.yaml`` + ``model_final.pth``); ``--init``
adds the randomly initialised network of the first run's config as a reference row.
Writes ``erf_top_left.png`` (one panel per run) and ``soft_labels.png`` (first run).
"""
import argparse
import os
import sys


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from montage_pretrain import MontageStream, add_montage_config, collate_montages
from montage_pretrain.config import merge_config_file
from montage_pretrain.export_format import WeightFileError
from montage_pretrain.loading import ExportCheckpointer

REGIONS = ("TL (small S)", "TR (W)", "BL (T)", "BR (large S)")


def load_model(run_dir, weights=True, bank=None):
    """Builds the pre-training model of RUN_DIR/config.yaml on CPU, optionally with its weights."""
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.set_new_allowed(True)
    merge_config_file(cfg, os.path.join(run_dir, "config.yaml"))  # safe YAML
    cfg.MODEL.DEVICE = "cpu"
    if bank:
        cfg.MONTAGE.BANK = bank
    model = build_model(cfg)
    if weights:
        path = os.path.join(run_dir, "model_final.pth")
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: not found; finish the pre-training run first")
        try:
            # torch.load(weights_only=True), explicitly: nothing in the file runs, even under
            # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (Detectron2's checkpointer would unpickle it).
            ExportCheckpointer(model).load(path)
        except WeightFileError as e:
            raise SystemExit(f"visualize_erf.py: {e}") from None
    return cfg, model.eval()


def top_left_erf(model, batch):
    """Mean ERF map (S, S) of the feature positions inside the top-left region."""
    maps = model.refresh_erf_weights(batch, int(model.erf_iter))
    own = model.region_map.flatten() == 0
    erf = maps[own].mean(0)
    return erf / erf.max().clamp_min(1e-12)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="pre-training OUTPUT_DIR")
    parser.add_argument("--init", action="store_true", help="add the random-init network")
    parser.add_argument("--bank", default="", help="override MONTAGE.BANK of the runs")
    parser.add_argument("--num-images", type=int, default=8, help="montages averaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    entries = [(os.path.basename(os.path.normpath(r)), r, True) for r in args.run]
    if args.init:
        entries.insert(0, ("random init", args.run[0], False))
    cfg0, model0 = load_model(args.run[0], bank=args.bank)
    stream = iter(MontageStream.from_config(cfg0, args.seed, crops_per_image=4))
    batch = collate_montages([next(stream) for _ in range(args.num_images)])

    # Fig. 5: ERF of the top-left region, one panel per run.
    fig, axes = plt.subplots(1, len(entries), figsize=(3.2 * len(entries), 3.4), squeeze=False)
    for ax, (name, run_dir, weights) in zip(axes[0], entries):
        cfg, model = load_model(run_dir, weights=weights, bank=args.bank)
        erf = top_left_erf(model, batch)
        ax.imshow(erf.numpy(), cmap="inferno")
        a = model.template.a
        ax.add_patch(plt.Rectangle((-0.5, -0.5), a, a, fill=False, ec="cyan", lw=1.5))
        inside = erf[:a, :a].sum() / erf.sum()
        ax.set_title(f"{name} [{cfg.MONTAGE.LOSS}]\nERF mass in TL: {inside:.2f}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        print(f"{name}: loss={cfg.MONTAGE.LOSS} ERF mass inside the top-left region {inside:.3f}")
    fig.tight_layout()
    path = os.path.join(args.out, "erf_top_left.png")
    fig.savefig(path, dpi=110)
    print("wrote", path)

    # A montage and the weight of each region's label at every feature position.
    model0.eval()
    image = model0.make_images({k: v[:4] if k != "labels" else v[:1] for k, v in batch.items()})
    image = image[0] * model0.pixel_std + model0.pixel_mean
    if cfg0.INPUT.FORMAT == "BGR":
        image = image.flip(0)
    weights = model0.erf_weights
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.4))
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 255).byte().numpy())
    axes[0].set_title(f"montage {model0.template.size}px, labels {batch['labels'][0].tolist()}")
    for i in range(4):
        im = axes[i + 1].imshow(weights[i].numpy(), vmin=0, vmax=1, cmap="viridis")
        for (y, x), v in zip(torch.cartesian_prod(*map(torch.arange, weights[i].shape)),
                             weights[i].flatten()):
            axes[i + 1].text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
        axes[i + 1].set_title(f"w of {REGIONS[i]} label")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8)
    path = os.path.join(args.out, "soft_labels.png")
    fig.savefig(path, dpi=110)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""
Why does a pre-trained init fine-tune worse than random init? Compares backbone exports with a
random init of the same detector on detection images, per ResNet stage, and writes variants of
an export for ablations.

    python scripts/diagnose_handoff.py --images ../shared/data/chess/train \\
        --weights output/x/montage_backbone.pkl --json diag.json
    python scripts/diagnose_handoff.py --weights x.pkl --write-variant init_scale --out y.pkl

Per stage (stem, res2..res5) and weights (random init first):

* ``norm_ratio``: mean filter norm of the BN-followed convs / Detectron2's init norm;
  ``effective_step``: mean ``(init / |w|)^2``, the factor by which SGD's effective step
  ``lr / |w|^2`` differs from random init's (montage_pretrain/weight_scale.py);
* ``bn_var_gap``: median over channels of ``|ln(var_batch / var_running)|`` of the BN inputs
  on detection images (0: the stored statistics a FrozenBN detector uses fit detection images);
  ``bn_mean_gap``: median of ``|mean_batch - mean_running| / sqrt(var_running)``;
* ``rms_frozen`` / ``rms_batch``: RMS of the stage output with stored / batch BN statistics;
* ``pr``: participation ratio of the stage output (batch statistics; diagnostics.py).

``--write-variant`` writes an export whose backbone is changed, for fine-tuning ablations:
``init_scale`` (the output-invariant rescale of weight_scale.reset_to_init_scale),
``reinit_res5`` / ``reinit_res4_res5`` (those stages, BN included, from the random init of the
same config and ``--seed``), ``bn_reset`` (every backbone norm's gamma / beta back to 1 / 0,
bn_affine.reset_bn_affine) and ``init_scale_bn_reset`` (both of init_scale and bn_reset).

* ``dead``: fraction of the stage's output channels that are <= 0 on every position of every
  image (batch statistics; the stage output, i.e. its last block's, as in
  bn_affine.dead_channel_fractions).
"""
import argparse
import json
import logging
import os
import pickle
import sys

import numpy as np
import torch
from tabulate import tabulate

from montage_pretrain.bn_affine import reset_bn_affine
from montage_pretrain.diagnostics import participation_ratio
from montage_pretrain.export_format import read_export
from montage_pretrain.export import rescale_export
from montage_pretrain.weight_scale import reset_to_init_scale, stage_of, stage_scale_summary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_rank import DEFAULT_CONFIG, build, load_config, load_images  # noqa: E402

VARIANTS = ("init_scale", "reinit_res5", "reinit_res4_res5", "bn_reset", "init_scale_bn_reset")


def bare_backbone_weights(model):
    """The detector's ResNet weights under bare export names (``res2.0.conv1.weight``)."""
    backbone = getattr(model.backbone, "bottom_up", model.backbone)
    return {k: v.detach().numpy().copy() for k, v in backbone.state_dict().items()
            if not k.endswith("num_batches_tracked")}


@torch.no_grad()
def bn_gaps(backbone, images):
    """Per stage: median |ln(var_b / var_r)| and |mean_b - mean_r| / sqrt(var_r) of BN inputs."""
    gaps, handles = {}, []
    for name, module in backbone.named_modules():
        norm = getattr(module, "norm", None)
        if norm is None or not hasattr(norm, "running_var") or stage_of(name) is None:
            continue

        def pre(mod, inputs, stage=stage_of(name)):
            x = inputs[0].double()
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            rv, rm = mod.running_var.double(), mod.running_mean.double()
            g = gaps.setdefault(stage, dict(var=[], mean=[]))
            g["var"].append(torch.log((var + 1e-12) / (rv + 1e-12)).abs())
            g["mean"].append((mean - rm).abs() / (rv + 1e-12).sqrt())

        handles.append(norm.register_forward_pre_hook(pre))
    was = backbone.training
    backbone.eval()  # BN inputs do not depend on the mode of this BN, only of earlier ones
    try:
        backbone(images)
    finally:
        backbone.train(was)
        for h in handles:
            h.remove()
    return {s: dict(bn_var_gap=float(torch.cat(g["var"]).median()),
                    bn_mean_gap=float(torch.cat(g["mean"]).median())) for s, g in gaps.items()}


@torch.no_grad()
def stage_outputs(backbone, images, batch_stats):
    was = backbone.training
    backbone.train(batch_stats)
    try:
        return backbone(images)
    finally:
        backbone.train(was)


def diagnose(model, images):
    """Per-stage dict of every measure listed in the module docstring."""
    backbone = getattr(model.backbone, "bottom_up", model.backbone)
    stats = stage_scale_summary(bare_backbone_weights(model))
    # Train-mode forwards update BN running statistics: measure on a copy of them.
    saved = {k: v.clone() for k, v in backbone.state_dict().items()}
    gaps = bn_gaps(backbone, images)
    frozen = stage_outputs(backbone, images, False)
    batch = stage_outputs(backbone, images, True)
    backbone.load_state_dict(saved)
    out = {}
    for stage in ("stem", "res2", "res3", "res4", "res5"):
        row = dict(stats.get(stage, {}))
        row.update(gaps.get(stage, {}))
        if stage in frozen:
            row["rms_frozen"] = float(frozen[stage].double().pow(2).mean().sqrt())
            row["rms_batch"] = float(batch[stage].double().pow(2).mean().sqrt())
            row["pr"] = participation_ratio(batch[stage])
            # The stage output is its last block's: the same forward, no second pass.
            row["dead"] = float((batch[stage].amax(dim=(0, 2, 3)) <= 0).float().mean())
        if row:
            out[stage] = row
    return out


def write_variant(weights_path, variant, out_path, cfg, seed):
    """Writes ``variant`` of the export at ``weights_path`` to ``out_path`` (same settings)."""
    if variant == "init_scale":  # the export's own rescale (montage-export's code path)
        return rescale_export(weights_path, out_path)
    export = read_export(weights_path)
    data = dict(export.checkpoint)
    weights = dict(data["model"])
    if variant in ("bn_reset", "init_scale_bn_reset"):
        summary = {}
        if variant == "init_scale_bn_reset":
            weights, summary = reset_to_init_scale(weights)
            if isinstance(data.get("montage"), dict):
                data["montage"] = dict(data["montage"], weight_scale="init")
        weights, reset = reset_bn_affine(weights)
        summary.update(reset)
        return _write_variant(data, weights, variant, weights_path, out_path, summary)
    stages = ("res5",) if variant == "reinit_res5" else ("res4", "res5")
    torch.manual_seed(seed)
    model, _ = build(cfg, "")
    fresh = bare_backbone_weights(model)
    changed = [k for k in weights if stage_of(k) in stages and k in fresh]
    for k in changed:
        weights[k] = fresh[k].astype(weights[k].dtype)
    summary = dict(reinitialised=len(changed), stages=list(stages), seed=seed)
    return _write_variant(data, weights, variant, weights_path, out_path, summary)


def _write_variant(data, weights, variant, weights_path, out_path, summary):
    data["model"] = weights
    if isinstance(data.get("montage"), dict):
        data["montage"] = dict(data["montage"], variant=variant)
    with open(out_path, "wb") as f:
        pickle.dump(data, f)
    sidecar = weights_path + ".yaml"
    if os.path.isfile(sidecar):
        with open(sidecar) as src, open(out_path + ".yaml", "w") as dst:
            dst.write(src.read())
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help="detector config")
    p.add_argument("--weights", action="append", default=[], help="backbone export(s)")
    p.add_argument("--images", default="", help="folder of detection images")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--size", type=int, default=320, help="square input side, px")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init")
    p.add_argument("--json", default="", help="write the measures here")
    p.add_argument("--write-variant", choices=VARIANTS, default=None)
    p.add_argument("--out", default="", help="--write-variant: the new export's path")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = p.parse_args(argv)
    for w in args.weights:
        if not os.path.isfile(w):
            raise SystemExit(f"{w}: not found; pass a backbone export (.pkl)")
    logging.getLogger("fvcore.common.checkpoint").setLevel(logging.ERROR)
    cfg = load_config(args.config_file, args.opts)

    if args.write_variant:
        if len(args.weights) != 1 or not args.out:
            p.error("--write-variant needs one --weights and --out")
        summary = write_variant(args.weights[0], args.write_variant, args.out, cfg, args.seed)
        print(f"{args.out}: {args.write_variant} of {args.weights[0]}: {summary}")
        return 0
    if not args.images:
        p.error("--images is needed to diagnose")

    raw = load_images(args.images, args.num_images, args.size, cfg.INPUT.FORMAT)
    results, rows = {}, []
    for weights in [""] + args.weights:
        torch.manual_seed(args.seed)
        model, _ = build(cfg, weights)
        model.eval()
        images = (raw - model.pixel_mean) / model.pixel_std
        label = weights or f"random init (seed {args.seed})"
        results[label] = diagnose(model, images)
        for stage, r in results[label].items():
            rows.append([label if stage == "stem" else "", stage] + [
                f"{r[k]:.3g}" if k in r else "-" for k in
                ("norm_ratio", "effective_step", "bn_var_gap", "bn_mean_gap", "rms_frozen",
                 "rms_batch", "pr", "dead")])
    print(f"{len(raw)} images of {args.images} at {args.size} px")
    print(tabulate(rows, headers=["weights", "stage", "|w|/init", "eff. step", "BN ln-var gap",
                                  "BN mean gap", "RMS frozen", "RMS batch", "PR", "dead"],
                   tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(images=args.images, num_images=len(raw), size=args.size,
                           config=args.config_file, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Export of a Montage pre-trained backbone to a Detectron2 weight file (the writing side).

The file is what ``tools/convert-torchvision-to-d2.py`` writes: a pickle
``{"model": {bare name: np.ndarray}, "__author__": ..., "matching_heuristics": True}``. Bare names
(``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean``, ... ``res5.*``) plus
``matching_heuristics`` let :class:`DetectionCheckpointer` fill the stock C4 model
(``backbone.res4.*`` and ``roi_heads.res5.*``) and the stock FPN models
(``backbone.bottom_up.*``) from one file, by longest-suffix matching. A pyramid pre-training
(``MontageFPNClassifier``) also exports its FPN's own layers under their bare names
(``fpn_lateral2.weight``, ``fpn_output5.bias``, ...), which fill a stock FPN detector's
``backbone.fpn_*`` the same way (C4 detectors leave them unused).

Two extras make the hand-off checkable; their format is :mod:`montage_pretrain.export_format`:

* ``"montage"``: the settings fine-tuning must match (pixel mean/std, input format, ResNet
  shape and stride placement, norm, backbone name, iteration);
* ``<path>.yaml``: the same settings as config overrides, e.g.
  ``projects/MontagePretrain/finetune_net.py --config-file ... --weights-config <path>.yaml``.

Command line (``config.yaml`` is the one the pre-training run wrote to its OUTPUT_DIR)::

    python -m montage_pretrain.export --config-file output/pretrain/config.yaml \\
        --checkpoint output/pretrain/model_final.pth --out output/pretrain/montage_backbone.pkl
"""
import argparse
import logging
import os
import pickle
import sys
import tempfile
from collections import OrderedDict

import numpy as np
import torch

from .config import add_montage_config, merge_config_file
from .export_format import (
    AUTHOR,
    PYRAMID_PREFIXES,
    SIDECAR_SUFFIX,
    export_settings,
    format_opts,
    is_pyramid_cfg,
    settings_to_overrides,
    sidecar_yaml,
)
from .loading import torch_load_weights_only
from .weight_scale import reset_to_init_scale

__all__ = [
    "BACKBONE_PREFIXES",
    "convert_state_dict",
    "export_backbone",
    "expected_backbone_shapes",
    "check_checkpoint_fits_cfg",
    "rescale_export",
    "fold_pyramid_norms",
    "parse_args",
    "main",
]

logger = logging.getLogger(__name__)

# Prefixes stripped from pre-training names, longest first: an FPN backbone keeps its ResNet
# under ``bottom_up``; DDP wraps everything in ``module``.
BACKBONE_PREFIXES = ("backbone.bottom_up.", "backbone.")


def _to_numpy(tensor):
    """Converts a tensor to a CPU numpy array (bfloat16 goes through float32)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def convert_state_dict(state_dict, pyramid=False):
    """
    Keeps the backbone of a pre-training state dict, under the bare Detectron2 names.

    ``backbone.`` (or ``backbone.bottom_up.`` for an FPN backbone, whose FPN layers are dropped
    unless ``pyramid``) is stripped, ``module.`` from DDP too; ``num_batches_tracked`` is dropped.
    BN running mean/var are kept: a FrozenBN detector normalises with them.

    Args:
        state_dict (dict[str, Tensor]): e.g. ``model.state_dict()`` of ``MontageClassifier``.
        pyramid (bool): also keep the FPN's own layers (``backbone.fpn_*``,
            ``backbone.top_block.*``) as ``fpn_*`` / ``top_block.*`` (needs an FPN backbone).

    Returns:
        tuple(OrderedDict[str, np.ndarray], list[str]): the converted weights, and the
        original names that were dropped (head, buffers like ``erf_weights``, FPN unless
        ``pyramid``, counters).
    """
    has_bottom_up = any(
        k.split("module.", 1)[-1].startswith("backbone.bottom_up.") for k in state_dict
    )
    if pyramid and not has_bottom_up:
        raise ValueError(
            "A pyramid export needs an FPN backbone ('backbone.bottom_up.*' and "
            f"'backbone.fpn_*'; first keys: {list(state_dict)[:5]}); pass the state dict of "
            "MontageFPNClassifier, or export a backbone-only model without pyramid"
        )
    converted = OrderedDict()
    dropped = []
    for old_name in state_dict:
        name = old_name[len("module."):] if old_name.startswith("module.") else old_name
        prefix = "backbone.bottom_up." if has_bottom_up else "backbone."
        if pyramid and name.startswith("backbone.") and name[len("backbone."):].startswith(
                PYRAMID_PREFIXES) and not name.endswith("num_batches_tracked"):
            prefix = "backbone."  # fpn_lateral2.weight, ...: the stock FPN's own names
        elif not name.startswith(prefix) or name.endswith("num_batches_tracked"):
            dropped.append(old_name)
            continue
        new_name = name[len(prefix):]
        if new_name in converted:
            raise ValueError(f"Two pre-training keys map to {new_name!r} (second: {old_name!r})")
        converted[new_name] = _to_numpy(state_dict[old_name])
        logger.debug("%s -> %s", old_name, new_name)
    if not converted:
        raise ValueError(
            "No 'backbone.*' weights in the state dict "
            f"(first keys: {list(state_dict)[:5]}); pass the pre-training model or its "
            "checkpoint's 'model' dict."
        )
    if dropped:
        counters = [k for k in dropped if k.endswith("num_batches_tracked")]
        others = [k for k in dropped if not k.endswith("num_batches_tracked")]
        logger.info(
            "Not exported (not part of the backbone): %s%s", ", ".join(others) or "-",
            f"; {len(counters)} BN num_batches_tracked counters" if counters else "",
        )
    return converted, dropped


def _atomic_write(path, data, mode):
    """Writes ``data`` to a temporary file next to ``path`` and renames it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            if "b" in mode:
                pickle.dump(data, f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_stages(weights):
    """Warns when a ResNet stage is missing (a C4 detector then misses ``roi_heads.res5``)."""
    names = {k.split(".", 1)[0] for k in weights}
    if "stem" in names and any(n.startswith("res") for n in names):
        missing = [s for s in ("res2", "res3", "res4", "res5") if s not in names]
        if missing:
            logger.warning(
                "The exported ResNet has no %s (pre-training MODEL.RESNETS.OUT_FEATURES stops "
                "earlier): detectors using those stages will start them from random init.",
                ", ".join(missing),
            )


# BN-family norms a pyramid's convs can be folded into (eval mode: an affine map per channel).
FOLDABLE_NORMS = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN")


def fold_pyramid_norms(weights, eps=1e-5):
    """
    Folds each FPN conv's BN (eval statistics) into the conv: ``w' = w * g / sqrt(var + eps)``
    per output channel, ``b' = beta + (b - mean) * g / sqrt(var + eps)``; the ``.norm.*`` tensors
    are removed. The folded conv computes what conv + BN computed in eval mode.

    Args:
        weights (OrderedDict[str, np.ndarray]): bare-name export weights (``fpn_lateral2.weight``,
            ``fpn_lateral2.norm.running_var``, ...); the ResNet's own norms are left alone.
        eps (float): the BN's eps (1e-5 for Detectron2's BN, SyncBN and naiveSyncBN).
    Returns:
        tuple(OrderedDict, int): the new weights (same order, norms dropped) and how many convs
        were folded.
    """
    out, folded = OrderedDict(), 0
    norms = [k[: -len(".norm.running_var")] for k in weights
             if k.startswith(PYRAMID_PREFIXES) and k.endswith(".norm.running_var")]
    for name, value in weights.items():
        if any(name.startswith(p + ".norm.") for p in norms):
            continue
        out[name] = value
    for p in norms:
        w = np.asarray(weights[f"{p}.weight"], dtype=np.float64)
        g = np.asarray(weights[f"{p}.norm.weight"], dtype=np.float64)
        beta = np.asarray(weights[f"{p}.norm.bias"], dtype=np.float64)
        mean = np.asarray(weights[f"{p}.norm.running_mean"], dtype=np.float64)
        var = np.asarray(weights[f"{p}.norm.running_var"], dtype=np.float64)
        bias = np.asarray(weights.get(f"{p}.bias", np.zeros_like(mean)), dtype=np.float64)
        scale = g / np.sqrt(var + eps)
        dtype = weights[f"{p}.weight"].dtype
        out[f"{p}.weight"] = (w * scale.reshape(-1, 1, 1, 1)).astype(dtype)
        out[f"{p}.bias"] = (beta + (bias - mean) * scale).astype(dtype)
        folded += 1
    return out, folded


def export_backbone(model_or_state_dict, cfg, path, iteration=None):
    """
    Writes the backbone of a pre-training model as a Detectron2 ``.pkl`` and ``<path>.yaml``.

    Both files are written atomically (temporary file + ``os.replace``), so a reader never sees
    a half-written export. Call it from the main process only.

    Args:
        model_or_state_dict (nn.Module or dict): the pre-training model (its ``backbone``
            attribute; DDP wrappers are unwrapped) or its state dict.
        cfg (CfgNode): the pre-training config (pixel/ResNet settings are read from it; a
            ``MontageFPNClassifier`` config exports the pyramid too, :func:`is_pyramid_cfg`).
        path (str): output ``.pkl`` path.
        iteration (int or None): pre-training iteration, stored in the settings.

    Returns:
        dict: ``{"path", "yaml", "num_tensors", "num_pyramid_tensors", "dropped", "settings"}``.
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        model = getattr(model_or_state_dict, "module", model_or_state_dict)
        state_dict = model.state_dict()
    else:
        state_dict = model_or_state_dict
    weights, dropped = convert_state_dict(state_dict, pyramid=is_pyramid_cfg(cfg))
    _check_stages(weights)
    freeze_at = cfg.MODEL.BACKBONE.get("FREEZE_AT", 0)
    if int(freeze_at or 0) > 0:
        logger.warning(
            "The pre-training config has MODEL.BACKBONE.FREEZE_AT=%s: the frozen stages kept "
            "their random initialisation and are exported as such.",
            freeze_at,
        )
    settings = export_settings(cfg, iteration)
    scale = cfg.MONTAGE.get("EXPORT_WEIGHT_SCALE", "init")
    if scale == "init":
        weights, rescaled = reset_to_init_scale(weights)
        logger.info("Rescaled %d BN-followed convs to their init filter norm (scales %.3g..%.3g; "
                    "MONTAGE.EXPORT_WEIGHT_SCALE init: same outputs)", rescaled["convs"],
                    rescaled["scale_min"], rescaled["scale_max"])
    settings["weight_scale"] = scale
    if is_pyramid_cfg(cfg) and cfg.MONTAGE.FPN.get("FOLD_NORM", True) and \
            settings.get("MODEL.FPN.NORM") in FOLDABLE_NORMS:
        weights, folded = fold_pyramid_norms(weights)
        # The pyramid now has plain convs with biases: what stock FPN detectors (NORM "") build.
        settings["MONTAGE.FPN.FOLDED_NORM"] = settings["MODEL.FPN.NORM"]
        settings["MODEL.FPN.NORM"] = ""
        logger.info("Folded the %s of %d FPN convs into their weights and biases",
                    settings["MONTAGE.FPN.FOLDED_NORM"], folded)
    data = {
        "model": weights,
        "__author__": AUTHOR,
        "matching_heuristics": True,
        "montage": settings,
    }
    _atomic_write(path, data, "wb")
    yaml_path = path + SIDECAR_SUFFIX
    _atomic_write(yaml_path, sidecar_yaml(settings, path), "w")
    pyramid = sum(k.startswith(PYRAMID_PREFIXES) for k in weights)
    logger.info(
        "Exported %d backbone tensors (%d of them the pyramid's) to %s (+ %s); settings: %s",
        len(weights), pyramid, path, yaml_path, {k: v for k, v in settings.items()},
    )
    return {
        "path": path,
        "yaml": yaml_path,
        "num_tensors": len(weights),
        "num_pyramid_tensors": pyramid,
        "dropped": dropped,
        "settings": settings,
    }


def rescale_export(src, dst):
    """
    Writes ``src`` (a backbone export) to ``dst`` with every BN-followed conv filter at its init
    norm and the BN statistics with it (:func:`~montage_pretrain.weight_scale.reset_to_init_scale`:
    the same outputs, the effective step size of random init); ``montage["weight_scale"]`` of the
    copy is ``"init"``, its ``.yaml`` sidecar is written as for any export.

    Returns:
        dict: the rescale summary (convs, smallest / largest scale, clamped variances).
    """
    from .export_format import read_export

    export = read_export(src)
    data = dict(export.checkpoint)
    data["model"], summary = reset_to_init_scale(dict(data["model"]))
    settings = dict(export.settings or {})
    settings["weight_scale"] = "init"
    data["montage"] = settings
    _atomic_write(dst, data, "wb")
    _atomic_write(dst + SIDECAR_SUFFIX, sidecar_yaml(settings, dst), "w")
    return summary


def _load_checkpoint(path, trust=False):
    """
    Loads a trainer checkpoint (``model_final.pth``) or a bare state dict on the CPU.

    ``torch.load(weights_only=True)`` builds only tensors and plain values; our trainer
    checkpoints (model with ERF buffers, optimizer, scheduler and hook state, iteration) are
    made of those. Anything else needs a full unpickle, which can run code: only with ``trust``.

    Returns:
        tuple(dict, int or None): the state dict and the checkpoint's iteration.

    Raises:
        WeightFileError: not weights_only-loadable and ``trust`` is False (one line).
    """
    if trust:
        logger.warning("--trust-checkpoint: fully unpickling %s (it can run code)", path)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    else:
        ckpt = torch_load_weights_only(
            path, "only if you trust this file (e.g. your own training output), pass "
                  "--trust-checkpoint"
        )
    if isinstance(ckpt, dict) and "model" in ckpt:
        iteration = ckpt.get("iteration")
        if iteration is None and isinstance(ckpt.get("trainer"), dict):
            iteration = ckpt["trainer"].get("iteration")
        return ckpt["model"], iteration
    return ckpt, None


def _load_cfg(config_file):
    """Merges the pre-training run's ``config.yaml`` into a fresh config (safe YAML only)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_montage_config(cfg)
    # Keys added by later versions of the project are irrelevant here: only stock keys are read.
    cfg.set_new_allowed(True)
    merge_config_file(cfg, config_file)
    return cfg


def _shape_summary(cfg):
    """``MODEL.BACKBONE.NAME ... MODEL.RESNETS.DEPTH 50 ...``: the config values that set the
    backbone's tensor shapes (named in the mismatch error)."""
    keys = ["MODEL.BACKBONE.NAME"]
    if "resnet" in cfg.MODEL.BACKBONE.NAME:
        keys += [f"MODEL.RESNETS.{k}" for k in
                 ("DEPTH", "RES2_OUT_CHANNELS", "NUM_GROUPS", "WIDTH_PER_GROUP", "NORM")]
    elif "regnet" in cfg.MODEL.BACKBONE.NAME:
        keys.append("MONTAGE.REGNET")
    values = {"MODEL.BACKBONE.NAME": cfg.MODEL.BACKBONE.NAME,
              "MONTAGE.REGNET": cfg.MONTAGE.REGNET}
    values.update({f"MODEL.RESNETS.{k}": v for k, v in cfg.MODEL.RESNETS.items()})
    return " ".join(f"{k} {values[k]}" for k in keys)


def expected_backbone_shapes(cfg):
    """
    Returns ``{"backbone.<name>": shape}`` of the backbone ``cfg`` builds, i.e. the backbone
    tensors a pre-training checkpoint of ``cfg`` holds (BN counters left out). Built on the meta
    device: no memory, no initialisation cost.
    """
    from detectron2.modeling import build_backbone

    from . import backbones as _  # noqa: F401  (registers the RegNet builders)

    try:
        with torch.device("meta"):
            backbone = build_backbone(cfg)
    except (AssertionError, KeyError, ValueError) as e:  # Detectron2 asserts on bad shapes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"the config builds no backbone ({_shape_summary(cfg)}: {type(e).__name__} "
            f"{reason}). Fix: pass the config.yaml the pre-training run wrote (--config-file)."
        ) from e
    return {f"backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def _checkpoint_backbone_shapes(state_dict):
    """``{"backbone.<name>": shape}`` of a checkpoint's state dict (DDP's ``module.`` dropped)."""
    shapes = {}
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith("backbone.") and not name.endswith("num_batches_tracked"):
            shapes[name] = tuple(value.shape)
    return shapes


def _listed(label, items):
    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
    return f"{len(items)} {label}: {', '.join(items[:3])}{more}"


def check_checkpoint_fits_cfg(state_dict, cfg, checkpoint):
    """
    Refuses a checkpoint whose backbone names or shapes differ from what ``cfg`` builds: the
    export records ``cfg``'s depth and width, and fine-tuning builds its detector from them.

    Args:
        state_dict (dict[str, Tensor]): the checkpoint's ``model`` dict.
        cfg (CfgNode): the pre-training config given with the checkpoint.
        checkpoint (str): the checkpoint's path (named in the error).

    Raises:
        ValueError: one line naming the config's shape, the first differences and the fix.
    """
    expected = expected_backbone_shapes(cfg)
    have = _checkpoint_backbone_shapes(state_dict)
    wrong = [f"{k} {have[k]} vs {v}" for k, v in expected.items() if k in have and have[k] != v]
    missing = [k for k in expected if k not in have]
    extra = [k for k in have if k not in expected]
    problems = [_listed(label, items) for label, items in (
        ("with another shape (checkpoint vs config)", wrong), ("missing", missing),
        ("not in the config's backbone", extra)) if items]
    if problems:
        raise ValueError(
            f"{checkpoint} does not fit the config's backbone ({_shape_summary(cfg)}): "
            + "; ".join(problems)
            + ". Fix: pass the config.yaml of the run that wrote this checkpoint (--config-file)."
        )


def parse_args(argv=None):
    """Parses the export command line."""
    parser = argparse.ArgumentParser(
        description="Export a Montage pre-trained backbone to a Detectron2 .pkl "
        "(+ <out>.yaml with the fine-tuning overrides)."
    )
    parser.add_argument(
        "--config-file", required=True, help="config.yaml written by the pre-training run"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="trainer checkpoint, e.g. OUTPUT_DIR/model_final.pth"
    )
    parser.add_argument("--out", required=True, help="output .pkl path")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="fully unpickle a checkpoint that torch.load(weights_only=True) refuses; this can "
        "run code from the file: only for files you trust",
    )
    parser.add_argument(
        "--weight-scale", choices=("init", "trained"), default=None,
        help="MONTAGE.EXPORT_WEIGHT_SCALE for this export (default: the config's)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every name mapping")
    return parser.parse_args(argv)


def main(argv=None):
    """Runs the export CLI; returns the summary dict of :func:`export_backbone`."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.out.endswith(".pkl"):
        raise SystemExit(f"--out must end with .pkl (Detectron2 reads .pkl as numpy): {args.out}")
    try:
        cfg = _load_cfg(args.config_file)
        if args.weight_scale:
            cfg.defrost()
            cfg.MONTAGE.EXPORT_WEIGHT_SCALE = args.weight_scale
        state_dict, iteration = _load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        check_checkpoint_fits_cfg(state_dict, cfg, args.checkpoint)
    except (FileNotFoundError, ValueError) as e:  # one-line input problems, refused files
        raise SystemExit(f"montage-export: {e}") from None
    summary = export_backbone(state_dict, cfg, args.out, iteration=iteration)
    print(f"wrote {summary['path']} ({summary['num_tensors']} tensors, iteration {iteration})")
    print(f"wrote {summary['yaml']}")
    overrides = settings_to_overrides(summary["settings"], summary["path"])
    print("fine-tune with:  --weights-config " + summary["yaml"])
    print("            or:  " + format_opts(overrides))
    return summary


def cli(argv=None):
    """The ``montage-export`` console script: :func:`main`, exit status 0 on success (a console
    script's return value is its exit status; main's summary dict would read as a failure)."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())

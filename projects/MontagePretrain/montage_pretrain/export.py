"""
Export of a Montage pre-trained backbone to a Detectron2 weight file (the writing side).

The file is what ``tools/convert-torchvision-to-d2.py`` writes: a pickle
``{"model": {bare name: np.ndarray}, "__author__": ..., "matching_heuristics": True}``. Bare names
(``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean``, ... ``res5.*``) plus
``matching_heuristics`` let :class:`DetectionCheckpointer` fill the stock C4 model
(``backbone.res4.*`` and ``roi_heads.res5.*``) and the stock FPN models
(``backbone.bottom_up.*``) from one file, by longest-suffix matching.

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
import tempfile
from collections import OrderedDict

import numpy as np
import torch

from .config import add_montage_config
from .export_format import (
    AUTHOR,
    SIDECAR_SUFFIX,
    export_settings,
    format_opts,
    settings_to_overrides,
    sidecar_yaml,
)

__all__ = [
    "BACKBONE_PREFIXES",
    "convert_state_dict",
    "export_backbone",
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


def convert_state_dict(state_dict):
    """
    Keeps the backbone of a pre-training state dict, under the bare Detectron2 names.

    ``backbone.`` (or ``backbone.bottom_up.`` for an FPN backbone, whose FPN layers are dropped)
    is stripped, ``module.`` from DDP too; ``num_batches_tracked`` is dropped. BN running
    mean/var are kept: a FrozenBN detector normalises with them.

    Args:
        state_dict (dict[str, Tensor]): e.g. ``model.state_dict()`` of ``MontageClassifier``.

    Returns:
        tuple(OrderedDict[str, np.ndarray], list[str]): the converted weights, and the
        original names that were dropped (head, buffers like ``erf_weights``, FPN, counters).
    """
    has_bottom_up = any(
        k.split("module.", 1)[-1].startswith("backbone.bottom_up.") for k in state_dict
    )
    converted = OrderedDict()
    dropped = []
    for old_name in state_dict:
        name = old_name[len("module."):] if old_name.startswith("module.") else old_name
        prefix = "backbone.bottom_up." if has_bottom_up else "backbone."
        if not name.startswith(prefix) or name.endswith("num_batches_tracked"):
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


def export_backbone(model_or_state_dict, cfg, path, iteration=None):
    """
    Writes the backbone of a pre-training model as a Detectron2 ``.pkl`` and ``<path>.yaml``.

    Both files are written atomically (temporary file + ``os.replace``), so a reader never sees
    a half-written export. Call it from the main process only.

    Args:
        model_or_state_dict (nn.Module or dict): the pre-training model (its ``backbone``
            attribute; DDP wrappers are unwrapped) or its state dict.
        cfg (CfgNode): the pre-training config (pixel/ResNet settings are read from it).
        path (str): output ``.pkl`` path.
        iteration (int or None): pre-training iteration, stored in the settings.

    Returns:
        dict: ``{"path", "yaml", "num_tensors", "dropped", "settings"}``.
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        model = getattr(model_or_state_dict, "module", model_or_state_dict)
        state_dict = model.state_dict()
    else:
        state_dict = model_or_state_dict
    weights, dropped = convert_state_dict(state_dict)
    _check_stages(weights)
    freeze_at = cfg.MODEL.BACKBONE.get("FREEZE_AT", 0)
    if int(freeze_at or 0) > 0:
        logger.warning(
            "The pre-training config has MODEL.BACKBONE.FREEZE_AT=%s: the frozen stages kept "
            "their random initialisation and are exported as such.",
            freeze_at,
        )
    settings = export_settings(cfg, iteration)
    data = {
        "model": weights,
        "__author__": AUTHOR,
        "matching_heuristics": True,
        "montage": settings,
    }
    _atomic_write(path, data, "wb")
    yaml_path = path + SIDECAR_SUFFIX
    _atomic_write(yaml_path, sidecar_yaml(settings, path), "w")
    logger.info(
        "Exported %d backbone tensors to %s (+ %s); settings: %s",
        len(weights), path, yaml_path, {k: v for k, v in settings.items()},
    )
    return {
        "path": path,
        "yaml": yaml_path,
        "num_tensors": len(weights),
        "dropped": dropped,
        "settings": settings,
    }


def _load_checkpoint(path):
    """Loads a trainer checkpoint (``model_final.pth``) or a bare state dict on the CPU."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Trainer checkpoints may hold plain-Python extras outside the weights_only allow-list;
        # this is the user's own training output, so a full unpickle is acceptable.
        logger.info("%s is not weights_only-loadable; loading it with full unpickling", path)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and "model" in ckpt:
        iteration = ckpt.get("iteration")
        if iteration is None and isinstance(ckpt.get("trainer"), dict):
            iteration = ckpt["trainer"].get("iteration")
        return ckpt["model"], iteration
    return ckpt, None


def _load_cfg(config_file):
    """Merges the pre-training run's ``config.yaml`` into a fresh config."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_montage_config(cfg)
    # Keys added by later versions of the project are irrelevant here: only stock keys are read.
    cfg.set_new_allowed(True)
    cfg.merge_from_file(config_file, allow_unsafe=True)
    return cfg


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
    cfg = _load_cfg(args.config_file)
    state_dict, iteration = _load_checkpoint(args.checkpoint)
    summary = export_backbone(state_dict, cfg, args.out, iteration=iteration)
    print(f"wrote {summary['path']} ({summary['num_tensors']} tensors, iteration {iteration})")
    print(f"wrote {summary['yaml']}")
    overrides = settings_to_overrides(summary["settings"], summary["path"])
    print("fine-tune with:  --weights-config " + summary["yaml"])
    print("            or:  " + format_opts(overrides))
    return summary


if __name__ == "__main__":
    main()

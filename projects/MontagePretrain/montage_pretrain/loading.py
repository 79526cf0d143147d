"""
Checked loading of a pre-trained backbone into a Detectron2 detector.

:func:`read_checked_weights` fails before anything is built on weights that would train a
broken model silently (missing file, FrozenBN from random init, an export whose pixel format
or ResNet shape differs from the config) and returns the export it read.

Detectron2 only warns about missing keys, and FrozenBN silently fills absent running statistics
with 0/1. :func:`load_and_verify` turns that into an error: every backbone tensor of the
detector (``backbone.*`` and, for C4, ``roi_heads.res5.*``; ``backbone.bottom_up.*`` for FPN, plus
``backbone.fpn_*`` when the file carries a pre-trained pyramid) must come from the file. Given an :class:`~montage_pretrain.export_format.ExportFile` it loads
from that in-memory copy instead of unpickling the file again.

Detectron2 reads a ``.pkl`` with plain ``pickle.load``, which runs whatever code the file names;
:class:`ExportCheckpointer` reads every ``.pkl`` with the restricted reader of
:func:`~montage_pretrain.export_format.read_export` and every other file with
``torch.load(weights_only=True)``, passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
cannot turn it off. :func:`use_safe_checkpointer` puts one in place of a trainer's own, so that
``MODEL.WEIGHTS`` and ``--resume`` (``OUTPUT_DIR/last_checkpoint`` may name any file) are read
the same way.
"""
import logging
import os
import re

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from .export_format import (
    PYRAMID_PREFIXES,
    ExportFile,
    WeightFileError,
    check_export_settings,
    read_export,
)

__all__ = [
    "read_checked_weights",
    "check_weights_path",
    "torch_load_weights_only",
    "ExportCheckpointer",
    "use_safe_checkpointer",
    "backbone_keys",
    "load_and_verify",
]

logger = logging.getLogger(__name__)


def read_checked_weights(cfg):
    """
    Checks ``MODEL.WEIGHTS`` of a fine-tuning config before the model is built.

    Args:
        cfg (CfgNode): the fine-tuning config.

    Returns:
        ExportFile or None: the local ``.pkl`` read for the check (load it with
        :func:`load_and_verify` so it is not read again); None when nothing was read.

    Raises:
        ValueError: FrozenBN without weights, or an export that does not match ``cfg``
            (:func:`~montage_pretrain.export_format.check_export_settings`).
        FileNotFoundError: a local ``MODEL.WEIGHTS`` that does not exist.
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights and cfg.MODEL.RESNETS.NORM == "FrozenBN":
        raise ValueError(
            "MODEL.RESNETS.NORM is FrozenBN but MODEL.WEIGHTS is empty: frozen identity BN "
            "diverges from random init. Pass MODEL.WEIGHTS <export.pkl>, or use a scratch config "
            "(MODEL.RESNETS.NORM GN or BN, MODEL.BACKBONE.FREEZE_AT 0)."
        )
    check_weights_path(weights)
    if not (weights.endswith(".pkl") and os.path.isfile(weights)):
        return None
    export = read_export(weights)
    check_export_settings(cfg, export)
    return export


def check_weights_path(weights):
    """
    Raises FileNotFoundError (one line, with the fix) when ``weights`` names a local file that
    does not exist; URLs and ``""`` pass. Cheap: entry points call it before writing anything.
    """
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS {weights} does not exist; export the pre-trained backbone first "
            "(python -m montage_pretrain.export ...) or pass MODEL.WEIGHTS <path>."
        )


def _torch_load_reason(error):
    """The one informative phrase of a torch.load error (its messages span many lines)."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it names {found.group(1)}; only a full unpickle builds that, and one can run code"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def torch_load_weights_only(path, fix):
    """
    ``torch.load(path, weights_only=True)`` on the CPU: tensors, containers and plain values
    only, so nothing in the file runs.

    Args:
        path (str): a local ``.pth`` file.
        fix (str): what the user should do instead, named in the error.

    Raises:
        WeightFileError: one line naming ``path``, why it is refused and ``fix``.
    """
    try:
        # weights_only explicit: no torch default or environment variable turns it off here.
        return torch.load(path, map_location=torch.device("cpu"), weights_only=True)
    except OSError:
        raise
    except Exception as e:  # refused globals, corrupt or non-torch files
        raise WeightFileError(
            f"{path} is not loadable with torch.load(weights_only=True): "
            f"{_torch_load_reason(e)}. Fix: {fix}."
        ) from e


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def backbone_keys(model, pyramid=False):
    """
    Returns the state-dict names of the detector's pre-trainable backbone.

    That is the bottom-up network: ``backbone.bottom_up.*`` under an FPN, else ``backbone.*``,
    plus ``roi_heads.res5.*`` of a C4 model (its res5 stage lives in the ROI head); with
    ``pyramid``, an FPN's own layers too (``backbone.fpn_*``, ``backbone.top_block.*``).
    ``num_batches_tracked`` counters are left out.
    """
    model = _unwrap(model)
    names = list(model.state_dict().keys())
    fpn = hasattr(model.backbone, "bottom_up")
    prefixes = ("backbone.bottom_up." if fpn else "backbone.", "roi_heads.res5.")
    if pyramid and fpn:
        prefixes += tuple("backbone." + p for p in PYRAMID_PREFIXES)
    keys = [k for k in names if k.startswith(prefixes)]
    return [k for k in keys if not k.endswith("num_batches_tracked")]


class ExportCheckpointer(DetectionCheckpointer):
    """
    A DetectionCheckpointer that reads weight files without running code in them, reads an
    already-read export from memory, and keeps the name-aligned weights it loaded, for checking.

    Args:
        model (nn.Module): as for :class:`DetectionCheckpointer`.
        export (ExportFile or None): loading ``export.path`` uses ``export.checkpoint`` instead
            of reading the file again; other ``.pkl`` files are read by
            :func:`~montage_pretrain.export_format.read_export`, ``.pth`` files by
            ``torch.load(weights_only=True)``.
    """

    def __init__(self, model, save_dir="", *, export=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.export = export
        self.aligned = None
        self.skipped_shapes = ()
        self.file_keys = ()

    def _load_file(self, filename):
        export = self.export
        if export is not None and os.path.realpath(filename) == os.path.realpath(export.path):
            self.logger.info("Reading a file from '%s' (already in memory)",
                             export.checkpoint.get("__author__"))
            # Loading replaces the "model" dict's entries: copy it, keep the export intact.
            return dict(export.checkpoint, model=dict(export.checkpoint["model"]))
        if filename.endswith(".pkl"):
            # DetectionCheckpointer would pickle.load it; read_export makes the same dict of it.
            return read_export(filename).checkpoint
        if filename.endswith(".pyth"):
            # pycls checkpoints: DetectionCheckpointer reads them with a bare torch.load.
            data = self._torch_load(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise WeightFileError(f"{filename}: a .pyth (pycls) checkpoint holds "
                                      "'model_state'; this one does not. Fix: pass the right file.")
            state = {k: v for k, v in data["model_state"].items()
                     if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f):
        return torch_load_weights_only(
            f, "pass a .pkl export (python -m montage_pretrain.export) or a checkpoint of "
               "tensors and plain values"
        )

    def _load_model(self, checkpoint):
        self.file_keys = tuple(checkpoint["model"])  # the file's own names, before alignment
        if checkpoint.get("matching_heuristics", False):
            # Same as DetectionCheckpointer._load_model, done here to keep the aligned dict.
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(
                self.model.state_dict(),
                checkpoint["model"],
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2",
            )
            checkpoint["matching_heuristics"] = False
        else:
            self._convert_ndarray_to_tensor(checkpoint["model"])
        self.aligned = dict(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        self.skipped_shapes = tuple(k for k, _, _ in incompatible.incorrect_shapes)
        return incompatible


def use_safe_checkpointer(trainer):
    """
    Replaces a Detectron2 ``DefaultTrainer``'s checkpointer (and the periodic checkpointer hook's)
    by an :class:`ExportCheckpointer` with the same model, folder and checkpointables: loading
    ``MODEL.WEIGHTS`` or resuming from ``OUTPUT_DIR/last_checkpoint`` then runs no code from the
    file (Detectron2's own would ``pickle.load`` a ``.pkl`` and, under
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, fully unpickle a ``.pth``). Saving is unchanged.

    Returns:
        ExportCheckpointer: the new ``trainer.checkpointer``.
    """
    old = trainer.checkpointer
    new = ExportCheckpointer(old.model, old.save_dir, save_to_disk=old.save_to_disk,
                             **old.checkpointables)
    trainer.checkpointer = new
    for hook in getattr(trainer, "_hooks", []):
        if getattr(hook, "checkpointer", None) is old:
            hook.checkpointer = new
    return new


def _describe(keys, limit=12):
    """Lists a few keys, or groups many as ``backbone.bottom_up.res5.*.weight x8``."""
    if len(keys) <= limit:
        return ", ".join(keys)
    groups = {}
    for key in keys:
        for prefix in ("backbone.bottom_up.", "backbone.", "roi_heads.", ""):
            if key.startswith(prefix):
                break
        parts = key[len(prefix):].split(".")
        name = f"{prefix}{parts[0]}.*.{parts[-1]}" if len(parts) > 2 else key
        groups[name] = groups.get(name, 0) + 1
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in groups.items())


def load_and_verify(model, weights):
    """
    Loads weights into a detector and checks every backbone tensor came from them.

    A path is read by :class:`DetectionCheckpointer` (``matching_heuristics`` suffix matching
    for bare-named exports); an :class:`ExportFile` is loaded from memory. A backbone tensor
    counts as loaded when a file tensor was matched to it, had the right shape, and the model
    now holds exactly that value. Heads and RPN staying random is expected; so is the FPN,
    unless the file carries a pre-trained pyramid (``fpn_*`` tensors, e.g. a
    ``MontageFPNClassifier`` export): then every ``backbone.fpn_*`` / ``backbone.top_block.*``
    tensor of an FPN detector must come from the file too.

    Args:
        model (nn.Module): a Detectron2 detector (``backbone`` attribute), DDP-wrapped or not.
        weights (str or ExportFile): the weight file (``.pkl`` export, ``.pth``, ...), or the
            export :func:`~montage_pretrain.export_format.read_export` already read.

    Returns:
        dict: ``{"loaded": int, "total": int, "not_loaded": list[str], "unused": list[str],
        "pyramid": bool}`` (pyramid: the file's FPN tensors were required too).

    Raises:
        RuntimeError: some backbone tensor was not filled from the file.
    """
    model = _unwrap(model)
    export = weights if isinstance(weights, ExportFile) else None
    path = export.path if export is not None else weights
    checkpointer = ExportCheckpointer(model, save_to_disk=False, export=export)
    checkpointer.load(path, checkpointables=[])
    aligned = checkpointer.aligned or {}
    state = model.state_dict()
    pyramid = any(str(k).startswith("fpn_") for k in checkpointer.file_keys)
    keys = backbone_keys(model, pyramid=pyramid)
    not_loaded = []
    for key in keys:
        src = aligned.get(key)
        if src is None or key in checkpointer.skipped_shapes:
            not_loaded.append(key)
            continue
        if not isinstance(src, torch.Tensor):
            src = torch.as_tensor(np.asarray(src))
        dst = state[key]
        if tuple(src.shape) != tuple(dst.shape) or not torch.equal(
            src.to(device=dst.device, dtype=dst.dtype), dst
        ):
            not_loaded.append(key)
    model_keys = set(state)
    unused = sorted(k for k in aligned if k not in model_keys)
    loaded = len(keys) - len(not_loaded)
    summary = {"loaded": loaded, "total": len(keys), "not_loaded": not_loaded, "unused": unused,
               "pyramid": pyramid and any(k.startswith("backbone.fpn_") for k in keys)}
    logger.info(
        "loaded %d/%d backbone tensors from %s; not loaded: %s", loaded, len(keys), path,
        _describe(not_loaded) if not_loaded else "none",
    )
    if unused:
        logger.info("File tensors not used by this detector (%d): %s", len(unused),
                    _describe(unused))
    if not keys:
        raise RuntimeError(f"The detector has no backbone tensors to load ({type(model)})")
    if not_loaded:
        raise RuntimeError(
            f"Only {loaded}/{len(keys)} backbone tensors were loaded from {path}; "
            f"not loaded: {_describe(not_loaded)}. The backbone would train from random init. "
            "Check that the "
            "file is a backbone export for this depth/width (MODEL.RESNETS.*; MODEL.FPN.* for a "
            "pyramid export), that it has the __author__ and matching_heuristics fields, and the "
            "weights-config overrides."
        )
    return summary

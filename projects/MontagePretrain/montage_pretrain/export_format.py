"""
The file format of a Montage backbone export and the settings contract it carries.

An export is what ``tools/convert-torchvision-to-d2.py`` writes, plus one key: a pickle
``{"model": {bare name: np.ndarray}, "__author__": "MontagePretrain", "matching_heuristics": True,
"montage": settings}``. ``settings`` (:func:`export_settings`) are the config values fine-tuning
must match: pixel mean/std, input format, ResNet shape and stride placement, norm, backbone name,
plus ``format_version`` and the pre-training ``iteration``; a pyramid export
(``MontageFPNClassifier``, whose ``model`` also holds ``fpn_*`` tensors) adds the FPN's shape,
norm and fusion (:data:`PYRAMID_SETTING_KEYS`). Everything else derives from them:

* the ``<export>.pkl.yaml`` sidecar (:func:`sidecar_yaml`): the same settings as fine-tuning
  config overrides (:func:`settings_to_overrides`), merged with ``--weights-config``;
* the check of a fine-tuning config against an export (:func:`check_export_settings`), whose
  error names the fix as ``KEY VALUE`` pairs (:func:`format_opts`).

:func:`read_export` unpickles a weight file once; :mod:`montage_pretrain.loading` loads the
weights from that in-memory copy, so a fine-tuning run reads the file a single time. Unpickling
can run code, so weight files are read by a restricted unpickler (:func:`load_weight_pickle`)
that builds only what a weight file holds: dicts, lists, strings, numbers and numpy arrays.
"""
import logging
import math
import os
import pickle
import shlex
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import yaml

from detectron2.config import CfgNode

from .config import add_montage_config

__all__ = [
    "FORMAT_VERSION",
    "AUTHOR",
    "SETTING_KEYS",
    "PYRAMID_SETTING_KEYS",
    "PYRAMID_META_ARCH",
    "PYRAMID_PREFIXES",
    "BN_NORMS",
    "SIDECAR_SUFFIX",
    "default_export_name",
    "is_pyramid_cfg",
    "export_settings",
    "settings_to_overrides",
    "format_opts",
    "sidecar_yaml",
    "WeightFileError",
    "load_weight_pickle",
    "ExportFile",
    "read_export",
    "check_export_settings",
]

logger = logging.getLogger(__name__)

# Version of the "montage" settings dict stored in the export.
FORMAT_VERSION = 1
# "__author__" of an export: with "model" it makes DetectionCheckpointer read the file as
# Detectron2 format (without it a .pkl is taken for Caffe2 blobs).
AUTHOR = "MontagePretrain"
# Config keys fine-tuning must match, recorded in the export's "montage" dict.
SETTING_KEYS = (
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "INPUT.FORMAT",
    "MODEL.RESNETS.STRIDE_IN_1X1",
    "MODEL.RESNETS.DEPTH",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "MODEL.RESNETS.NUM_GROUPS",
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "MODEL.RESNETS.NORM",
    "MODEL.BACKBONE.NAME",
)
# Pre-training meta-architecture whose export carries the feature pyramid too.
PYRAMID_META_ARCH = "MontageFPNClassifier"
# What a stock FPN detector must match to take a pre-trained pyramid: the tensors' shapes
# (IN_FEATURES, OUT_CHANNELS, NORM) and how the top-down pathway combines them (FUSE_TYPE).
PYRAMID_SETTING_KEYS = (
    "MODEL.FPN.IN_FEATURES",
    "MODEL.FPN.OUT_CHANNELS",
    "MODEL.FPN.NORM",
    "MODEL.FPN.FUSE_TYPE",
)
# Bare names of an FPN's own layers in an export (Detectron2's FPN: fpn_lateral<s>,
# fpn_output<s>, top_block); the bottom-up network keeps its ResNet names.
PYRAMID_PREFIXES = ("fpn_", "top_block.")
# BN-family norms share the (weight, bias, running_mean, running_var) layout and hand over
# to FrozenBN; GN carries no running statistics.
BN_NORMS = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN", "FrozenBN")
# The fine-tuning overrides are written next to the export as <export>.pkl.yaml.
SIDECAR_SUFFIX = ".yaml"
# Which fine-tuning configs suit an export's norm family (named in the norm-mismatch error).
_NORM_CONFIGS = {"BN": "configs/finetune/*_montage.yaml (FrozenBN)",
                 "GN": "configs/finetune/*_montage_gn.yaml (GN)"}
# Settings compared only when both sides build a ResNet.
_RESNET_KEYS = tuple(
    k for k in SETTING_KEYS if k.startswith("MODEL.RESNETS.") and k != "MODEL.RESNETS.NORM"
)


def default_export_name():
    """Returns the default ``MONTAGE.EXPORT_NAME``: the file name pre-training exports to."""
    cfg = CfgNode()
    add_montage_config(cfg)
    return cfg.MONTAGE.EXPORT_NAME


def is_pyramid_cfg(cfg):
    """True when the pre-training ``cfg`` trains backbone + pyramid (MontageFPNClassifier): its
    export then carries the FPN tensors and :data:`PYRAMID_SETTING_KEYS`."""
    return cfg.MODEL.META_ARCHITECTURE == PYRAMID_META_ARCH


def _cfg_get(cfg, dotted, default=None):
    """Returns ``cfg.A.B.C`` for ``"A.B.C"``, or ``default`` when a level is absent."""
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return default
        node = node[part]
    return node


def _to_plain(value):
    """Turns yacs values (tuples, numpy scalars) into plain YAML/pickle-friendly values."""
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
def export_settings(cfg, iteration=None):
    """
    Returns the settings fine-tuning must match, read from the pre-training ``cfg``.

    Args:
        cfg (CfgNode): the pre-training config.
        iteration (int or None): the pre-training iteration of the weights, if known.

    Returns:
        dict: dotted config key -> value, plus ``format_version`` and ``iteration``.
    """
    settings = {key: _to_plain(_cfg_get(cfg, key)) for key in SETTING_KEYS}
    if is_pyramid_cfg(cfg):
        settings.update({key: _to_plain(_cfg_get(cfg, key)) for key in PYRAMID_SETTING_KEYS})
    if "regnet" in str(settings["MODEL.BACKBONE.NAME"]).lower():
        settings["MONTAGE.REGNET"] = _cfg_get(cfg, "MONTAGE.REGNET")
    settings["format_version"] = FORMAT_VERSION
    settings["iteration"] = None if iteration is None else int(iteration)
    return settings


def settings_to_overrides(settings, weights_path=None):
    """
    Returns the fine-tuning config overrides implied by export ``settings``.

    A BN-family pre-training norm becomes ``FrozenBN`` (the paper freezes BN at the detection
    stage); GN stays GN. The backbone name is not set: C4 or FPN is the fine-tuning choice.

    Args:
        settings (dict): from :func:`export_settings`.
        weights_path (str or None): written as ``MODEL.WEIGHTS`` when given.

    Returns:
        dict: dotted key -> value, in a fixed order.
    """
    overrides = OrderedDict()
    is_resnet = "resnet" in str(settings.get("MODEL.BACKBONE.NAME", "resnet"))
    for key in SETTING_KEYS:
        if key in ("MODEL.BACKBONE.NAME", "MODEL.RESNETS.NORM") or settings.get(key) is None:
            continue
        if key.startswith("MODEL.RESNETS.") and not is_resnet:
            continue  # the ResNet shape keys do not apply (e.g. RegNet: MONTAGE.REGNET)
        overrides[key] = settings[key]
    norm = settings.get("MODEL.RESNETS.NORM")
    if norm:
        overrides["MODEL.RESNETS.NORM"] = "FrozenBN" if norm in BN_NORMS else norm
    for key in PYRAMID_SETTING_KEYS:  # a pyramid export only
        if key in settings:
            value = settings[key]
            overrides[key] = "FrozenBN" if key == "MODEL.FPN.NORM" and value in BN_NORMS else value
    if settings.get("MONTAGE.REGNET"):
        overrides["MONTAGE.REGNET"] = settings["MONTAGE.REGNET"]
    if weights_path:
        overrides["MODEL.WEIGHTS"] = weights_path
    return overrides


def format_opts(overrides):
    """
    Formats dotted overrides as shell-ready ``KEY VALUE`` pairs for Detectron2's ``opts``.

    Example: ``MODEL.PIXEL_MEAN '[123.675, 116.28, 103.53]' INPUT.FORMAT RGB``.
    """
    parts = []
    for key, value in overrides.items():
        text = str(list(value)) if isinstance(value, (list, tuple)) else str(value)
        parts.append(f"{key} {shlex.quote(text)}")
    return " ".join(parts)


def _nest(dotted_items):
    """``{"A.B": 1}`` -> ``{"A": {"B": 1}}``."""
    root = {}
    for key, value in dotted_items.items():
        node = root
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return root


def sidecar_yaml(settings, path):
    """
    Returns the text of ``<path>.yaml``: the fine-tuning overrides of ``settings`` as a config.

    Args:
        settings (dict): from :func:`export_settings`.
        path (str): the export's ``.pkl`` path, written (absolute) as ``MODEL.WEIGHTS``.
    """
    overrides = settings_to_overrides(settings, os.path.abspath(path))
    header = (
        "# Fine-tuning overrides for the Montage export {}\n"
        "# (pre-training iteration: {}). Merge after the detector config, e.g.\n"
        "#   projects/MontagePretrain/finetune_net.py --config-file CFG --weights-config {}\n"
        "# or pass the KEY VALUE pairs on the command line.\n"
    ).format(os.path.basename(path), settings.get("iteration"), path + SIDECAR_SUFFIX)
    return header + yaml.safe_dump({**_nest(overrides), "VERSION": 2}, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class WeightFileError(ValueError):
    """A weight file that is not one (or would run code when read): one line, file and fix."""


# The fix named by every weight-file error.
_WEIGHTS_FIX = (
    "Fix: pass a Detectron2 .pkl of numpy arrays (python -m montage_pretrain.export writes "
    "one; Detectron2 model-zoo and MSRA .pkl files are of this kind)"
)
# The only globals a weight pickle may name: the containers and numpy array pieces that
# Detectron2 / MSRA / torchvision-converted .pkl files and our exports are made of. Each of them
# builds data and nothing else; any other global (builtins.exec, os.system, torch's rebuild
# functions, ...) could run code.
_ALLOWED_GLOBALS = frozenset([
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in protocol 0-2 pickles written by Python 3
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),  # ndarray, protocol <= 4
    ("numpy._core.multiarray", "scalar"),  # numpy scalars (np.float32(1.0))
    ("numpy._core.numeric", "_frombuffer"),  # ndarray, protocol 5
])
# numpy < 2 wrote numpy.core.*, numpy >= 2 writes numpy._core.* (same functions).
_NUMPY_RENAMES = {"numpy.core.multiarray": "numpy._core.multiarray",
                  "numpy.core.numeric": "numpy._core.numeric"}


class _WeightUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside :data:`_ALLOWED_GLOBALS`."""

    def __init__(self, file, path):
        # latin1: Python 2 pickles (MSRA / Detectron1 blobs) hold numpy buffers as str.
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module, name):
        canonical = _NUMPY_RENAMES.get(module, module)
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise WeightFileError(
                f"{self.path}: refusing to unpickle {module}.{name} (a weight file holds only "
                "dicts, lists, strings, numbers and numpy arrays; anything else can run code "
                f"when unpickled). {_WEIGHTS_FIX}, converted from this file only if you trust it."
            )
        try:
            return super().find_class(canonical, name)
        except ImportError:  # numpy < 2 has no numpy._core
            return super().find_class(canonical.replace("numpy._core", "numpy.core"), name)


def load_weight_pickle(path):
    """
    Unpickles a weight file with the restricted unpickler; nothing in the file can run code.

    Args:
        path (str): a local ``.pkl`` file.

    Returns:
        object: what the file holds (built from :data:`_ALLOWED_GLOBALS` and plain values).

    Raises:
        WeightFileError: a forbidden global, or a file that is not a readable pickle.
    """
    with open(path, "rb") as f:
        try:
            return _WeightUnpickler(f, path).load()
        except WeightFileError:
            raise
        except Exception as e:  # garbage and truncated files fail in many ways inside pickle
            reason = str(e).splitlines()[0] if str(e) else ""
            raise WeightFileError(
                f"{path} is not a readable weight pickle ({type(e).__name__}: {reason}). "
                f"{_WEIGHTS_FIX}."
            ) from e


def _check_weights(path, weights):
    """Every weight must be a numeric numpy array, as DetectionCheckpointer needs them."""
    if not isinstance(weights, dict) or not weights:
        raise WeightFileError(f"{path} holds no weights (an empty or non-dict 'model'). "
                              f"{_WEIGHTS_FIX}.")
    for key, value in weights.items():
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            kind = f"an array of {value.dtype}" if isinstance(value, np.ndarray) else (
                f"a {type(value).__name__}")
            raise WeightFileError(
                f"{path} is not a weight file: {key!r} is {kind}, not a numpy array of numbers. "
                f"{_WEIGHTS_FIX}."
            )


@dataclass(frozen=True)
class ExportFile:
    """
    A ``.pkl`` weight file read into memory.

    Attributes:
        path (str): the file, as given to :func:`read_export`.
        checkpoint (dict): ``{"model", "__author__", "matching_heuristics", ...}``, i.e. what
            ``DetectionCheckpointer._load_file`` makes of the file. Treat it as read-only.
        settings (dict or None): the ``"montage"`` settings; None for any other weight file
            (MSRA, torchvision conversions, Caffe2 blobs).
    """

    path: str
    checkpoint: dict
    settings: dict = None

    @property
    def weights(self):
        """dict[str, np.ndarray]: the weights under their (bare) file names."""
        return self.checkpoint["model"]


def read_export(path):
    """
    Reads a ``.pkl`` weight file once, safely: weights plus, for a Montage export, its settings.

    The file is unpickled by :func:`load_weight_pickle` (no code runs) and then interpreted as
    ``DetectionCheckpointer`` interprets a ``.pkl``: a dict with ``model`` and ``__author__`` is
    Detectron2 format; anything else is taken for Caffe2 / Detectron1 blobs (``_momentum``
    entries dropped, ``matching_heuristics`` set). Every weight must be a numeric numpy array.

    Args:
        path (str): a local ``.pkl`` file, e.g. ``MODEL.WEIGHTS``.

    Returns:
        ExportFile: ``settings`` is None unless the file is a Montage export.

    Raises:
        WeightFileError: not a weight file, or one that would run code (one line).
    """
    if not path.endswith(".pkl"):
        raise ValueError(f"{path}: read_export reads .pkl weight files (Detectron2 format)")
    data = load_weight_pickle(path)
    if not isinstance(data, dict):
        raise WeightFileError(
            f"{path} holds a {type(data).__name__}, not a dict of weights. {_WEIGHTS_FIX}."
        )
    if "model" in data and "__author__" in data:
        checkpoint = data
    else:  # same conversion as DetectionCheckpointer._load_file
        blobs = data.get("blobs", data)
        if not isinstance(blobs, dict):
            blobs = {"blobs": blobs}  # reported by _check_weights
        checkpoint = {
            "model": {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")},
            "__author__": "Caffe2",
            "matching_heuristics": True,
        }
    _check_weights(path, checkpoint["model"])
    settings = data.get("montage")
    return ExportFile(path, checkpoint, settings if isinstance(settings, dict) else None)


# ---------------------------------------------------------------------------------------------
# Checking a fine-tuning config
# ---------------------------------------------------------------------------------------------
def _backbone_family(name):
    """``build_resnet_fpn_backbone`` -> ``resnet``: C4/FPN wrappers share the bottom-up net."""
    name = str(name or "")
    for piece in ("build_", "_fpn", "_backbone"):
        name = name.replace(piece, "")
    return name


def _same(a, b):
    """Compares config values; float sequences with a tolerance."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-4)
        except (TypeError, ValueError):
            return False
    return a == b


def _fmt(value):
    return str(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def _norm_family(norm):
    """BN-family norms hand over to one another (FrozenBN included); others only to themselves."""
    return "BN" if norm in BN_NORMS else (norm or "none")


def _pyramid_mismatches(cfg, settings):
    """(mismatch texts, keys off) of an FPN detector ``cfg`` against a pyramid export."""
    mismatches, keys_off = [], []
    for key in PYRAMID_SETTING_KEYS:
        if key not in settings:
            continue
        want, have = settings[key], _cfg_get(cfg, key)
        if key == "MODEL.FPN.NORM":
            off = _norm_family(have) != _norm_family(want)
        else:
            off = not _same(have, want)
        if off:
            mismatches.append(f"{key} is {_fmt(have)} in the config but {_fmt(want)} in the "
                              "export's pre-trained pyramid")
            keys_off.append(key)
    return mismatches, keys_off


def check_export_settings(cfg, export):
    """
    Checks that a fine-tuning ``cfg`` matches the settings recorded in a Montage export.

    Files without settings (MSRA, torchvision conversions, full checkpoints) are not checked.
    Norms are compared by family: a BN/SyncBN pre-training hands over to BN/SyncBN/FrozenBN,
    a GN one only to GN. A pyramid export given to an FPN detector must also match its
    :data:`PYRAMID_SETTING_KEYS` (the FPN norm by family, as above).

    Args:
        cfg (CfgNode): the fine-tuning config.
        export (ExportFile): from :func:`read_export` on ``MODEL.WEIGHTS``.

    Returns:
        dict or None: the export's settings, or None when the file has none.

    Raises:
        ValueError: one line naming each mismatching key, both values and the fix.
    """
    settings = export.settings
    if settings is None:
        return None
    family = _backbone_family(settings.get("MODEL.BACKBONE.NAME"))
    mismatches, keys_off = [], []
    cfg_family = _backbone_family(cfg.MODEL.BACKBONE.NAME)
    if family and cfg_family != family:
        mismatches.append(
            f"MODEL.BACKBONE.NAME is {cfg.MODEL.BACKBONE.NAME!r} in the config but the export is "
            f"a {settings.get('MODEL.BACKBONE.NAME')!r} backbone"
        )
    keys = ["MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT"]
    if family == "resnet":
        keys += list(_RESNET_KEYS)
    if "MONTAGE.REGNET" in settings:
        keys.append("MONTAGE.REGNET")
    for key in keys:
        if key not in settings or settings[key] is None:
            continue
        have = _cfg_get(cfg, key)
        if not _same(have, settings[key]):
            mismatches.append(
                f"{key} is {_fmt(have)} in the config but {_fmt(settings[key])} in the export"
            )
            keys_off.append(key)
    want_norm = settings.get("MODEL.RESNETS.NORM")
    have_norm = cfg.MODEL.RESNETS.NORM
    if want_norm and (want_norm in BN_NORMS) != (have_norm in BN_NORMS):
        # A BN export carries running statistics a GN layer has no place for, and a GN export
        # lacks the statistics a BN/FrozenBN layer needs: no tensor-by-tensor fix exists.
        mismatches.append(
            f"MODEL.RESNETS.NORM is {have_norm!r} in the config but the export was pre-trained "
            f"with {want_norm!r}"
        )
        keys_off.append("MODEL.RESNETS.NORM")
    elif want_norm and want_norm not in BN_NORMS and have_norm != want_norm:
        mismatches.append(
            f"MODEL.RESNETS.NORM is {have_norm!r} in the config but {want_norm!r} in the export"
        )
        keys_off.append("MODEL.RESNETS.NORM")
    if "fpn" in str(cfg.MODEL.BACKBONE.NAME).lower():
        # A pyramid export's fpn_* tensors fill the detector's FPN only at the same shape, norm
        # and fusion; a C4 detector does not use them (backbone-only exports have no such keys).
        more, off = _pyramid_mismatches(cfg, settings)
        mismatches += more
        keys_off += off
    if mismatches:
        overrides = settings_to_overrides(settings)
        fix = format_opts({k: overrides[k] for k in keys_off if k in overrides})
        if "MODEL.RESNETS.NORM" in keys_off:
            family_norm = "BN" if want_norm in BN_NORMS else "GN"
            fix += (f" (or use a detector config of the export's norm: {want_norm} export -> "
                    f"{_NORM_CONFIGS[family_norm]})")
        raise ValueError(
            f"{export.path} does not match the fine-tuning config: " + "; ".join(mismatches)
            + f". Fix: pass --weights-config {export.path}{SIDECAR_SUFFIX}"
            + (f", or set {fix}" if fix.strip() else "")
        )
    logger.info(
        "Pixel format and backbone shape match the export %s (pre-training iteration %s)",
        export.path, settings.get("iteration"),
    )
    return settings

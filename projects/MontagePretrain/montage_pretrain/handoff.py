"""
The fine-tuning side of the hand-off: datasets, configs and checked weight loading.

Three checks turn the usual silent failures of loading a pre-trained backbone into errors:

* :func:`check_pixel_format`: the detector config must normalise and shape the network like
  the pre-training did (pixel mean/std, RGB/BGR, STRIDE_IN_1X1, depth, width, norm);
* :func:`load_and_verify`: every backbone tensor of the detector (``backbone.*`` and, for C4,
  ``roi_heads.res5.*``; ``backbone.bottom_up.*`` for FPN) must come from the file. Detectron2 only
  warns about missing keys, and FrozenBN silently fills absent running statistics with 0/1;
* :func:`register_coco_dataset`: missing files fail at registration with the path and the fix.

:func:`merge_config_file` lets a YAML inherit a stock model-zoo config with
``_BASE_: "model_zoo://COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"``: the stock configs live
inside the installed ``detectron2`` package, whose location a relative ``_BASE_`` cannot know.
"""
import importlib.util
import logging
import math
import os
import pickle

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.config import CfgNode

from .export import BN_NORMS, SETTING_KEYS, _cfg_get, format_opts, settings_to_overrides

__all__ = [
    "MODEL_ZOO_PREFIX",
    "resolve_model_zoo_path",
    "merge_config_file",
    "register_coco_dataset",
    "read_montage_settings",
    "check_pixel_format",
    "backbone_keys",
    "load_and_verify",
]

logger = logging.getLogger(__name__)

MODEL_ZOO_PREFIX = "model_zoo://"
# Settings compared only when both sides build a ResNet.
_RESNET_KEYS = tuple(
    k for k in SETTING_KEYS if k.startswith("MODEL.RESNETS.") and k != "MODEL.RESNETS.NORM"
)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def resolve_model_zoo_path(path):
    """
    Maps ``model_zoo://REL`` (also after being joined to a folder by ``_BASE_`` resolution) to
    the stock config file ``REL`` inside the installed ``detectron2/model_zoo/configs``.
    Other paths are returned unchanged.
    """
    if MODEL_ZOO_PREFIX not in path:
        return path
    rel = path.split(MODEL_ZOO_PREFIX, 1)[1]
    # find_spec locates the package without importing it (its import pulls in pkg_resources).
    spec = importlib.util.find_spec("detectron2.model_zoo")
    full = os.path.join(list(spec.submodule_search_locations)[0], "configs", rel)
    if not os.path.isfile(full):
        raise FileNotFoundError(
            f"{MODEL_ZOO_PREFIX}{rel}: no such stock config in {os.path.dirname(full)}; "
            "check the name against detectron2/model_zoo/configs."
        )
    return full


class _ModelZooCfgNode(CfgNode):
    """A CfgNode whose ``_BASE_`` may name a stock config as ``model_zoo://REL``."""

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        return super().load_yaml_with_base(resolve_model_zoo_path(filename), allow_unsafe)


def merge_config_file(cfg, path, allow_unsafe=True):
    """
    Merges a YAML config into ``cfg`` like ``cfg.merge_from_file``, resolving ``model_zoo://``.

    Args:
        cfg (CfgNode): e.g. ``get_cfg()`` with ``add_montage_config`` applied.
        path (str): YAML file; its ``_BASE_`` chain may use ``model_zoo://`` and relative paths.
    """
    if not os.path.isfile(path) and MODEL_ZOO_PREFIX not in path:
        raise FileNotFoundError(f"Config file not found: {path}")
    loaded = _ModelZooCfgNode.load_yaml_with_base(path, allow_unsafe=allow_unsafe)
    loaded = type(cfg)(loaded)
    if loaded.get("VERSION", cfg.VERSION) != cfg.VERSION:
        raise ValueError(
            f"{path} has VERSION {loaded.VERSION}, expected {cfg.VERSION}; "
            "use cfg.merge_from_file for legacy configs."
        )
    cfg.merge_from_other_cfg(loaded)
    return cfg


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
def register_coco_dataset(name, json_file, image_root):
    """
    Registers a COCO-format instance dataset under ``name`` (idempotent).

    Args:
        name (str): dataset name for ``DATASETS.TRAIN/TEST``.
        json_file (str): ``instances_*.json``.
        image_root (str): folder the json's ``file_name`` entries are relative to.

    Raises:
        FileNotFoundError: the json or the image folder is missing.
        ValueError: ``name`` is already registered with other paths.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"COCO annotation file not found: {json_file} (dataset {name!r}); pass an existing "
            "instances_*.json (--train-json/--val-json), or write the toy set with `make toy`."
        )
    if not os.path.isdir(image_root):
        raise FileNotFoundError(
            f"Image folder not found: {image_root} (dataset {name!r}); pass the folder holding "
            "the json's file_name entries (--train-images/--val-images)."
        )
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        same = os.path.abspath(meta.get("json_file", "")) == os.path.abspath(json_file) and (
            os.path.abspath(meta.get("image_root", "")) == os.path.abspath(image_root)
        )
        if same:
            return name
        raise ValueError(
            f"Dataset {name!r} is already registered with json_file={meta.get('json_file')!r}, "
            f"image_root={meta.get('image_root')!r}; choose another name (--dataset-name)."
        )
    register_coco_instances(name, {}, json_file, image_root)
    return name


# ---------------------------------------------------------------------------------------------
# Pixel format
# ---------------------------------------------------------------------------------------------
def read_montage_settings(weights_path):
    """Returns the ``"montage"`` settings dict of an export, or None for any other file."""
    if not weights_path or not weights_path.endswith(".pkl") or not os.path.isfile(weights_path):
        return None
    with open(weights_path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    if isinstance(data, dict) and isinstance(data.get("montage"), dict):
        return data["montage"]
    return None


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


def check_pixel_format(cfg, weights_path):
    """
    Checks that ``cfg`` matches the settings recorded in a Montage export.

    Files without a ``"montage"`` dict (MSRA, torchvision conversions, full checkpoints) are
    not checked. Norms are compared by family: a BN/SyncBN pre-training hands over to
    BN/SyncBN/FrozenBN, a GN one only to GN.

    Args:
        cfg (CfgNode): the fine-tuning config.
        weights_path (str): ``MODEL.WEIGHTS``.

    Returns:
        dict or None: the export's settings, or None when the file has none.

    Raises:
        ValueError: one line naming each mismatching key, both values and the fix.
    """
    settings = read_montage_settings(weights_path)
    if settings is None:
        return None
    family = _backbone_family(settings.get("MODEL.BACKBONE.NAME"))
    mismatches = []
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
    want_norm = settings.get("MODEL.RESNETS.NORM")
    have_norm = cfg.MODEL.RESNETS.NORM
    if want_norm and (want_norm in BN_NORMS) != (have_norm in BN_NORMS):
        mismatches.append(
            f"MODEL.RESNETS.NORM is {have_norm!r} in the config but the export was pre-trained "
            f"with {want_norm!r}"
        )
    elif want_norm and want_norm not in BN_NORMS and have_norm != want_norm:
        mismatches.append(
            f"MODEL.RESNETS.NORM is {have_norm!r} in the config but {want_norm!r} in the export"
        )
    if mismatches:
        fix = format_opts(settings_to_overrides(settings))
        raise ValueError(
            f"{weights_path} does not match the fine-tuning config: " + "; ".join(mismatches)
            + f". Fix: pass --weights-config {weights_path}.yaml, or set {fix}"
        )
    logger.info(
        "Pixel format and backbone shape match the export %s (pre-training iteration %s)",
        weights_path, settings.get("iteration"),
    )
    return settings


# ---------------------------------------------------------------------------------------------
# Checked loading
# ---------------------------------------------------------------------------------------------
def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def backbone_keys(model):
    """
    Returns the state-dict names of the detector's pre-trainable backbone.

    That is the bottom-up network: ``backbone.bottom_up.*`` under an FPN, else ``backbone.*``,
    plus ``roi_heads.res5.*`` of a C4 model (its res5 stage lives in the ROI head).
    ``num_batches_tracked`` counters are left out.
    """
    model = _unwrap(model)
    names = list(model.state_dict().keys())
    prefix = "backbone.bottom_up." if hasattr(model.backbone, "bottom_up") else "backbone."
    keys = [k for k in names if k.startswith(prefix) or k.startswith("roi_heads.res5.")]
    return [k for k in keys if not k.endswith("num_batches_tracked")]


class _RecordingCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer that keeps the name-aligned weights it loaded, for checking."""

    aligned = None
    skipped_shapes = ()

    def _load_model(self, checkpoint):
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


def load_and_verify(model, weights_path):
    """
    Loads ``weights_path`` into a detector and checks every backbone tensor came from it.

    The file is read by :class:`DetectionCheckpointer` (``matching_heuristics`` suffix
    matching for bare-named exports). A backbone tensor counts as loaded when a file tensor was
    matched to it, had the right shape, and the model now holds exactly that value. Heads, FPN
    and RPN staying random is expected.

    Args:
        model (nn.Module): a Detectron2 detector (``backbone`` attribute), DDP-wrapped or not.
        weights_path (str): the weight file (``.pkl`` export, ``.pth``, ...).

    Returns:
        dict: ``{"loaded": int, "total": int, "not_loaded": list[str], "unused": list[str]}``.

    Raises:
        RuntimeError: some backbone tensor was not filled from the file.
    """
    model = _unwrap(model)
    checkpointer = _RecordingCheckpointer(model, save_to_disk=False)
    checkpointer.load(weights_path, checkpointables=[])
    aligned = checkpointer.aligned or {}
    state = model.state_dict()
    keys = backbone_keys(model)
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
    summary = {"loaded": loaded, "total": len(keys), "not_loaded": not_loaded, "unused": unused}
    logger.info(
        "loaded %d/%d backbone tensors from %s; not loaded: %s", loaded, len(keys), weights_path,
        _describe(not_loaded) if not_loaded else "none",
    )
    if unused:
        logger.info("File tensors not used by this detector (%d): %s", len(unused),
                    _describe(unused))
    if not keys:
        raise RuntimeError(f"The detector has no backbone tensors to load ({type(model)})")
    if not_loaded:
        raise RuntimeError(
            f"Only {loaded}/{len(keys)} backbone tensors were loaded from {weights_path}; "
            f"not loaded: {_describe(not_loaded)}. The backbone would train from random init. "
            "Check that the "
            "file is a backbone export for this depth/width (MODEL.RESNETS.*), that it has the "
            "__author__ and matching_heuristics fields, and the weights-config overrides."
        )
    return summary

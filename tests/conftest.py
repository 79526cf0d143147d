"""Fixtures shared by every test folder: loading entry-point files, a tiny synthetic bank."""
import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch

from builder.bank import group_of
from builder.writer import BankWriter

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="session")
def load_module():
    """
    ``load_module("projects/MontagePretrain/train_net.py")`` imports a file of the checkout that
    is not part of an installed package (entry points, scripts) as a module, once per session.
    """
    cache = {}

    def load(relpath):
        if relpath not in cache:
            name = os.path.splitext(os.path.basename(relpath))[0] + "_under_test"
            spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
            cache[relpath] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(cache[relpath])
        return cache[relpath]

    return load


# Aspect (w/h) of the synthetic crops of each group: S, T, W.
_ASPECTS = {0: (0.6, 1.4), 1: (0.25, 0.45), 2: (1.7, 3.0)}


def crop_color(i):
    """RGB colour of synthetic crop i (distinct per crop, so tests can tell crops apart)."""
    return np.array([(37 * i + 11) % 251, (91 * i + 29) % 241, (13 * i + 101) % 239], np.uint8)


def write_bank(path, n_s=8, n_t=3, n_w=3, num_classes=3, seed=0, encoding="png"):
    """
    Writes a bank of constant-colour crops (colour ``crop_color(i)``, RGB) with random sizes of
    the right aspect per group, random labels 0..C and random /box areas unrelated to the crop
    size (so the S ordering must use /box).
    """
    rng = np.random.default_rng(seed)
    groups = np.array([0] * n_s + [1] * n_t + [2] * n_w, np.uint8)
    rng.shuffle(groups)
    n = len(groups)
    blobs, sizes, boxes = [], [], []
    for i, g in enumerate(groups):
        h = int(rng.integers(12, 40))
        w = max(1, int(round(h * rng.uniform(*_ASPECTS[int(g)]))))
        assert group_of(w, h) == g
        img = np.empty((h, w, 3), np.uint8)
        img[:] = crop_color(i)
        ext = ".png" if encoding == "png" else ".jpg"
        ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        assert ok
        blobs.append(buf.tobytes())
        sizes.append((h, w))
        bw, bh = rng.uniform(5, 200, size=2)
        boxes.append((3.0, 4.0, 3.0 + bw, 4.0 + bh))
    labels = rng.integers(0, num_classes + 1, size=n).astype(np.int32)
    with BankWriter(str(path), encoding=encoding) as writer:
        writer.append(blobs, labels, groups, np.array(sizes, np.int32).reshape(n, 2),
                      np.arange(n, dtype=np.int64), np.array(boxes, np.float32).reshape(n, 4),
                      np.array(boxes, np.float32).reshape(n, 4))
        writer.finalize({"num_classes": num_classes,
                         "category_names": [f"c{k}" for k in range(num_classes)],
                         "category_ids": list(range(1, num_classes + 1))})
    return str(path)


@pytest.fixture
def few_threads():
    # The CI machine has 2 shared cores; tiny tensors do not need more.
    torch.set_num_threads(1)


@pytest.fixture(name="crop_color")
def crop_color_fixture():
    """The colour function of the synthetic crops (test modules cannot import conftest)."""
    return crop_color


@pytest.fixture
def make_bank(tmp_path):
    """Factory: ``make_bank(n_s=8, n_t=3, n_w=3, ...)`` -> path of a fresh synthetic bank."""
    counter = iter(range(10**6))

    def make(**kwargs):
        return write_bank(tmp_path / f"bank{next(counter)}.h5", **kwargs)

    return make


@pytest.fixture
def bank_path(make_bank):
    """A default synthetic bank: 8 S, 3 T, 3 W crops, 3 classes."""
    return make_bank()


def _r18_pretrain_cfg(norm="BN"):
    """A pre-training-like R-18 config: ``norm`` (plain BN), torchvision-style RGB input, res5
    kept."""
    from detectron2.config import get_cfg
    from montage_pretrain.config import add_montage_config

    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.merge_from_list([
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.RESNETS.NORM", norm, "MODEL.RESNETS.STRIDE_IN_1X1", "False",
        "MODEL.BACKBONE.FREEZE_AT", "0", "INPUT.FORMAT", "RGB",
        "MODEL.RESNETS.OUT_FEATURES", '["res5"]',  # the stock default ["res4"] prunes res5
        "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
        "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]",
    ])
    return cfg


@pytest.fixture(scope="session")
def make_r18_export(tmp_path_factory):
    """
    ``make_r18_export(randomise=False, iteration=0, norm="BN")`` writes an R-18 backbone export
    (+ its ``.pkl.yaml``) and returns its path. ``randomise`` sets every weight and BN statistic
    to random values, so a tensor that was not loaded cannot pass for a loaded one.
    """
    import torch
    from torch import nn

    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone
    from montage_pretrain.export import export_backbone
    from montage_pretrain.export_format import default_export_name

    def make(randomise=False, iteration=0, norm="BN"):
        cfg = _r18_pretrain_cfg(norm)
        torch.manual_seed(0)
        model = nn.Module()
        model.backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        if randomise:
            with torch.no_grad():
                for name, t in model.backbone.state_dict().items():
                    if name.endswith("running_var"):
                        t.uniform_(0.5, 2.0)
                    elif not name.endswith("num_batches_tracked"):
                        t.normal_(0.0, 0.1)
        path = str(tmp_path_factory.mktemp("export") / default_export_name())
        export_backbone(model, cfg, path, iteration=iteration)
        return path

    return make


@pytest.fixture(scope="session")
def r18_export(make_r18_export):
    """An R-18 backbone export at its random initialisation (pre-training iteration 0)."""
    return make_r18_export()

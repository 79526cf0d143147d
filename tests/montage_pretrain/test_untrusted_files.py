"""
Files are data, never code: crafted weight pickles, trainer checkpoints and YAML configs that would
write a marker file if anything executed them are refused with one line naming the file and the
fix, while genuine exports, Detectron2/MSRA pickles, trainer checkpoints and stock configs load.
"""
import argparse
import collections
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer, hooks
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone
from detectron2.solver import build_lr_scheduler
from builder.testing import write_synthetic_coco
from finetune_helpers import TOY, finetune_cfg
from montage_pretrain.config import add_montage_config, merge_config_file
from montage_pretrain.export import main as export_main
from montage_pretrain.export_format import default_export_name, read_export
from montage_pretrain.loading import ExportCheckpointer, load_and_verify, read_checked_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickles as ``exec(code)``: writes ``marker`` if anything runs it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def one_line(excinfo):
    """The message of a raised error, checked to be a single line."""
    text = str(excinfo.value)
    assert "\n" not in text.strip(), text
    return text


def write_pickle(path, data, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return str(path)


def crafted_pkl(tmp_path):
    """A Detectron2-looking export whose one "weight" runs code when unpickled."""
    marker = tmp_path / "MARKER_pkl"
    data = {"model": {"stem.conv1.weight": Payload(marker)}, "__author__": "MontagePretrain",
            "matching_heuristics": True}
    return write_pickle(tmp_path / "crafted.pkl", data), marker


def pretrain_cfg(depth=18, groups=1, width=64):
    """A pre-training-like ResNet config (plain BN, RGB input, res5 kept)."""
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.NUM_GROUPS = groups
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = width
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.INPUT.FORMAT = "RGB"
    return cfg


class PretrainModel(nn.Module):
    """Stand-in for MontageClassifier: ``backbone`` + a dense head + the ERF buffers."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        self.head = nn.Conv2d(self.backbone.output_shape()["res5"].channels, 4, 1)
        self.register_buffer("erf_weights", torch.rand(4, 4, 4))
        self.register_buffer("erf_iter", torch.tensor(2))


def write_config(tmp_path, cfg, name="config.yaml"):
    path = tmp_path / name
    path.write_text(cfg.dump())
    return str(path)


def export_args(config_file, ckpt, out, *extra):
    return ["--config-file", config_file, "--checkpoint", str(ckpt), "--out", str(out), *extra]


@pytest.fixture
def no_plain_unpickling(monkeypatch):
    """Fails the test if anything reads a file with the unrestricted ``pickle`` loaders."""
    def refuse(*args, **kwargs):
        raise AssertionError("a file was read with unrestricted pickle.load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# --- weight .pkl files ------------------------------------------------------------------------
def test_crafted_pkl_is_refused_by_read_export(tmp_path):
    path, marker = crafted_pkl(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        read_export(path)
    text = one_line(excinfo)
    assert path in text and "builtins.exec" in text and "Fix:" in text
    assert not marker.exists()


def test_crafted_pkl_is_refused_before_fine_tuning(tmp_path):
    """MODEL.WEIGHTS is checked (read_checked_weights) before anything is built."""
    path, marker = crafted_pkl(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        read_checked_weights(finetune_cfg(TOY, "MODEL.WEIGHTS", path))
    assert path in one_line(excinfo)
    assert not marker.exists()


def test_crafted_pkl_is_refused_by_load_and_verify(tmp_path):
    """A path handed straight to the checkpointer (scripts/feature_rank.py) is read safely too."""
    path, marker = crafted_pkl(tmp_path)
    model = build_model(finetune_cfg())
    with pytest.raises(ValueError) as excinfo:
        load_and_verify(model, path)
    assert path in one_line(excinfo) and "builtins.exec" in str(excinfo.value)
    assert not marker.exists()


@pytest.mark.parametrize("force_no_weights_only", [False, True], ids=["default", "env"])
def test_crafted_pth_as_weights_is_refused(tmp_path, monkeypatch, force_no_weights_only):
    """A .pth MODEL.WEIGHTS is read with weights_only=True, explicitly: torch's environment
    switch TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which overrides only its default, cannot undo it."""
    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER_weights_pth"
    path = tmp_path / "weights.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(1)},
                "extra": Payload(marker)}, path)
    with pytest.raises(ValueError) as excinfo:
        load_and_verify(build_model(finetune_cfg()), str(path))
    text = one_line(excinfo)
    assert str(path) in text and "weights_only=True" in text and "Fix:" in text
    assert not marker.exists()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A 2-image synthetic COCO set (json, images) for the entry points' dataset flags."""
    return write_synthetic_coco(str(tmp_path_factory.mktemp("coco")), num_images=2)


@pytest.fixture(scope="module")
def finetune_net(load_module):
    return load_module("projects/MontagePretrain/finetune_net.py")


def finetune_argv(coco, name, weights, out_dir, *extra):
    json_file, images = coco
    return ["--config-file", TOY, "--train-json", json_file, "--train-images", images,
            "--val-json", json_file, "--val-images", images, "--dataset-name", name, *extra,
            "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out_dir)]


@pytest.mark.parametrize("eval_only", [False, True], ids=["train", "eval_only"])
def test_crafted_pkl_is_refused_by_finetune_net(tmp_path, coco, finetune_net, eval_only):
    """Both weight paths of finetune_net.py (training and --eval-only) end in one line."""
    path, marker = crafted_pkl(tmp_path)
    extra = ["--eval-only"] if eval_only else []
    args = finetune_net.parse_args(
        finetune_argv(coco, f"crafted_{eval_only}", path, tmp_path / "out", *extra))
    with pytest.raises(SystemExit) as excinfo:
        finetune_net.main(args)
    assert path in one_line(excinfo)
    assert not marker.exists()


def test_crafted_pkl_is_refused_by_probe_cli(tmp_path, coco, load_module):
    path, marker = crafted_pkl(tmp_path)
    json_file, images = coco
    probe = load_module("scripts/probe.py")
    with pytest.raises(SystemExit) as excinfo:
        probe.main(["--weights", path, "--train-json", json_file, "--train-images", images,
                    "--val-json", json_file, "--val-images", images, "--config-file", TOY,
                    "MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    assert path in one_line(excinfo)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["garbage", "truncated", "no_arrays", "torch_tensor"])
def test_random_pkl_as_weights_is_one_line(tmp_path, r18_export, content):
    """Not a weight file: one line naming the file and the fix, not a traceback from pickle."""
    path = str(tmp_path / f"{content}.pkl")
    if content == "garbage":
        with open(path, "wb") as f:
            f.write(b"this is not a pickle\n" * 4)
    elif content == "truncated":
        with open(r18_export, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif content == "no_arrays":
        write_pickle(path, {"name": "notes", "values": [1, 2, 3]})
    else:  # torch tensors in a .pkl unpickle through torch.load: not a .pkl of numpy arrays
        write_pickle(path, {"model": {"stem.conv1.weight": torch.zeros(2)},
                            "__author__": "someone"})
    with pytest.raises(ValueError) as excinfo:
        read_checked_weights(finetune_cfg(TOY, "MODEL.WEIGHTS", path))
    text = one_line(excinfo)
    assert path in text and "Fix:" in text


def test_random_pkl_finetune_cli_is_one_line(tmp_path, coco, finetune_net):
    path = str(tmp_path / "random.pkl")
    with open(path, "wb") as f:
        f.write(os.urandom(256))
    args = finetune_net.parse_args(finetune_argv(coco, "random_pkl", path, tmp_path / "out"))
    with pytest.raises(SystemExit) as excinfo:
        finetune_net.main(args)
    text = one_line(excinfo)
    assert path in text and "Fix:" in text


def test_genuine_export_loads_without_unrestricted_unpickling(r18_export, no_plain_unpickling):
    export = read_export(r18_export)
    assert export.settings["format_version"] == 1 and len(export.weights) == 100
    summary = load_and_verify(build_model(finetune_cfg()), r18_export)  # a path, not the copy
    assert summary["loaded"] == summary["total"] == 100


def test_finetune_reads_the_export_once_and_safely(r18_export, no_plain_unpickling, monkeypatch):
    """setup's check reads the file; loading reuses that copy: one restricted read in all."""
    from montage_pretrain import export_format

    reads = []
    real = export_format.load_weight_pickle
    monkeypatch.setattr(export_format, "load_weight_pickle",
                        lambda path: reads.append(path) or real(path))
    cfg = finetune_cfg(TOY, "MODEL.WEIGHTS", r18_export)
    export = read_checked_weights(cfg)
    summary = load_and_verify(build_model(cfg), export)
    assert reads == [r18_export] and summary["loaded"] == 100


def msra_blobs(rng):
    """A Caffe2/Detectron1 (MSRA R-50.pkl) style dict: arrays, momentum blobs, a scalar."""
    return {"blobs": collections.OrderedDict([
        ("conv1_w", rng.standard_normal((64, 3, 7, 7)).astype(np.float32)),
        ("conv1_w_momentum", np.zeros((64, 3, 7, 7), np.float32)),
        ("res_conv1_bn_s", rng.standard_normal(64).astype(np.float32)),
        ("res2_0_branch2a_w", rng.standard_normal((64, 64, 1, 1)).astype(np.float32)),
        ("lr", np.array(0.01, np.float32)),
    ])}


def assert_reads_like_detectron2(path, data):
    """The restricted reader makes of ``path`` what DetectionCheckpointer made of ``data``."""
    checkpoint = read_export(path).checkpoint
    expected = data if "__author__" in data else {
        "model": {k: v for k, v in data["blobs"].items() if not k.endswith("_momentum")},
        "__author__": "Caffe2", "matching_heuristics": True}
    assert checkpoint.keys() == expected.keys()
    assert checkpoint["__author__"] == expected["__author__"]
    assert list(checkpoint["model"]) == list(expected["model"])
    for key, value in expected["model"].items():
        np.testing.assert_array_equal(checkpoint["model"][key], value)
    # The checkpointer of load_and_verify reads the path the same way.
    loaded = ExportCheckpointer(nn.Linear(1, 1))._load_file(path)
    assert list(loaded["model"]) == list(expected["model"])


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("style", ["msra_blobs", "detectron2_zoo"])
def test_detectron2_style_pickles_load(tmp_path, protocol, style, no_plain_unpickling):
    rng = np.random.default_rng(0)
    if style == "detectron2_zoo":
        data = {"model": collections.OrderedDict(
                    (f"backbone.res2.{i}.conv1.weight", rng.standard_normal((8, 4, 1, 1)))
                    for i in range(3)),
                "__author__": "Detectron2 Model Zoo"}
    else:
        data = msra_blobs(rng)
    assert_reads_like_detectron2(write_pickle(tmp_path / f"{style}.pkl", data, protocol), data)


def test_numpy1_pickles_load(tmp_path, no_plain_unpickling):
    """Files written under numpy < 2 name numpy.core.multiarray (protocol 2 spells it in text)."""
    data = msra_blobs(np.random.default_rng(1))
    path = write_pickle(tmp_path / "numpy1.pkl", data, protocol=2)
    with open(path, "rb") as f:
        raw = f.read()
    assert b"cnumpy._core.multiarray\n" in raw
    with open(path, "wb") as f:
        f.write(raw.replace(b"numpy._core", b"numpy.core"))
    assert_reads_like_detectron2(path, data)


# --- trainer checkpoints (montage-export) -----------------------------------------------------
def r18_checkpoint(tmp_path, **extra):
    """A plain ``{"model", "iteration", **extra}`` checkpoint of an R-18 pre-training model."""
    torch.manual_seed(0)
    model = PretrainModel(pretrain_cfg(18))
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 7, **extra}, path)
    return path, model


def test_crafted_pth_is_refused_by_export(tmp_path):
    marker = tmp_path / "MARKER_pth"
    ckpt, _ = r18_checkpoint(tmp_path, extra=Payload(marker))
    config = write_config(tmp_path, pretrain_cfg(18))
    with pytest.raises(SystemExit) as excinfo:
        export_main(export_args(config, ckpt, tmp_path / "out.pkl"))
    text = one_line(excinfo)
    assert str(ckpt) in text and "--trust-checkpoint" in text
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()


def test_trust_checkpoint_is_the_explicit_opt_in(tmp_path):
    """A checkpoint with a pickled Python object needs --trust-checkpoint; with it, it exports."""
    ckpt, model = r18_checkpoint(tmp_path, args=argparse.Namespace(lr=0.1))
    config = write_config(tmp_path, pretrain_cfg(18))
    out = tmp_path / "out.pkl"
    with pytest.raises(SystemExit, match="--trust-checkpoint"):
        export_main(export_args(config, ckpt, out))
    summary = export_main(export_args(config, ckpt, out, "--trust-checkpoint"))
    assert summary["num_tensors"] == 100 and summary["settings"]["iteration"] == 7


def test_genuine_trainer_checkpoint_exports_without_the_flag(tmp_path, monkeypatch):
    """What train_net.py saves (model with ERF buffers, optimizer, scheduler and hook state,
    iteration) loads with torch.load(weights_only=True): no opt-in needed for our own files."""
    cfg = pretrain_cfg(18)
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS = 10, 2
    torch.manual_seed(0)
    model = PretrainModel(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.head.weight.sum().backward()
    optimizer.step()  # fills the momentum buffers
    trainer = SimpleTrainer(model, [], optimizer)
    trainer.register_hooks([hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer))])
    trainer.iter = 3
    DetectionCheckpointer(model, str(tmp_path), trainer=trainer).save("model_final", iteration=3)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only"))
                        or real_load(*a, **k))
    summary = export_main(export_args(write_config(tmp_path, cfg), tmp_path / "model_final.pth",
                                      tmp_path / default_export_name()))
    assert summary["num_tensors"] == 100 and summary["settings"]["iteration"] == 3
    assert loads == [True]
    assert not any("erf" in k for k in read_export(summary["path"]).weights)


@pytest.mark.parametrize("config, named", [
    (dict(depth=50), "MODEL.RESNETS.DEPTH 50"),
    (dict(depth=34), "MODEL.RESNETS.DEPTH 34"),
], ids=["depth50", "depth34"])
def test_export_refuses_a_config_the_checkpoint_does_not_fit(tmp_path, config, named):
    """The export records the config's ResNet shape: it must be the checkpoint's."""
    ckpt, _ = r18_checkpoint(tmp_path)
    out = tmp_path / "out.pkl"
    with pytest.raises(SystemExit) as excinfo:
        export_main(export_args(write_config(tmp_path, pretrain_cfg(**config)), ckpt, out))
    text = one_line(excinfo)
    assert str(ckpt) in text and named in text and "Fix:" in text
    assert not out.exists()


def test_export_refuses_a_config_that_builds_no_backbone(tmp_path):
    """Detectron2 asserts RES2_OUT_CHANNELS 64 for R-18: one line, not its AssertionError."""
    ckpt, _ = r18_checkpoint(tmp_path)
    cfg = pretrain_cfg(18)
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 128
    with pytest.raises(SystemExit) as excinfo:
        export_main(export_args(write_config(tmp_path, cfg), ckpt, tmp_path / "out.pkl"))
    assert "RES2_OUT_CHANNELS 128" in one_line(excinfo)


@pytest.fixture(scope="module")
def r50_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("r50") / "model_final.pth"
    torch.save({"model": PretrainModel(pretrain_cfg(50)).state_dict()}, path)
    return path


@pytest.mark.parametrize("shape, named", [
    (dict(groups=32, width=4), "NUM_GROUPS 32"),
    (dict(width=32), "WIDTH_PER_GROUP 32"),
], ids=["resnext", "width"])
def test_export_refuses_another_width(tmp_path, r50_checkpoint, shape, named):
    config = write_config(tmp_path, pretrain_cfg(50, **shape))
    with pytest.raises(SystemExit) as excinfo:
        export_main(export_args(config, r50_checkpoint, tmp_path / "out.pkl"))
    assert named in one_line(excinfo) and "with another shape" in str(excinfo.value)


# --- YAML configs -----------------------------------------------------------------------------
def crafted_yaml(tmp_path, name="crafted.yaml"):
    marker = tmp_path / f"MARKER_{name}"
    path = tmp_path / name
    path.write_text(
        "MODEL:\n"
        f"  WEIGHTS: !!python/object/apply:os.system [\"touch {marker}\"]\n"
        "VERSION: 2\n"
    )
    return str(path), marker


def fresh_cfg():
    cfg = get_cfg()
    add_montage_config(cfg)
    return cfg


def test_crafted_yaml_is_refused_by_merge_config_file(tmp_path):
    path, marker = crafted_yaml(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        merge_config_file(fresh_cfg(), path)
    text = one_line(excinfo)
    assert path in text and "Fix:" in text
    assert not marker.exists()


def test_crafted_base_is_refused_and_named(tmp_path):
    base, marker = crafted_yaml(tmp_path, "base.yaml")
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text("_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.1\n")
    with pytest.raises(ValueError) as excinfo:
        merge_config_file(fresh_cfg(), str(leaf))
    assert "base.yaml" in one_line(excinfo)
    assert not marker.exists()


def test_model_zoo_prefix_does_not_trust_files_outside_the_package(tmp_path):
    """Stock configs are trusted; a model_zoo:// path climbing out of the package is not."""
    path, marker = crafted_yaml(tmp_path)
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text(f"_BASE_: model_zoo://{'../' * 40}{path.lstrip('/')}\n")
    with pytest.raises(ValueError) as excinfo:
        merge_config_file(fresh_cfg(), str(leaf))
    one_line(excinfo)
    assert not marker.exists()


def test_crafted_sidecar_is_refused_by_finetune_setup(tmp_path, coco, finetune_net, r18_export):
    path, marker = crafted_yaml(tmp_path, "montage_backbone.pkl.yaml")
    args = finetune_net.parse_args(finetune_argv(coco, "crafted_sidecar", r18_export,
                                                 tmp_path / "out", "--weights-config", path))
    with pytest.raises(SystemExit) as excinfo:
        finetune_net.main(args)
    assert path in one_line(excinfo)
    assert not marker.exists()


def test_crafted_config_is_refused_by_export(tmp_path):
    config, marker = crafted_yaml(tmp_path)
    ckpt, _ = r18_checkpoint(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        export_main(export_args(config, ckpt, tmp_path / "out.pkl"))
    assert config in one_line(excinfo)
    assert not marker.exists()


def test_stock_retinanet_config_still_loads():
    """Base-RetinaNet.yaml (in the installed detectron2) computes its anchor sizes in YAML."""
    cfg = fresh_cfg()
    merge_config_file(cfg, "model_zoo://COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert len(cfg.MODEL.ANCHOR_GENERATOR.SIZES) == 5
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0][0] == 32


def test_unsafe_yaml_only_with_the_explicit_opt_in(tmp_path):
    path = tmp_path / "tuple.yaml"
    path.write_text("SOLVER:\n  STEPS: !!python/tuple [10, 20]\n")
    with pytest.raises(ValueError, match="allow_unsafe"):
        merge_config_file(fresh_cfg(), str(path))
    cfg = merge_config_file(fresh_cfg(), str(path), allow_unsafe=True)
    assert tuple(cfg.SOLVER.STEPS) == (10, 20)


def test_crafted_pretraining_config_is_refused_by_train_net(load_module, tmp_path):
    """train_net.py merges its --config-file as plain YAML too: the payload never runs."""
    from detectron2.engine import default_argument_parser

    config, marker = crafted_yaml(tmp_path)
    train_net = load_module("projects/MontagePretrain/train_net.py")
    with pytest.raises(SystemExit) as e:
        train_net.main(default_argument_parser().parse_args(["--config-file", str(config)]))
    assert not marker.exists()
    assert str(config) in str(e.value) and "\n" not in str(e.value)


def test_console_script_exits_zero_on_success(tmp_path):
    """``montage-export`` (pyproject's entry point) returns exit status 0 after a good export;
    the summary dict of main() would make sys.exit() report a failure."""
    import importlib
    import re

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    with open(os.path.join(root, "pyproject.toml")) as f:
        target = re.search(r'^montage-export = "([\w.]+):(\w+)"', f.read(), re.M)
    entry = getattr(importlib.import_module(target.group(1)), target.group(2))
    cfg = pretrain_cfg(18)
    torch.manual_seed(0)
    DetectionCheckpointer(PretrainModel(cfg), str(tmp_path)).save("model_final", iteration=1)
    out = tmp_path / default_export_name()
    assert entry(export_args(write_config(tmp_path, cfg), tmp_path / "model_final.pth", out)) == 0
    assert read_export(str(out)).settings["iteration"] == 1

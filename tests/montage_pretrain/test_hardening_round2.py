"""
Hardening, round 2 (issue 23), entry points: no code runs from any weight path of pre-training
(MODEL.WEIGHTS, --resume) or fine-tuning (--resume), even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1;
a missing bank or weight file ends in one line before OUTPUT_DIR is written; a damaged crop stops
pre-training in one line; log files carry no ANSI colour codes. Payloads write a marker file if
anything runs them. Every test failed against the code before the fix (docs/RELIABILITY.md).
"""
import os
import pickle
import subprocess
import sys

import h5py
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser

from builder.testing import write_synthetic_coco
from finetune_helpers import TOY
from montage_pretrain.config import add_montage_config, merge_config_file

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "projects", "MontagePretrain", "configs", "Base-Montage.yaml")
TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MONTAGE.INPUT_SIZE", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "1", "MONTAGE.ERF_NUM_IMAGES", "2", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.DEVICE", "cpu", "SEED", "1",
]
FORCE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class Payload:
    """Unpickles as ``exec(code)``: writes ``marker`` if anything runs it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def crafted(folder, kind):
    """A weight file whose unpickling runs the payload: ``pkl`` (Detectron2-looking export) or
    ``pth`` (torch.save of a checkpoint). Returns (path, marker)."""
    marker = folder / f"MARKER_{kind}"
    if kind == "pkl":
        path = folder / "crafted.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": {"stem.conv1.weight": Payload(marker)},
                         "__author__": "MontagePretrain", "matching_heuristics": True}, f)
    else:
        path = folder / "crafted.pth"
        torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(1)},
                    "extra": Payload(marker)}, path)
    return str(path), marker


def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text.strip(), text
    return text


@pytest.fixture(scope="module")
def train_net(load_module):
    return load_module("projects/MontagePretrain/train_net.py")


@pytest.fixture(scope="module")
def finetune_net(load_module):
    return load_module("projects/MontagePretrain/finetune_net.py")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_synthetic_coco(str(tmp_path_factory.mktemp("coco")), num_images=2)


def pretrain_args(bank, out, *extra, resume=False):
    argv = ["--config-file", CONFIG] + (["--resume"] if resume else [])
    argv += ["MONTAGE.BANK", str(bank), "OUTPUT_DIR", str(out)] + TINY + list(extra)
    return default_argument_parser().parse_args(argv)


def finetune_argv(coco, name, weights, out_dir, *extra):
    json_file, images = coco
    return ["--config-file", TOY, "--train-json", json_file, "--train-images", images,
            "--val-json", json_file, "--val-images", images, "--dataset-name", name, *extra,
            "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out_dir), "SOLVER.MAX_ITER", "1"]


# --- items 1-3: no code from any weight path ----------------------------------------------------


@pytest.mark.parametrize("kind, force", [("pkl", False), ("pth", True)], ids=["pkl", "pth-env"])
def test_crafted_pretraining_weights_are_refused(train_net, bank_path, tmp_path, monkeypatch,
                                                 kind, force):
    """Item 1 (and 3): pre-training loaded MODEL.WEIGHTS through Detectron2's stock checkpointer,
    which unpickled a .pkl and, under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, a .pth."""
    if force:
        monkeypatch.setenv(FORCE, "1")
    path, marker = crafted(tmp_path, kind)
    with pytest.raises(SystemExit) as excinfo:
        train_net.main(pretrain_args(bank_path, tmp_path / "out", "MODEL.WEIGHTS", path))
    text = one_line(excinfo)
    assert path in text and "Fix:" in text
    assert not marker.exists()


@pytest.mark.parametrize("kind, force", [("pkl", False), ("pth", True)], ids=["pkl", "pth-env"])
def test_resume_runs_no_code_from_last_checkpoint_in_pretraining(train_net, bank_path, tmp_path,
                                                                  monkeypatch, kind, force):
    """Item 2 (and 3): --resume loads whatever OUTPUT_DIR/last_checkpoint names."""
    if force:
        monkeypatch.setenv(FORCE, "1")
    out = tmp_path / "out"
    out.mkdir()
    path, marker = crafted(out, kind)
    (out / "last_checkpoint").write_text(os.path.basename(path))
    with pytest.raises(SystemExit) as excinfo:
        train_net.main(pretrain_args(bank_path, out, resume=True))
    assert path in one_line(excinfo)
    assert not marker.exists()


@pytest.mark.parametrize("kind, force", [("pkl", False), ("pth", True)], ids=["pkl", "pth-env"])
def test_resume_runs_no_code_from_last_checkpoint_in_finetuning(finetune_net, coco, r18_export,
                                                                 tmp_path, monkeypatch, kind,
                                                                 force):
    """Item 2 (and 3): finetune_net training resumed through Detectron2's checkpointer too
    (--eval-only --resume already refused the file)."""
    if force:
        monkeypatch.setenv(FORCE, "1")
    out = tmp_path / "out"
    out.mkdir()
    path, marker = crafted(out, kind)
    (out / "last_checkpoint").write_text(os.path.basename(path))
    args = finetune_net.parse_args(
        finetune_argv(coco, f"resume_{kind}", r18_export, out, "--resume"))
    with pytest.raises(SystemExit) as excinfo:
        finetune_net.main(args)
    assert path in one_line(excinfo)
    assert not marker.exists()


def test_visualize_erf_refuses_a_crafted_checkpoint_under_the_env_switch(
        load_module, bank_path, tmp_path, monkeypatch):
    """Item 3: scripts/visualize_erf.py read model_final.pth with a bare torch.load."""
    monkeypatch.setenv(FORCE, "1")
    run = tmp_path / "run"
    run.mkdir()
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, CONFIG)
    cfg.merge_from_list(["MONTAGE.BANK", bank_path] + TINY)
    (run / "config.yaml").write_text(cfg.dump())
    marker = run / "MARKER_viz"
    torch.save({"model": {}, "extra": Payload(marker)}, run / "model_final.pth")
    viz = load_module("scripts/visualize_erf.py")
    with pytest.raises(SystemExit) as excinfo:
        viz.main(["--run", str(run), "--out", str(tmp_path / "viz"), "--num-images", "1"])
    assert str(run / "model_final.pth") in one_line(excinfo)
    assert not marker.exists()


# --- item 9: user inputs checked before anything is written; one line --------------------------


def test_missing_bank_is_one_line_and_keeps_the_finished_run(train_net, tmp_path):
    out = tmp_path / "pretrain"
    out.mkdir()
    (out / "config.yaml").write_text("the finished run's config\n")
    bank = tmp_path / "nonexistent.h5"
    with pytest.raises(SystemExit) as excinfo:
        train_net.main(pretrain_args(bank, out))
    text = one_line(excinfo)
    assert str(bank) in text and "make samples" in text
    assert (out / "config.yaml").read_text() == "the finished run's config\n"
    assert sorted(os.listdir(out)) == ["config.yaml"]  # no log.txt either


def test_missing_weights_is_one_line_and_keeps_the_finished_run(finetune_net, coco, tmp_path):
    out = tmp_path / "finetune"
    out.mkdir()
    (out / "config.yaml").write_text("the finished run's config\n")
    weights = str(tmp_path / "nonexistent.pkl")
    args = finetune_net.parse_args(finetune_argv(coco, "missing_weights", weights, out))
    with pytest.raises(SystemExit) as excinfo:
        finetune_net.main(args)
    text = one_line(excinfo)
    assert weights in text and "does not exist" in text
    assert sorted(os.listdir(out)) == ["config.yaml"]
    assert (out / "config.yaml").read_text() == "the finished run's config\n"


def test_pretrain_cli_missing_bank_prints_one_line(tmp_path):
    """`make pretrain BANK=/nonexistent.h5` printed 463 lines (environment, coloured config,
    a 40-line traceback)."""
    cmd = [sys.executable, os.path.join(ROOT, "projects", "MontagePretrain", "train_net.py"),
           "--config-file", CONFIG, "MONTAGE.BANK", str(tmp_path / "nonexistent.h5"),
           "OUTPUT_DIR", str(tmp_path / "out"), *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # Deprecation warnings of the installed libraries at import time are not ours to silence.
    lines = [line for line in proc.stderr.strip().splitlines()
             if "Warning: " not in line and not line.startswith(" ")]
    assert lines == [
        f"train_net.py: sample bank {tmp_path / 'nonexistent.h5'} not found; build it with "
        f"`make samples BANK={tmp_path / 'nonexistent.h5'}`"]
    assert len(proc.stdout.strip().splitlines()) <= 1  # "Command Line Args: ..."
    assert not (tmp_path / "out").exists()


def test_logs_carry_no_colour_codes(train_net, bank_path, tmp_path, capfd):
    """default_setup logged the config through pygments' terminal colours, into log.txt and
    every captured stdout."""
    out = tmp_path / "out"
    train_net.setup(pretrain_args(bank_path, out))
    captured = capfd.readouterr()
    log = (out / "log.txt").read_text()
    assert "Running with full config" in log
    assert "\x1b[" not in log and "\x1b[" not in captured.out + captured.err


# --- item 4: a damaged crop stops pre-training --------------------------------------------------


def test_damaged_crops_stop_pretraining_in_one_line(train_net, bank_path, tmp_path):
    """Before, pre-training trained on garbled crops (libjpeg printed "Corrupt JPEG data")."""
    with h5py.File(bank_path, "r") as f:
        crops = [bytes(c) for c in f["crops"][()]]
    raw = bytearray(open(bank_path, "rb").read())
    for crop in crops:  # every crop, so the first one drawn is damaged
        at = raw.find(crop)
        assert at > 0
        for k in range(at + len(crop) // 2, at + len(crop) // 2 + 8):
            raw[k] ^= 0xFF
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as excinfo:
        train_net.main(pretrain_args(damaged, tmp_path / "out"))
    text = one_line(excinfo)
    assert str(damaged) in text and "fails its checksum" in text and "rebuild" in text
    assert not (tmp_path / "out" / "montage_backbone.pkl").exists()

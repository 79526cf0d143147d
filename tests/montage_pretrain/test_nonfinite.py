"""A non-finite loss ends train_net.py / finetune_net.py with one line: the iteration, the loss
terms, the knobs to try and the last checkpoint with finite weights."""
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer, default_argument_parser
from detectron2.utils.events import EventStorage

from montage_pretrain.config import add_montage_config
from montage_pretrain.nonfinite import last_good_checkpoint, loss_terms, nonfinite_message


def detectron2_error(iteration, **losses):
    """The FloatingPointError Detectron2's own loss check raises for ``losses``."""
    with EventStorage(iteration), pytest.raises(FloatingPointError) as info:
        SimpleTrainer.write_metrics({k: torch.tensor(v) for k, v in losses.items()}, 0.0, iteration)
    return info.value


def cfg_in(folder):
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.OUTPUT_DIR = str(folder)
    cfg.SOLVER.BASE_LR = 0.8
    return cfg


def save(folder, name, value):
    torch.save({"model": {"w": torch.full((3,), value), "n": torch.tensor(4)}, "iteration": 1},
               os.path.join(folder, name))


def test_loss_terms_parse_detectron2s_message():
    error = detectron2_error(7, loss_cls=float("nan"), loss_box_reg=0.5)
    terms = loss_terms(str(error))
    assert set(terms) == {"loss_cls", "loss_box_reg"}
    assert terms["loss_box_reg"] == pytest.approx(0.5) and terms["loss_cls"] != terms["loss_cls"]


def test_message_names_iteration_terms_knobs_and_last_good_checkpoint(tmp_path):
    save(tmp_path, "model_0000004.pth", 1.0)
    save(tmp_path, "model_0000009.pth", float("nan"))  # written after the loss had gone bad
    error = detectron2_error(12, loss_box_reg=0.25, loss_cls=float("inf"))
    cfg = cfg_in(tmp_path)
    cfg.SOLVER.AMP.ENABLED = True
    line = nonfinite_message("train_net.py", error, cfg, check_period=20)
    assert "\n" not in line
    assert line.startswith("train_net.py: non-finite loss at iteration 12 (checked every 20")
    # the non-finite term first, then the others
    assert line.index("loss_cls inf") < line.index("loss_box_reg 0.25")
    for knob in ("SOLVER.BASE_LR (now 0.8)", "SOLVER.WARMUP_ITERS", "SOLVER.WARMUP_FACTOR",
                 "SOLVER.CLIP_GRADIENTS.ENABLED True (now off)", "SOLVER.AMP.ENABLED False"):
        assert knob in line
    assert str(tmp_path / "model_0000004.pth") in line and "--resume" in line
    assert last_good_checkpoint(str(tmp_path)) == str(tmp_path / "model_0000004.pth")


def test_message_without_a_good_checkpoint(tmp_path):
    save(tmp_path, "model_final.pth", float("nan"))
    (tmp_path / "model_0000002.pth").write_bytes(b"not a checkpoint")
    line = nonfinite_message("finetune_net.py", detectron2_error(0, loss=float("nan")),
                             cfg_in(tmp_path))
    assert line.startswith("finetune_net.py: non-finite loss at iteration 0: loss nan;")
    assert "no checkpoint with finite weights yet" in line
    assert "AMP" not in line  # AMP is off: nothing to turn off
    assert last_good_checkpoint(str(tmp_path / "missing")) is None


def test_pretraining_blow_up_ends_with_one_line_and_no_export(load_module, bank_path, tmp_path):
    """A real divergence (LR 1e30): train_net.py's main ends with the one line, and the broken
    weights are not exported."""
    from test_train_net import CONFIG, TINY

    train_net = load_module("projects/MontagePretrain/train_net.py")
    argv = ["--config-file", CONFIG, "MONTAGE.BANK", bank_path, "OUTPUT_DIR", str(tmp_path)]
    argv += TINY + ["SOLVER.BASE_LR", "1e30", "SOLVER.WARMUP_ITERS", "0", "MONTAGE.LOG_PERIOD", "1"]
    with pytest.raises(SystemExit) as info:
        train_net.main(default_argument_parser().parse_args(argv))
    line = str(info.value.code)
    assert line.startswith("train_net.py: non-finite loss at iteration ") and "\n" not in line
    assert "SOLVER.BASE_LR (now 1e+30)" in line
    assert not (tmp_path / "montage_backbone.pkl").exists()


def test_box_head_divergence_names_the_last_logged_losses(tmp_path):
    """Detectron2's box head raises its own FloatingPointError with no loss dict: the line then
    shows the losses the trainer logged last."""
    error = FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
    logged = {"loss_cls": (1.1, 3), "total_loss": (2.5, 3)}
    line = nonfinite_message("finetune_net.py", error, cfg_in(tmp_path), iteration=4, logged=logged)
    assert line.startswith("finetune_net.py: non-finite loss at iteration 4: Predicted boxes")
    assert "losses last logged at iteration 3: loss_cls 1.1, total_loss 2.5" in line

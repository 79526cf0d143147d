"""
One line for a non-finite loss, in place of Detectron2's traceback.

Detectron2's trainer raises ``FloatingPointError("Loss became infinite or NaN at
iteration=N!\\nloss_dict = {...}")`` when the summed loss it logs is not finite.
:func:`nonfinite_message` turns that into one line for ``train_net.py`` and ``finetune_net.py``:
the iteration, every loss term with its value (the non-finite ones first), the knobs to try with
their current values, and the last checkpoint whose weights are all finite, to ``--resume`` from.
"""
import math
import os
import re

import torch

_ITERATION = re.compile(r"iteration=(\d+)")
# "'loss_cls': nan" or, with NumPy 2, "'loss_cls': np.float64(nan)"
_TERM = re.compile(r"'([^']+)':\s*(?:np\.float\d+\()?([-+0-9.eEinfINFaN]+)\)?")
_CHECKPOINT = re.compile(r"^model_(\d+|final)\.pth$")


def loss_terms(text):
    """``{name: value}`` of the loss dict in Detectron2's message (values as floats; nan and inf
    kept); ``{}`` when the message has none."""
    body = text.split("loss_dict", 1)[1] if "loss_dict" in text else ""
    terms = {}
    for name, value in _TERM.findall(body):
        try:
            terms[name] = float(value)
        except ValueError:
            continue
    return terms


def _finite_weights(path):
    """True when every floating tensor of the checkpoint's ``model`` is finite (read with
    ``weights_only``: no code in the file runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable or not a checkpoint: not a good one
        return False
    state = state.get("model", state) if isinstance(state, dict) else {}
    tensors = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def last_good_checkpoint(output_dir):
    """The newest ``model_*.pth`` in ``output_dir`` whose weights are all finite (the loss is
    checked only every few iterations, so the newest file may already hold NaN), or None."""
    try:
        names = [n for n in os.listdir(output_dir) if _CHECKPOINT.match(n)]
    except OSError:
        return None

    def order(name):
        it = _CHECKPOINT.match(name).group(1)
        return math.inf if it == "final" else int(it)

    for name in sorted(names, key=order, reverse=True):
        path = os.path.join(output_dir, name)
        if _finite_weights(path):
            return path
    return None


def latest_losses(trainer):
    """``{name: (value, iteration)}``: the losses the trainer's EventStorage logged last
    (``total_loss`` and ``loss_*``), or ``{}``."""
    storage = getattr(trainer, "storage", None)
    try:
        latest = storage.latest() if storage is not None else {}
    except Exception:
        return {}
    return {k: v for k, v in latest.items() if k == "total_loss" or k.startswith("loss")}


def nonfinite_message(tool, error, cfg, iteration=None, check_period=None, logged=None):
    """
    One line for ``error`` (Detectron2's FloatingPointError) of the run configured by ``cfg``.

    Args:
        tool: the script's name, first on the line.
        iteration: the trainer's iteration, used when the message names none.
        check_period: iterations between loss checks (``MONTAGE.LOG_PERIOD`` in pre-training),
            named on the line when > 1: the loss may have gone bad up to that many iterations
            earlier.
        logged: :func:`latest_losses`, shown when the error names no loss terms (Detectron2's
            "Predicted boxes or scores contain Inf/NaN" comes from the box head, not the
            loss check).
    """
    text = str(error)
    found = _ITERATION.search(text)
    it = int(found.group(1)) if found else iteration
    terms = loss_terms(text)
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    shown = bad + [k for k in terms if k not in bad]
    listed = ", ".join(f"{k} {terms[k]:.4g}" for k in shown)
    if not listed:
        listed = text.strip().splitlines()[0].rstrip(".") if text.strip() else type(error).__name__
        if logged:
            at = max(i for _, i in logged.values())
            listed += (f"; losses last logged at iteration {at}: "
                       + ", ".join(f"{k} {v:.4g}" for k, (v, _) in sorted(logged.items())))
    checked = (f" (checked every {check_period} iterations: MONTAGE.LOG_PERIOD)"
               if check_period and check_period > 1 else "")
    s = cfg.SOLVER
    clip = (f"{s.CLIP_GRADIENTS.CLIP_TYPE} {s.CLIP_GRADIENTS.CLIP_VALUE:g}"
            if s.CLIP_GRADIENTS.ENABLED else "off")
    knobs = (f"lower SOLVER.BASE_LR (now {s.BASE_LR:g}), a longer SOLVER.WARMUP_ITERS (now "
             f"{s.WARMUP_ITERS}) or lower SOLVER.WARMUP_FACTOR (now {s.WARMUP_FACTOR:g}), "
             f"SOLVER.CLIP_GRADIENTS.ENABLED True (now {clip})")
    if s.AMP.ENABLED:  # fp16's range is one cause; bf16 has fp32's range but less precision
        knobs += ", SOLVER.AMP.ENABLED False (now True)"
    good = last_good_checkpoint(cfg.OUTPUT_DIR)
    where = (f"last good checkpoint {good}: change a knob and rerun with --resume" if good else
             "no checkpoint with finite weights yet: change a knob and start again")
    return f"{tool}: non-finite loss at iteration {it}{checked}: {listed}; try {knobs}; {where}"

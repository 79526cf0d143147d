"""
What the first fine-tuning iterations do to each backbone stage: a trainer hook.

For the first ``num_iters`` iterations of a detector's training it records, every iteration:

* ``total_loss`` (Detectron2's sum of the detector losses, before clipping);
* per group (``stem``, ``res2`` ... ``res5``, ``fpn``, ``rpn``, ``roi_heads``), over the group's
  4-d conv weights: the weight norm ``|w|``, the gradient norm ``|g|`` (after clipping, what the
  optimizer used) and the relative update ``|w_after - w_before| / |w_before|``, the quantity
  that ``lr / |w|^2`` predicts for BN-followed convs.

It is written to ``OUTPUT_DIR/handoff_trace.json`` when those iterations are done (or training
ends first). ``finetune_net.py --trace-iters N`` adds it; the cost is one copy of the conv
weights per traced iteration.
"""
import json
import logging
import os
from collections import OrderedDict

import torch

from detectron2.engine import HookBase
from detectron2.utils import comm

from .weight_scale import stage_of

__all__ = ["group_of", "HandoffTrace"]

logger = logging.getLogger(__name__)


def group_of(name):
    """Parameter name -> trace group: the ResNet stage, else ``fpn``, ``rpn``, ``roi_heads``
    (``roi_heads.res5.*`` of a C4 detector counts as ``res5``), else None."""
    stage = stage_of(name)
    if stage:
        return stage
    name = name[len("module."):] if name.startswith("module.") else name
    if name.startswith("backbone.fpn_") or name.startswith("backbone.top_block"):
        return "fpn"
    for g in ("proposal_generator", "roi_heads"):
        if name.startswith(g + "."):
            return "rpn" if g == "proposal_generator" else "roi_heads"
    return None


class HandoffTrace(HookBase):
    """Per-iteration loss, weight / gradient norms and relative updates of each group's convs."""

    def __init__(self, num_iters, path):
        """
        Args:
            num_iters (int): iterations to trace from the start of training (> 0).
            path (str): JSON file written at the end of the traced iterations.
        """
        self.num_iters, self.path = int(num_iters), path
        self.rows, self._before, self._written = [], None, False

    def _params(self):
        model = self.trainer.model
        model = getattr(model, "module", model)
        groups = OrderedDict()
        for name, p in model.named_parameters():
            g = group_of(name)
            if g is not None and p.dim() == 4 and p.requires_grad:
                groups.setdefault(g, []).append(p)
        return groups

    def before_step(self):
        if self.trainer.iter >= self.num_iters:
            return
        self._before = {g: [p.detach().clone() for p in ps] for g, ps in self._params().items()}

    @torch.no_grad()
    def after_step(self):
        it = self.trainer.iter
        if self._before is None or it >= self.num_iters:
            return
        row = {"iter": it}
        hist = self.trainer.storage.history("total_loss") if "total_loss" in \
            self.trainer.storage.histories() else None
        row["total_loss"] = float(hist.latest()) if hist is not None else None
        for g, ps in self._params().items():
            before = self._before[g]
            w2 = sum(float((b.double() ** 2).sum()) for b in before)
            d2 = sum(float(((p.double() - b.double()) ** 2).sum()) for p, b in zip(ps, before))
            g2 = sum(float((p.grad.double() ** 2).sum()) for p in ps if p.grad is not None)
            row[g] = dict(w=w2 ** 0.5, grad=g2 ** 0.5, rel_update=(d2 / w2) ** 0.5 if w2 else 0.0)
        self.rows.append(row)
        self._before = None
        if it + 1 >= self.num_iters:
            self._write()

    def after_train(self):
        self._write()

    def _write(self):
        if self._written or not self.rows or not comm.is_main_process():
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"num_iters": len(self.rows), "rows": self.rows}, f)
        os.replace(tmp, self.path)
        self._written = True
        logger.info("Hand-off trace of %d iterations written to %s", len(self.rows), self.path)

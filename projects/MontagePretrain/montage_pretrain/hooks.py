"""Trainer hooks of Montage pre-training: ERF refresh, feature-collapse guard, backbone export."""
import logging
import os
import time

import torch

from detectron2.engine import HookBase
from detectron2.utils import comm

from .data import MontageStream, collate_montages
from .diagnostics import last_feature_health
from .export import export_backbone

__all__ = ["ERFRefreshHook", "FeatureCollapseHook", "FeatureCollapseError", "ExportHook",
           "collapse_message", "is_collapsed", "montage_feature_health", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model):
    """Returns the module inside a (Distributed)DataParallel wrapper, or the model itself."""
    return model.module if hasattr(model, "module") else model


def fixed_montages(cfg, seed, num):
    """``num`` 4-crop montages drawn once from rank 0's stream with ``seed`` (the same on every
    process), collated as a training batch."""
    stream = iter(MontageStream.from_config(cfg, seed, crops_per_image=4, rank=0))
    return collate_montages([next(stream) for _ in range(num)])


class ERFRefreshHook(HookBase):
    """
    Computes the ERF-adaptive label weights (Eq. 2) before training from the randomly
    initialised network, then refreshes them every ``period`` iterations.

    The montages used are a fixed set drawn once with a fixed seed, so the only thing that
    changes between refreshes is the network. A resumed run loads ``erf_weights`` and
    ``erf_iter`` from its checkpoint and does not recompute them.

    Several processes: every rank draws the same montage set (the stream of rank 0) and runs
    the computation; a synchronised norm (naiveSyncBN, SyncBN) calibrates with collectives, so
    no rank may skip it. Rank 0's weights are then broadcast, so all ranks train on
    bit-identical targets.
    """

    # Offset of the fixed montage set's seed from cfg.SEED, so it is not the first training batch.
    SEED_OFFSET = 7919

    def __init__(self, cfg):
        """
        Args:
            cfg (CfgNode): reads ``MONTAGE.ERF_PERIOD`` (refresh every that many iterations;
                0 = only before training), ``MONTAGE.ERF_NUM_IMAGES`` (montages averaged per
                estimate), the montage stream keys (``MontageStream.from_config``) and ``SEED``.
        """
        self._cfg = cfg
        self._period = cfg.MONTAGE.ERF_PERIOD
        self._num_images = cfg.MONTAGE.ERF_NUM_IMAGES
        self._seed = max(cfg.SEED, 0) + self.SEED_OFFSET
        self._batch = None

    def _montages(self):
        if self._batch is None:
            # ERF maps are measured on 4-crop montages, whatever the training objective; rank 0's
            # stream on every process, so all ranks measure the same montages.
            self._batch = fixed_montages(self._cfg, self._seed, self._num_images)
        return self._batch

    def _refresh(self, iteration):
        model = unwrap_model(self.trainer.model)
        start = time.perf_counter()
        model.refresh_erf_weights(self._montages(), iteration)
        if comm.get_world_size() > 1:
            # Same montages and parameters on every rank, but plain BN keeps per-rank running
            # statistics (DDP does not sync buffers here) and reductions may drift: all ranks
            # take rank 0's weights.
            torch.distributed.broadcast(model.erf_weights, src=0)
        own = model.erf_weights.gather(0, model.region_map[None]).squeeze(0)
        logger.info(
            "ERF weights refreshed at iter %d in %.1fs: own-region weight min %.3f mean %.3f",
            iteration, time.perf_counter() - start, own.min().item(), own.mean().item(),
        )
        self.trainer.storage.put_scalar("montage/erf_own_weight", own.mean().item(),
                                        smoothing_hint=False)

    def before_train(self):
        model = unwrap_model(self.trainer.model)
        if model.loss_name == "erf" and int(model.erf_iter) < 0:
            self._refresh(self.trainer.iter)

    def before_step(self):
        model = unwrap_model(self.trainer.model)
        it = self.trainer.iter
        if (model.loss_name == "erf" and self._period > 0 and it > 0 and it % self._period == 0
                and int(model.erf_iter) != it):
            self._refresh(it)


def montage_feature_health(model, batch):
    """:func:`~montage_pretrain.diagnostics.last_feature_health` of a Montage model's backbone on
    the montages of ``batch`` (assembled without the training augmentation)."""
    was_training = model.training
    model.eval()
    try:
        images = model.make_images(batch)
    finally:
        model.train(was_training)
    return last_feature_health(model.backbone, images)


def is_collapsed(health, reference_pr, min_pr_ratio, max_dead):
    """The guard's rule: PR below ``min_pr_ratio`` x random init's, or ``max_dead`` of the
    channels (or more) dead."""
    return health["pr"] < min_pr_ratio * reference_pr or health["dead"] >= max_dead


# The start of the guard's message: a log that holds it comes from a collapsed run.
COLLAPSE_MARK = "pre-training collapsed by iteration"


def collapse_message(log_path):
    """The guard's first message in a run's log (from its mark on, stripped), or None (no such
    message, or no log)."""
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if COLLAPSE_MARK in line:
                    return line[line.index(COLLAPSE_MARK):].strip()
    except OSError:
        pass
    return None


class FeatureCollapseError(RuntimeError):
    """Pre-training collapsed its features (``MONTAGE.COLLAPSE``); the message is one line."""


class FeatureCollapseHook(HookBase):
    """
    Guards against a collapsed pre-training (``MONTAGE.COLLAPSE``; why: the config comments and
    the project README, "Cause (2), taken apart"). Before the first step it measures the
    participation ratio (PR) of the backbone's coarsest output on a fixed montage set, the
    random init's reference; every ``PERIOD`` iterations (and after the last) it measures it
    again and writes ``montage/feature_pr`` (and ``montage/dead_channels``). Below
    ``MIN_PR_RATIO`` x the reference, or with ``MAX_DEAD`` of the channels dead, "stop" raises
    :class:`FeatureCollapseError` (nothing more is checkpointed, no export is written), "warn"
    logs once and goes on. The reference is saved in checkpoints, so a resumed run keeps the
    random init's.
    """

    SEED_OFFSET = 104729  # its own montage set, not the ERF's nor the first training batch

    def __init__(self, cfg):
        self._cfg = cfg
        self._period = int(cfg.MONTAGE.COLLAPSE.PERIOD)
        self._ratio = float(cfg.MONTAGE.COLLAPSE.MIN_PR_RATIO)
        self._max_dead = float(cfg.MONTAGE.COLLAPSE.MAX_DEAD)
        self._stop = cfg.MONTAGE.COLLAPSE.ACTION == "stop"
        self._batch = None
        self.reference = None  # PR of the random init
        self._warned = False

    @classmethod
    def montages(cls, cfg):
        """The guard's fixed montage set of a config (scripts/collapse_check.py uses it too)."""
        return fixed_montages(cfg, max(cfg.SEED, 0) + cls.SEED_OFFSET,
                              cfg.MONTAGE.COLLAPSE.NUM_IMAGES)

    def state_dict(self):
        return {"reference": self.reference} if self.reference is not None else {}

    def load_state_dict(self, state):
        self.reference = state.get("reference")

    def measure(self):
        """``{"pr", "dead"}`` of the current network (see :func:`last_feature_health`); the same
        value on every process (rank 0's)."""
        if self._batch is None:
            self._batch = self.montages(self._cfg)
        model = unwrap_model(self.trainer.model)
        health = montage_feature_health(model, self._batch)
        if comm.get_world_size() > 1:
            values = torch.tensor([health["pr"], health["dead"]], device=model.device)
            torch.distributed.broadcast(values, src=0)
            health = dict(pr=float(values[0]), dead=float(values[1]))
        return health

    def before_train(self):
        if self._period <= 0:
            return
        if self.reference is None:
            if self.trainer.iter > 0:  # resumed from a checkpoint without a reference
                logger.info("Feature-collapse guard off: the checkpoint has no random-init reference")
                self._period = 0
                return
            self.reference = self.measure()["pr"]
            logger.info("Feature-collapse guard: random-init participation ratio %.1f; the run "
                        "stops below %.1f or with %g of the channels dead", self.reference,
                        self._ratio * self.reference, self._max_dead)
        else:  # resumed: a collapsed checkpoint (model_final too) must not go on to an export
            self._check(self.trainer.iter)

    def after_step(self):
        it = self.trainer.iter + 1  # iterations done
        if self._period > 0 and (it % self._period == 0 or it >= self.trainer.max_iter):
            self._check(it)

    def _check(self, it):
        health = self.measure()
        storage = self.trainer.storage
        storage.put_scalar("montage/feature_pr", health["pr"], smoothing_hint=False)
        storage.put_scalar("montage/dead_channels", health["dead"], smoothing_hint=False)
        if not is_collapsed(health, self.reference, self._ratio, self._max_dead):
            return
        message = (
            f"{COLLAPSE_MARK} {it}: the last feature map's participation "
            f"ratio is {health['pr']:.1f} against random init's {self.reference:.1f} "
            f"(MONTAGE.COLLAPSE.MIN_PR_RATIO={self._ratio:g}) and {100 * health['dead']:.0f} % "
            f"of its channels are dead (MAX_DEAD={self._max_dead:g}); such an export "
            f"fine-tunes worse than random init; "
            f"start again with a lower SOLVER.BASE_LR (now {self._cfg.SOLVER.BASE_LR:g}; on "
            "banks of 0.7k-2.3k crops R-18 stayed healthy at <= 0.05 and collapsed at >= 0.1, "
            "whatever the batch)"
        )
        if self._stop:
            raise FeatureCollapseError(message)
        if not self._warned:
            logger.warning("%s. MONTAGE.COLLAPSE.ACTION=warn: going on.", message)
            self._warned = True


class ExportHook(HookBase):
    """Writes the Detectron2 backbone export (see :mod:`montage_pretrain.export`) after training."""

    def __init__(self, cfg, path):
        self._cfg = cfg
        self._path = path

    def after_train(self):
        # Only a finished run is exported (the loop leaves iter == max_iter): an interrupted
        # one re-exports when resumed, and one that failed at its last iteration (a non-finite
        # loss) must not export its weights.
        if comm.is_main_process() and self.trainer.iter >= self.trainer.max_iter:
            os.makedirs(os.path.dirname(self._path) or ".", exist_ok=True)
            export_backbone(unwrap_model(self.trainer.model), self._cfg, self._path,
                            iteration=self.trainer.iter)
            logger.info("Exported the pre-trained backbone to %s", self._path)

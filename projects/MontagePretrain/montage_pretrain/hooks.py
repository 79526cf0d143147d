"""Trainer hooks of Montage pre-training: ERF refresh and backbone export."""
import logging
import os
import time

import torch

from detectron2.engine import HookBase
from detectron2.utils import comm

from .data import MontageStream, collate_montages
from .export import export_backbone

__all__ = ["ERFRefreshHook", "ExportHook", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model):
    """Returns the module inside a (Distributed)DataParallel wrapper, or the model itself."""
    return model.module if hasattr(model, "module") else model


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
            stream = iter(MontageStream.from_config(self._cfg, self._seed, crops_per_image=4,
                                                    rank=0))
            self._batch = collate_montages([next(stream) for _ in range(self._num_images)])
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

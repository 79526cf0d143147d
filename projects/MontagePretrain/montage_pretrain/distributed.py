"""
Several processes without CUDA (Detectron2's ``launch`` uses gloo there): the two places where
stock Detectron2 assumes one GPU per process.

* ``DefaultTrainer`` wraps the model with ``DistributedDataParallel(device_ids=[local_rank])``,
  which torch refuses for a CPU model ("device_ids ... module parameters {device(type='cpu')}");
  :func:`cpu_ddp` makes that wrapping pass ``device_ids=None`` for CPU models.
* ``SyncBN`` / ``nnSyncBN`` build ``torch.nn.SyncBatchNorm``, whose forward raises on CPU
  tensors; :func:`fit_sync_norms` swaps them for ``naiveSyncBN`` (Detectron2's all-reduce
  SyncBN, which runs on gloo) and keeps the statistics synchronised across processes.
"""
import contextlib
import logging

from detectron2.engine import defaults as _d2_defaults
from detectron2.utils import comm

__all__ = ["cpu_ddp", "create_ddp_model", "fit_sync_norms", "CUDA_ONLY_SYNC_NORMS"]

logger = logging.getLogger(__name__)

# Norm names that build torch.nn.SyncBatchNorm (CUDA only); naiveSyncBN is their CPU stand-in.
CUDA_ONLY_SYNC_NORMS = ("SyncBN", "nnSyncBN")


def create_ddp_model(model, **kwargs):
    """
    Detectron2's ``create_ddp_model``, except that a model on the CPU gets ``device_ids=None``
    (DDP's only valid value for CPU modules) instead of ``[local_rank]``.
    """
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if comm.get_world_size() > 1 and on_cpu:
        kwargs.setdefault("device_ids", None)
    return _ORIGINAL_CREATE_DDP_MODEL(model, **kwargs)


_ORIGINAL_CREATE_DDP_MODEL = _d2_defaults.create_ddp_model


@contextlib.contextmanager
def cpu_ddp():
    """
    Within the block, ``DefaultTrainer.__init__`` wraps CPU models with DDP correctly::

        with cpu_ddp():
            super().__init__(cfg)

    ``DefaultTrainer.__init__`` calls the module-level ``create_ddp_model`` of
    ``detectron2.engine.defaults`` and offers no hook for its arguments, so that name points at
    :func:`create_ddp_model` for the duration of the block only.
    """
    _d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        _d2_defaults.create_ddp_model = _ORIGINAL_CREATE_DDP_MODEL


def fit_sync_norms(cfg, world_size):
    """
    Replaces ``SyncBN`` / ``nnSyncBN`` by ``naiveSyncBN`` in every ``*.NORM`` key of ``cfg`` (in
    place, logged) when several processes train on the CPU, where torch's SyncBatchNorm raises.
    Does nothing on one process (the callers use plain BN there) or on CUDA.

    Returns:
        list[str]: the keys changed.
    """
    if world_size <= 1 or not cfg.MODEL.DEVICE.startswith("cpu"):
        return []
    return _replace_norms(cfg, CUDA_ONLY_SYNC_NORMS, "naiveSyncBN", world_size)


def _replace_norms(node, old, new, world_size, prefix=""):
    changed = []
    for key, value in node.items():
        if hasattr(value, "items"):
            changed += _replace_norms(value, old, new, world_size, f"{prefix}{key}.")
        elif key == "NORM" and value in old:
            logger.warning(
                "%s%s=%s needs CUDA (torch.nn.SyncBatchNorm); %d CPU processes use %s, "
                "Detectron2's all-reduce SyncBN, instead", prefix, key, value, world_size, new,
            )
            node[key] = new
            changed.append(prefix + key)
    return changed

"""
The infinite stream of Montage samples (2 S + 1 T + 1 W per montage) and its loader.

Workers only draw, decode and batch crops; the montages themselves are assembled on the model's
device by :func:`montage_pretrain.montage.assemble_montages`.

Two batch formats, one per collate:

* packed (:func:`collate_packed`, the training loader's default, ``MONTAGE.PACKED_CROPS``): the
  crops' HWC pixels back to back in one flat uint8 buffer + per-crop byte offsets and sizes.
  What crosses to the main process, is pinned and is copied to the device is the crops' own
  pixels (1.0x), not a batch padded to its largest crop (~9x on COCO-like banks). The device
  rebuilds the padded batch (:func:`montage_pretrain.montage.unpack_crops`), pixel for pixel;
* padded (:func:`collate_montages`): uint8 (N*k, 3, Hm, Wm), what assembly consumes; the ERF
  hook's fixed montage set and ``MONTAGE.PACKED_CROPS False`` use it.

Pixels are copied once on the host: a decoded crop stays in its HWC array (the stream yields a
CHW view of it), and the collate writes it straight into the batch, which inside a DataLoader
worker lives in shared memory so that handing it to the main process copies nothing.
"""
import logging
import math
import os
import signal
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from builder.bank import GROUP_S, GROUP_T, GROUP_W, GROUPS
from detectron2.utils import comm

from builder.bank import SampleBank

__all__ = [
    "MontageStream", "MontageLoader", "collate_montages", "collate_packed", "is_packed",
    "build_montage_train_loader", "FALLBACKS",
]

logger = logging.getLogger(__name__)

FALLBACKS = ("nearest", "error")
# "nearest": the group nearest by aspect (T < S < W) that is not empty.
_NEAREST = {GROUP_T: (GROUP_S, GROUP_W), GROUP_W: (GROUP_S, GROUP_T)}
# (bank, group, source) triples already logged. A forked worker inherits the set, so a fallback
# is logged once by the main process rather than once more per worker; a spawned worker logs it.
_warned = set()


def _warn_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


class MontageStream(IterableDataset):
    """
    Endless stream of montage samples, each a dict:

    * ``crops``: list of k uint8 tensors (3, h, w), RGB, in region order 0 = TL (the S crop with
      the smaller original-box area), 1 = TR (W), 2 = BL (T), 3 = BR (larger-area S); each a
      CHW view (not contiguous) of the decoded HWC array: :func:`collate_montages` does the
      one copy;
    * ``labels``: int64 (k,).

    Draws are uniform with replacement within each group, so there are no epochs. The RNG is
    seeded from (seed, rank, worker id): every process and worker draws its own stream and the
    stream is reproducible for a fixed world size and worker count. ``rank`` is read when the
    stream is built (in the training process), so loader workers draw their process's stream
    whatever their start method; a fixed ``rank`` gives every process the same stream.

    Group fallback ("nearest"): a group with fewer than ``min_group_size`` crops is replaced by
    the nearest usable group by aspect (T < S < W): a missing T draws from S (else W), a missing
    W from S (else T), a missing S from the larger of W and T. The cover-crop fills the region
    whatever the crop's aspect. Each substitution is logged once per process. "error" raises.

    ``crops_per_image=1`` is the no-montage baseline: one crop drawn uniformly from the whole bank.
    """

    def __init__(self, bank_path, crops_per_image=4, seed=0, min_group_size=1, fallback="nearest",
                 rank=None):
        """
        Args:
            bank_path (str): HDF5 sample bank.
            crops_per_image (int): 4 (montage) or 1 (single-crop baseline).
            seed (int): base seed.
            min_group_size (int): a group with fewer crops counts as empty.
            fallback (str): one of :data:`FALLBACKS`.
            rank (int or None): stream index of this process; None = ``comm.get_rank()``.
        """
        super().__init__()
        if crops_per_image not in (1, 4):
            raise ValueError(f"crops_per_image={crops_per_image}: use 4 (montage) or 1 (single)")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback={fallback!r}: use one of {FALLBACKS}")
        self.bank = SampleBank(bank_path)
        self.crops_per_image = crops_per_image
        self.seed = int(seed)
        # Read here, not in the worker: a spawned worker has no process group (rank 0 there).
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.min_group_size = max(int(min_group_size), 1)
        self.fallback = fallback
        # Read the small arrays now (checks the bank early) and close the handle before any
        # DataLoader fork; workers reopen their own for decoding.
        self.labels = self.bank.labels
        self.box_areas = self.bank.box_areas
        self.pools = self._make_pools() if crops_per_image == 4 else None
        if len(self.labels) == 0:
            raise ValueError(f"sample bank {bank_path} is empty; rebuild it (make samples)")
        self.bank.close()

    @classmethod
    def from_config(cls, cfg, seed, crops_per_image=None, rank=None):
        """
        The stream of ``cfg.MONTAGE`` (bank, group fallback, min group size) with ``seed``;
        ``crops_per_image`` defaults to 1 for ``MONTAGE.LOSS == "single"``, else 4; ``rank`` as
        in the constructor.
        """
        if crops_per_image is None:
            crops_per_image = 1 if cfg.MONTAGE.LOSS == "single" else 4
        return cls(
            cfg.MONTAGE.BANK,
            crops_per_image=crops_per_image,
            seed=seed,
            min_group_size=cfg.MONTAGE.MIN_GROUP_SIZE,
            fallback=cfg.MONTAGE.GROUP_FALLBACK,
            rank=rank,
        )

    def _make_pools(self, warn=True):
        """Index arrays to draw S, T, W from, after the fallback rule."""
        idx = {g: self.bank.group_indices(g) for g in (GROUP_S, GROUP_T, GROUP_W)}
        usable = {g: len(v) >= self.min_group_size for g, v in idx.items()}
        if not any(usable.values()):
            raise ValueError(
                f"{self.bank.path}: no group has >= {self.min_group_size} crops "
                f"(S/T/W = {[len(idx[g]) for g in (GROUP_S, GROUP_T, GROUP_W)]}); rebuild the bank"
            )
        pools = {}
        for g in (GROUP_S, GROUP_T, GROUP_W):
            if usable[g]:
                pools[g] = idx[g]
                continue
            if self.fallback == "error":
                raise ValueError(
                    f"{self.bank.path}: group {GROUPS[g]} has {len(idx[g])} crops < "
                    f"MONTAGE.MIN_GROUP_SIZE={self.min_group_size}; set MONTAGE.GROUP_FALLBACK "
                    "nearest or rebuild the bank"
                )
            if g == GROUP_S:
                src = max((GROUP_W, GROUP_T), key=lambda k: (usable[k], len(idx[k])))
            else:
                src = next(k for k in _NEAREST[g] if usable[k])
            pools[g] = idx[src]
            if warn:
                _warn_once((self.bank.path, g, src), (
                    f"sample bank {self.bank.path}: group {GROUPS[g]} has {len(idx[g])} crops "
                    f"(< {self.min_group_size}); drawing its crops from group {GROUPS[src]} "
                    "(fallback 'nearest': T->S->W by aspect, S->larger of W/T), cover-cropped"
                ))
        return pools

    def _rng(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return np.random.default_rng([self.seed, self.rank, worker])

    def _draw(self, rng):
        """Sample indices of one montage, in region order."""
        if self.crops_per_image == 1:
            return [int(rng.integers(len(self.labels)))]
        p = self.pools
        s1, s2 = (int(v) for v in p[GROUP_S][rng.integers(len(p[GROUP_S]), size=2)])
        t = int(p[GROUP_T][rng.integers(len(p[GROUP_T]))])
        w = int(p[GROUP_W][rng.integers(len(p[GROUP_W]))])
        if self.box_areas[s2] < self.box_areas[s1]:
            s1, s2 = s2, s1
        return [s1, w, t, s2]

    def __iter__(self):
        if self.crops_per_image == 4:
            self.pools = self._make_pools(warn=True)  # logs the fallback in this process
        rng = self._rng()
        while True:
            idx = self._draw(rng)
            # Views: the HWC -> CHW copy happens once, in collate_montages.
            crops = [torch.from_numpy(self.bank.decode(i)).permute(2, 0, 1) for i in idx]
            yield {"crops": crops, "labels": torch.as_tensor(self.labels[idx], dtype=torch.long)}


def _new_uint8(shape):
    """
    Uninitialised uint8 tensor of ``shape``; inside a DataLoader worker its storage is shared
    memory (as torch's default_collate allocates it), so sending it to the main process does
    not copy it again.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    elem = torch.empty(0, dtype=torch.uint8)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(shape)


def collate_montages(items):
    """
    Pads the crops of ``items`` into one tensor (in the worker, so only one copy crosses).

    Each crop's pixels are written once, straight from its (possibly HWC-strided) tensor into
    the batch, and only the padding around it is zeroed. Inside a DataLoader worker the batch
    is allocated in shared memory.

    Args:
        items (list[dict]): N samples of :class:`MontageStream`, k crops each; a crop is any
            uint8 (3, h, w) tensor, contiguous or not.

    Returns:
        dict: ``crops`` uint8 (N*k, 3, Hm, Wm) zero-padded at the bottom/right, ``sizes`` int64
        (N*k, 2) true (h, w), ``labels`` int64 (N, k).
    """
    crops = [c for it in items for c in it["crops"]]
    hw = [(int(c.shape[1]), int(c.shape[2])) for c in crops]
    sizes = torch.tensor(hw, dtype=torch.long)
    hm, wm = max(h for h, _ in hw), max(w for _, w in hw)
    out = _new_uint8((len(crops), 3, hm, wm))
    # Through numpy: its strided copy transposes HWC -> CHW about twice as fast as torch's, and
    # its slicing costs less per crop.
    buf = out.numpy()
    for i, (c, (h, w)) in enumerate(zip(crops, hw)):
        dst = buf[i]
        np.copyto(dst[:, :h, :w], c.numpy() if torch.is_tensor(c) else c)  # the one copy
        dst[:, h:, :] = 0
        dst[:, :h, w:] = 0
    labels = torch.stack([it["labels"] for it in items])
    return {"crops": out, "sizes": sizes, "labels": labels}


def collate_packed(items):
    """
    Packs the crops of ``items`` into one flat buffer (ragged: no padding), in the worker.

    Each crop's pixels are written once, as HWC rows (the decoder's own layout: a plain memcpy
    for the stream's CHW views of decoded arrays), at ``offsets[i]``. Inside a DataLoader worker
    the buffer is allocated in shared memory.

    Args:
        items (list[dict]): as for :func:`collate_montages`.

    Returns:
        dict: ``pixels`` uint8 (sum of 3*h*w,) the crops back to back, crop i HWC at
        ``pixels[offsets[i]:offsets[i] + 3*h*w]``; ``offsets`` int64 (N*k,) byte offsets;
        ``sizes`` int64 (N*k, 2) (h, w); ``labels`` int64 (N, k).
        :func:`montage_pretrain.montage.unpack_crops` rebuilds the padded crops of
        :func:`collate_montages` from it, on any device.
    """
    crops = [c for it in items for c in it["crops"]]
    hw = [(int(c.shape[1]), int(c.shape[2])) for c in crops]
    sizes = torch.tensor(hw, dtype=torch.long)
    nbytes = sizes.prod(1) * 3
    ends = torch.cumsum(nbytes, 0)
    offsets = ends - nbytes
    out = _new_uint8((int(ends[-1]) if len(hw) else 0,))
    buf = out.numpy()
    for c, start, end, (h, w) in zip(crops, offsets.tolist(), ends.tolist(), hw):
        hwc = c.permute(1, 2, 0) if torch.is_tensor(c) else np.transpose(c, (1, 2, 0))
        hwc = hwc.numpy() if torch.is_tensor(hwc) else hwc
        np.copyto(buf[start:end].reshape(h, w, 3), hwc)  # the one copy (a memcpy for views)
    labels = torch.stack([it["labels"] for it in items])
    return {"pixels": out, "offsets": offsets, "sizes": sizes, "labels": labels}


def is_packed(batch):
    """True for a batch of :func:`collate_packed`, False for one of :func:`collate_montages`."""
    return "pixels" in batch


class MontageLoader(DataLoader):
    """
    A DataLoader whose iterator reports a worker that died (SIGKILL, e.g. by the out-of-memory
    killer) as one clear error with the fix, whatever torch raised where it noticed: its own
    "DataLoader worker ... exited unexpectedly", or a bare ``ConnectionResetError`` /
    ``FileNotFoundError`` when the dead worker had already queued a batch whose shared memory
    only it could hand over.
    """

    # Seconds to wait for a worker whose connection broke to be seen dead (it dies after its
    # sockets close).
    DEATH_GRACE = 2.0

    def __iter__(self):
        it = super().__iter__()
        return _WorkerDeathCheck(it, self.DEATH_GRACE) if self.num_workers > 0 else it


class _WorkerDeathCheck:
    """Iterator wrapper of :class:`MontageLoader`: errors from dead workers get one message."""

    def __init__(self, it, grace):
        self._it = it
        self._grace = grace

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            dead = _dead_workers(getattr(self._it, "_workers", []), self._grace)
            if not dead:
                raise
            raise RuntimeError(_death_message(dead)) from e


def _dead_workers(workers, grace):
    """Workers that have exited, waiting up to ``grace`` seconds for one to be seen dead."""
    deadline = time.monotonic() + grace
    while True:
        dead = [w for w in workers if w.exitcode is not None]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def _death_message(dead):
    """One line: which workers died and how, the likely cause and the fix."""
    causes = []
    for w in dead:
        code = w.exitcode
        if code < 0 and -code in signal.valid_signals():
            causes.append(f"pid {w.pid}, killed by {signal.Signals(-code).name}")
        else:
            causes.append(f"pid {w.pid}, exit code {code}")
    oom = any(w.exitcode == -signal.SIGKILL for w in dead)
    return (
        f"DataLoader worker ({'; '.join(causes)}) of the montage loader died"
        + (", usually the out-of-memory killer (see dmesg)" if oom else "")
        + ": lower DATALOADER.NUM_WORKERS or SOLVER.IMS_PER_BATCH and restart with --resume"
    )


def build_montage_train_loader(cfg):
    """
    The training loader of this process: an endless iterator of collated batches.

    Per-process batch = ``SOLVER.IMS_PER_BATCH // world_size`` montages; workers
    ``DATALOADER.NUM_WORKERS`` (0 = in process); ``MONTAGE.LOSS == "single"`` streams one crop per
    image. ``SEED < 0`` draws a random seed. Batches are packed (:func:`collate_packed`) unless
    ``MONTAGE.PACKED_CROPS`` is False (padded, :func:`collate_montages`).

    With CUDA the DataLoader's pin-memory thread pins each batch (off the main thread); packed,
    that is the crops' pixel bytes only, so the copy to the device can be ``non_blocking``.
    """
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total} is not divisible by the {world} processes; "
            f"choose a multiple of {world}"
        )
    seed = cfg.SEED if cfg.SEED >= 0 else int.from_bytes(os.urandom(4), "little") % (2**31)
    stream = MontageStream.from_config(cfg, seed)
    workers = cfg.DATALOADER.NUM_WORKERS
    return MontageLoader(
        stream,
        batch_size=total // world,
        num_workers=workers,
        collate_fn=collate_packed if cfg.MONTAGE.PACKED_CROPS else collate_montages,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        # Batches in flight per worker; 2 bounds the shared memory (/dev/shm) they occupy.
        prefetch_factor=2 if workers > 0 else None,
    )

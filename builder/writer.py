"""
Writes a sample bank (format: :mod:`builder.bank`) incrementally and atomically.

Rows go to resizable, chunked datasets in batches, so memory stays bounded by one batch however
large the dataset (full COCO is ~1M crops). Everything is written to ``OUT.tmp-<pid>`` next to
the output and renamed with ``os.replace`` only after the index and attributes are complete; the
``format`` attribute is the last thing written, so a killed build leaves at most a temp file
that :func:`builder.bank.check_bank` rejects, never a file that looks valid.
"""

import datetime
import json
import logging
import os

import h5py
import numpy as np

from .bank import FORMAT_NAME, FORMAT_VERSION, GROUPS

__all__ = ["BankWriter", "temp_path_for"]

logger = logging.getLogger(__name__)

# Rows per HDF5 chunk and per write; 1024 vlen references are 16 KiB.
_CHUNK = 1024


def temp_path_for(out_path):
    """Returns the temp file written before the rename (same dir, so ``os.replace`` is atomic)."""
    return f"{out_path}.tmp-{os.getpid()}"


class BankWriter:
    """
    Appends sample rows and produces the final bank on :meth:`finalize`.

    Use as a context manager: leaving the block with an exception (or without finalize) deletes
    the temp file.

    Example::

        with BankWriter("bank.h5", encoding="jpeg") as w:
            w.append(crops, label, group, size, image_id, box, crop_box)
            w.finalize(attrs)
    """

    def __init__(self, out_path, encoding="jpeg", chunk_rows=_CHUNK):
        self.out_path = out_path
        self.tmp_path = temp_path_for(out_path)
        self.encoding = encoding
        self.chunk_rows = int(chunk_rows)
        self.num_rows = 0
        self._pending = []
        self._pending_rows = 0
        self._done = False
        self.h5 = h5py.File(self.tmp_path, "w")
        self._create()

    def _create(self):
        chunk = self.chunk_rows
        specs = {
            "crops": ((), h5py.vlen_dtype(np.uint8)),
            "label": ((), np.int32),
            "group": ((), np.uint8),
            "size": ((2,), np.int32),
            "image_id": ((), np.int64),
            "box": ((4,), np.float32),
            "crop_box": ((4,), np.float32),
        }
        self.datasets = {}
        for name, (tail, dtype) in specs.items():
            self.datasets[name] = self.h5.create_dataset(
                name,
                shape=(0,) + tail,
                maxshape=(None,) + tail,
                dtype=dtype,
                chunks=(chunk,) + tail,
            )

    def append(self, crops, label, group, size, image_id, box, crop_box):
        """
        Queues rows; they are written once a chunk's worth has accumulated.

        Args:
            crops (list[bytes]): n encoded crops.
            label (ndarray): (n,) int32.  group (ndarray): (n,) uint8.
            size (ndarray): (n, 2) int32 (h, w).  image_id (int or ndarray): source image id(s).
            box, crop_box (ndarray): (n, 4) float32 xyxy.
        """
        n = len(crops)
        if n == 0:
            return
        ids = np.broadcast_to(np.asarray(image_id, dtype=np.int64), (n,))
        self._pending.append((list(crops), label, group, size, ids, box, crop_box))
        self._pending_rows += n
        if self._pending_rows >= self.chunk_rows:
            self.flush()

    def flush(self):
        """Writes all queued rows."""
        if not self._pending_rows:
            return
        cols = list(zip(*self._pending))
        crops = np.empty(self._pending_rows, dtype=object)
        for i, c in enumerate(c for part in cols[0] for c in part):
            crops[i] = np.frombuffer(c, dtype=np.uint8)
        arrays = {
            "label": np.concatenate(cols[1]).astype(np.int32),
            "group": np.concatenate(cols[2]).astype(np.uint8),
            "size": np.concatenate(cols[3]).astype(np.int32).reshape(-1, 2),
            "image_id": np.concatenate(cols[4]),
            "box": np.concatenate(cols[5]).astype(np.float32).reshape(-1, 4),
            "crop_box": np.concatenate(cols[6]).astype(np.float32).reshape(-1, 4),
        }
        start, stop = self.num_rows, self.num_rows + self._pending_rows
        # write_direct, not ds[a:b] = crops: h5py reads an object array whose crops all have the
        # same length as a 2-D block and fails to broadcast it.
        self.datasets["crops"].resize(stop, axis=0)
        self.datasets["crops"].write_direct(crops, dest_sel=np.s_[start:stop])
        for name, values in arrays.items():
            ds = self.datasets[name]
            ds.resize(stop, axis=0)
            ds[start:stop] = values
        self.num_rows = stop
        self._pending, self._pending_rows = [], 0

    def finalize(self, attrs):
        """
        Writes the group index and the root attributes, then renames the temp file to the output.

        Args:
            attrs (dict): root attributes (num_classes, category_names, ...); dicts and lists are
                stored as json strings. ``format``, ``version``, ``encoding`` and ``created`` are
                set here.

        Returns:
            str: the output path.
        """
        self.flush()
        groups = self.datasets["group"][...]
        for gid, name in enumerate(GROUPS):
            idx = np.flatnonzero(groups == gid).astype(np.int64)
            self.h5.create_dataset(f"index/{name}", data=idx)
        for key, value in attrs.items():
            self.h5.attrs[key] = (
                json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
            )
        self.h5.attrs["encoding"] = self.encoding
        self.h5.attrs["created"] = datetime.datetime.now().isoformat(timespec="seconds")
        # Written last: until here the file is not a valid bank.
        self.h5.attrs["version"] = FORMAT_VERSION
        self.h5.attrs["format"] = FORMAT_NAME
        self.h5.close()
        os.replace(self.tmp_path, self.out_path)
        self._done = True
        logger.info("wrote %s (%d samples)", self.out_path, self.num_rows)
        return self.out_path

    def abort(self):
        """Closes and deletes the temp file (no-op after finalize)."""
        if self._done:
            return
        try:
            self.h5.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()
        return False

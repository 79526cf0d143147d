"""Lazy, fork-safe reader of the HDF5 sample bank (format: ``builder/schema.py``)."""
import json
import os

import cv2
import h5py
import numpy as np

from builder.schema import GROUPS, check_bank

__all__ = ["SampleBank"]

# OpenCV >= 4.10 decodes to RGB directly (same pixels as IMREAD_COLOR + BGR2RGB, one pass less).
_IMREAD_COLOR_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


class SampleBank:
    """
    Read-only view of a sample bank.

    The HDF5 file is opened on first access in the current process and reopened after a fork
    (the pid is tracked): an HDF5 handle must never be shared across processes. Pickling drops
    the handle and the cached arrays, so the object can be sent to DataLoader workers (spawn or
    fork) and each worker opens its own handle.

    Small per-sample arrays (labels, groups, sizes, box areas, group indexes) are read once and
    cached; crops are read and decoded one at a time by :meth:`decode`, through the ``/crops``
    dataset object of this process's handle, kept (a lookup by name per crop costs more than
    the read).
    """

    def __init__(self, path):
        """
        Args:
            path (str): the ``.h5`` bank written by ``python -m builder build``.
        """
        self.path = os.fspath(path)
        self._check_exists()
        self._h5 = None
        self._pid = None
        self._crops = None
        self._cache = {}

    def _check_exists(self):
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"sample bank {self.path} not found; build it with `make samples BANK={self.path}`"
            )

    @property
    def h5(self):
        """The ``h5py.File`` of this process (opened and validated on first use)."""
        if self._h5 is None or self._pid != os.getpid():
            # After a fork the inherited handle belongs to the parent: forget it, never close it
            # here (closing would act on the parent's HDF5 state).
            self._check_exists()
            self._crops = None  # belonged to the forgotten handle
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
            check_bank(self._h5, self.path)
        return self._h5

    @property
    def crops_dataset(self):
        """The ``/crops`` dataset of this process's handle (looked up once per handle)."""
        h5 = self.h5  # reopens after a fork, which drops the dataset of the old handle
        if self._crops is None:
            self._crops = h5["crops"]
        return self._crops

    def close(self):
        """Closes this process's handle (it is reopened on the next access)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._pid = None
        self._crops = None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._h5 = None
        self._pid = None
        self._crops = None
        self._cache = {}

    def _cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @staticmethod
    def _attr(h5, key):
        value = h5.attrs[key]
        return value.decode() if isinstance(value, bytes) else value

    @property
    def num_classes(self):
        """int: foreground categories C (labels 0..C-1; C = background)."""
        return self._cached("num_classes", lambda: int(self.h5.attrs["num_classes"]))

    @property
    def category_names(self):
        """list[str]: the C category names in contiguous-label order."""
        return self._cached("names", lambda: json.loads(self._attr(self.h5, "category_names")))

    @property
    def labels(self):
        """np.ndarray: (N,) int64 labels 0..C."""
        return self._cached("labels", lambda: self.h5["label"][()].astype(np.int64))

    @property
    def groups(self):
        """np.ndarray: (N,) uint8 group ids, 0 = S, 1 = T, 2 = W."""
        return self._cached("groups", lambda: self.h5["group"][()])

    @property
    def sizes(self):
        """np.ndarray: (N, 2) int64 stored crop (height, width), pixels."""
        return self._cached("sizes", lambda: self.h5["size"][()].astype(np.int64))

    @property
    def box_areas(self):
        """np.ndarray: (N,) float64 area of the original GT box (/box), source pixels^2."""

        def read():
            box = self.h5["box"][()].astype(np.float64)
            return np.clip(box[:, 2] - box[:, 0], 0, None) * np.clip(box[:, 3] - box[:, 1], 0, None)

        return self._cached("box_areas", read)

    def group_indices(self, g):
        """
        Args:
            g (int): 0 = S, 1 = T, 2 = W.

        Returns:
            np.ndarray: int64 sample indices of group g (ascending; may be empty).
        """
        name = GROUPS[int(g)]
        return self._cached(f"index/{name}", lambda: self.h5[f"index/{name}"][()].astype(np.int64))

    def __len__(self):
        return self._cached("len", lambda: int(self.h5["label"].shape[0]))

    def decode(self, i):
        """
        Args:
            i (int): sample index.

        Returns:
            np.ndarray: (h, w, 3) uint8 RGB.
        """
        data = np.asarray(self.crops_dataset[int(i)], dtype=np.uint8)
        if _IMREAD_COLOR_RGB is not None:
            img = cv2.imdecode(data, _IMREAD_COLOR_RGB)  # RGB straight from the decoder
        else:
            img = cv2.imdecode(data, cv2.IMREAD_COLOR)
            img = None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img is None:
            raise ValueError(f"{self.path}: crop {i} could not be decoded ({data.size} bytes)")
        return img

    def __repr__(self):
        return f"SampleBank({self.path!r})"

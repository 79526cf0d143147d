"""
The HDF5 sample bank: its format (version 1), its validation and its one reader,
:class:`SampleBank`. The writer is :class:`builder.writer.BankWriter`; everything else (``info``,
``show``, the pre-training loader, the benchmarks, the tests) reads banks through this module.

File layout (N samples, C foreground categories)::

    /crops        (N,)   vlen uint8   encoded crop (JPEG or PNG bytes, RGB)
    /label        (N,)   int32        0..C-1 = category (contiguous), C = background (negative)
    /group        (N,)   uint8        0 = S (0.5 <= w/h <= 1.5), 1 = T (w/h < 0.5), 2 = W (w/h > 1.5)
    /size         (N, 2) int32        stored crop (height, width) in pixels, after any resize
    /image_id     (N,)   int64        source image id (the json's "id")
    /box          (N, 4) float32      original GT box, x0 y0 x1 y1 in source pixels (negatives:
                                      the sampled background box)
    /crop_box     (N, 4) float32      enlarged box actually cut, x0 y0 x1 y1 in source pixels
    /crc32        (N,)   uint32       zlib.crc32 of each encoded crop (banks from builder 1.1 on)
    /index/S, /index/T, /index/W      int64 sample indices of each group (ascending)

Integrity (banks from builder 1.1 on): every dataset but ``/crops`` carries HDF5's per-chunk
Fletcher-32 checksum (HDF5 filters no variable-length data), and ``/crc32`` covers the crop bytes,
so flipped bytes are reported, never decoded into a garbled crop. Banks of builder 1.0 have
neither; they stay readable without those checks (``builder info --verify`` says so). Every bank
is checked when opened: labels in 0..C, groups in 0..2, and each ``/index/G`` listing exactly the
rows whose ``/group`` is G.

Root attributes::

    format = "montage-sample-bank", version = 1
    num_classes      C (int)
    category_names   json list of C names, in contiguous-label order
    category_ids     json list of C dataset category ids, in contiguous-label order
    encoding         "jpeg" or "png"
    seed, tool_version, build_args (json), counts (json), created (ISO time)

Conventions of the writer (``python -m builder build``, version 1.1), for readers:

- ``/crops`` holds ordinary JPEG/PNG files of the true colours: PIL decodes them to RGB,
  ``cv2.imdecode`` to BGR (convert with ``cv2.COLOR_BGR2RGB``).
- Rows are in image order (json order): per image its positives in annotation order, then its
  negatives; negatives from the make-up passes (see ``builder/build.py``) follow at the end.
- Positives: ``/box`` is the GT box clipped to the image; ``/crop_box`` is the randomly enlarged
  box, whole pixels, clipped to the image, always containing ``/box``. Negatives: ``/box`` equals
  ``/crop_box`` and has zero intersection with every GT box of its image (crowd and tiny included).
- ``/size`` and ``/group`` describe the stored crop after the optional ``--max-side`` downscale,
  so ``group == group_of(size[1], size[0])`` always holds.
- ``counts`` (json): ``images`` {in_json, selected, without_annotations, missing, failed, decoded,
  with_samples}, ``annotations`` {total, planned_positives, skipped {crowd, degenerate, outside,
  tiny, unknown_category}, in_missing_or_failed_images}, ``samples`` {total, positives,
  negatives, positives_by_group, negatives_by_group}, ``negatives`` {ratio, target,
  placed_by_pass, shortfall, images_exhausted, exhausted_image_ids (first 20)}, ``problems``
  {kind: count}.
- The ``format`` attribute is written last, and the file appears under its name only when
  complete (``os.replace`` of ``NAME.tmp-<pid>-<host>-<token>``; builder/writer.py).
"""
import json
import os
import re
import zlib

import cv2
import h5py
import numpy as np

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "GROUPS", "GROUP_S", "GROUP_T", "GROUP_W",
    "S_MIN_ASPECT", "S_MAX_ASPECT", "group_of", "BankFormatError", "check_bank", "check_rows",
    "decode_attr",
    "open_bank_file", "JSON_ATTRS",
    "SampleBank",
]

FORMAT_NAME = "montage-sample-bank"
FORMAT_VERSION = 1
GROUPS = ("S", "T", "W")
GROUP_S, GROUP_T, GROUP_W = 0, 1, 2
S_MIN_ASPECT, S_MAX_ASPECT = 0.5, 1.5


def group_of(width, height):
    """
    Returns the group id of a crop from its size (pixels): S for 0.5 <= w/h <= 1.5 (both ends
    inclusive, as the paper's "between 0.5 and 1.5"), T for w/h < 0.5, W for w/h > 1.5.
    """
    aspect = float(width) / float(height)
    if aspect < S_MIN_ASPECT:
        return GROUP_T
    if aspect > S_MAX_ASPECT:
        return GROUP_W
    return GROUP_S


# Root attributes stored as json text (decoded by :func:`decode_attr`).
JSON_ATTRS = ("category_names", "category_ids", "build_args", "counts")


class BankFormatError(ValueError):
    """Raised when a file is not a sample bank this code can read."""


def decode_attr(h5, key, default=None):
    """
    Returns the root attribute ``key`` of an open bank as a plain Python value: bytes -> str,
    numpy scalars -> Python scalars, the :data:`JSON_ATTRS` parsed; ``default`` when absent.
    """
    if key not in h5.attrs:
        return default
    value = h5.attrs[key]
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if key in JSON_ATTRS and isinstance(value, str):
        value = json.loads(value)
    return value


def check_bank(h5, path="<bank>"):
    """
    Validates an open ``h5py.File`` as a sample bank; raises :class:`BankFormatError` with a
    one-line message naming the file and the fix.
    """
    fmt = decode_attr(h5, "format")
    if fmt != FORMAT_NAME:
        raise BankFormatError(
            f"{path}: not a Montage sample bank (format attribute {fmt!r}); "
            f"build one with `python -m builder build --annotations JSON --images DIR --out {path}`"
        )
    version = int(h5.attrs.get("version", -1))
    if version != FORMAT_VERSION:
        raise BankFormatError(
            f"{path}: sample bank version {version}, this code reads version {FORMAT_VERSION}; "
            "rebuild it with `python -m builder build ... --overwrite`"
        )
    missing = [k for k in ("crops", "label", "group", "size", "index/S", "index/T", "index/W")
               if k not in h5]
    if missing:
        raise BankFormatError(
            f"{path}: sample bank is incomplete (missing {', '.join(missing)}); "
            "rebuild it with `python -m builder build ... --overwrite`"
        )


_REBUILD = "rebuild it with `python -m builder build ... --overwrite`"


def open_bank_file(path):
    """
    Opens ``path`` read-only with h5py; a file that is not HDF5, truncated or unreadable raises
    :class:`BankFormatError` naming the file and the fix instead of h5py's bare text.
    """
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise  # SampleBank's own message covers it
    except PermissionError:
        raise BankFormatError(f"{path}: cannot read the bank (permission denied); fix its "
                              "permissions") from None
    except OSError as e:
        text = str(e)
        # h5py: "Unable to synchronously open file (truncated file: eof = 55800, ...,
        # stored_eof = 111600)" or "(file signature not found)".
        if "signature not found" in text:
            raise BankFormatError(
                f"{path}: not an HDF5 file, so not a sample bank; pass the .h5 file that "
                "`python -m builder build --out` wrote"
            ) from None
        if "unable to lock file" in text:
            raise BankFormatError(
                f"{path}: another process holds the file's HDF5 lock (a build still writing "
                "it?); wait for it to finish, or set HDF5_USE_FILE_LOCKING=FALSE if none does"
            ) from None
        eof = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
        if eof:
            what = f"truncated HDF5 file ({eof[1]} of {eof[2]} bytes: a copy or build cut short)"
        else:
            detail = re.search(r"\(([^()]*)\)\s*$", text)
            what = f"cannot open it as HDF5 ({detail[1] if detail else text})"
        raise BankFormatError(f"{path}: {what}; copy it again or {_REBUILD}") from None


def _damaged(path, what):
    return BankFormatError(f"{path}: {what}; the file is damaged, {_REBUILD}")


def read_dataset(h5, name, path="<bank>", sel=()):
    """
    ``h5[name][sel]``; a chunk that fails its checksum or cannot be read raises
    :class:`BankFormatError` (one line naming the file, the dataset and the fix) instead of
    h5py's multi-line text.
    """
    try:
        return h5[name][sel]
    except (OSError, RuntimeError, KeyError) as e:
        text = " ".join(str(e).split())
        if "checksum" in text.lower() or "filter" in text.lower():
            what = f"/{name} fails its checksum ({text})"
        else:
            what = f"/{name} cannot be read ({text})"
        raise _damaged(path, what) from None


def check_rows(path, num_classes, labels, groups, indexes):
    """
    Checks what a reader relies on in every row: ``labels`` in 0..C, ``groups`` in 0..2, and
    ``indexes[g]`` (the ``/index/G`` arrays) listing exactly the rows whose group is g. Raises
    :class:`BankFormatError` naming the first bad row.
    """
    bad = np.flatnonzero((labels < 0) | (labels > num_classes))
    if len(bad):
        i = int(bad[0])
        raise _damaged(path, f"/label of row {i} is {int(labels[i])}, outside 0..{num_classes} "
                             f"({num_classes} categories + background)")
    bad = np.flatnonzero(groups >= len(GROUPS))
    if len(bad):
        i = int(bad[0])
        raise _damaged(path, f"/group of row {i} is {int(groups[i])}, not 0 (S), 1 (T) or 2 (W)")
    for g, name in enumerate(GROUPS):
        want = np.flatnonzero(groups == g)
        idx = np.asarray(indexes[g], dtype=np.int64)
        if len(idx) != len(want) or not np.array_equal(idx, want):
            diff = np.setxor1d(idx, want)
            row = int(diff[0]) if len(diff) else int(idx[np.flatnonzero(idx != want)[0]])
            raise _damaged(path, f"/index/{name} disagrees with /group at row {row}")


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

    A file that is not a whole bank (not HDF5, truncated, a chunk or crop failing its checksum,
    a label or group out of range, a group index that disagrees with ``/group``, a crop that
    does not decode) raises :class:`BankFormatError`: one line naming the file and
    the fix, for ``builder info``/``show`` and ``MONTAGE.BANK`` alike.
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
            self._h5 = open_bank_file(self.path)
            self._pid = os.getpid()
            check_bank(self._h5, self.path)
            if "rows_checked" not in self._cache:  # once per object (forked copies share it)
                check_rows(self.path, self.num_classes, self.labels, self.groups,
                           [self.group_indices(g) for g in range(len(GROUPS))])
                self._cache["rows_checked"] = True
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

    @property
    def attrs(self):
        """dict: every root attribute, decoded by :func:`decode_attr` (json ones parsed)."""
        return self._cached("attrs", lambda: {k: decode_attr(self.h5, k) for k in self.h5.attrs})

    @property
    def num_classes(self):
        """int: foreground categories C (labels 0..C-1; C = background)."""
        return int(self.attrs["num_classes"])

    @property
    def category_names(self):
        """list[str]: the C category names in contiguous-label order."""
        return list(self.attrs.get("category_names") or [str(i) for i in range(self.num_classes)])

    @property
    def category_ids(self):
        """list[int]: the C dataset category ids in contiguous-label order."""
        return list(self.attrs.get("category_ids") or range(self.num_classes))

    def read(self, name):
        """
        Reads a whole per-sample dataset (not cached), e.g. ``"box"``, ``"crop_box"``,
        ``"image_id"``, ``"index/S"``; ``"crops"`` gives the encoded files as a list of bytes.
        """
        if name == "crops":
            return [bytes(c) for c in self._read_crops(())]
        return read_dataset(self.h5, name, self.path)

    def _read_crops(self, sel):
        try:
            return self.crops_dataset[sel]
        except (OSError, RuntimeError) as e:
            raise _damaged(self.path, f"/crops row {sel} cannot be read "
                                      f"({' '.join(str(e).split())})") from None

    @property
    def checksums(self):
        """np.ndarray or None: (N,) uint32 CRC-32 of each crop; None for a builder 1.0 bank."""
        return self._cached(
            "crc32", lambda: read_dataset(self.h5, "crc32", self.path, ()).astype(np.uint32)
            if "crc32" in self.h5 else None
        )

    def encoded(self, i):
        """
        Returns the stored JPEG/PNG bytes of sample ``i`` (np.ndarray of uint8), checked against
        its CRC-32 when the bank has them (:class:`BankFormatError` on a mismatch).
        """
        i = int(i)
        data = np.asarray(self._read_crops(i), dtype=np.uint8)
        crc = self.checksums
        if crc is not None and zlib.crc32(data) != int(crc[i]):
            raise _damaged(self.path, f"crop {i} fails its checksum ({data.size} bytes, crc32 "
                                      f"{zlib.crc32(data):08x}, stored {int(crc[i]):08x})")
        return data

    @property
    def labels(self):
        """np.ndarray: (N,) int64 labels 0..C."""
        return self._cached(
            "labels", lambda: read_dataset(self.h5, "label", self.path).astype(np.int64))

    @property
    def groups(self):
        """np.ndarray: (N,) uint8 group ids, 0 = S, 1 = T, 2 = W."""
        return self._cached("groups", lambda: read_dataset(self.h5, "group", self.path))

    @property
    def sizes(self):
        """np.ndarray: (N, 2) int64 stored crop (height, width), pixels."""
        return self._cached(
            "sizes", lambda: read_dataset(self.h5, "size", self.path).astype(np.int64))

    @property
    def box_areas(self):
        """np.ndarray: (N,) float64 area of the original GT box (/box), source pixels^2."""

        def read():
            box = read_dataset(self.h5, "box", self.path).astype(np.float64)
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

        def read():
            idx = read_dataset(self.h5, f"index/{name}", self.path).astype(np.int64)
            # A damaged index would otherwise fail later as a bare IndexError (or read garbage).
            if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
                bad = idx.max() if idx.max() >= len(self) else idx.min()
                raise BankFormatError(
                    f"{self.path}: index/{name} holds row {bad} but the bank has {len(self)} rows "
                    f"(0..{len(self) - 1}); the file is damaged, {_REBUILD}"
                )
            return idx

        return self._cached(f"index/{name}", read)

    def __len__(self):
        return self._cached("len", lambda: int(self.h5["label"].shape[0]))

    def decode(self, i):
        """
        Args:
            i (int): sample index.

        Returns:
            np.ndarray: (h, w, 3) uint8 RGB.
        """
        data = self.encoded(i)
        if _IMREAD_COLOR_RGB is not None:
            img = cv2.imdecode(data, _IMREAD_COLOR_RGB)  # RGB straight from the decoder
        else:
            img = cv2.imdecode(data, cv2.IMREAD_COLOR)
            img = None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img is None:
            # A BankFormatError (a ValueError) so the CLI prints it as one line.
            raise BankFormatError(
                f"{self.path}: crop {i} could not be decoded ({data.size} bytes); the file is "
                f"damaged, {_REBUILD}"
            )
        return img

    def __repr__(self):
        return f"SampleBank({self.path!r})"

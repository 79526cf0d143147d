"""
Writes a sample bank (format: :mod:`builder.bank`) incrementally and atomically, and keeps other
processes and OS failures from damaging an output.

Rows go to resizable, chunked datasets in batches, so memory stays bounded by one batch however
large the dataset (full COCO is ~1M crops). Every dataset carries HDF5's per-chunk Fletcher-32
checksum (all but ``/crops``: HDF5 filters no variable-length data), and ``/crc32`` holds a CRC-32 of each encoded crop (the crop bytes live in HDF5's
global heap, which no filter covers), so a reader detects flipped bytes instead of training on
them. Everything is written to ``OUT.tmp-<pid>-<host>-<token>`` next to the output (created
exclusively under an unguessable name, :func:`builder.output_lock.create_temp`) and renamed with
``os.replace`` only after the index and attributes are complete and synced to disk; the
``format`` attribute is the last thing written, so a killed build leaves at most a temp file that
:func:`builder.bank.check_bank` rejects, never a file that looks valid, and the next build of that
output removes it (:func:`builder.output_lock.remove_stale_temps`).

A failed write (full disk, quota, ``ulimit -f``, I/O error) raises one :class:`BankWriteError`.
A build holds :class:`builder.output_lock.OutputLock` so that a second build of the same output
fails at once.
"""

import contextlib
import datetime
import errno
import json
import logging
import os
import shutil
import zlib

import h5py
import numpy as np

from .bank import FORMAT_NAME, FORMAT_VERSION, GROUPS
from .output_lock import create_temp

__all__ = ["BankWriteError", "BankWriter", "unclosed_files"]

logger = logging.getLogger(__name__)

# Rows per HDF5 chunk and per write; 1024 vlen references are 16 KiB.
_CHUNK = 1024


# HDF5 files that failed to close (see BankWriter.abort): kept referenced until the process ends.
_UNCLOSED = []


def unclosed_files():
    """
    True when HDF5 still holds a file open in this process, e.g. a temp bank whose close failed
    after a write error. HDF5's own at-exit cleanup would then flush it through a file object
    that is gone or whose data was dropped, and can crash the interpreter (segfault) after the
    one-line error was printed; ``python -m builder`` then ends with ``os._exit`` instead.
    """
    try:
        return bool(_UNCLOSED) or bool(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE))
    except Exception:  # noqa: BLE001 (h5py internals; when in doubt, assume the worst)
        return True


class BankWriteError(OSError):
    """The bank could not be written (disk full, quota, file-size limit, I/O error); one line."""


class _TempFile:
    """
    The temp file as h5py's file object ("fileobj" driver). A failed write is recorded in
    :attr:`error` and its data dropped instead of raised: after a failed vlen write HDF5's error
    path crashes h5py (segfault), so HDF5 must never see one. :class:`BankWriter` checks
    ``error`` after each HDF5 call. :meth:`discard` drops all further writes (file to delete).

    After :meth:`close` every call still succeeds (writes dropped, reads give zeros): HDF5 may
    call in again when it closes a file it failed to close before, at the latest in its at-exit
    cleanup, and an exception raised into it there crashes the interpreter (segfault).
    """

    def __init__(self, fd):
        self.fd = fd  # from create_temp: a new file, never a planted link
        self.pos = 0
        self.error = None
        self.discarded = False

    def seek(self, offset, whence=os.SEEK_SET):
        if whence == os.SEEK_END:
            offset += os.fstat(self.fd).st_size if self.fd is not None else self.pos
        elif whence == os.SEEK_CUR:
            offset += self.pos
        self.pos = offset
        return offset

    def tell(self):
        return self.pos

    def readinto(self, buf):
        if self.fd is None:
            view = memoryview(buf).cast("B")
            view[:] = bytes(len(view))
            self.pos += len(view)
            return len(view)
        n = os.preadv(self.fd, [buf], self.pos)
        self.pos += n
        return n

    def read(self, size=-1):  # h5py needs it to see a file object; it reads with readinto
        if self.fd is None:
            return b""
        size = os.fstat(self.fd).st_size - self.pos if size < 0 else size
        data = os.pread(self.fd, max(0, size), self.pos)
        self.pos += len(data)
        return data

    def write(self, buf):
        view = memoryview(buf).cast("B")
        done = 0
        # h5py ignores short writes: loop until all is written (or the error is recorded).
        while (done < len(view) and self.error is None and not self.discarded
               and self.fd is not None):
            try:
                done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as e:
                self.error = e
        self.pos += len(view)
        return len(view)

    def truncate(self, size=None):
        size = self.pos if size is None else size
        self._guard(os.ftruncate, self.fd, size)
        return size

    def flush(self):
        pass  # unbuffered

    def sync(self):
        # Also where NFS reports a full disk.
        self._guard(os.fsync, self.fd)

    def _guard(self, fn, *args):
        if self.error is None and not self.discarded and self.fd is not None:
            try:
                fn(*args)
            except OSError as e:
                self.error = e

    def discard(self):
        self.discarded = True

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _sync_dir(path):
    # Makes the rename itself durable; some file systems cannot sync a directory: then skip.
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BankWriter:
    """
    Appends sample rows and produces the final bank on :meth:`finalize`.

    Use as a context manager: leaving the block with an exception (or without finalize) deletes
    the temp file. A write that fails raises :class:`BankWriteError` (one line naming the output,
    the cause and the fix); the output is then untouched.

    Example::

        with BankWriter("bank.h5", encoding="jpeg") as w:
            w.append(crops, label, group, size, image_id, box, crop_box)
            w.finalize(attrs)
    """

    def __init__(self, out_path, encoding="jpeg", chunk_rows=_CHUNK, lock=None):
        self.out_path = out_path
        self.encoding = encoding
        self.chunk_rows = int(chunk_rows)
        self.num_rows = 0
        self._pending = []
        self._pending_rows = 0
        self._done = False
        self.h5 = None
        try:
            # An unguessable new name, recorded in the output's lock first (see output_lock).
            self.tmp_path, fd = create_temp(out_path, lock)
        except OSError as e:
            raise BankWriteError(str(e)) from None
        self._file = _TempFile(fd)
        try:
            with self._io():
                self.h5 = h5py.File(self._file, "w")
                self._create()
        except BaseException:
            self.abort()
            raise

    @contextlib.contextmanager
    def _io(self):
        """Turns a failed write inside the block (recorded by _TempFile) into BankWriteError."""
        try:
            yield
        except Exception:
            # HDF5 may fail on reading back what was dropped; the write error is the cause.
            if self._file.error is None:
                raise
        if self._file.error is not None:
            raise self._write_error() from None

    def _write_error(self):
        e = self._file.error
        code = errno.errorcode.get(e.errno, str(e.errno))
        folder = os.path.dirname(os.path.abspath(self.out_path))
        try:
            free = f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free there"
        except OSError:
            free = "free space unknown"
        return BankWriteError(
            f"{self.out_path}: writing the bank failed ({e.strerror or e}, {code}) in "
            f"{os.path.basename(self.tmp_path)}, {free}; free disk space (or raise the quota / "
            f"the `ulimit -f` file-size limit) and rerun; {os.path.basename(self.out_path)} was "
            "not changed"
        )

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
            "crc32": ((), np.uint32),
        }
        self.datasets = {}
        for name, (tail, dtype) in specs.items():
            self.datasets[name] = self.h5.create_dataset(
                name,
                shape=(0,) + tail,
                maxshape=(None,) + tail,
                dtype=dtype,
                chunks=(chunk,) + tail,
                # Per-chunk checksum, so a reader detects flipped bytes. HDF5 filters no
                # variable-length data: /crc32 covers the crops.
                fletcher32=name != "crops",
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
        crc = np.empty(self._pending_rows, dtype=np.uint32)
        for i, c in enumerate(c for part in cols[0] for c in part):
            crops[i] = np.frombuffer(c, dtype=np.uint8)
            crc[i] = zlib.crc32(c)
        arrays = {
            "label": np.concatenate(cols[1]).astype(np.int32),
            "group": np.concatenate(cols[2]).astype(np.uint8),
            "size": np.concatenate(cols[3]).astype(np.int32).reshape(-1, 2),
            "image_id": np.concatenate(cols[4]),
            "box": np.concatenate(cols[5]).astype(np.float32).reshape(-1, 4),
            "crop_box": np.concatenate(cols[6]).astype(np.float32).reshape(-1, 4),
            "crc32": crc,
        }
        start, stop = self.num_rows, self.num_rows + self._pending_rows
        # write_direct, not ds[a:b] = crops: h5py reads an object array whose crops all have the
        # same length as a 2-D block and fails to broadcast it.
        with self._io():
            self.datasets["crops"].resize(stop, axis=0)
            self.datasets["crops"].write_direct(crops, dest_sel=np.s_[start:stop])
        with self._io():
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
        with self._io():
            groups = self.datasets["group"][...]
            for gid, name in enumerate(GROUPS):
                idx = np.flatnonzero(groups == gid).astype(np.int64)
                self.h5.create_dataset(
                    f"index/{name}", data=idx, maxshape=(None,), fletcher32=True,
                    chunks=(max(1, min(len(idx), 1 << 16)),),
                )
            for key, value in attrs.items():
                self.h5.attrs[key] = (
                    json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
                )
            self.h5.attrs["encoding"] = self.encoding
            self.h5.attrs["created"] = datetime.datetime.now().isoformat(timespec="seconds")
            # Written last: until here the file is not a valid bank.
            self.h5.attrs["version"] = FORMAT_VERSION
            self.h5.attrs["format"] = FORMAT_NAME
        with self._io():
            self.h5.close()  # writes the cached metadata
            # On disk before the rename: after a crash the output is the old bank or the new one.
            self._file.sync()
        self._file.close()
        os.replace(self.tmp_path, self.out_path)
        self._done = True
        _sync_dir(self.out_path)
        logger.info("wrote %s (%d samples)", self.out_path, self.num_rows)
        return self.out_path

    def abort(self):
        """Closes and deletes the temp file (no-op after finalize)."""
        if self._done:
            return
        self._done = True
        # The file is deleted: drop HDF5's closing writes (they would fail again on a full disk).
        self._file.discard()
        closed = True
        try:
            if self.h5 is not None:
                self.h5.close()
        except (OSError, RuntimeError, ValueError) as e:
            # h5py's errors; the one that got us here is the one to report.
            logger.debug("closing %s: %s", self.tmp_path, e)
            closed = False
        finally:
            if closed:
                self._file.close()
            else:
                # HDF5 still holds the file: keep its objects and descriptor alive (a dealloc
                # would call into HDF5 again and print its errors), writes dropped; the CLI ends
                # without HDF5's at-exit cleanup (unclosed_files). The name goes now.
                _UNCLOSED.append((self.h5, getattr(self, "datasets", None), self._file))
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort()
        return False

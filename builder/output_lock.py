"""
Keeps concurrent and dead builds from damaging an output: the output's lock
(:class:`OutputLock`, so a second build of the same ``--out`` fails at once, naming the first),
the temp file (:func:`create_temp`: ``OUT.tmp-<pid>-<host>-<random token>``, created exclusively,
its name recorded in the lock file first) and the removal of the temp file that a dead build left
(:func:`remove_stale_temps`).

Nothing here follows a symbolic link: the lock file is opened with ``O_NOFOLLOW`` and the temp
file with ``O_CREAT | O_EXCL`` (which fails on any existing name, links included) under a name
with 64 random bits, so a link planted at ``OUT.lock`` or ``OUT.tmp-*`` is refused, never
truncated or written through. A temp file is removed only when the builder can prove it wrote it:
its name is the one recorded in the lock file by the build that held the lock before, and that
build's pid no longer runs on this host. Any other file, whatever its name (``bank.h5.tmp-2026``),
is left alone.
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import secrets
import socket
import time

__all__ = ["OutputBusyError", "OutputLockError", "OutputLock", "create_temp",
           "remove_stale_temps", "temp_path_for"]

logger = logging.getLogger(__name__)

# Random hex digits at the end of a temp file's name: unguessable, so nobody can plant a link there.
_TOKEN_HEX = 16


class OutputBusyError(OSError):
    """Another build holds the output's lock; the message names it (pid, host, start)."""


class OutputLockError(OSError):
    """The lock or temp file cannot be created (unwritable folder, a planted link); one line."""


def _host():
    # Part of file names: keep it to characters that are safe there.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "unknown-host"


def _temp_re(out_path):
    """``OUT.tmp-<pid>-<host>-<token>`` of this output (basename), groups pid, host, token."""
    return re.compile(
        re.escape(os.path.basename(out_path) + ".tmp-") + r"(\d+)-(.+)-([0-9a-f]{%d})" % _TOKEN_HEX
    )


def temp_path_for(out_path, token=None):
    """
    Returns a temp file name for ``out_path``: ``OUT.tmp-<pid>-<host>-<token>`` in the same
    folder (so ``os.replace`` is atomic); ``token`` is 64 random bits unless given.
    """
    token = token or secrets.token_hex(_TOKEN_HEX // 2)
    return f"{out_path}.tmp-{os.getpid()}-{_host()}-{token}"


def create_temp(out_path, lock=None, mode=0o644):
    """
    Creates a new, empty temp file for ``out_path`` and returns ``(path, fd)`` (read-write).

    The name is recorded in ``lock`` (an entered :class:`OutputLock`) *before* the file exists,
    so a later build can prove the file is a builder's temp whatever happens next. The file is
    created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing file or link of that name is
    never opened.

    Raises:
        OutputLockError: the file cannot be created (one line naming it, the cause and the fix).
    """
    for _ in range(8):
        path = temp_path_for(out_path)
        if lock is not None:
            lock.record_temp(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode)
        except FileExistsError:
            continue  # 64 random bits taken: someone planted it; draw another name
        except OSError as e:
            raise OutputLockError(
                f"cannot create {path} ({e.strerror}); make its directory writable or pass "
                "another --out"
            ) from None
        return path, fd
    raise OutputLockError(
        f"cannot create a temp file next to {out_path}: every name tried exists; remove the "
        f"{os.path.basename(out_path)}.tmp-* files there or pass another --out"
    )


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(out_path, lock=None):
    """
    Removes the temp file that the previous holder of ``lock`` (an entered :class:`OutputLock`)
    recorded and left behind (SIGKILL, OOM killer, power loss), with one log line.

    Only that file goes, and only when its name has the builder's form, it was written on this
    host and its pid no longer runs. Other files that look like this output's temp files are kept
    and reported (a live build's, another host's, or one the lock file does not name); files of
    any other name are not touched.

    Returns:
        list[str]: the removed paths.
    """
    folder = os.path.dirname(os.path.abspath(out_path))
    pattern, host = _temp_re(out_path), _host()
    recorded = ((lock.previous if lock is not None else None) or {}).get("temp")
    removed = []
    if isinstance(recorded, str) and pattern.fullmatch(recorded):
        m = pattern.fullmatch(recorded)
        path, pid = os.path.join(folder, recorded), int(m.group(1))
        if m.group(2) == host and pid != os.getpid() and not _pid_alive(pid):
            try:
                size = os.lstat(path).st_size
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning(
                    "%s: cannot remove the temp file of dead build pid %d (%s); delete it by hand",
                    path, pid, e.strerror,
                )
            else:
                logger.warning(
                    "removed %s (%.1f MB), the temp file of build pid %d, which no longer runs "
                    "(killed?)", path, size / 1e6, pid,
                )
                removed.append(path)
    for name in sorted(os.listdir(folder)):
        m = pattern.fullmatch(name)
        path = os.path.join(folder, name)
        if m is None or path in removed or int(m.group(1)) == os.getpid():
            continue
        pid, where = int(m.group(1)), m.group(2)
        if where != host:
            why = f"written by pid {pid} on host {where}; delete it once no build of %s runs there"
        elif _pid_alive(pid):
            why = f"pid {pid} still runs on this host; delete it if that is no build of %s"
        else:
            why = ("not the temp file the last build of %s recorded; delete it by hand if it is "
                   "not yours")
        logger.warning("%s: kept, " + why, path, os.path.basename(out_path))
    return removed


class OutputLock:
    """
    Exclusive, non-blocking ``flock`` on ``OUT.lock``, held by a build from before its existence
    check until after its rename; a second build of ``OUT`` raises :class:`OutputBusyError`
    naming the holder (with or without ``--overwrite``).

    The lock file holds the holder's record (json: pid, host, start, and its temp file's name once
    :func:`create_temp` made it). The OS drops the lock when its process dies (even by SIGKILL),
    so a lock file left behind is simply reused, and its record (:attr:`previous`) names the temp
    file the dead build left. The holder unlinks the file before unlocking it; a build that locked
    the unlinked file sees that it is no longer the one at the path and starts over. A symbolic
    link at ``OUT.lock`` is refused (``O_NOFOLLOW``), never followed.
    """

    def __init__(self, out_path):
        self.out_path = out_path
        self.path = f"{out_path}.lock"
        self.fd = None
        self.locked = False
        self.previous = None
        self.record = None

    def __enter__(self):
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644)
            except OSError as e:
                if os.path.islink(self.path):
                    raise OutputLockError(
                        f"{self.path} is a symbolic link, not a lock file of the builder; "
                        "remove it (the builder never writes through a link) and rerun"
                    ) from None
                raise OutputLockError(
                    f"cannot create the lock file {self.path} ({e.strerror}); make its "
                    "directory writable or pass another --out"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd)
                os.close(fd)
                raise OutputBusyError(
                    f"{self.out_path}: another build ({owner}) is writing this output; wait "
                    "for it to end or pass another --out"
                ) from None
            except OSError as e:  # a file system without locks (ENOLCK, EOPNOTSUPP)
                logger.warning(
                    "%s: cannot lock (%s); a concurrent build of %s would go unnoticed",
                    self.path, e.strerror, self.out_path,
                )
                break
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                current = False
            if current:
                self.locked = True
                break
            os.close(fd)
        self.fd = fd
        self.previous = self._read_record(fd)
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "temp": None,
        }
        self._write_record()
        return self

    @staticmethod
    def _read_record(fd):
        try:
            record = json.loads(os.pread(fd, 4096, 0))
        except (ValueError, OSError):
            return None
        return record if isinstance(record, dict) else None

    def _write_record(self):
        try:
            data = json.dumps(self.record).encode()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:
            pass  # the record serves messages and cleanup; a full disk must not stop the build

    def record_temp(self, path):
        """Records ``path`` as this build's temp file (before it is created)."""
        if self.fd is not None:
            self.record["temp"] = os.path.basename(path)
            self._write_record()

    @staticmethod
    def _owner(fd):
        # The holder writes its record right after locking: give it a moment.
        for _ in range(20):
            try:
                o = json.loads(os.pread(fd, 4096, 0))
                return f"pid {o['pid']} on {o['host']}, started {o['started']}"
            except (ValueError, KeyError, TypeError, OSError):
                time.sleep(0.025)
        return "pid unknown"

    def __exit__(self, *exc):
        if self.locked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd, self.locked = None, False
        return False

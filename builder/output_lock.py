"""
Keeps concurrent and dead builds from damaging an output: the output's lock
(:class:`OutputLock`, so a second build of the same ``--out`` fails at once, naming the first),
the temp file name ``OUT.tmp-<pid>-<host>`` (:func:`temp_path_for`) and the removal of temp files
that dead builds left (:func:`remove_stale_temps`).
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import socket
import time

__all__ = ["OutputBusyError", "OutputLock", "remove_stale_temps", "temp_path_for"]

logger = logging.getLogger(__name__)


class OutputBusyError(OSError):
    """Another build holds the output's lock; the message names it (pid, host, start)."""


def _host():
    # Part of file names: keep it to characters that are safe there.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "unknown-host"


def temp_path_for(out_path):
    """
    Returns the temp file written before the rename: ``OUT.tmp-<pid>-<host>`` (same dir, so
    ``os.replace`` is atomic; pid and host tell a later build whether its writer is dead).
    """
    return f"{out_path}.tmp-{os.getpid()}-{_host()}"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(out_path):
    """
    Removes the temp files that dead builds of ``out_path`` left (SIGKILL, OOM killer, power
    loss), one log line each. Call it holding the output's :class:`OutputLock`.

    Only a temp file whose pid no longer runs on this host goes; one written on another host, or
    whose pid runs, is kept and reported (never delete a live build's file).

    Returns:
        list[str]: the removed paths.
    """
    folder = os.path.dirname(os.path.abspath(out_path))
    prefix_re = re.escape(os.path.basename(out_path) + ".tmp-")
    host, removed = _host(), []
    for name in sorted(os.listdir(folder)):
        # <pid>-<host>; a bare <pid> is the name before hosts were recorded (this host).
        m = re.fullmatch(prefix_re + r"(\d+)(?:-(.+))?", name)
        if m is None or int(m.group(1)) == os.getpid():  # ours: the writer truncates it
            continue
        path, pid = os.path.join(folder, name), int(m.group(1))
        if m.group(2) not in (None, host):
            logger.warning(
                "%s: kept, written by pid %d on host %s; delete it once no build of %s runs there",
                path, pid, m.group(2), os.path.basename(out_path),
            )
            continue
        if _pid_alive(pid):
            logger.warning(
                "%s: kept, pid %d still runs on this host; delete it if that is no build", path, pid
            )
            continue
        try:
            size = os.path.getsize(path)
            os.remove(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            logger.warning(
                "%s: cannot remove the temp file of dead build pid %d (%s); delete it by hand",
                path, pid, e.strerror,
            )
            continue
        logger.warning(
            "removed %s (%.1f MB), the temp file of build pid %d, which no longer runs (killed?)",
            path, size / 1e6, pid,
        )
        removed.append(path)
    return removed


class OutputLock:
    """
    Exclusive, non-blocking ``flock`` on ``OUT.lock``, held by a build from before its existence
    check until after its rename; a second build of ``OUT`` raises :class:`OutputBusyError`
    naming the holder (with or without ``--overwrite``).

    The OS drops the lock when its process dies (even by SIGKILL), so a lock file left behind is
    simply reused. The holder unlinks the file before unlocking it; a build that locked the
    unlinked file sees that it is no longer the one at the path and starts over.
    """

    def __init__(self, out_path):
        self.out_path = out_path
        self.path = f"{out_path}.lock"
        self.fd = None
        self.locked = False

    def __enter__(self):
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise BankWriteError(
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
                self.fd = fd
                return self
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        self.fd, self.locked = fd, True
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
        except OSError:
            pass  # the owner record only serves messages; a full disk must not stop the build
        return self

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

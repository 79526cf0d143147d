"""
A build against other processes and the OS, for real: a second build of the same output, a worker
killed with SIGKILL, SIGINT / SIGTERM / SIGKILL to the build, and a write that fails (file-size
limit). Each case ends with a clear one-line error, the old bank byte-identical and no temp file.

The builds run as `python -m builder build` subprocesses. To act while a build is provably in the
middle of its work, a ``sitecustomize`` on the subprocess's PYTHONPATH (this file writes it; the
builder has no test hook) makes ``read_image`` of one "gate" image wait: the process that reads it
(the build itself with 1 worker, a pool worker otherwise) creates ``reached-<pid>`` and waits for
a ``release`` file. The gate only holds the process; every kill below is a real signal.
"""

import logging
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from bank_helpers import build, make_dataset, read_bank

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Generous for a loaded 2-core CI machine; the fixed builder stops in about a second.
_TIMEOUT = 60

_SITECUSTOMIZE = '''
import os
import time

_gate_dir = os.environ.get("BUILDER_TEST_GATE_DIR")
if _gate_dir:
    import builder.extract as _extract

    _read_image = _extract.read_image

    def _gated_read_image(path):
        if os.path.basename(path) == os.environ["BUILDER_TEST_GATE_IMAGE"]:
            open(os.path.join(_gate_dir, "reached-%d" % os.getpid()), "w").close()
            deadline = time.monotonic() + 300
            while not os.path.exists(os.path.join(_gate_dir, "release")):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        return _read_image(path)

    _extract.read_image = _gated_read_image
'''


def _dataset(tmp_path, num_images=6, size=(200, 160)):
    """``num_images`` images with 3 boxes each; returns (json, image dir, gate image name)."""
    k = size[0] / 200  # boxes scale with the image
    boxes = [{"bbox": [k * v for v in b]} for b in ([20, 20, 60, 50], [110, 40, 40, 90],
                                                      [30, 90, 70, 30])]
    json_path, img_dir, ids = make_dataset(tmp_path, [boxes] * num_images, size=size)
    return json_path, img_dir, f"img{ids[1]}.jpg"


def _child_setup(fsize_limit=None):
    """preexec_fn: default SIGINT/SIGTERM/SIGHUP (a background pytest may ignore them), optional
    limit."""

    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if fsize_limit is not None:
            # Writes past the limit fail with EFBIG instead of raising SIGXFSZ.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    return setup


class _Builds:
    """Starts `python -m builder build` subprocesses and kills any left at teardown."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.gate_dir = tmp_path / "gate"
        self.gate_dir.mkdir()
        (self.gate_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        self.procs = []

    def start(self, json_path, img_dir, out, *extra, gate_image=None, fsize_limit=None):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.gate_dir), ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        )
        if gate_image:
            env.update(BUILDER_TEST_GATE_DIR=str(self.gate_dir), BUILDER_TEST_GATE_IMAGE=gate_image)
        n = len(self.procs)
        argv = [sys.executable, "-m", "builder", "build", "--annotations", str(json_path),
                "--images", str(img_dir), "--out", str(out), *map(str, extra)]
        with open(self.tmp_path / f"build{n}.out", "w") as out_f, \
                open(self.tmp_path / f"build{n}.err", "w") as err_f:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out_f,
                stderr=err_f,
                start_new_session=True,  # its own process group: teardown kills workers too
                preexec_fn=_child_setup(fsize_limit),  # noqa: PLW1509 (no threads here)
            )
        proc.err_path = self.tmp_path / f"build{n}.err"
        self.procs.append(proc)
        return proc

    def wait_at_gate(self, proc):
        """Waits until some process of ``proc`` holds the gate; returns that process's pid."""
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            reached = [p.name for p in self.gate_dir.iterdir() if p.name.startswith("reached-")]
            if reached:
                return int(reached[0].split("-")[1])
            assert proc.poll() is None, f"build exited ({proc.returncode}): {_stderr(proc)}"
            time.sleep(0.05)
        raise AssertionError("the build never reached the gate image")

    def release(self):
        (self.gate_dir / "release").touch()

    def close(self):
        self.release()
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def builds(tmp_path):
    b = _Builds(tmp_path)
    yield b
    b.close()


def _stderr(proc):
    return proc.err_path.read_text()


def _error_lines(proc):
    """The error lines of a finished build: the one-line message, never a traceback."""
    err = _stderr(proc)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    return [line for line in err.splitlines() if line.startswith("builder: ")]


def _wait(proc, timeout=_TIMEOUT):
    """Exit status, or a failure naming the hang (the process group is killed at teardown)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"build pid {proc.pid} still running after {timeout} s: {_stderr(proc)}")


def test_second_build_to_same_out_fails_naming_the_first(tmp_path, builds):
    json_path, img_dir, gate = _dataset(tmp_path)
    out = tmp_path / "out" / "bank.h5"
    first = builds.start(json_path, img_dir, out, gate_image=gate)
    builds.wait_at_gate(first)
    # Without --overwrite the output does not exist yet; with it the check is moot: both must fail.
    for extra in ((), ("--overwrite",)):
        second = builds.start(json_path, img_dir, out, "--max-images", 2, *extra)
        assert _wait(second) == 1, _stderr(second)
        lines = _error_lines(second)
        assert len(lines) == 1 and "another build" in lines[0], lines
        assert f"pid {first.pid}" in lines[0] and str(out) in lines[0], lines
        assert not out.exists()
    builds.release()
    assert _wait(first) == 0, _stderr(first)
    assert read_bank(out)["counts"]["images"]["selected"] == 6  # the first build's bank
    assert os.listdir(out.parent) == ["bank.h5"]  # no lock file, no temp file


def test_killed_worker_stops_build_with_clear_error(tmp_path, builds):
    json_path, img_dir, gate = _dataset(tmp_path)
    out = tmp_path / "out" / "bank.h5"
    proc = builds.start(json_path, img_dir, out, "--workers", 2, gate_image=gate)
    worker = builds.wait_at_gate(proc)
    assert worker != proc.pid  # the gate image is decoded in a pool worker
    start = time.monotonic()
    os.kill(worker, signal.SIGKILL)  # what the OOM killer does
    assert _wait(proc, timeout=30) == 1, _stderr(proc)
    seconds = time.monotonic() - start
    lines = _error_lines(proc)
    assert len(lines) == 1, lines
    assert f"pid {worker}" in lines[0] and "SIGKILL" in lines[0] and "--workers" in lines[0]
    assert seconds < 30
    assert os.listdir(out.parent) == []  # no temp file, no lock file, no output


@pytest.mark.parametrize(
    "sig, workers",
    [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGTERM, 1), (signal.SIGTERM, 2)],
    ids=["sigint-1worker", "sigint-2workers", "sigterm-1worker", "sigterm-2workers"],
)
def test_sigint_and_sigterm_remove_temp_and_keep_old_bank(tmp_path, builds, make_bank, sig,
                                                          workers):
    json_path, img_dir, gate = _dataset(tmp_path)
    out = tmp_path / "out" / "bank.h5"
    out.parent.mkdir()
    os.replace(make_bank(), out)
    old = out.read_bytes()
    proc = builds.start(json_path, img_dir, out, "--overwrite", "--workers", workers,
                        gate_image=gate)
    builds.wait_at_gate(proc)
    assert [p for p in os.listdir(out.parent) if p.startswith("bank.h5.tmp-")]
    os.kill(proc.pid, sig)  # the build only, as `kill PID` or a scheduler does
    assert _wait(proc, timeout=30) == 130, _stderr(proc)
    assert _error_lines(proc) == ["builder: interrupted; no output written"]
    assert out.read_bytes() == old
    assert os.listdir(out.parent) == ["bank.h5"]


def test_sigkill_leftovers_reported_and_removed_on_next_start(tmp_path, builds, caplog):
    json_path, img_dir, gate = _dataset(tmp_path)
    out = tmp_path / "out" / "bank.h5"
    proc = builds.start(json_path, img_dir, out, gate_image=gate)
    builds.wait_at_gate(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p for p in os.listdir(out.parent) if p.startswith("bank.h5.tmp-")]
    assert (out.parent / "bank.h5.lock").exists()  # stale, but the OS released its flock
    assert len(left) == 1 and left[0].startswith(f"bank.h5.tmp-{proc.pid}"), left
    # The name after the pid (if any) says which host wrote the file.
    host_tail = left[0][len(f"bank.h5.tmp-{proc.pid}"):]
    # Temp files that are not provably dead on this host must survive.
    keep = [
        f"bank.h5.tmp-{os.getppid()}{host_tail}",  # a live process on this host (not the build)
        f"bank.h5.tmp-{proc.pid}-elsewhere.example.org",  # written on another host
        f"other.h5.tmp-{proc.pid}{host_tail}",  # another output's
    ]
    for name in keep:
        (out.parent / name).write_bytes(b"not mine")
    caplog.set_level(logging.INFO)
    assert build(json_path, img_dir, out) == 0  # a stale lock file must not block it
    removed = [r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING and left[0] in r.getMessage()]
    assert len(removed) == 1 and f"pid {proc.pid}" in removed[0], removed
    assert sorted(os.listdir(out.parent)) == sorted(["bank.h5"] + keep)
    assert read_bank(out)["counts"]["images"]["selected"] == 6


def test_write_error_keeps_old_bank_and_leaves_no_temp(tmp_path, builds, make_bank):
    # Full-size PNG crops of 640x480 images: a bank of about 2 MB, far over the limit.
    json_path, img_dir, _ = _dataset(tmp_path, num_images=8, size=(640, 480))
    out = tmp_path / "out" / "bank.h5"
    out.parent.mkdir()
    os.replace(make_bank(), out)
    old = out.read_bytes()
    limit = 256 * 1024
    proc = builds.start(json_path, img_dir, out, "--overwrite", "--encoding", "png",
                        "--max-side", 0, fsize_limit=limit)
    assert _wait(proc) == 1, _stderr(proc)
    lines = _error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("builder: error: "), lines
    assert str(out) in lines[0] and "free disk space" in lines[0], lines
    assert out.read_bytes() == old
    assert os.listdir(out.parent) == ["bank.h5"]

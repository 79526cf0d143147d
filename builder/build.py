"""
Builds a sample bank from a COCO dataset: plan, extract crops in worker processes, write in
image order.

Negative quota (paper: positives : negatives = 10 : 1 over the bank):

1. Pass 1 gives each image ``allocate_negatives(planned positives, neg_ratio)`` negatives, i.e.
   in proportion to its positives with the remainder carried along the image order.
2. Images that cannot place their share within the try budget are reported as exhausted. After
   pass 1 the target is recomputed from the positives actually written,
   ``round(neg_ratio * positives)``, and the shortfall is spread round-robin (in image order) over
   the images with spare room: decoded fine, have at least one GT box, never exhausted. Each
   make-up pass re-decodes those images with a fresh per-image RNG stream (pass index 1, 2, ...);
   at most ``max_passes`` make-up passes run, and any remaining shortfall is reported.

Images without any annotation are never decoded: they host no positives, and an unannotated
image may simply be unlabelled, so it is no safe source of background.

Determinism: every random draw comes from an RNG seeded by (seed, image_id, pass), results are
consumed in task order (``ProcessPoolExecutor.map``), so the bank does not depend on ``workers``.

Failures: the build holds the output's lock (:class:`builder.output_lock.OutputLock`) from its
existence check to the rename and first removes temp files of dead builds of that output; a
worker that dies (OOM killer) fails the build at once naming it; SIGTERM and SIGHUP are handled
like Ctrl-C. Each ends with one error line, the temp file removed and any old bank untouched.
Workers end with the build even when it is killed outright (SIGKILL): each watches the build
process (:func:`_watch_parent`), and with the workers gone the fork server and the resource
tracker exit by themselves.
"""

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import cv2
import numpy as np
from tqdm import tqdm

from . import __version__
from .coco import load_coco
from . import extract
from .extract import ExtractOptions, ImageTask, extract_image
from .bank import GROUPS
from .sampling import KEEP, SKIP_REASONS, allocate_negatives, allocate_shortfall, classify_boxes
from .output_lock import OutputLock, remove_stale_temps
from .writer import BankWriter

__all__ = ["BuildError", "BuildOptions", "ProblemLog", "build_bank"]

logger = logging.getLogger(__name__)

# Image ids listed per report entry (the counts stay exact; the lists are examples).
_MAX_LISTED_IDS = 20
# Images in flight per worker (about 10 crops of ~10 KB each).
_WINDOW_PER_WORKER = 128


class BuildError(RuntimeError):
    """A build that cannot produce a bank; the message is one line naming the cause and fix."""


@dataclasses.dataclass
class BuildOptions:
    """
    Build settings (the CLI's flags).

    Attributes:
        seed (int): RNG seed.
        workers (int): processes (<= 1: in this process).
        max_images (int or None): first N images of the json.
        overwrite (bool): replace ``out``.
        strict (bool): any input problem fails the build.
        max_side (int): crop downscale target of the longer side (0 = keep).
        quality (int): JPEG quality.
        encoding (str): "jpeg" or "png".
        neg_ratio (float): negatives per positive.
        enlarge (tuple): positive enlargement range.
        min_size (int): min box side in pixels.
        max_passes (int): negative make-up passes.
        progress (bool or None): tqdm bars (None = only on a terminal).
    """

    seed: int = 0
    workers: int = 1
    max_images: int = None
    overwrite: bool = False
    strict: bool = False
    max_side: int = extract.DEFAULT_MAX_SIDE
    quality: int = extract.DEFAULT_QUALITY
    encoding: str = extract.DEFAULT_ENCODING
    neg_ratio: float = 0.1
    enlarge: tuple = extract.DEFAULT_ENLARGE
    min_size: int = extract.DEFAULT_MIN_SIZE
    max_passes: int = 3
    progress: bool = None


class ProblemLog:
    """
    Counts input problems by kind and logs one line per problem (the first ``max_logged`` of
    each kind; the rest are only counted, so a broken 118k-image run stays readable).
    """

    def __init__(self, max_logged=20):
        self.counts = Counter()
        self.max_logged = max_logged

    def add(self, kind, message):
        self.counts[kind] += 1
        n = self.counts[kind]
        if n <= self.max_logged:
            logger.warning("%s: %s", kind, message)
        elif n == self.max_logged + 1:
            logger.warning(
                "%s: further problems of this kind are only counted (see the summary)", kind
            )

    @property
    def total(self):
        return sum(self.counts.values())


def _strict_error(problems):
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(problems.counts.items()))
    return BuildError(
        f"{problems.total} input problem(s) ({kinds}) listed above; --strict makes them fatal "
        "and no output was written (fix them or drop --strict)"
    )


def _tqdm_disable(options):
    # tqdm's disable=None hides the bar when stderr is not a terminal (logs, CI, tests).
    return None if options.progress is None else not options.progress


def _init_worker(build_pid=None):
    # The parent handles Ctrl-C and a hang-up (sent to the whole process group when a terminal
    # closes) and then stops the workers; one OpenCV thread per worker avoids oversubscribing
    # the cores.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cv2.setNumThreads(1)
    if build_pid is not None:  # None: a pool of another tool (scripts/benchmark.py)
        _watch_parent(build_pid)


def _watch_parent(build_pid, poll_s=0.5):
    """
    Ends this worker as soon as the build process ``build_pid`` ends, however it ends (SIGKILL
    included), from a daemon thread.

    A worker's parent is the fork server, not the build, and the fork server stays up as long as
    a worker holds its "alive" pipe, so PR_SET_PDEATHSIG or watching ``os.getppid()`` would not
    see the build die: the worker watches the build itself, through a pidfd (Linux >= 5.3, no pid
    reuse) or else by polling the pid. With every worker gone the fork server sees its pipe
    close and exits, and so does the resource tracker.
    """
    try:
        fd = os.pidfd_open(build_pid)
    except ProcessLookupError:
        os._exit(1)  # the build is already gone
    except (AttributeError, OSError):
        fd = None

    def watch():
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has ended
        else:
            while True:
                try:
                    os.kill(build_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="builder-watch-build", daemon=True).start()


def _worker_died(processes):
    """BuildError naming the worker that died; ``processes``: the pool's pid -> Process."""
    codes = {pid: p.exitcode for pid, p in list(processes.items()) if p.exitcode}
    # The pool then terminates (SIGTERM) the other workers: the culprit is the odd one out.
    culprits = [pid for pid, c in codes.items() if c != -signal.SIGTERM] or list(codes)
    if not culprits:
        return BuildError(
            "a worker process died while extracting crops; no output was written; "
            "rerun with fewer --workers if memory is short"
        )
    pid, code = culprits[0], codes[culprits[0]]
    if code < 0:
        name = signal.Signals(-code).name
        how = f"was killed by {name}" + (
            " (usually the out-of-memory killer; see `dmesg`)" if -code == signal.SIGKILL else ""
        )
    else:
        how = f"exited with status {code}"
    return BuildError(
        f"worker process pid {pid} {how} while extracting crops; the build stopped and "
        "wrote no output; rerun with fewer --workers (or a smaller --max-side) to use less memory"
    )


def _run(tasks, opts, workers):
    """Yields one ImageResult per task, in task order."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield extract_image(task, opts)
        return
    # Not "fork": a parent that already ran OpenCV (its thread pool) can deadlock forked children
    # inside cv2.resize. The fork server is a clean process with the worker code pre-imported.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["builder.extract"])
    # Not multiprocessing.Pool: it replaces a worker killed by the OOM killer and waits forever
    # for the lost task; this pool fails every pending task with BrokenProcessPool instead.
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(os.getpid(),))
    # The pool's live pid -> Process dict (private, so read defensively): the exit code of a
    # dead worker for the message, the workers to stop on an error.
    processes = getattr(pool, "_processes", {})  # the same dict object, filled as they start
    # A bounded queue of futures, consumed in task order: finished crops wait for the writer in
    # memory, so at most _WINDOW_PER_WORKER images per worker are in flight.
    window = _WINDOW_PER_WORKER * workers
    pending = deque()
    finished = False
    try:
        for task in tasks:
            pending.append(pool.submit(extract_image, task, opts))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        finished = True
    except BrokenProcessPool:
        pool.shutdown(wait=True)  # the pool terminates and joins the others: exit codes are final
        raise _worker_died(processes) from None
    finally:
        if not finished:
            # Error, Ctrl-C or SIGTERM: stop now, not after the tasks already handed out. No
            # future is cancelled: Python 3.11's pool then crashes its thread when it fails them.
            for p in list(processes.values()):
                p.terminate()
        pool.shutdown(wait=True)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """
    Turns the first SIGTERM (``kill PID``, a scheduler's stop) or SIGHUP (the terminal or ssh
    session closed) into KeyboardInterrupt, so it cleans up like Ctrl-C: workers stopped, temp
    file removed, old bank untouched, exit 130. A second such signal kills as usual. Python runs
    handlers only in the main thread: elsewhere, and for a signal that is ignored or handled
    already (``nohup`` ignores SIGHUP), nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) == signal.SIG_DFL]

    def interrupt(signum, frame):
        for s in sigs:
            signal.signal(s, signal.SIG_DFL)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for s in sigs:
        signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s in sigs:
            signal.signal(s, signal.SIG_DFL)


def _plan(dataset, opts, neg_ratio):
    """Returns pass-1 tasks: images with at least one annotation, with their negative quota."""
    records = [r for r in dataset.images if len(r.boxes)]
    planned = []
    for r in records:
        _, reasons = classify_boxes(r.boxes, r.iscrowd, r.labels, r.width, r.height, opts.min_size)
        planned.append(int((reasons == KEEP).sum()))
    quotas = allocate_negatives(planned, neg_ratio)
    tasks = [
        ImageTask(
            image_id=r.image_id,
            path=r.path,
            width=r.width,
            height=r.height,
            boxes=r.boxes,
            labels=r.labels,
            iscrowd=r.iscrowd,
            num_negatives=int(q),
        )
        for r, q in zip(records, quotas)
    ]
    return tasks, int(sum(planned))


class _Tally:
    """Running counts of what was written and of what went wrong."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.pos_by_group = np.zeros(len(GROUPS), dtype=np.int64)
        self.neg_by_group = np.zeros(len(GROUPS), dtype=np.int64)
        self.skipped = Counter({k: 0 for k in SKIP_REASONS})
        self.images_used = 0
        self.failed = 0
        self.lost_annotations = 0
        self.exhausted = []
        self.neg_by_pass = []

    def add(self, result):
        is_neg = result.label == self.num_classes
        self.pos_by_group += np.bincount(result.group[~is_neg], minlength=len(GROUPS))
        self.neg_by_group += np.bincount(result.group[is_neg], minlength=len(GROUPS))
        self.skipped.update(result.skipped)

    @property
    def positives(self):
        return int(self.pos_by_group.sum())

    @property
    def negatives(self):
        return int(self.neg_by_group.sum())


def _run_pass(tasks, pass_index, opts, options, writer, tally, problems):
    """
    Extracts and writes one pass over ``tasks`` in order.

    Returns:
        list[ImageTask]: the tasks whose image placed every negative asked of it (spare room).
    """
    desc = "images" if pass_index == 0 else f"negatives make-up pass {pass_index}"
    results = tqdm(
        _run(tasks, opts, options.workers),
        total=len(tasks),
        desc=desc,
        unit="img",
        disable=_tqdm_disable(options),
    )
    placed, spare = 0, []
    for task, res in zip(tasks, results):
        for kind, message in res.problems:
            problems.add(kind, message)
        if options.strict and problems.total:
            raise _strict_error(problems)
        if not res.ok:
            if pass_index == 0:
                tally.failed += 1
                tally.lost_annotations += len(task.boxes)
            continue
        writer.append(
            res.crops, res.label, res.group, res.size, res.image_id, res.box, res.crop_box
        )
        tally.add(res)
        tally.images_used += pass_index == 0 and len(res.label) > 0
        placed += res.neg_placed
        if res.neg_placed < res.neg_requested:
            tally.exhausted.append(task.image_id)
        else:
            spare.append(task)
    tally.neg_by_pass.append(placed)
    return spare


def _counts(dataset, options, tally, problems, num_planned, planned_pos, num_missing):
    """Returns the ``counts`` report stored in the bank and printed by the CLI."""
    exhausted = sorted(set(tally.exhausted))
    target = int(round(options.neg_ratio * tally.positives))
    return {
        "images": {
            "in_json": dataset.num_images_in_json,
            "selected": len(dataset.images),
            "without_annotations": len(dataset.images) - num_planned,
            "missing": num_missing,
            "failed": tally.failed,
            "decoded": num_planned - num_missing - tally.failed,
            "with_samples": tally.images_used,
        },
        "annotations": {
            "total": dataset.num_annotations,
            "planned_positives": planned_pos,
            "skipped": dict(tally.skipped),
            "in_missing_or_failed_images": tally.lost_annotations,
        },
        "samples": {
            "total": tally.positives + tally.negatives,
            "positives": tally.positives,
            "negatives": tally.negatives,
            "positives_by_group": dict(zip(GROUPS, tally.pos_by_group.tolist())),
            "negatives_by_group": dict(zip(GROUPS, tally.neg_by_group.tolist())),
        },
        "negatives": {
            "ratio": options.neg_ratio,
            "target": target,
            "placed_by_pass": tally.neg_by_pass,
            "shortfall": max(0, target - tally.negatives),
            "images_exhausted": len(exhausted),
            "exhausted_image_ids": exhausted[:_MAX_LISTED_IDS],
        },
        "problems": dict(sorted(problems.counts.items())),
    }


def _build(annotations, image_dir, out_path, options, build_args, lock=None):
    """The build proper, under the output lock; returns the ``counts`` report."""
    dataset = load_coco(annotations, image_dir, options.max_images)
    problems = ProblemLog()
    for kind, message in dataset.problems:
        problems.add(kind, message)
    num_classes = len(dataset.category_ids)
    opts = ExtractOptions(
        seed=options.seed,
        num_classes=num_classes,
        enlarge=tuple(options.enlarge),
        min_size=options.min_size,
        max_side=options.max_side,
        encoding=options.encoding,
        quality=options.quality,
    )
    tasks, planned_pos = _plan(dataset, opts, options.neg_ratio)
    num_planned = len(tasks)
    tally = _Tally(num_classes)
    # Cheap existence check first, so --strict fails before any decoding.
    present = []
    for task in tasks:
        if os.path.isfile(task.path):
            present.append(task)
            continue
        tally.lost_annotations += len(task.boxes)
        problems.add(
            "missing_file",
            f"{task.path}: image {task.image_id} not found; check "
            "--images or remove the image from the json",
        )
    if options.strict and problems.total:
        raise _strict_error(problems)
    num_missing, tasks = len(tasks) - len(present), present

    with BankWriter(out_path, encoding=options.encoding, lock=lock) as writer:
        spare = _run_pass(tasks, 0, opts, options, writer, tally, problems)
        for pass_index in range(1, options.max_passes + 1):
            # Make-up pass: spread the remaining shortfall over images with spare room.
            shortfall = int(round(options.neg_ratio * tally.positives)) - tally.negatives
            if shortfall <= 0 or not spare:
                break
            extra = allocate_shortfall(len(spare), shortfall)
            makeup = [
                dataclasses.replace(
                    t, num_negatives=int(e), with_positives=False, pass_index=pass_index
                )
                for t, e in zip(spare, extra)
                if e > 0
            ]
            _run_pass(makeup, pass_index, opts, options, writer, tally, problems)
            # Unused candidates stay; the ones that just ran out of room leave.
            full = set(tally.exhausted)
            spare = [t for t in spare if t.image_id not in full]

        if tally.positives == 0:
            raise BuildError(
                f"no usable crops from {annotations}: {len(dataset.images)} images, "
                f"{dataset.num_annotations} annotations, {num_missing + tally.failed} images "
                f"missing or unreadable, skipped {dict(tally.skipped)}; check --images, "
                "--min-size and the json"
            )
        if tally.exhausted:
            logger.info(
                "%d image(s) had no room for all their negatives (e.g. %s); the shortfall went to "
                "images with spare room, %d left",
                len(set(tally.exhausted)),
                sorted(set(tally.exhausted))[:5],
                max(0, int(round(options.neg_ratio * tally.positives)) - tally.negatives),
            )
        counts = _counts(dataset, options, tally, problems, num_planned, planned_pos, num_missing)
        writer.finalize(
            {
                "num_classes": num_classes,
                "category_names": list(dataset.category_names),
                "category_ids": list(dataset.category_ids),
                "seed": int(options.seed),
                "tool_version": __version__,
                "build_args": build_args,
                "counts": counts,
            }
        )
    return counts


def build_bank(annotations, image_dir, out_path, options=None, build_args=None):
    """
    Builds the HDF5 sample bank ``out_path`` (format: :mod:`builder.bank`).

    Args:
        annotations (str): COCO instances json.
        image_dir (str): directory of the images.
        out_path (str): bank to write (atomically).
        options (BuildOptions or None): settings; defaults if None.
        build_args (dict or None): stored as the ``build_args`` attribute; defaults to the
            paths plus ``options``.

    Returns:
        dict: ``{"out": path, "seconds": float, "counts": dict}``; ``counts`` is also stored in
        the bank's ``counts`` attribute.

    With ``workers > 1`` the workers come from a fork server, so a script calling this must
    guard its entry point with ``if __name__ == "__main__":`` (as for any non-fork start).

    Raises:
        BuildError: output exists without ``overwrite``, no usable crops, a worker process died,
            or (``strict``) any input problem. No output is written then.
        builder.output_lock.OutputBusyError: another build is writing ``out_path``.
        builder.writer.BankWriteError: the bank could not be written (disk full, ...).
        builder.coco.CocoFormatError: the json is not a usable COCO instances file.
        KeyboardInterrupt: Ctrl-C, SIGTERM or SIGHUP; the temp file is removed.
    """
    start = time.perf_counter()
    options = options or BuildOptions()
    if os.path.isdir(out_path):
        raise BuildError(f"{out_path} is a directory; pass a file path such as {out_path}/bank.h5")
    if build_args is None:
        build_args = dict(
            annotations=annotations, images=image_dir, out=out_path, **dataclasses.asdict(options)
        )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # The lock spans the existence check to the final rename, so a second build of out_path
    # fails at once naming this one instead of silently replacing (or being replaced by) it.
    with _sigterm_as_interrupt(), OutputLock(out_path) as lock:
        remove_stale_temps(out_path, lock)
        if os.path.exists(out_path) and not options.overwrite:
            raise BuildError(f"{out_path} already exists; pass --overwrite to replace it")
        counts = _build(annotations, image_dir, out_path, options, build_args, lock)
    return {"out": out_path, "seconds": time.perf_counter() - start, "counts": counts}

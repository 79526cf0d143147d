#!/usr/bin/env python
"""
Profiles full Montage pre-training steps (train_net.py's Trainer: real loader, hooks, AMP) with
torch.profiler and writes a JSON summary (the `profile` step of scripts/gpu_check.sh).

    python scripts/profile_step.py --config-file CFG.yaml --out profile.json \
        [--warmup 10] [--rate-iters 20] [--steps 20] [KEY VALUE ...]

Iterations: ``--warmup`` (not measured), then ``--rate-iters`` unprofiled steps whose
Detectron2 ``time`` (hooks.IterationTimer, per iteration) gives the end-to-end montages/s as
train_net.py's log reports it (median over that steady window; min / max too), then ``--steps``
steps under torch.profiler. The summary:

* ``phases``: per step, host (main-thread wall) ms of each named range (record_function) -
  data (loader hand-off), h2d_copy, montage_assembly, forward, loss, backward, optimizer,
  hooks, metrics - and, with CUDA, the device ms of the kernels launched inside each range
  (any thread: backward's kernels come from the autograd thread) and the device idle time;
* ``bytes``: bytes copied to the device per step (the batch's tensors) against the crops'
  pixel bytes;
* ``top_kernels``: the 15 CUDA kernels with the most device time (empty without CUDA);
* ``rate``: montages/s and the steady window of Detectron2's ``time``.

The model's own ranges (h2d_copy, montage_assembly, forward, loss, metrics) are in
montage_pretrain/meta_arch.py; the trainer-level ones are added here by wrapping (no change to
the step when not profiling).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from detectron2.engine import HookBase, default_argument_parser
from detectron2.engine import hooks as d2_hooks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("data", "h2d_copy", "montage_assembly", "forward", "loss", "backward", "optimizer",
          "hooks", "metrics")
TOP_KERNELS = 15


def load_train_net():
    path = os.path.join(ROOT, "projects", "MontagePretrain", "train_net.py")
    spec = importlib.util.spec_from_file_location("train_net_profiled", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ranged(name, fn):
    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapped


class _CountingIter:
    """The loader iterator, its hand-off named "data", bytes of every batch counted."""

    def __init__(self, it):
        self.it, self.batches = it, []

    def __iter__(self):
        return self

    def __next__(self):
        with record_function("data"):
            batch = next(self.it)
        tensors = [v for v in batch.values() if torch.is_tensor(v)]
        sizes = batch["sizes"]
        self.batches.append((sum(v.numel() * v.element_size() for v in tensors),
                             3 * int(sizes.prod(1).sum())))
        return batch


class ProfileWindow(HookBase):
    """Runs torch.profiler over iterations [start, start + steps)."""

    def __init__(self, start, steps, cuda):
        self.start, self.steps, self.cuda = start, steps, cuda
        self.prof, self.wall_s, self._t0, self.batch_count = None, None, None, None

    def before_step(self):
        if self.trainer.iter == self.start:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=acts, record_shapes=False, with_stack=False)
            if self.cuda:
                torch.cuda.synchronize()
            self.prof.__enter__()
            self.batch_count = len(self.trainer._counting.batches)
            self._t0 = time.perf_counter()

    def after_step(self):
        if self.prof is not None and self.trainer.iter == self.start + self.steps - 1:
            if self.cuda:
                torch.cuda.synchronize()
            self.wall_s = time.perf_counter() - self._t0
            self.prof.__exit__(None, None, None)


def instrument(trainer):
    """Named ranges around the trainer-level phases; the loader iterator counts bytes."""
    inner = trainer._trainer
    opt = inner.optimizer
    opt.step = _ranged("optimizer", opt.step)
    opt.zero_grad = _ranged("optimizer", opt.zero_grad)
    inner._write_metrics = _ranged("metrics", inner._write_metrics)
    for h in trainer._hooks:
        if not isinstance(h, ProfileWindow):
            h.before_step = _ranged("hooks", h.before_step)
            h.after_step = _ranged("hooks", h.after_step)
    trainer._counting = inner._data_loader_iter_obj = _CountingIter(iter(inner.data_loader))


@contextlib.contextmanager
def ranged_backward():
    """Tensor.backward inside a "backward" range (the step calls it on the summed losses)."""
    orig = torch.Tensor.backward
    torch.Tensor.backward = _ranged("backward", orig)
    try:
        yield
    finally:
        torch.Tensor.backward = orig


def _interval_union(intervals):
    total, end = 0.0, None
    start = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    return total + (end - start if end is not None else 0.0)


def summarize(prof, steps, wall_s, cuda):
    """Per-step phase times (ms), device idle and the top kernels from the profiler's events."""
    events = list(prof.events())
    cpu_type = torch.autograd.DeviceType.CPU
    ranges = {k: [] for k in PHASES}
    for e in events:
        if e.name in ranges and e.device_type == cpu_type:
            ranges[e.name].append((e.time_range.start, e.time_range.end))
    host = {k: _interval_union(v) / 1e3 / steps for k, v in ranges.items()}
    covered = _interval_union([iv for v in ranges.values() for iv in v]) / 1e3 / steps
    out = {"host_ms_per_step": host, "step_ms": 1e3 * wall_s / steps,
           "host_unattributed_ms_per_step": 1e3 * wall_s / steps - covered}
    if not cuda:
        out.update(device_ms_per_step=None, device_busy_ms_per_step=None,
                   device_idle_ms_per_step=None, top_kernels=[],
                   note="no CUDA: host times only (the CPU is the device)",
                   phases_ms_per_step=dict(host, idle=out["host_unattributed_ms_per_step"]),
                   phases_basis="host: main-thread wall per range; idle = outside every range")
        return out
    device, kernels, busy = {k: 0.0 for k in PHASES}, {}, []
    device["unattributed"] = 0.0
    flat = sorted((s, e, k) for k, v in ranges.items() for s, e in v)
    for e in events:
        if e.device_type != cpu_type:  # a kernel / memcpy / memset on the device
            busy.append((e.time_range.start, e.time_range.end))
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
        ks = getattr(e, "kernels", None) or []
        if e.device_type == cpu_type and ks:
            dur = sum(k.duration for k in ks)
            t = e.time_range.start
            # The innermost phase range open at launch time, on any thread.
            inside = [(en - s, k) for s, en, k in flat if s <= t <= en]
            device[min(inside)[1] if inside else "unattributed"] += dur
    if not kernels:  # kernels only attached to their launching ops
        for e in events:
            for k in getattr(e, "kernels", None) or []:
                kernels[k.name] = kernels.get(k.name, 0.0) + k.duration
    busy_ms = _interval_union(busy) / 1e3 / steps
    out.update(
        device_ms_per_step={k: v / 1e3 / steps for k, v in device.items()},
        device_busy_ms_per_step=busy_ms,
        device_idle_ms_per_step=max(out["step_ms"] - busy_ms, 0.0),
        top_kernels=[{"name": n[:200], "ms_per_step": t / 1e3 / steps} for n, t in
                     sorted(kernels.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]])
    out["phases_ms_per_step"] = dict(out["device_ms_per_step"],
                                     idle=out["device_idle_ms_per_step"])
    out["phases_basis"] = ("device: kernel time launched inside each range (any thread); idle = "
                           "step wall - device busy")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--out", required=True, help="JSON summary")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rate-iters", type=int, default=20)
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    train_net = load_train_net()
    # One more step after the window: the last iteration's writers and eval are not profiled.
    total = args.warmup + args.rate_iters + args.steps + 1
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        d2_args = default_argument_parser().parse_args(
            ["--config-file", args.config_file] + args.opts + [
                "OUTPUT_DIR", tmp, "SOLVER.MAX_ITER", str(total),
                "SOLVER.CHECKPOINT_PERIOD", str(10**9)])
        cfg = train_net.setup(d2_args)
        cuda = cfg.MODEL.DEVICE.startswith("cuda")
        window = ProfileWindow(args.warmup + args.rate_iters, args.steps, cuda)

        class Profiled(train_net.Trainer):
            def build_hooks(self):
                # No checkpoint or export at the end: only the steps are of interest.
                keep = [h for h in super().build_hooks() if not isinstance(
                    h, (d2_hooks.PeriodicCheckpointer, train_net.ExportHook))]
                return keep + [window]

        trainer = Profiled(cfg)
        trainer.resume_or_load(resume=False)
        instrument(trainer)
        t_setup = time.perf_counter() - t_start
        with ranged_backward():
            trainer.train()
        times = trainer.storage.history("time").values()  # (seconds, iteration)
        steady = [t for t, it in times if args.warmup <= it < args.warmup + args.rate_iters]
    B = cfg.SOLVER.IMS_PER_BATCH
    med = statistics.median(steady) if steady else None
    batches = trainer._counting.batches[window.batch_count:window.batch_count + args.steps]
    sent = sum(b for b, _ in batches) / max(len(batches), 1)
    pixels = sum(px for _, px in batches) / max(len(batches), 1)
    summary = summarize(window.prof, args.steps, window.wall_s, cuda)
    rec = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "config": os.path.relpath(os.path.abspath(args.config_file), ROOT), "opts": args.opts,
        "montages_per_step": B, "input_size": cfg.MONTAGE.INPUT_SIZE,
        "amp": bool(cfg.SOLVER.AMP.ENABLED), "channels_last": bool(cfg.MONTAGE.CHANNELS_LAST),
        "packed_crops": bool(cfg.MONTAGE.PACKED_CROPS), "workers": cfg.DATALOADER.NUM_WORKERS,
        "log_period": cfg.MONTAGE.LOG_PERIOD,
        "iterations": {"warmup": args.warmup, "rate": args.rate_iters, "profiled": args.steps},
        "rate": {"montages_per_s": B / med if med else None, "time_median_s": med,
                 "time_min_s": min(steady) if steady else None,
                 "time_max_s": max(steady) if steady else None, "window": len(steady),
                 "source": "Detectron2 storage 'time' (hooks.IterationTimer), steady window"},
        "bytes": {"h2d_bytes_per_step": sent, "pixel_bytes_per_step": pixels,
                  "h2d_over_pixels": sent / pixels if pixels else None},
        "profiled_montages_per_s": B * args.steps / window.wall_s,
        "setup_s": t_setup, "wall_s": time.perf_counter() - t_start,
        **summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    host = rec["host_ms_per_step"]
    print(f"profile: {B} montages/step, {rec['rate']['montages_per_s'] or 0:.1f} montages/s "
          f"(D2 time median {1e3 * (med or 0):.1f} ms over {len(steady)} steps); bytes to device "
          f"/ pixels {rec['bytes']['h2d_over_pixels'] or 0:.2f}x; host ms/step: "
          + ", ".join(f"{k} {v:.1f}" for k, v in host.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""
GPU throughput of Montage pre-training (R-50, the real config), in one self-contained command.

On a GPU machine (torch + torchvision with CUDA, plus the project's Python wheels: Detectron2
python code, fvcore, iopath, h5py, pycocotools, opencv), from the repository root::

    PYTHONPATH=.:projects/MontagePretrain python scripts/bench_gpu.py --json out.json

(``make bench-gpu`` runs the same.) Without ``--bank`` a small bank is built on the spot from the
built-in toy dataset (``scripts/make_toy_coco.py`` + ``python -m builder build``, ~300 images,
crops pre-resized by the builder's ``--max-side 256`` default) in a temporary folder; pass
``--bank coco_bank.h5`` to measure the loader on real COCO crops. Defaults on CUDA: 256 montages
per step, ``min(16, cpu_count)`` loader workers; the whole run takes a few minutes (< 8).

Modes, each measured after warm-up as the MEDIAN of several timed windows (CUDA-synchronised):

(a) model-only training step, synthetic montages: random normalised (B, 3, 224, 224) images
    straight into backbone + head + loss + SGD step (no loader, no assembly), in fp32, AMP bf16
    (``torch.autocast("cuda", dtype=torch.bfloat16)``, no GradScaler) and AMP bf16 +
    channels_last (``MONTAGE.CHANNELS_LAST True``: model and inputs in channels_last);
(b) full training step: the real loader (``build_montage_train_loader``, N workers, pinned
    memory) and on-device montage assembly (the model's forward) with AMP + channels_last, in a
    plain loop; (b') the same step through Detectron2's ``AMPTrainer.run_step`` as
    ``train_net.py`` runs it (GradScaler, metrics written every step);
(c) loader only: montages/s out of the DataLoader with N workers, plus the per-crop cost of the
    HDF5 read and of the JPEG/PNG decode, the collate cost and the padded transfer volume, so
    one can see whether the host would starve the GPU.

Goals printed: (a) AMP + channels_last >= 5000 montages/s on an H100 (floor 2500);
(b) / best (a) >= 0.80. Projected hours: 64k iterations x 512 montages = 32.77M montages on ONE
device at the measured rate.

Without CUDA (or with ``--tiny``) the same code runs at a tiny size (R-18, 96 px montages,
batch 4, 2 windows of 2 steps, 1 worker; AMP modes are skipped without CUDA), which is what
``tests/scripts/test_bench_gpu.py`` runs.
"""
import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
from tabulate import tabulate

from detectron2.config import get_cfg
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from montage_pretrain import add_montage_config, assert_montage_cfg
from builder.bank import SampleBank
from montage_pretrain.data import (
    MontageStream,
    build_montage_train_loader,
    collate_montages,
)
from montage_pretrain.losses import (
    blockwise_loss,
    erf_dense_loss,
    global_loss,
    single_loss,
)

DEFAULT_CONFIG = os.path.join(ROOT, "projects/MontagePretrain/configs/montage_R_50.yaml")
CROPS_PER_MONTAGE = 4
# The paper's schedule: 64k iterations x 512 montages.
SCHEDULE_MONTAGES = 64000 * 512
GOAL_A, FLOOR_A, GOAL_RATIO = 5000.0, 2500.0, 0.80
# Overrides of the tiny (CPU / test) size: ResNet-18, 96 px montages (split 0.3 -> 29 | 67;
# res5 is 3 x 3 and every region owns a feature position).
TINY_OPTS = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
             "MONTAGE.INPUT_SIZE", "96"]
MODE_KEYS = ("a_fp32", "a_bf16", "a_bf16_cl", "b_full", "b_trainer", "c_loader")


# ------------------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def autocast(device, enabled):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def hours_for_schedule(rate):
    return SCHEDULE_MONTAGES / rate / 3600.0 if rate and rate > 0 else None


def toy_bank(tmp, num_train, workers):
    """Generates the built-in toy dataset and builds a bank from it; returns the bank path."""
    data, bank = os.path.join(tmp, "toy"), os.path.join(tmp, "bank.h5")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "projects", "MontagePretrain"), env.get("PYTHONPATH", "")])
    py = sys.executable
    subprocess.run([py, os.path.join(ROOT, "scripts/make_toy_coco.py"), "--out", data,
                    "--num-train", str(num_train), "--num-val", "0"],
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env=env)
    subprocess.run([py, "-m", "builder", "build", "--annotations",
                    os.path.join(data, "annotations/instances_train.json"), "--images",
                    os.path.join(data, "train"), "--out", bank, "--workers", str(workers)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                   env=env)
    return bank


def make_cfg(args, bank, channels_last, workers):
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.merge_from_file(args.config)
    # No LR schedule runs here, so the LR is held at a small constant: the speed does not depend
    # on it, and 100+ steps from scratch stay finite (Detectron2's trainer raises on a NaN loss).
    opts = ["MONTAGE.BANK", bank, "SOLVER.IMS_PER_BATCH", str(args.batch),
            "DATALOADER.NUM_WORKERS", str(workers), "MONTAGE.CHANNELS_LAST", str(channels_last),
            "SEED", "0", "SOLVER.BASE_LR", "0.01"]
    if args.tiny:
        opts = TINY_OPTS + opts
    cfg.merge_from_list(opts + list(args.opts))
    assert_montage_cfg(cfg)
    return cfg


def bank_info(path):
    bank = SampleBank(path)
    sizes = bank.sizes
    longer = sizes.max(1) if len(sizes) else np.zeros(1)
    enc = bank.h5.attrs.get("encoding", "?")
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    groups = np.bincount(bank.groups, minlength=3).tolist()
    info = {
        "path": os.path.abspath(path), "samples": len(bank), "num_classes": bank.num_classes,
        "encoding": enc, "groups_S_T_W": groups,
        "crop_long_side_px": {"median": float(np.median(longer)),
                              "p90": float(np.percentile(longer, 90)),
                              "max": int(longer.max())},
        "crop_mean_pixels": float((sizes[:, 0] * sizes[:, 1]).mean()) if len(sizes) else 0.0,
    }
    bank.close()
    return info


def timed_windows(step, items_per_step, device, warmup, windows, steps, max_seconds):
    """
    Runs ``warmup`` steps, then up to ``windows`` timed windows of ``steps`` steps each, the
    device synchronised around each window; stops early (after at least one window) once the
    mode has run ``max_seconds``. Returns the items/s of each window.
    """
    t_start = time.perf_counter()
    for _ in range(warmup):
        step()
        if time.perf_counter() - t_start > max_seconds / 2:
            break
    rates = []
    for _ in range(windows):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * items_per_step / (time.perf_counter() - t0))
        if time.perf_counter() - t_start > max_seconds:
            break
    return rates


def result(label, precision, rates, device, items="montages", **extra):
    rate = statistics.median(rates)
    out = {
        "label": label, "precision": precision, "skipped": None,
        "montages_per_s": rate, "crops_per_s": rate * CROPS_PER_MONTAGE,
        "hours_64k_x_512": hours_for_schedule(rate), "peak_gpu_mem_gib": peak_gib(device),
        "window_rates": rates, "windows": len(rates),
    }
    out.update(extra)
    return out


def skipped(label, precision, reason):
    return {"label": label, "precision": precision, "skipped": reason, "montages_per_s": None,
            "crops_per_s": None, "hours_64k_x_512": None, "peak_gpu_mem_gib": None,
            "window_rates": [], "windows": 0}


def guarded(fn, failed, device):
    """
    Runs one mode; an exception (e.g. CUDA out of memory at a large --batch) marks the mode
    failed, with the error, instead of losing the results of the others.
    """
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        msg = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        print(f"[bench_gpu] {msg}", file=sys.stderr)
        reset_memory(device)
        return failed(msg)


def model_loss(model, logits, labels):
    """The model's training loss on ``logits`` (what ``MontageClassifier.forward`` computes)."""
    logits = logits.float()
    if model.loss_name == "erf":
        return erf_dense_loss(logits, labels, model.erf_weights, model.region_map)
    if model.loss_name == "blockwise":
        return blockwise_loss(logits, labels, model.region_map)
    if model.loss_name == "global":
        return global_loss(logits, labels, model.region_areas)
    return single_loss(logits, labels)


# ----------------------------------------------------------------------------------------- (a)
def bench_model_only(args, bank, device, amp, channels_last, label, precision):
    """(a): synthetic normalised montages straight into backbone + head + loss + SGD step."""
    reset_memory(device)
    torch.manual_seed(0)
    cfg = make_cfg(args, bank, channels_last, 0)
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    S, B = cfg.MONTAGE.INPUT_SIZE, args.batch
    k = 1 if model.loss_name == "single" else CROPS_PER_MONTAGE
    images = torch.randn(B, 3, S, S, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, model.num_classes + 1, (B, k), device=device)

    def step():
        with autocast(device, amp):
            logits = model.head(model.backbone(images)[model.in_feature])
            loss = model_loss(model, logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rates = timed_windows(step, B, device, args.warmup, args.windows, args.steps,
                          args.max_seconds)
    out = result(label, precision, rates, device)
    del model, opt, images, labels
    return out


# ----------------------------------------------------------------------------------------- (b)
def fit_prefetch_to_shm(loader, bank_path, batch, notes, shm="/dev/shm"):
    """
    The loader keeps up to workers x prefetch_factor collated batches in flight, each a padded
    uint8 tensor in shared memory (up to B x 4 x 3 x max h x max w bytes). Where /dev/shm is too
    small for that (containers often mount 64 MB) the workers would die with a bus error, so
    prefetch_factor is lowered for this run, with a note.
    """
    workers = loader.num_workers
    if workers == 0 or not os.path.isdir(shm):
        return
    bank = SampleBank(bank_path)
    sizes = bank.sizes
    bank.close()  # no HDF5 handle may be open in this process when the workers fork
    per_batch = batch * CROPS_PER_MONTAGE * 3 * int(sizes[:, 0].max()) * int(sizes[:, 1].max())
    st = os.statvfs(shm)
    free = st.f_bavail * st.f_frsize
    need = workers * loader.prefetch_factor * per_batch
    if need <= 0.7 * free:
        return
    pf = max(1, int(0.7 * free // (workers * per_batch)))
    msg = (f"{shm} has {free / 2**30:.1f} GiB free but {workers} workers x prefetch_factor "
           f"{loader.prefetch_factor} x {per_batch / 2**20:.0f} MiB/batch = {need / 2**30:.1f} GiB "
           f"could be in flight: prefetch_factor lowered to {pf} for this run")
    if workers * pf * per_batch > free:
        msg += " (still too much: the loader may fail; use fewer --workers or a smaller --batch)"
    notes.append(msg)
    loader.prefetch_factor = pf


class _SharedLoader:
    """An iterable whose iterator is an existing (already warm) loader iterator."""

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self.it


def bench_full(args, bank, device, amp, notes):
    """(b) and (b'): real loader + on-device assembly + AMP + channels_last."""
    reset_memory(device)
    torch.manual_seed(0)
    channels_last = device.type == "cuda"
    cfg = make_cfg(args, bank, channels_last, args.workers)
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    B = args.batch
    precision = ("bf16" if amp else "fp32") + (" + channels_last" if channels_last else "")
    loader = build_montage_train_loader(cfg)
    fit_prefetch_to_shm(loader, bank, B, notes)
    loader_iter = iter(loader)
    wait = [0.0]

    def next_batch():
        t0 = time.perf_counter()
        batch = next(loader_iter)
        wait[0] += time.perf_counter() - t0
        return batch

    def step():
        batch = next_batch()
        with autocast(device, amp):
            loss = sum(model(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {}
    with EventStorage(0):
        # The workers' first batches arrive together: warm up past that burst so the timed
        # windows see the loader's steady state, not its start-up buffer.
        warmup = max(args.warmup, 2 * args.workers)
        timed_windows(step, B, device, warmup, 0, 1, args.max_seconds)  # warm-up only
        wait[0] = 0.0
        t0 = time.perf_counter()
        rates = timed_windows(step, B, device, 0, args.windows, args.steps, args.max_seconds)
        elapsed = time.perf_counter() - t0
        breakdown = {"loader_wait_share": wait[0] / elapsed if elapsed > 0 else None}
        breakdown.update(step_breakdown(model, next_batch(), device, amp))
        out["b_full"] = result(
            "(b) full step: loader + on-device assembly", precision, rates, device,
            breakdown=breakdown)

        # (b') the same step through Detectron2's trainer, as train_net.py builds it.
        reset_memory(device)
        if device.type == "cuda" and amp:
            trainer = AMPTrainer(model, _SharedLoader(loader_iter), opt)
            trainer.precision = torch.bfloat16
            tlabel = "(b') via D2 AMPTrainer.run_step"
        else:
            trainer = SimpleTrainer(model, _SharedLoader(loader_iter), opt)
            tlabel = "(b') via D2 SimpleTrainer.run_step"

        def trainer_step():
            trainer.run_step()
            trainer.iter += 1

        rates = timed_windows(trainer_step, B, device, args.warmup, args.windows, args.steps,
                              args.max_seconds)
        out["b_trainer"] = result(tlabel, precision, rates, device)
        del trainer
    del loader_iter, loader, model, opt
    gc.collect()
    return out


def step_breakdown(model, batch, device, amp, reps=3):
    """Synchronised host->device copy and montage-assembly times of one loader batch."""
    crops = batch["crops"]
    out = {"padded_crops_shape": list(crops.shape),
           "padded_bytes_per_step": crops.numel() * crops.element_size()}
    if device.type == "cuda":
        if not crops.is_pinned():
            crops = crops.pin_memory()
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            crops.to(device, non_blocking=True)
            sync(device)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        out["h2d_ms_per_step"] = 1e3 * t
        out["h2d_gb_per_s"] = out["padded_bytes_per_step"] / t / 1e9
    dev_batch = {k: v.to(device) for k, v in batch.items()}
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp):
            model.make_images(dev_batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    out["assembly_ms_per_step"] = 1e3 * statistics.median(times)
    return out


# ----------------------------------------------------------------------------------------- (c)
def bench_loader(args, bank, notes):
    """(c): montages/s out of the DataLoader with ``args.workers`` workers (nothing consumes)."""
    cfg = make_cfg(args, bank, False, args.workers)
    B = args.batch
    loader = build_montage_train_loader(cfg)
    fit_prefetch_to_shm(loader, bank, B, notes)
    it = iter(loader)
    for _ in range(max(1, args.workers) + 1):  # start-up: every worker delivers once
        next(it)
    rates = timed_windows(lambda: next(it), B, torch.device("cpu"), 0, args.windows,
                          args.steps, args.max_seconds)
    del it, loader
    gc.collect()
    out = result(f"(c) loader only, {args.workers} worker(s)", "uint8", rates,
                 torch.device("cpu"))
    out["peak_gpu_mem_gib"] = None
    per_worker = out["crops_per_s"] / max(args.workers, 1)
    out["crops_per_s_per_worker"] = per_worker
    return out


def bench_host_costs(args, bank_path, device):
    """
    In-process cost of the loader's pieces, to see where a worker's time goes: per crop the
    HDF5 read, the decode (imdecode + BGR->RGB) and the HWC->CHW copy; per montage one full draw
    (4 of each, as MontageStream yields it); per batch the collate (zero-filled padded tensor),
    the copy into shared memory that sending the batch to the main process costs (the collate
    allocates ordinary memory), and on CUDA the copy into pinned memory (the pin-memory thread).
    """
    import cv2

    bank = SampleBank(bank_path)
    rng = np.random.default_rng(0)
    idx = rng.integers(len(bank), size=args.decode_crops).tolist()
    h5 = bank.h5
    # As SampleBank.decode reads: the dataset is looked up by name for every crop.
    t0 = time.perf_counter()
    for i in idx:
        np.asarray(h5["crops"][int(i)], dtype=np.uint8)
    t_read = (time.perf_counter() - t0) / len(idx)
    # With the dataset object kept (what a cached handle would cost).
    ds = h5["crops"]
    t0 = time.perf_counter()
    blobs = [np.asarray(ds[int(i)], dtype=np.uint8) for i in idx]
    t_read_cached = (time.perf_counter() - t0) / len(idx)
    t0 = time.perf_counter()
    imgs = [cv2.cvtColor(cv2.imdecode(b, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for b in blobs]
    t_decode = (time.perf_counter() - t0) / len(idx)
    t0 = time.perf_counter()
    for img in imgs:
        torch.from_numpy(img).permute(2, 0, 1).contiguous()
    t_chw = (time.perf_counter() - t0) / len(idx)
    encoded = float(np.mean([b.size for b in blobs]))
    bank.close()
    del blobs, imgs

    stream = iter(MontageStream(bank_path, crops_per_image=CROPS_PER_MONTAGE, seed=0))
    B = args.batch
    t0 = time.perf_counter()
    items = [next(stream) for _ in range(B)]
    t_item = (time.perf_counter() - t0) / B
    t0 = time.perf_counter()
    batch = collate_montages(items)
    t_collate = time.perf_counter() - t0
    del items
    crops = batch["crops"]
    real = int((batch["sizes"][:, 0] * batch["sizes"][:, 1]).sum()) * 3
    padded = crops.numel()
    out = {
        "h5_read_ms_per_crop": 1e3 * t_read,
        "h5_read_cached_dataset_ms_per_crop": 1e3 * t_read_cached,
        "encoded_bytes_per_crop": encoded,
        "decode_ms_per_crop": 1e3 * t_decode,
        "hwc_to_chw_ms_per_crop": 1e3 * t_chw,
        "decode_crops_per_s_per_core": 1.0 / (t_read + t_decode),
        "draw_ms_per_montage": 1e3 * t_item,
        "collate_ms_per_batch": 1e3 * t_collate,
        "padded_batch_shape": list(crops.shape),
        "padded_bytes_per_montage": padded / B,
        "real_bytes_per_montage": real / B,
        "padding_efficiency": real / padded,
    }
    if device.type == "cuda":
        t0 = time.perf_counter()
        crops.pin_memory()
        out["pin_ms_per_batch"] = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    crops.share_memory_()
    t_share = time.perf_counter() - t0
    out["shm_copy_ms_per_batch"] = 1e3 * t_share
    per_montage = t_item + (t_collate + t_share) / B
    out["collate_and_shm_share_of_worker_time"] = (t_collate + t_share) / B / per_montage
    out["montages_per_s_per_core_in_process"] = 1.0 / per_montage
    return out


# ---------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", default="", help="HDF5 sample bank (default: toy bank built here)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="pre-training config (R-50)")
    p.add_argument("--batch", type=int, default=None, help="montages per step (CUDA 256)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (CUDA min(16, cpu_count))")
    p.add_argument("--windows", type=int, default=None, help="timed windows per mode (CUDA 5)")
    p.add_argument("--steps", type=int, default=None, help="steps per window (CUDA 15)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per mode (CUDA 8)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop a mode after its first window once it ran this long (CUDA 60)")
    p.add_argument("--num-train", type=int, default=None,
                   help="toy images for the on-the-spot bank (CUDA 300)")
    p.add_argument("--decode-crops", type=int, default=None,
                   help="crops timed for the per-crop read/decode cost (CUDA 512)")
    p.add_argument("--modes", default="a,b,c", help="subset of a,b,c to run")
    p.add_argument("--tiny", action="store_true", help="tiny size (the default without CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while benchmarking (default: unchanged; 1 on CPU, "
                        "where a shared machine makes more threads slower)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides KEY VALUE")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.tiny = args.tiny or not cuda
    big = not args.tiny
    cpus = os.cpu_count() or 1
    defaults = dict(batch=256 if big else 4, workers=min(16, cpus) if big else min(1, cpus - 1),
                    windows=5 if big else 2, steps=15 if big else 2, warmup=8 if big else 1,
                    max_seconds=60.0 if big else 20.0, num_train=300 if big else 16,
                    decode_crops=512 if big else 32)
    if args.threads is None and not cuda:
        args.threads = 1
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("batch", "windows", "steps"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1")
    args.modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    if not args.modes <= {"a", "b", "c"}:
        p.error(f"--modes {','.join(sorted(args.modes))}: use a subset of a,b,c")
    return args


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def verdict(ok):
    return "PASS" if ok else "FAIL"


def report(res):
    """The printed table and goal lines."""
    env, setup, bank, modes = res["env"], res["setup"], res["bank"], res["modes"]
    lines = [
        f"device: {env['device_name']}   torch {env['torch']}   torchvision {env['torchvision']}"
        f"   cudnn.benchmark {env['cudnn_benchmark']}   TF32 conv {env['cudnn_allow_tf32']}"
        f" / matmul {env['matmul_allow_tf32']}",
        f"config: {setup['config']}   ResNet-{setup['depth']}   {setup['input_size']} px"
        f"   batch {setup['batch']} montages/step   workers {setup['workers']}"
        f"   windows {setup['windows']} x {setup['steps']} steps (median)"
        + ("   [tiny size]" if setup["tiny"] else ""),
        f"bank: {bank['path']}   {bank['samples']} crops "
        f"(S/T/W {'/'.join(map(str, bank['groups_S_T_W']))})"
        f"   {bank['num_classes']} classes   {bank['encoding']}   crop long side median/p90/max "
        f"{bank['crop_long_side_px']['median']:.0f}/{bank['crop_long_side_px']['p90']:.0f}/"
        f"{bank['crop_long_side_px']['max']} px",
    ]
    rows = []
    for key in MODE_KEYS:
        m = modes.get(key)
        if m is None:
            continue
        if m["skipped"]:
            status = "failed" if m["skipped"].startswith("failed") else "skipped"
            rows.append([m["label"], m["precision"], status, "", "", "", m["skipped"]])
            continue
        note = ""
        if key == "c_loader":
            note = f"{m['crops_per_s_per_worker']:.0f} crops/s per worker"
        elif key == "b_full":
            bd = m["breakdown"]
            note = (f"loader wait {bd['loader_wait_share']:.0%}, "
                    f"assembly {bd['assembly_ms_per_step']:.1f} ms")
            if "h2d_ms_per_step" in bd:
                note += f", H2D {bd['h2d_ms_per_step']:.1f} ms ({bd['h2d_gb_per_s']:.1f} GB/s)"
        rows.append([m["label"], m["precision"], fmt(m["montages_per_s"], ".1f"),
                     fmt(m["crops_per_s"], ".0f"), fmt(m["hours_64k_x_512"], ".1f"),
                     fmt(m["peak_gpu_mem_gib"], ".2f"), note])
    table = tabulate(rows, disable_numparse=True,
                     headers=["mode", "precision", "montages/s", "crops/s",
                              "h for 64k x 512 (1 dev)", "peak GiB", "note"])
    lines += ["", table, ""]
    g = res["goals"]
    a = g["a_amp_channels_last"]
    if a["value"] is None:
        lines.append(f"goal (a) AMP bf16 + channels_last >= {GOAL_A:.0f} montages/s on an H100 "
                     f"(floor {FLOOR_A:.0f}): n/a ({a['note']})")
    else:
        lines.append(f"goal (a) AMP bf16 + channels_last >= {GOAL_A:.0f} montages/s on an H100 "
                     f"(floor {FLOOR_A:.0f}): {a['value']:.1f} -> {a['verdict']}"
                     + (f" ({a['note']})" if a["note"] else ""))
    r = g["ratio_b_over_a_best"]
    lines.append(f"goal (b) / best (a) >= {GOAL_RATIO:.2f}: "
                 + ("n/a" if r["value"] is None else f"{r['value']:.2f} -> {r['verdict']}")
                 + (f"   (b') / best (a) = {r['trainer_value']:.2f}"
                    if r.get("trainer_value") is not None else ""))
    d = res.get("data")
    if d:
        lines.append(
            f"host data path, per crop ({d['encoded_bytes_per_crop'] / 1e3:.1f} kB encoded): "
            f"HDF5 read {d['h5_read_ms_per_crop']:.3f} ms (cached dataset handle "
            f"{d['h5_read_cached_dataset_ms_per_crop']:.3f} ms) + decode "
            f"{d['decode_ms_per_crop']:.3f} ms (= {d['decode_crops_per_s_per_core']:.0f} crops/s "
            f"per core) + HWC->CHW {d['hwc_to_chw_ms_per_crop']:.3f} ms; one montage drawn "
            f"{d['draw_ms_per_montage']:.2f} ms")
        lines.append(
            f"host data path, per batch: collate {d['collate_ms_per_batch']:.1f} ms + copy to "
            f"shared memory {d['shm_copy_ms_per_batch']:.1f} ms"
            + (f" + pin {d['pin_ms_per_batch']:.1f} ms (main process)"
               if "pin_ms_per_batch" in d else "")
            + f" ({d['collate_and_shm_share_of_worker_time']:.0%} of worker time); in-process "
            f"{d['montages_per_s_per_core_in_process']:.0f} montages/s per core; padded batch "
            f"{tuple(d['padded_batch_shape'])} = {d['padded_bytes_per_montage'] / 1e3:.0f} "
            f"kB/montage (padding efficiency {d['padding_efficiency']:.0%})")
        if d.get("feeds") is not None:
            lines.append(d["feeds"])
    for n in res["notes"]:
        lines.append(f"note: {n}")
    lines.append("run time: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["timing_s"].items()
                                          if v is not None))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    # assert_montage_cfg logs its adaptations (SyncBN -> BN, no CUDA) once per config built.
    cfg_logger = logging.getLogger("montage_pretrain.config")
    dedup = _OnceFilter()
    cfg_logger.addFilter(dedup)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _main(args)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        cfg_logger.removeFilter(dedup)


class _OnceFilter(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _main(args):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    notes = []
    import torchvision

    env = {
        "device_name": torch.cuda.get_device_name(device) if cuda
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "cuda": cuda, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda_version": torch.version.cuda, "cpu_count": os.cpu_count(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    t_main = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_gpu_")
    try:
        t0 = time.perf_counter()
        bank = args.bank or toy_bank(tmp, args.num_train, min(8, os.cpu_count() or 1))
        bank_seconds = time.perf_counter() - t0 if not args.bank else None
        binfo = bank_info(bank)
        binfo["build_seconds"] = bank_seconds
        if not args.bank:
            notes.append(f"bank built from {args.num_train} toy images in {bank_seconds:.1f} s "
                         "(toy crops are smaller than COCO's: pass --bank for real decode costs)")
        cfg = make_cfg(args, bank, False, args.workers)
        setup = {"config": os.path.relpath(args.config, ROOT), "tiny": args.tiny,
                 "batch": args.batch, "workers": args.workers, "windows": args.windows,
                 "steps": args.steps, "warmup": args.warmup, "max_seconds": args.max_seconds,
                 "depth": cfg.MODEL.RESNETS.DEPTH, "input_size": cfg.MONTAGE.INPUT_SIZE,
                 "loss": cfg.MONTAGE.LOSS, "norm": cfg.MODEL.RESNETS.NORM,
                 "opts": list(args.opts)}
        timing = {"bank": bank_seconds}
        modes = {}
        no_amp = "no CUDA: AMP bf16 runs on CUDA only"
        if "a" in args.modes:
            t0 = time.perf_counter()
            for key, amp, cl, precision in (("a_fp32", False, False, "fp32"),
                                            ("a_bf16", True, False, "bf16"),
                                            ("a_bf16_cl", True, True, "bf16 + channels_last")):
                label = "(a) model only, synthetic"
                if amp and not cuda:
                    modes[key] = skipped(label, precision, no_amp)
                else:
                    modes[key] = guarded(
                        lambda: bench_model_only(args, bank, device, amp, cl, label, precision),
                        lambda msg: skipped(label, precision, msg), device)
            timing["a"] = time.perf_counter() - t0
        if "b" in args.modes:
            t0 = time.perf_counter()
            prec = "bf16 + channels_last" if cuda else "fp32"
            modes.update(guarded(
                lambda: bench_full(args, bank, device, cuda, notes),
                lambda msg: {"b_full": skipped("(b) full step: loader + on-device assembly",
                                               prec, msg),
                             "b_trainer": skipped("(b') via D2 trainer run_step", prec, msg)},
                device))
            timing["b"] = time.perf_counter() - t0
            if not cuda:
                notes.append("(b) runs fp32 and contiguous without CUDA (AMP + channels_last "
                             "need CUDA)")
        data = None
        if "c" in args.modes:
            t0 = time.perf_counter()
            label = f"(c) loader only, {args.workers} worker(s)"
            modes["c_loader"] = guarded(lambda: bench_loader(args, bank, notes),
                                        lambda msg: skipped(label, "uint8", msg), device)
            data = guarded(lambda: bench_host_costs(args, bank, device), lambda msg: None,
                           device)
            timing["c"] = time.perf_counter() - t0
        reset_memory(device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timing["total"] = time.perf_counter() - t_main

    # Goals and derived numbers.
    a_rates = [modes[k]["montages_per_s"] for k in ("a_fp32", "a_bf16", "a_bf16_cl")
               if k in modes and modes[k]["montages_per_s"]]
    a_best = max(a_rates) if a_rates else None
    a_cl = modes.get("a_bf16_cl", {}).get("montages_per_s")
    is_h100 = cuda and "H100" in env["device_name"]
    if a_cl is None:
        goal_a = {"value": None, "verdict": None,
                  "note": "not measured" if cuda else "no CUDA"}
    else:
        goal_a = {"value": a_cl,
                  "verdict": "PASS" if a_cl >= GOAL_A else
                  ("BELOW GOAL, ABOVE FLOOR" if a_cl >= FLOOR_A else "BELOW FLOOR"),
                  "note": "" if is_h100 else
                  f"the goal is for an H100; this is {env['device_name']}"}
    b = modes.get("b_full", {}).get("montages_per_s")
    bt = modes.get("b_trainer", {}).get("montages_per_s")
    ratio = b / a_best if (b and a_best) else None
    goals = {
        "a_amp_channels_last": goal_a,
        "ratio_b_over_a_best": {"value": ratio, "goal": GOAL_RATIO,
                                "verdict": None if ratio is None else verdict(ratio >= GOAL_RATIO),
                                "trainer_value": bt / a_best if (bt and a_best) else None},
    }
    if data is not None:
        c = modes["c_loader"]
        data["loader_crops_per_s_per_worker"] = c.get("crops_per_s_per_worker")
        data["feeds"] = None
        if a_best and c["montages_per_s"]:
            need = a_best * CROPS_PER_MONTAGE / c["crops_per_s_per_worker"]
            data["workers_needed_for_a_best"] = need
            data["h2d_gb_per_s_at_a_best"] = data["padded_bytes_per_montage"] * a_best / 1e9
            w16 = c["crops_per_s_per_worker"] * 16 / CROPS_PER_MONTAGE
            data["feeds"] = (
                f"loader: {c['crops_per_s_per_worker']:.0f} crops/s per worker -> feeding best (a) "
                f"({a_best:.0f} montages/s) needs ~{math.ceil(need)} workers "
                f"(16 workers, linear: {w16:.0f} montages/s -> "
                f"{'OK' if w16 >= a_best else 'STARVES the GPU'}); padded H2D at that rate "
                f"{data['h2d_gb_per_s_at_a_best']:.1f} GB/s")
    res = {"env": env, "setup": setup, "bank": binfo, "modes": modes, "goals": goals,
           "data": data, "notes": notes, "timing_s": timing}
    print(report(res))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

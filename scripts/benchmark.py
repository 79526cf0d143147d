#!/usr/bin/env python
"""
Benchmarks of Montage pre-training, in the shape of Detectron2's tools/benchmark.py.

    python scripts/benchmark.py --task builder,host,model,step,pyramid,loader,stability
        [--size tiny|small|full] [--quick] [--config-file CFG.yaml] [--pyramid-config CFG.yaml]
        [--bank BANK.h5] [--json OUT.jsonl] [KEY VALUE ...]

Tasks, run in this order; each prints its table and goal lines and appends its JSON record to
--json as soon as it finishes:

  builder  the bank builder vs the JPEG-decode floor on the same images: (a) cv2.imread of each
           image, (b) builder.build_bank with 1 worker, (c) with 2 (goal (b)/(a) <= 1.5); and
           the builder's decode with / without its corrupt-image check (decoder warnings).
  host     the loader's pieces in one process: per crop HDF5 read, decode (SampleBank.decode),
           HWC->CHW; a montage draw; per batch collate, shared/pinned-memory copy, padding; and
           padded vs packed batches side by side: bytes copied to the device per montage against
           the crops' pixel bytes (goal packed <= 1.1x), main-process host ms per step (hand-off
           from a worker, pin / staging copy, copy issue) and the device-side unpacking.
  model    (a) model-only step (the model's forward + loss + SGD, no loader, no assembly) on
           synthetic montages in fp32, bf16 and bf16 + channels_last (the last two CUDA only;
           goal bf16 + channels_last >= 5000 montages/s on an H100, floor 2500).
  step     (b) the full step: real loader + on-device montage assembly + loss + SGD (bf16 +
           channels_last on CUDA), (b') the same through Detectron2's trainer; goals ERF /
           global loss step <= 1.05, assembly < 5 % of the step, (b) / best (a) >= 0.80.
  pyramid  backbone + pyramid pre-training (MontageFPNClassifier, --pyramid-config) vs the
           backbone-only step of the size's config, same canvas, batch and fixed batch of
           montages, windows interleaved in one process (goal ratio <= 1.3); and the backward
           passes of one ERF refresh of each.
  loader   (c) montages/s out of the real DataLoader per worker count, vs the decode floor
           (host) and the workers needed to feed the best (a) rate (model).
  stability  every shipped pre-training config (STABILITY_CONFIGS) trained by train_net.py's
           Trainer at 512 montages and its own LR scaled linearly to them, a warm-up of 10,
           12 iterations at 64 px (small; make bench-stability); full (CUDA): the pyramid configs
           at 224 px, 40 iterations, bf16, and the R-50 pyramid with an unnormalised FPN as the
           control; prints each run's max loss and whether every loss was finite (goal: all).

Sizes: tiny (R-18 96 px, 4 montages/step: seconds on a CPU; --quick), small (the toy config,
R-18 128 px, 16 montages/step), full (R-50 224 px, 256 montages/step, CUDA only); default full
with CUDA, else small. Without --bank the bank is built in a temp folder from the toy dataset
(scripts/make_toy_coco.py + builder.build_bank). Units: rates in montages/s (4 crops each),
times in ms unless marked (s); hours are for the paper's 64k x 512 montages on one device.
"""
import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import cv2
import numpy as np
from tabulate import tabulate

from builder.bank import SampleBank
from builder.build import BuildOptions, _init_worker, build_bank
from builder.coco import load_coco
from builder import extract
from builder.extract import decode_image
from builder.info import SIZE_BINS, summarize_bank

if __name__ != "__mp_main__":  # not in the builder's pool processes, which re-import this file
    import torch
    from detectron2.config import get_cfg
    from detectron2.engine import AMPTrainer, SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage, get_event_storage
    from torch.utils.data import DataLoader
    from montage_pretrain import (MontageStream, add_montage_config, assert_montage_cfg,
                                  build_montage_train_loader, collate_montages, collate_packed)
    from montage_pretrain.montage import unpack_crops
    from montage_pretrain.config import merge_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("builder", "host", "model", "step", "pyramid", "loader", "stability")
CROPS, SCHEDULE = 4, 64000 * 512  # crops per montage; the paper's schedule in montages
GOAL_A, FLOOR_A, GOAL_B, GOAL_ERF, GOAL_ASM, GOAL_BUILD = 5000.0, 2500.0, 0.80, 1.05, 0.05, 1.5
GOAL_PYRAMID = 1.3  # pyramid / backbone-only pre-training step
GOAL_BYTES = 1.1  # bytes copied to the device per montage / the crops' pixel bytes
COCO_IMAGES, COCO_BOXES = 118287, 860001  # COCO train2017
COCO_TINY = ("/work/shared/data/coco_tiny", os.path.join(ROOT, "..", "shared", "data", "coco_tiny"))
# Per size: config (under projects/MontagePretrain/configs), its pyramid twin, overrides, montages
# per step,
# loader workers, timing of each measure, toy images in the bank, crops timed by `host`,
# `builder`'s image limit (None: all) and repetitions.
SIZES = {
    "tiny": dict(config="demo/montage_R_18_toy.yaml", pyramid="demo/montage_R_18_FPN_toy.yaml",
                 opts=["MONTAGE.INPUT_SIZE", "96"], batch=4,
                 workers=[1], warmup=1, iters=2, windows=2, toy=12, crops=32, images=40, repeat=1),
    "small": dict(config="demo/montage_R_18_toy.yaml", pyramid="demo/montage_R_18_FPN_toy.yaml",
                  opts=[], batch=16, workers=[1, 2],
                  warmup=2, iters=3, windows=4, toy=60, crops=256, images=None, repeat=3),
    "full": dict(config="montage_R_50.yaml", pyramid="montage_R_50_FPN.yaml", opts=[], batch=256,
                 workers=[min(16, os.cpu_count() or 1)], warmup=8, iters=15, windows=5, toy=300,
                 crops=512, images=None, repeat=3),
}


def measure(fn, iters=1, warmup=0, windows=1, device="cpu"):
    """
    The one timing helper: ``warmup`` untimed calls of ``fn()``, then ``windows`` windows of
    ``iters`` calls each, the CUDA device synchronised around every window.

    Returns:
        dict: ``wall_s`` / ``cpu_s`` seconds per call in each window (wall clock / this
        process's CPU time); ``median_s`` / ``best_s`` the median / least of ``wall_s``.
    """
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda d: None
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(windows):
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(iters):
            fn()
        sync(device)
        wall.append((time.perf_counter() - w0) / iters)
        cpu.append((time.process_time() - c0) / iters)
    return {"wall_s": wall, "cpu_s": cpu, "median_s": statistics.median(wall), "best_s": min(wall)}


def rate(t, montages, device):
    """Throughput of a ``measure`` result whose calls each process ``montages`` montages."""
    r = montages / t["median_s"]
    return {"montages_per_s": r, "crops_per_s": CROPS * r, "ms_per_step": 1e3 * t["median_s"],
            "hours_64k_x_512": SCHEDULE / r / 3600, "windows": [montages / s for s in t["wall_s"]],
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda" else None}


def peak(res):
    """The peak GPU memory of a ``rate`` for a note ("" without CUDA)."""
    return "" if res["peak_gpu_mem_gib"] is None else f", peak {res['peak_gpu_mem_gib']:.2f} GiB"


def bf16(amp):
    return torch.autocast("cuda", torch.bfloat16) if amp else contextlib.nullcontext()


def train_step(model, opt, batch, amp):
    """One step through the model's own forward and loss (under an EventStorage)."""
    get_event_storage().iter += 1  # the model reads its accuracy every LOG_PERIOD iterations
    with bf16(amp):
        loss = sum(model(batch).values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class Results(dict):
    """A task's JSON record whose ``add`` also makes a printed table row."""

    def __init__(self, **kw):
        super().__init__(kw)
        self.rows = []

    def add(self, key, value, label, spec=".1f", note=""):
        """A dict ``value`` (a ``rate``) shows its montages/s."""
        self[key] = value
        shown = value.get("montages_per_s") if isinstance(value, dict) else value
        self.rows.append([label, "-" if shown is None else format(shown, spec), note])

    def show(self, title):
        print(f"\n== {title}\n" + tabulate(self.rows, ["measure", "value", "note"],
                                          disable_numparse=True))

    def goal(self, key, name, value, target, ok, unit=""):
        """Prints one goal line (``value`` None: not measured in this run)."""
        print(f"goal {name} {target}: "
              + ("n/a" if value is None else f"{value:.2f}{unit} -> {'PASS' if ok else 'FAIL'}"))
        self[key] = {"value": value, "goal": target, "pass": None if value is None else bool(ok)}


class Bench:
    """What the tasks share: options, size, device, the bank, the config, earlier results."""

    def __init__(self, args, tmp):
        self.args, self.tmp, self.size = args, tmp, dict(SIZES[args.size])
        self.size["workers"] = args.workers or self.size["workers"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        configs = os.path.join(ROOT, "projects", "MontagePretrain", "configs")
        self.config = args.config_file or os.path.join(configs, self.size["config"])
        self.pyramid_config = args.pyramid_config or os.path.join(configs, self.size["pyramid"])
        self.results, self.notes, self.bank_summary = {}, [], None
        self._toy, self._bank, self._cfg, self._pyramid_cfg = None, args.bank or None, None, None

    def time(self, fn, warmup=None, windows=None):
        """``measure`` at this size's iterations, warm-up and windows."""
        s = self.size
        return measure(fn, s["iters"], s["warmup"] if warmup is None else warmup,
                       windows or s["windows"], self.device)

    def toy(self):
        """(annotations json, image folder) of the toy dataset, written once per run."""
        if self._toy is None:
            out = os.path.join(self.tmp, "toy")
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_toy_coco.py"),
                            "--out", out, "--num-train", str(self.size["toy"]),
                            "--num-val", "0"], check=True, stdout=subprocess.DEVNULL)
            self._toy = (f"{out}/annotations/instances_train.json", f"{out}/train")
        return self._toy

    def bank(self):
        """The bank's path (--bank, else built from the toy dataset); prints its statistics."""
        if self._bank is None:
            self._bank, t0 = os.path.join(self.tmp, "bank.h5"), time.perf_counter()
            build_bank(*self.toy(), self._bank, BuildOptions(progress=False))
            self.notes.append(f"bank built from {self.size['toy']} toy images in "
                              f"{time.perf_counter() - t0:.1f} s (toy crops are smaller than "
                              "COCO's: pass --bank for real decode costs)")
        if self.bank_summary is None:
            s = summarize_bank(self._bank)
            self.bank_summary = {k: s[k] for k in ("path", "file_mb", "encoding", "num_samples",
                                                   "num_classes", "groups", "size_hist")}
            groups = "/".join(str(g["positives"] + g["negatives"]) for g in s["groups"].values())
            hist = [sum(h[i] for h in s["size_hist"].values()) for i in range(len(SIZE_BINS) + 1)]
            print(f"bank: {s['path']} ({s['file_mb']:.1f} MiB, {s['encoding']}): {s['num_samples']}"
                  f" crops (S/T/W {groups}), {s['num_classes']} classes; crops with longer side "
                  f"<= {'/'.join(map(str, SIZE_BINS))}/more px: {'/'.join(map(str, hist))}")
        return self._bank

    def cfg(self, workers=0, channels_last=False, loss=None):
        """
        The config file + size overrides + trailing opts (checked once), then this measure's
        keys. The LR is a small constant (0.001, as in D2's benchmark): no schedule runs, and a
        from-scratch step must stay finite (Detectron2's trainer raises on a NaN loss).
        """
        if self._cfg is None:
            self._cfg = self._load(self.config)
        cfg = self._cfg.clone()
        cfg.merge_from_list(["DATALOADER.NUM_WORKERS", str(workers), "MONTAGE.CHANNELS_LAST",
                             str(channels_last)] + (["MONTAGE.LOSS", loss] if loss else []))
        return cfg

    def pyramid_cfg(self, channels_last=False):
        """The pyramid twin of :meth:`cfg` (``--pyramid-config``): same size overrides and opts,
        so the same canvas and montages per step."""
        if self._pyramid_cfg is None:
            self._pyramid_cfg = self._load(self.pyramid_config)
        cfg = self._pyramid_cfg.clone()
        cfg.merge_from_list(["DATALOADER.NUM_WORKERS", "0", "MONTAGE.CHANNELS_LAST",
                             str(channels_last)])
        return cfg

    def _load(self, config):
        """``config`` + size overrides + trailing opts, checked and printed once."""
        cfg = get_cfg()
        add_montage_config(cfg)
        merge_config_file(cfg, config)  # safe YAML
        cfg.merge_from_list(self.size["opts"] + [
            "MONTAGE.BANK", self.bank(), "SOLVER.IMS_PER_BATCH", str(self.size["batch"]),
            "SEED", "0", "SOLVER.BASE_LR", "0.001"] + self.args.opts)
        cfg = assert_montage_cfg(cfg)
        given = [os.path.relpath(config, ROOT)] + self.size["opts"] + self.args.opts
        print(f"config: {' '.join(given)}: {cfg.MODEL.BACKBONE.NAME} depth "
              f"{cfg.MODEL.RESNETS.DEPTH}, {cfg.MONTAGE.INPUT_SIZE} px, "
              f"{cfg.SOLVER.IMS_PER_BATCH} montages/step, loss {cfg.MONTAGE.LOSS}; median of "
              f"{self.size['windows']} x {self.size['iters']} steps")
        return cfg

    def loader(self, cfg):
        """
        The real loader; its prefetch_factor is lowered, with a note, where /dev/shm cannot
        hold workers x prefetch_factor padded batches (containers often mount 64 MB there).
        """
        loader, shm = build_montage_train_loader(cfg), "/dev/shm"
        if loader.num_workers and os.path.isdir(shm):
            bank = SampleBank(cfg.MONTAGE.BANK)
            per_batch = cfg.SOLVER.IMS_PER_BATCH * CROPS * 3 * int(np.prod(bank.sizes.max(0)))
            bank.close()  # no HDF5 handle may be open in this process when the workers fork
            st = os.statvfs(shm)
            room = max(1, int(0.7 * st.f_bavail * st.f_frsize // (loader.num_workers * per_batch)))
            if room < loader.prefetch_factor:
                self.notes.append(f"{shm} too small: prefetch_factor {loader.prefetch_factor} -> "
                                  f"{room}")
                loader.prefetch_factor = room
        return loader

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def task_builder(b):
    """(a) decode floor, (b) build with 1 worker, (c) with 2: seconds, best of the repeats."""
    tiny = [r for r in COCO_TINY if os.path.isfile(f"{r}/annotations/instances_train2017.json")]
    if b.args.annotations:
        json_path, img_dir, source = b.args.annotations, b.args.images, "given"
    elif tiny:
        json_path = f"{tiny[0]}/annotations/instances_train2017.json"
        img_dir, source = f"{tiny[0]}/train2017", f"coco_tiny ({tiny[0]})"
    else:
        (json_path, img_dir), source = b.toy(), "toy dataset"
    limit, reports = b.size["images"], {}
    dataset = load_coco(json_path, img_dir, limit)
    paths = [r.path for r in dataset.images if len(r.boxes)]  # the build decodes only these
    for p in paths:  # warm the page cache so no side pays for the first disk read
        with open(p, "rb") as f:
            f.read()

    def build(workers, max_images=limit):
        opts = BuildOptions(workers=workers, max_images=max_images, overwrite=True, progress=False)
        reports[workers] = build_bank(json_path, img_dir, f"{b.tmp}/built{workers}.h5", opts)

    def pool(server=False):  # a 2-process pool of the builder's fork server
        ctx = multiprocessing.get_context("forkserver")
        if server:
            ctx.set_forkserver_preload(["builder.extract"])
        with ctx.Pool(2, initializer=None if server else _init_worker) as p:
            p.map(abs, [1, 2])

    # One-time costs of a process (fork server, lazy imports, first HDF5 file) are paid first.
    t_server = measure(lambda: pool(server=True))["best_s"]
    build(1, max_images=2)
    t_pool = measure(pool)["best_s"]
    def decode(check):  # the build's own read + decode, with or without the corrupt-image check
        for p in paths:
            with open(p, "rb") as f:
                decode_image(f.read(), p, check=check)

    runs = {k: [] for k in ("json", "a", "b", "c", "unchecked", "checked")}
    for _ in range(b.size["repeat"]):  # interleaved, so load from other processes hits all
        runs["json"].append(measure(lambda: load_coco(json_path, img_dir, limit)))
        runs["a"].append(measure(lambda: [cv2.imread(p, cv2.IMREAD_COLOR) for p in paths]))
        # Each side alternately first, 3 windows each: the check costs microseconds per image.
        for check in (False, True, True, False):
            runs["checked" if check else "unchecked"].append(measure(partial(decode, check),
                                                                     windows=3))
        runs["b"].append(measure(lambda: build(1)))
        runs["c"].append(measure(lambda: build(2)))
    t = {k: min(r["best_s"] for r in v) for k, v in runs.items()}
    cpu = {k: min(r["cpu_s"][0] for r in v) for k, v in runs.items()}
    cpu_best = {k: min(min(r["cpu_s"]) for r in v) for k, v in runs.items()}
    # The check alone (stderr swapped around a no-op), free of the decode's noise: us per image.
    t_swap = measure(lambda: [extract._stderr_capture.call(int) for _ in range(1000)],
                     windows=5)["best_s"] / 1000
    counts = reports[1]["counts"]
    n, samples, pos = len(paths), counts["samples"]["total"], counts["samples"]["positives"]
    size = os.path.getsize(f"{b.tmp}/built1.h5")
    per_crop = max(t["b"] - t["json"] - t["a"], 0.0) / samples  # beyond the decode
    pos_per_box = pos / max(counts["annotations"]["total"], 1)
    coco_samples = COCO_BOXES * pos_per_box * (1 + counts["negatives"]["ratio"])
    coco_min = (COCO_IMAGES * t["a"] / n + coco_samples * per_crop) / 60
    r = Results(source=source, images=n, samples=samples, cpu_s=cpu, fork_server_start_s=t_server,
                pool_start_s=t_pool, coco_samples=coco_samples, coco_minutes_1_worker=coco_min)
    r.add("decode_s", t["a"], "(a) decode only, cv2.imread (s)", ".2f",
          f"{1e3 * t['a'] / n:.1f} ms/image; CPU {cpu['a']:.2f} s")
    r.add("build_1_worker_s", t["b"], "(b) build, 1 worker (s)", ".2f",
          f"{1e3 * per_crop:.2f} ms/crop beyond decode; CPU {cpu['b']:.2f} s")
    r.add("build_2_workers_s", t["c"], "(c) build, 2 workers (s)", ".2f", f"includes {t_pool:.2f}"
          f" s pool start-up, not the one-time fork server start ({t_server:.2f} s)")
    r.add("decode_unchecked_s", t["unchecked"], "decode, builder without the check (s)", ".3f",
          f"extract.decode_image(check=False): read + cv2.imdecode; CPU {cpu_best['unchecked']:.3f}"
          " s")
    r.add("decode_checked_s", t["checked"], "decode, builder with the check (s)", ".3f",
          f"as extract.read_image (decoder warnings caught); CPU {cpu_best['checked']:.3f} s")
    r.add("corrupt_check_ratio", t["checked"] / t["unchecked"], "corrupt-image check: with/without",
          ".3f", f"wall, best of the windows (CPU time: "
          f"{cpu_best['checked'] / cpu_best['unchecked']:.3f}); 1.000 = free")
    r.add("corrupt_check_us", 1e6 * t_swap, "corrupt-image check alone (us/image)", ".1f",
          f"{100 * t_swap * n / t['unchecked']:.2f} % of the decode")
    r.add("json_parse_s", t["json"], "json parse (s)", ".2f",
          f"{dataset.num_images_in_json} images in the json")
    r.add("b_over_a_cpu", cpu["b"] / cpu["a"], "(b)/(a) CPU time", ".2f")
    r.add("b_over_a_without_json", (t["b"] - t["json"]) / t["a"], "(b)/(a) wall without json",
          ".2f")
    r.add("speedup_b_over_c", t["b"] / t["c"], "speed-up (b)/(c)", ".2f",
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    r.add("bank_mib", size / 2**20, "bank (MiB)", ".2f", f"{size / samples / 1024:.1f} KiB/sample")
    r.show(f"builder: {source}, {n} images, {samples} crops ({pos} pos, {samples - pos} neg), "
           f"--max-side {BuildOptions.max_side}, best of {b.size['repeat']}")
    print(f"full COCO train2017 estimate (~{coco_samples / 1e3:.0f}k samples at {pos_per_box:.2f}"
          f" positives/box + negatives): bank ~{coco_samples * size / samples / 2**30:.1f} GiB; "
          f"build ~{coco_min:.0f} min with 1 worker, ~{coco_min * t['c'] / t['b']:.0f} min with 2"
          f" at this speed-up, ~{coco_min / 8:.0f} min on 8 free cores if linear; plus ~20-30 s "
          "to parse the 448 MB json")
    r.goal("goal_b_over_a", "(b)/(a) wall", t["b"] / t["a"], f"<= {GOAL_BUILD}",
           t["b"] / t["a"] <= GOAL_BUILD)
    return r


def task_host(b):
    """The loader's pieces in this process: ms per crop, per montage and per batch."""
    path, n, B = b.bank(), b.size["crops"], b.size["batch"]
    bank = SampleBank(path)
    idx = np.random.default_rng(0).integers(len(bank), size=n).tolist()

    def per_crop(fn):  # seconds per crop, best of 3 passes over the same crops
        return measure(lambda: [fn(i) for i in idx], windows=3)["best_s"] / n

    read, full = per_crop(bank.encoded), per_crop(bank.decode)  # read; read + decode
    by_name = per_crop(lambda i: np.asarray(bank.h5["crops"][i]))
    imgs = {i: bank.decode(i) for i in idx}
    chw = per_crop(lambda i: torch.from_numpy(imgs[i]).permute(2, 0, 1).contiguous())
    kb = np.mean([bank.encoded(i).size for i in idx]) / 1e3
    bank.close()
    stream, items = iter(MontageStream(path, crops_per_image=CROPS, seed=0)), []
    draw = measure(lambda: items.append(next(stream)), iters=B)["median_s"]
    collate = measure(lambda: collate_montages(items))["median_s"]
    batch = collate_montages(items)
    crops, real = batch["crops"], int(batch["sizes"].prod(1).sum()) * 3
    shm = measure(crops.share_memory_)["median_s"]  # what handing a batch over costs a worker
    per_montage = draw + (collate + shm) / B
    r = Results(encoded_kb_per_crop=kb, h5_read_by_name_ms_per_crop=1e3 * by_name,
                padded_batch_shape=list(crops.shape), padding_efficiency=real / crops.numel())
    r.add("h5_read_ms_per_crop", 1e3 * read, "HDF5 read (ms/crop)", ".3f",
          f"{kb:.1f} kB encoded; dataset looked up by name: {1e3 * by_name:.3f} ms")
    r.add("decode_ms_per_crop", 1e3 * (full - read), "decode (ms/crop)", ".3f",
          "SampleBank.decode minus the read")
    r.add("hwc_to_chw_ms_per_crop", 1e3 * chw, "HWC->CHW copy (ms/crop)", ".3f")
    r.add("floor_montages_per_s", 1 / (CROPS * full), "decode-only floor (montages/s, 1 proc)",
          ".0f", f"{1 / full:.0f} crops/s per core (read + decode)")
    r.add("draw_ms_per_montage", 1e3 * draw, "one montage drawn (ms)", ".2f", "MontageStream")
    r.add("collate_ms_per_batch", 1e3 * collate, "collate (ms/batch)")
    r.add("shm_copy_ms_per_batch", 1e3 * shm, "copy to shared memory (ms/batch)", ".1f",
          f"collate + shm = {(collate + shm) / B / per_montage:.0%} of worker time")
    r.add("pin_ms_per_batch", measure(crops.pin_memory)["median_s"] * 1e3 if b.cuda else None,
          "copy to pinned memory (ms/batch)", ".1f", "main process, CUDA only")
    r.add("montages_per_s_per_core", 1 / per_montage, "in-process montages/s per core", ".0f")
    r.add("padded_bytes_per_montage", crops.numel() / B, "padded batch (bytes/montage)", ".0f",
          f"shape {tuple(crops.shape)}, padding efficiency {r['padding_efficiency']:.0%}")
    r.show(f"host: data path in one process, {n} crops, batch {B}")
    transfer_side_by_side(b, r, path, items, per_batch_s=draw * B + collate + shm)
    return r


def _nbytes(batch):
    """Bytes of a batch's tensors (what is pinned and copied to the device)."""
    return sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))


def _handoff_ms(path, B, collate, per_batch_s, batches):
    """
    Main-thread CPU ms of ``next(it)`` of a 1-worker DataLoader whose next batch is already
    waiting (the worker is given 2x its measured batch time first): receiving a batch from a
    worker (shared-memory handles, tensor rebuild), not the wait for it (CPU time, so other
    load on the machine does not count). -> (median ms, the last batch).
    """
    loader = DataLoader(MontageStream(path, crops_per_image=CROPS, seed=0), batch_size=B,
                        num_workers=1, collate_fn=collate, prefetch_factor=2)
    it, times = iter(loader), []
    batch = next(it)  # the worker's start-up
    for _ in range(batches):
        time.sleep(2 * per_batch_s + 0.005)
        t0 = time.thread_time()
        batch = next(it)
        times.append(time.thread_time() - t0)
    del it  # stops the worker
    return 1e3 * statistics.median(times), batch


def transfer_side_by_side(b, r, path, items, per_batch_s):
    """
    Padded vs packed batches of the same montages, measured in one run: bytes sent to the
    device per montage / the crops' pixel bytes, and main-process host ms per step (CPU time:
    hand-off from a worker + pin / staging copy + queueing the copies to the device). The
    staging copy is the DataLoader's pin (CUDA; its pin thread) or, without CUDA, a copy into
    fresh memory as its proxy (the same bytes touched and written).
    """
    B, dev = len(items), b.device
    pixel_bytes = 3 * sum(int(c.shape[1]) * int(c.shape[2]) for it in items for c in it["crops"])
    out, rows = {"pixel_bytes_per_montage": pixel_bytes / B}, []
    for name, collate in (("padded", collate_montages), ("packed", collate_packed)):
        batch = collate(items)
        f = {"bytes_per_montage": _nbytes(batch) / B}
        f["bytes_over_pixels"] = f["bytes_per_montage"] * B / pixel_bytes
        f["collate_ms"] = 1e3 * min(measure(lambda: collate(items), windows=3)["cpu_s"])  # noqa
        f["handoff_ms"], got = _handoff_ms(path, B, collate, per_batch_s, b.size["windows"] + 1)
        if b.cuda:
            stage = lambda: {k: v.pin_memory() for k, v in got.items()}  # noqa: B023,E731
        else:
            stage = lambda: {k: torch.empty_like(v).copy_(v) for k, v in got.items()}  # noqa
        f["stage_ms"] = 1e3 * statistics.median(measure(stage, 3, 1, 3)["cpu_s"])
        f["h2d_issue_ms"] = f["h2d_ms"] = 0.0
        staged = stage()
        if b.cuda:  # host time to queue the non_blocking copies; synchronised copy time
            t = measure(lambda: [v.to(dev, non_blocking=True) for v in staged.values()],  # noqa
                        3, windows=3)
            f["h2d_issue_ms"] = 1e3 * min(t["cpu_s"])
            f["h2d_ms"] = 1e3 * t["median_s"]
        f["main_host_ms_per_step"] = f["handoff_ms"] + f["stage_ms"] + f["h2d_issue_ms"]
        # Device work the format adds before assembly: rebuilding the padded crops.
        f["unpack_ms"] = 0.0
        if name == "packed":
            pix = staged["pixels"].to(dev)
            f["unpack_ms"] = 1e3 * measure(
                lambda: unpack_crops(pix, staged["offsets"], staged["sizes"]),  # noqa: B023
                3, 1, 3, dev)["median_s"]
        out[name] = f
        rows.append([name, f"{f['bytes_per_montage']:.0f}", f"{f['bytes_over_pixels']:.2f}x",
                     f"{f['collate_ms']:.2f}", f"{f['handoff_ms']:.2f}", f"{f['stage_ms']:.2f}",
                     f"{f['h2d_issue_ms']:.2f}", f"{f['main_host_ms_per_step']:.2f}",
                     f"{f['unpack_ms']:.2f}"])
    pad, pk = out["padded"], out["packed"]
    out["packed_over_padded_bytes"] = pk["bytes_per_montage"] / pad["bytes_per_montage"]
    out["packed_over_padded_main_host_ms"] = (pk["main_host_ms_per_step"]
                                             / pad["main_host_ms_per_step"])
    r["transfer"] = out
    print(f"\n== transfer: padded vs packed, {B} montages/step, "
          f"{pixel_bytes / B:.0f} pixel bytes/montage, "
          + ("pin_memory + non_blocking H2D" if b.cuda else "no CUDA: staging = copy to fresh "
             "memory (pin proxy), no H2D") + "\n" + tabulate(
              rows, ["batch", "bytes/montage", "/ pixels", "collate ms (worker)", "hand-off ms",
                     "pin/stage ms", "H2D issue ms", "main host ms/step", "unpack ms (device)"],
              # CPU ms of the thread that does it; unpack: wall on the model's device
              disable_numparse=True))
    print(f"  packed / padded: bytes {out['packed_over_padded_bytes']:.3f}, main-process host ms "
          f"{out['packed_over_padded_main_host_ms']:.2f}")
    r.goal("goal_bytes_over_pixels", "packed bytes to the device / pixel bytes",
           pk["bytes_over_pixels"], f"<= {GOAL_BYTES}", pk["bytes_over_pixels"] <= GOAL_BYTES, "x")


def build_train(cfg):
    """(model in training mode, its optimizer), seeded."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    return model, build_optimizer(cfg, model)


def model_only(b, amp, channels_last):
    """(a) at one precision: the model's forward + loss + SGD on synthetic normalised montages."""
    cfg = b.cfg(channels_last=channels_last)
    model, opt = build_train(cfg)
    B, S = cfg.SOLVER.IMS_PER_BATCH, cfg.MONTAGE.INPUT_SIZE
    images = torch.randn(B, 3, S, S, device=b.device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.make_images = lambda batch: images  # no loader, no assembly
    k = 1 if model.loss_name == "single" else CROPS
    batch = {"labels": torch.randint(0, model.num_classes + 1, (B, k))}
    with EventStorage(0):
        return rate(b.time(lambda: train_step(model, opt, batch, amp)), B, b.device)


def task_model(b):
    """(a): the model alone on synthetic montages, in fp32, bf16, bf16 + channels_last."""
    r = Results()
    for key, amp, cl in (("fp32", 0, 0), ("bf16", 1, 0), ("bf16_channels_last", 1, 1)):
        res, note = {}, "AMP bf16 runs on CUDA only"
        if b.cuda or not amp:
            b.free()
            try:
                res = model_only(b, bool(amp), bool(cl))
                note = (f"{res['crops_per_s']:.0f} crops/s, {res['hours_64k_x_512']:.1f} h for "
                        f"64k x 512{peak(res)}")
            except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory: keep the others
                note = f"failed: {type(e).__name__}: {str(e)[:160]}"
        r.add(key, res or {"skipped": note}, f"(a) {key} (montages/s)", note=note)
    b.free()
    r.show("model: forward + loss + SGD on synthetic montages")
    rates = [v["montages_per_s"] for v in r.values() if "montages_per_s" in v]
    r["best_montages_per_s"] = max(rates, default=None)
    cl = r["bf16_channels_last"].get("montages_per_s")
    device = torch.cuda.get_device_name(b.device) if b.cuda else "no CUDA"
    r.goal("goal_a", f"(a) bf16 + channels_last on an H100 (here {device}; floor {FLOOR_A:.0f})",
           cl, f">= {GOAL_A:.0f}", cl is not None and cl >= GOAL_A, " montages/s")
    if cl is not None and cl < GOAL_A:
        print("  " + ("above the floor" if cl >= FLOOR_A else "BELOW THE FLOOR"))
    return r


def full_step(b, amp, W):
    """(b) and (b'): montages/s of the real loader (W workers) + assembly + loss + SGD."""
    cfg = b.cfg(workers=W, channels_last=amp)
    B = cfg.SOLVER.IMS_PER_BATCH
    model, opt = build_train(cfg)
    it, wait = iter(b.loader(cfg)), [0.0]

    def step():
        t0 = time.perf_counter()
        batch = next(it)
        wait[0] += time.perf_counter() - t0
        train_step(model, opt, batch, amp)

    with EventStorage(0):
        measure(step, max(b.size["warmup"], 2 * W))  # past the burst of the workers' 1st batches
        wait[0] = 0.0
        t = b.time(step, warmup=0)
        full = rate(t, B, b.device)
        full["loader_wait_share"] = wait[0] / (sum(t["wall_s"]) * b.size["iters"])
        if b.cuda:  # synchronised host->device copy of one batch's crops (packed or padded)
            nxt = next(it)
            crops = (nxt["pixels"] if "pixels" in nxt else nxt["crops"]).pin_memory()
            h2d = measure(lambda: crops.to(b.device, non_blocking=True), 3, device=b.device)
            full.update(h2d_ms_per_step=1e3 * h2d["median_s"],
                        h2d_gb_per_s=crops.numel() / h2d["median_s"] / 1e9)
        # (b'): the same step through Detectron2's trainer, as train_net.py builds it.
        shared = type("Shared", (), {"__iter__": lambda self: it})()
        trainer = (AMPTrainer(model, shared, opt, precision=torch.bfloat16,
                              grad_scaler=torch.amp.GradScaler("cuda", enabled=False))
                   if amp else SimpleTrainer(model, shared, opt))

        def trainer_step():
            trainer.iter = get_event_storage().iter = trainer.iter + 1
            trainer.run_step()

        return full, rate(b.time(trainer_step), B, b.device)


def erf_vs_global(b, amp):
    """Seconds per step with the ERF and the global loss (same weights, one fixed batch,
    interleaved windows so drift hits both alike) and of the montage assembly."""
    cfgs = {k: b.cfg(channels_last=amp, loss=k) for k in ("erf", "global")}
    batch = next(iter(build_montage_train_loader(cfgs["erf"])))
    models = {k: build_train(c) for k, c in cfgs.items()}
    models["global"][0].load_state_dict(models["erf"][0].state_dict())
    times = interleaved_step_times(b, models, batch, amp)
    with bf16(amp):
        asm = b.time(lambda: models["erf"][0].make_images(batch))["median_s"]
    return statistics.median(times["erf"]), statistics.median(times["global"]), asm


def interleaved_step_times(b, models, batch, amp):
    """{name: [median s of each window]} of training steps of ``models`` ({name: (model,
    optimizer)}) on one ``batch``, the models taking turns window by window so that machine
    drift (other jobs, clocks) hits them alike."""
    times = {k: [] for k in models}
    with EventStorage(0):
        for i in range(b.size["windows"]):
            for k, (model, opt) in models.items():
                step = partial(train_step, model, opt, batch, amp)
                times[k].append(b.time(step, warmup=int(i == 0), windows=1)["median_s"])
    return times


def task_step(b):
    """(b), (b'): the full training step; ERF vs global loss and assembly on one batch."""
    amp, W = b.cuda, b.size["workers"][-1]  # bf16 + channels_last on CUDA, else fp32
    b.free()
    full, tr = full_step(b, amp, W)
    b.free()
    erf, glob, asm = erf_vs_global(b, amp)
    b.free()
    r = Results(precision="bf16 + channels_last" if amp else "fp32", workers=W)
    r.add("b_full", full, "(b) full step (montages/s)", note=f"{full['ms_per_step']:.0f} ms/step,"
          f" loader wait {full['loader_wait_share']:.0%}" + (
              f", H2D {full['h2d_ms_per_step']:.1f} ms ({full['h2d_gb_per_s']:.1f} GB/s)"
              if b.cuda else ""))
    r.add("b_trainer", tr, "(b') via D2 trainer run_step (montages/s)",
          note=f"{tr['ms_per_step']:.0f} ms/step")
    r.add("hours_64k_x_512", full["hours_64k_x_512"], "h for 64k x 512 at (b)", ".1f",
          f"{full['crops_per_s']:.0f} crops/s{peak(full)}")
    r.add("erf_step_ms", 1e3 * erf, "step, erf loss, fixed batch (ms)")
    r.add("global_step_ms", 1e3 * glob, "step, global loss, fixed batch (ms)")
    r.add("assembly_ms", 1e3 * asm, "montage assembly (ms)", ".2f", "on the model's device")
    r.show(f"step: {W} loader worker(s), {r['precision']}")
    r.goal("goal_erf_over_global", "erf / global step time", erf / glob, f"<= {GOAL_ERF}",
           erf / glob <= GOAL_ERF)
    r.goal("goal_assembly_share", "assembly / erf step", 100 * asm / erf,
           f"< {100 * GOAL_ASM:.0f} %", asm / erf < GOAL_ASM, " %")
    best = (b.results.get("model") or {}).get("best_montages_per_s")
    ratio = best and full["montages_per_s"] / best
    r.goal("goal_b_over_best_a", "(b) / best (a)", ratio, f">= {GOAL_B:.2f}",
           ratio is not None and ratio >= GOAL_B)
    r["b_trainer_over_best_a"] = best and tr["montages_per_s"] / best
    if best:
        print(f"  (b') / best (a) = {r['b_trainer_over_best_a']:.2f}")
    return r


def erf_passes(model, num_images):
    """Position backward passes of one ERF refresh on ``num_images`` montages."""
    if hasattr(model, "erf_images_per_level"):  # MontageFPNClassifier
        per_level = model.erf_images_per_level(num_images)
        return sum(per_level[k] * h * w for k, (_, h, w) in model._slices.items())
    return num_images * model.region_map.numel()


def task_pyramid(b):
    """Backbone + pyramid vs backbone-only pre-training step: same canvas, batch and montages,
    same loss (the pyramid config's), windows interleaved so that load drift hits both alike."""
    amp = b.cuda  # bf16 + channels_last on CUDA, else fp32
    b.free()
    cfgs = {"pyramid": b.pyramid_cfg(channels_last=amp)}
    cfgs["backbone"] = b.cfg(channels_last=amp, loss=cfgs["pyramid"].MONTAGE.LOSS)
    for key in ("MONTAGE.INPUT_SIZE", "SOLVER.IMS_PER_BATCH"):
        values = {k: c.MONTAGE.INPUT_SIZE if key.endswith("SIZE") else c.SOLVER.IMS_PER_BATCH
                  for k, c in cfgs.items()}
        if values["pyramid"] != values["backbone"]:
            raise ValueError(f"{key} differs between the configs ({values}): the ratio compares "
                             "steps at the same canvas and batch")
    batch = next(iter(build_montage_train_loader(cfgs["backbone"])))
    models = {k: build_train(cfgs[k]) for k in ("backbone", "pyramid")}
    times = interleaved_step_times(b, models, batch, amp)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_erf = cfgs["pyramid"].MONTAGE.ERF_NUM_IMAGES
    passes = {k: erf_passes(models[k][0], n_erf) for k in models}
    pyr = models["pyramid"][0]
    b.free()
    r = Results(precision="bf16 + channels_last" if amp else "fp32",
                levels=list(pyr.levels), loss=pyr.loss_name,
                windows_s={k: v for k, v in times.items()})
    r.add("backbone_step_ms", 1e3 * med["backbone"], "step, backbone only (ms)",
          note=os.path.relpath(b.config, ROOT))
    r.add("pyramid_step_ms", 1e3 * med["pyramid"], "step, backbone + pyramid (ms)",
          note=f"{os.path.relpath(b.pyramid_config, ROOT)}: levels {', '.join(pyr.levels)}")
    r.add("backbone_erf_passes", passes["backbone"], "ERF refresh, backbone only (passes)", "d",
          f"{n_erf} montages x {models['backbone'][0].region_map.numel()} positions")
    r.add("pyramid_erf_passes", passes["pyramid"], "ERF refresh, backbone + pyramid (passes)",
          "d", "montages per level: " + ", ".join(
              f"{k} {n}" for k, n in pyr.erf_images_per_level(n_erf).items()))
    r.show(f"pyramid: {cfgs['pyramid'].SOLVER.IMS_PER_BATCH} montages/step at "
           f"{cfgs['pyramid'].MONTAGE.INPUT_SIZE} px, {r['precision']}, "
           f"{b.size['windows']} interleaved windows of {b.size['iters']} steps")
    ratio = med["pyramid"] / med["backbone"]
    r.goal("goal_pyramid_over_backbone", "pyramid / backbone-only step time", ratio,
           f"<= {GOAL_PYRAMID}", ratio <= GOAL_PYRAMID)
    print("  per window (s): " + "; ".join(
        f"{k} " + " ".join(f"{t:.2f}" for t in v) for k, v in times.items()))
    return r


# stability (issue 21): every shipped pre-training config at the paper's batch and its own LR
# scaled linearly to it, a short warm-up, a small canvas (the demo pyramid diverged there with an
# unnormalised FPN); full (CUDA): the pyramid configs at 224 px in bf16, and the R-50 pyramid
# with the FPN unnormalised (the cause, as a control that must diverge).
STABILITY_CONFIGS = ("demo/montage_R_18_toy.yaml", "demo/montage_R_18_FPN_toy.yaml",
                     "demo/montage_R_18_toy_gn.yaml", "montage_R_50.yaml", "montage_R_50_FPN.yaml",
                     "montage_R_50_gn.yaml", "montage_R_101.yaml", "montage_X101_32x4d.yaml",
                     "montage_RegNetX_4GF.yaml")
NO_FPN_NORM = ("MODEL.FPN.NORM", "")
STABILITY = {
    "tiny": dict(montages=8, size=64, iters=3, warmup=2,
                 runs=[("demo/montage_R_18_FPN_toy.yaml", ())]),
    "small": dict(montages=512, size=64, iters=12, warmup=10,
                  runs=[(c, ()) for c in STABILITY_CONFIGS]),
    "full": dict(montages=512, size=224, iters=40, warmup=20,
                 runs=[("demo/montage_R_18_FPN_toy.yaml", ()), ("montage_R_50_FPN.yaml", ()),
                       ("montage_R_50_FPN.yaml", NO_FPN_NORM)]),
}


class _LossRecorder:
    """A trainer hook recording every iteration's total_loss (MONTAGE.LOG_PERIOD 1)."""

    def __init__(self):
        from detectron2.engine import HookBase

        rec = self

        class Hook(HookBase):
            def after_step(self):
                h = self.trainer.storage.histories().get("total_loss")
                if h is not None and h.latest() is not None:
                    rec.losses.append([self.trainer.iter, float(h.latest())])

        self.losses, self.hook = [], Hook()


def stability_run(b, config, opts, spec):
    """Trains ``config`` (+ ``opts``) with train_net.py's Trainer for ``spec['iters']`` steps at
    ``spec['montages']`` montages and the config's LR scaled to them; returns the losses, whether
    all were finite, and where Detectron2 stopped a non-finite one."""
    import importlib.util

    spec_ = importlib.util.spec_from_file_location(
        "montage_train_net", os.path.join(ROOT, "projects", "MontagePretrain", "train_net.py"))
    train_net = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(train_net)
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, os.path.join(ROOT, "projects", "MontagePretrain", "configs", config))
    lr = spec.get("lr") or cfg.SOLVER.BASE_LR * spec["montages"] / cfg.SOLVER.IMS_PER_BATCH
    out = tempfile.mkdtemp(dir=b.tmp, prefix="stability-")
    cfg.merge_from_list([
        "MONTAGE.BANK", b.bank(), "SOLVER.IMS_PER_BATCH", str(spec["montages"]),
        "SOLVER.BASE_LR", str(lr), "MONTAGE.INPUT_SIZE", str(spec["size"]),
        "SOLVER.WARMUP_ITERS", str(spec["warmup"]),
        "SOLVER.MAX_ITER", str(max(cfg.SOLVER.MAX_ITER, 10 * spec["iters"])),
        "SOLVER.CHECKPOINT_PERIOD", str(10 ** 7), "MONTAGE.ERF_NUM_IMAGES", "1",
        "MONTAGE.ERF_PERIOD", str(10 ** 7), "MONTAGE.FPN.ERF_LEVEL_BUDGET", "16",
        "MONTAGE.LOG_PERIOD", "1", "TEST.PRECISE_BN.ENABLED", "False",
        "DATALOADER.NUM_WORKERS", str(b.size["workers"][0]), "OUTPUT_DIR", out, "SEED", "0",
        "MODEL.DEVICE", b.device.type] + list(opts))
    cfg = assert_montage_cfg(cfg)
    trainer = train_net.Trainer(cfg)
    recorder = _LossRecorder()
    trainer.register_hooks([recorder.hook])
    trainer.max_iter = spec["iters"]  # the LR schedule stays the config's (cosine ~ flat here)
    trainer.resume_or_load(resume=False)
    stopped, t0 = None, time.perf_counter()
    try:
        trainer.train()
    except FloatingPointError:
        stopped = trainer.iter
    wall = time.perf_counter() - t0
    losses = [x for _, x in recorder.losses]
    finite = stopped is None and all(math.isfinite(x) for x in losses)
    del trainer
    b.free()
    return dict(config=config, opts=list(opts), lr=lr, montages=spec["montages"],
                size=spec["size"], iters=spec["iters"], warmup=spec["warmup"],
                losses=recorder.losses, finite=finite, stopped_at=stopped,
                max_loss=max((x for x in losses if math.isfinite(x)), default=None),
                wall_s=wall)


def task_stability(b):
    """Every shipped pre-training config at 512 montages and its LR: max loss, all finite?"""
    spec = dict(STABILITY[b.args.size])
    if getattr(b.args, "stability_configs", None):
        spec["runs"] = [(c, ()) for c in b.args.stability_configs]
    r = Results(spec={k: v for k, v in spec.items() if k != "runs"}, runs=[])
    for config, opts in spec["runs"]:
        run = stability_run(b, config, opts, spec)
        r["runs"].append(run)
        label = config + (" " + " ".join(repr(o) if o == "" else o for o in opts) if opts else "")
        state = "all finite" if run["finite"] else (
            f"non-finite, stopped at iteration {run['stopped_at']}" if run["stopped_at"]
            is not None else "non-finite")
        r.add(label, run["max_loss"], label, ".3g",
              f"{state}; LR {run['lr']:g}; {run['wall_s']:.0f} s with the ERF set-up")
    r.show(f"stability: {spec['montages']} montages at {spec['size']} px, {spec['iters']} "
           f"iterations, warm-up {spec['warmup']}, each config's LR scaled to the batch "
           "(value: max loss)")
    shipped = [x for x in r["runs"] if not x["opts"]]
    ok = all(x["finite"] for x in shipped)
    r.goal("goal_stable", "every shipped config finite", float(sum(x["finite"] for x in shipped)),
           f"{len(shipped)} of {len(shipped)}", ok)
    return r


def task_loader(b):
    """(c): montages/s out of the DataLoader (nothing consumes them), per worker count."""
    r = Results()
    host, model = b.results.get("host") or {}, b.results.get("model") or {}
    floor = host.get("floor_montages_per_s")
    for w in b.size["workers"]:
        cfg = b.cfg(workers=w)
        it = iter(b.loader(cfg))
        for _ in range(max(1, w) + 1):  # start-up: every worker delivers once
            next(it)
        t = measure(lambda: next(it), b.size["iters"], 0, b.size["windows"])  # noqa: B023
        c = rate(t, cfg.SOLVER.IMS_PER_BATCH, torch.device("cpu"))
        it = None  # stops the workers
        c["crops_per_s_per_worker"] = per = c["crops_per_s"] / max(w, 1)
        c["per_worker_over_floor"] = floor and per / CROPS / floor
        r.add(f"workers_{w}", c, f"(c) loader, {w} worker(s) (montages/s)",
              note=f"{per:.0f} crops/s per worker" + (
                  f" = {c['per_worker_over_floor']:.2f} x decode floor" if floor else ""))
    r.show(f"loader: {cfg.SOLVER.IMS_PER_BATCH} montages/batch")
    best = model.get("best_montages_per_s")
    if best:  # what feeding the best model-only rate takes, at the last worker count's rate
        r["workers_needed_for_best_a"] = need = best * CROPS / per
        w16 = per * 16 / CROPS
        print(f"feeding best (a) ({best:.0f} montages/s) needs ~{need:.1f} workers at {per:.0f} "
              f"crops/s per worker (16 workers, linear: {w16:.0f} montages/s -> "
              f"{'OK' if w16 >= best else 'STARVES the GPU'})" + (
                  f"; H2D at that rate {host['padded_bytes_per_montage'] * best / 1e9:.1f} GB/s "
                  f"padded, {host['transfer']['packed']['bytes_per_montage'] * best / 1e9:.2f} "
                  "GB/s packed" if host else ""))
    return r


def parse_args(argv=None):
    first, _, rest = __doc__.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=first, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, type=lambda v: v.split(","),
                   help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--config-file", default="", metavar="FILE",
                   help="pre-training config (default: the size's)")
    p.add_argument("--pyramid-config", default="", metavar="FILE",
                   help="pyramid: the backbone + pyramid config (default: the size's)")
    p.add_argument("--size", choices=tuple(SIZES), help="default: full with CUDA, else small")
    p.add_argument("--quick", action="store_true", help="same as --size tiny")
    p.add_argument("--bank", default="", help="HDF5 sample bank (default: toy bank built here)")
    p.add_argument("--workers", type=lambda v: [int(w) for w in v.split(",")],
                   help="comma-separated loader worker counts (default: the size's)")
    p.add_argument("--stability-configs", type=lambda v: [c for c in v.split(",") if c],
                   help="stability: comma-separated configs under projects/MontagePretrain/"
                        "configs (default: the size's list)")
    p.add_argument("--annotations", help="builder: COCO json (default: coco_tiny, else toy)")
    p.add_argument("--images", help="builder: the image folder of --annotations")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: unchanged with "
                   "CUDA, else 1: more threads fight the loader workers for the cores)")
    p.add_argument("--json", default="", metavar="PATH",
                   help="write one JSON record per task (a line each) as soon as it finishes")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not set(args.task) <= set(TASKS):
        p.error(f"--task {','.join(args.task)}: use a comma-separated subset of {','.join(TASKS)}")
    if args.quick and args.size not in (None, "tiny"):
        p.error(f"--quick means --size tiny, not --size {args.size}")
    args.size = "tiny" if args.quick else args.size or ("full" if cuda else "small")
    if args.size == "full" and not cuda:
        p.error("--size full (R-50, 256 montages/step) needs CUDA; use --size small or tiny")
    if bool(args.annotations) != bool(args.images):
        p.error("--annotations and --images go together")
    return args


def main(argv=None):
    args = parse_args(argv)
    threads, cudnn = torch.get_num_threads(), torch.backends.cudnn.benchmark
    cuda = torch.backends.cudnn.benchmark = torch.cuda.is_available()
    torch.set_num_threads(args.threads or (threads if cuda else 1))
    import torchvision

    env = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})",
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "cuda": torch.version.cuda, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
           "cudnn.benchmark": cuda, "tf32_conv": torch.backends.cudnn.allow_tf32,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    print("  ".join(f"{k} {v}" for k, v in env.items()) + f"  size {args.size}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        open(args.json, "w").close()
    failed = 0
    try:
        with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
            b = Bench(args, tmp)
            for name in [t for t in TASKS if t in args.task]:
                t0, error, res = time.perf_counter(), None, None
                try:
                    res = b.results[name] = globals()[f"task_{name}"](b)
                except Exception as e:  # noqa: BLE001 - recorded; the next tasks still run
                    error, failed = f"{type(e).__name__}: {e}", failed + 1
                    print(f"[benchmark] task {name} failed: {error}", file=sys.stderr)
                seconds = time.perf_counter() - t0
                print("".join(f"note: {n}\n" for n in b.notes) + f"[{name}: {seconds:.1f} s]")
                record = {"task": name, "seconds": seconds, "error": error, "env": env,
                          "size": args.size, "config": b.config, "opts": args.opts,
                          "bank": b.bank_summary, "notes": b.notes, "results": res}
                b.notes = []
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(record) + "\n")
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""
Pre-training speed, measured side by side in one run (same backbone, same batch):

1. training-step time with the ERF-adaptive dense loss vs the global loss (goal: ratio <= 1.05),
2. montage assembly time as a fraction of the step (goal: < 5% on CPU),
3. loader throughput in montages/s per worker vs the decode-only floor (4 crops per montage).

    python scripts/bench_pretrain.py [--bank BANK.h5] [--config CFG.yaml] [--quick 1]

Without --bank a bank is built on the spot from the built-in toy dataset (in a temp folder).
"""
import argparse
import os
import statistics
import subprocess
import sys

import tempfile
import time

import torch
from tabulate import tabulate

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from montage_pretrain import add_montage_config, assert_montage_cfg, collate_montages
from builder.bank import SampleBank
from montage_pretrain.data import MontageStream, build_montage_train_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "projects/MontagePretrain/configs/demo/montage_R_18_toy.yaml")


def toy_bank(tmp):
    """Builds a small bank from a freshly generated toy dataset; returns its path."""
    data, bank = os.path.join(tmp, "toy"), os.path.join(tmp, "bank.h5")
    py = sys.executable
    subprocess.run([py, os.path.join(ROOT, "scripts/make_toy_coco.py"), "--out", data,
                    "--num-train", "60", "--num-val", "4"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([py, "-m", "builder", "build", "--annotations",
                    os.path.join(data, "annotations/instances_train.json"), "--images",
                    os.path.join(data, "train"), "--out", bank], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return bank


def make_cfg(config, bank, loss, batch, workers):
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MONTAGE.BANK", bank, "MONTAGE.LOSS", loss, "SOLVER.IMS_PER_BATCH",
                         batch, "DATALOADER.NUM_WORKERS", workers])
    assert_montage_cfg(cfg)
    return cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, opt, batch, steps):
    """Median seconds of a full training step and of the montage assembly inside it."""
    step_t, asm_t = [], []
    with EventStorage():
        for _ in range(steps):
            sync(model.device)
            t0 = time.perf_counter()
            model.make_images(batch)
            sync(model.device)
            asm_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync(model.device)
            step_t.append(time.perf_counter() - t0)
    return statistics.median(step_t), statistics.median(asm_t)


def bench_losses(config, bank, batch_size, steps, rounds):
    """Interleaves erf and global steps (same weights, same batch) so drift hits both alike."""
    models = {}
    for loss in ("erf", "global"):
        torch.manual_seed(0)
        models[loss] = build_model(make_cfg(config, bank, loss, batch_size, 0)).train()
    models["global"].load_state_dict(models["erf"].state_dict())
    stream = iter(MontageStream(bank, crops_per_image=4, seed=0))
    batch = collate_montages([next(stream) for _ in range(batch_size)])
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()}
    times = {k: [] for k in models}
    asm = []
    for k in models:  # warm-up
        time_steps(models[k], opts[k], batch, 1)
    for _ in range(rounds):
        for k in models:
            step, a = time_steps(models[k], opts[k], batch, steps)
            times[k].append(step)
            asm.append(a)
    erf, glob = statistics.median(times["erf"]), statistics.median(times["global"])
    return erf, glob, statistics.median(asm)


def bench_loader(config, bank, batch_size, workers, seconds):
    """Montages/s of the real loader with ``workers`` workers, after one warm-up batch."""
    cfg = make_cfg(config, bank, "erf", batch_size, workers)
    it = iter(build_montage_train_loader(cfg))
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["labels"].shape[0]
    return n / (time.perf_counter() - t0)


def bench_decode_floor(bank_path, seconds):
    """Montages/s when one process only decodes 4 random crops per montage."""
    bank = SampleBank(bank_path)
    g = torch.Generator().manual_seed(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in torch.randint(len(bank), (4,), generator=g).tolist():
            bank.decode(i)
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", default="")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--batch", type=int, default=16, help="montages per step")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", type=int, default=0)
    args = parser.parse_args(argv)
    steps, rounds, secs = (2, 2, 3.0) if args.quick else (3, 4, 8.0)
    with tempfile.TemporaryDirectory() as tmp:
        bank = args.bank or toy_bank(tmp)
        erf, glob, asm = bench_losses(args.config, bank, args.batch, steps, rounds)
        floor = bench_decode_floor(bank, secs)
        loaders = [(w, bench_loader(args.config, bank, args.batch, w, secs)) for w in args.workers]
    print(f"config {os.path.relpath(args.config, ROOT)}, {args.batch} montages/step, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"{torch.get_num_threads()} threads")
    print(tabulate([
        ["step time, erf loss (s)", f"{erf:.3f}", ""],
        ["step time, global loss (s)", f"{glob:.3f}", ""],
        ["erf / global step time", f"{erf / glob:.3f}", "goal <= 1.05"],
        ["montage assembly (s)", f"{asm:.4f}", ""],
        ["assembly / erf step", f"{asm / erf:.1%}", "goal < 5%"],
        ["decode-only floor (montages/s, 1 proc)", f"{floor:.0f}", ""],
    ] + [[f"loader, {w} worker(s) (montages/s)", f"{r:.0f}",
          f"{r / w:.0f}/worker = {r / w / floor:.2f} x floor"] for w, r in loaders],
        headers=["measure", "value", "note"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

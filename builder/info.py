"""
Summarises a sample bank: counts per group and class, crop-size histogram, pos:neg ratio and the
build's own report (``build_args``, ``counts``).
"""

import json
import os

import cv2
import numpy as np

from .bank import GROUPS, BankFormatError, SampleBank, read_dataset
from .extract import _JPEG_DAMAGE, _stderr_capture

__all__ = ["summarize_bank", "format_summary", "verify_bank", "SIZE_BINS"]

# Histogram bins over the stored crop's longer side, in pixels: (..16], (16..32], ..., (512..).
# Upper edges are inclusive so crops downscaled to exactly --max-side 256 land in "<=256".
SIZE_BINS = (16, 32, 64, 128, 256, 512)


def summarize_bank(path):
    """
    Reads the per-sample arrays (not the crops) of a bank and summarises them.

    Args:
        path (str): bank file.

    Returns:
        dict: ``num_samples``, ``positives``, ``negatives``, ``groups`` ({"S": {"positives",
        "negatives"}, ...}), ``classes`` (list of (label, category_id, name, count); background
        last), ``size_hist`` ({group: counts per SIZE_BINS bin}), and the file's attributes.

    Raises:
        builder.bank.BankFormatError: not a sample bank.
    """
    bank = SampleBank(path)
    try:
        label, group, size = bank.labels, bank.groups, bank.sizes
        for g in range(len(GROUPS)):
            bank.group_indices(g)  # checks that every index row exists (a damaged bank fails here)
        num_classes, names, ids = bank.num_classes, bank.category_names, bank.category_ids
        attrs = {k: bank.attrs.get(k) for k in ("encoding", "seed", "tool_version", "created")}
        build_args = bank.attrs.get("build_args") or {}
        counts = bank.attrs.get("counts") or {}
    finally:
        bank.close()
    is_neg = label == num_classes
    per_class = np.bincount(label, minlength=num_classes + 1)
    longer = size.max(axis=1) if len(size) else np.zeros(0, dtype=np.int64)
    bins = np.searchsorted(np.array(SIZE_BINS), longer, side="left")
    return {
        "path": path,
        "file_mb": os.path.getsize(path) / 2**20,
        "num_samples": int(len(label)),
        "num_classes": num_classes,
        "positives": int((~is_neg).sum()),
        "negatives": int(is_neg.sum()),
        "groups": {
            g: {
                "positives": int(((group == i) & ~is_neg).sum()),
                "negatives": int(((group == i) & is_neg).sum()),
            }
            for i, g in enumerate(GROUPS)
        },
        "classes": [(i, ids[i], names[i], int(per_class[i])) for i in range(num_classes)]
        + [(num_classes, None, "background", int(per_class[num_classes]))],
        "size_hist": {
            g: np.bincount(bins[group == i], minlength=len(SIZE_BINS) + 1).tolist()
            for i, g in enumerate(GROUPS)
        },
        "build_args": build_args,
        "counts": counts,
        **attrs,
    }


def ratio_text(pos, neg):
    """Formats positives:negatives as ``"10.00:1"``."""
    if neg == 0:
        return "inf" if pos else "n/a"
    return f"{pos / neg:.2f}:1"


def format_summary(summary):
    """Returns the multi-line text printed by ``python -m builder info``."""
    s = summary
    lines = [
        f"bank: {s['path']} ({s['file_mb']:.1f} MiB, {s['encoding']}, tool {s['tool_version']}, "
        f"seed {s['seed']}, created {s['created']})",
        f"samples: {s['num_samples']}  positives: {s['positives']}  negatives: {s['negatives']}  "
        f"pos:neg = {ratio_text(s['positives'], s['negatives'])}",
        "groups:",
    ]
    for g, c in s["groups"].items():
        lines.append(
            f"  {g}: {c['positives'] + c['negatives']:>8}  (positives {c['positives']}, "
            f"negatives {c['negatives']})"
        )
    lines.append(f"classes ({s['num_classes']} + background): label  category_id  name  count")
    for label, cid, name, count in s["classes"]:
        lines.append(f"  {label:>4}  {'-' if cid is None else cid:>5}  {name:<20} {count}")
    edges = [f"<={b}" for b in SIZE_BINS] + [f">{SIZE_BINS[-1]}"]
    lines.append("crop size (longer side, px): " + "  ".join(f"{e:>6}" for e in edges))
    for g, hist in s["size_hist"].items():
        lines.append(f"  {g}:{'':26}" + "  ".join(f"{v:>6}" for v in hist))
    lines.append("build args: " + json.dumps(s["build_args"], sort_keys=True))
    lines.append("counts: " + json.dumps(s["counts"], sort_keys=True))
    return "\n".join(lines)


def verify_bank(path):
    """
    Reads a whole bank as a reader would, and more: every dataset in full (so every chunk's
    Fletcher-32 checksum is checked), the rows (:func:`builder.bank.check_rows`, at open), and
    every crop: its CRC-32 (banks from builder 1.1 on), then a decode, in which libjpeg's
    warnings about damaged data count as damage too.

    Args:
        path (str): bank file.

    Returns:
        dict: ``num_crops`` (int) and ``checksums`` (bool: the bank has per-chunk and per-crop
        checksums; False for a builder 1.0 bank, where only decoding could be checked).

    Raises:
        builder.bank.BankFormatError: one line naming the file, the first bad dataset or crop
            and the fix.
    """
    bank = SampleBank(path)
    try:
        h5 = bank.h5  # opens and checks the rows
        names = []
        h5.visititems(lambda name, obj: names.append(name) if hasattr(obj, "shape") else None)
        for name in names:
            if name != "crops":
                read_dataset(h5, name, path)
        checksums = bank.checksums is not None
        for i in range(len(bank)):
            data = bank.encoded(i)  # CRC-32 checked here
            img, text = _stderr_capture.call(cv2.imdecode, data, cv2.IMREAD_COLOR)
            if img is None or any(m in text for m in _JPEG_DAMAGE):
                said = text.decode("utf-8", "replace").strip().splitlines()
                said = f": decoder says {said[0].strip()!r}" if said else ""
                raise BankFormatError(
                    f"{path}: crop {i} does not decode cleanly ({data.size} bytes{said}); the "
                    "file is damaged, rebuild it with `python -m builder build ... --overwrite`"
                )
    finally:
        bank.close()
    return {"num_crops": len(bank), "checksums": checksums}


def format_verify(path, result):
    """The line printed by ``python -m builder info --verify`` for a bank that passed."""
    if result["checksums"]:
        return (f"verified {path}: every chunk checksum, {result['num_crops']} crop checksums "
                "and decodes OK")
    return (f"verified {path}: {result['num_crops']} crops decode, but the bank has no checksums "
            "(built by builder 1.0), so flipped bytes elsewhere could go unnoticed; rebuild it "
            "to add them")

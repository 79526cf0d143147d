"""
Command line of the sample-bank builder::

    python -m builder build --annotations JSON --images DIR --out BANK.h5 [--seed S] [--workers N]
        [--max-images N] [--overwrite] [--strict] [--max-side PX] [--quality Q]
        [--encoding jpeg|png] [--neg-ratio R] [--enlarge LO HI] [--min-size PX]
    python -m builder info BANK.h5 [--verify]
    python -m builder show BANK.h5 --out GRID.png

Exit status: 0 success, 1 the command failed (message on stderr), 2 bad arguments.
"""

import argparse
import logging
import os
import sys

from .build import BuildError, BuildOptions, build_bank
from .coco import CocoFormatError
from .info import format_summary, format_verify, ratio_text, summarize_bank, verify_bank
from .bank import BankFormatError
from .show import check_png_path, write_grid
from .writer import unclosed_files

# Defaults of `build`, declared once in BuildOptions (and extract.DEFAULT_*).
_D = BuildOptions()

__all__ = ["parse_args", "main", "exit_with"]

logger = logging.getLogger("builder")


def _add_build_parser(sub):
    p = sub.add_parser(
        "build",
        help="COCO json + images -> HDF5 sample bank",
        description="Extract positive (enlarged GT) and negative (IoU = 0) crops.",
    )
    p.add_argument("--annotations", required=True, metavar="JSON", help="COCO instances json")
    p.add_argument(
        "--images", required=True, metavar="DIR", help="directory of the json's file_name"
    )
    p.add_argument("--out", required=True, metavar="BANK.h5", help="bank to write")
    p.add_argument("--seed", type=int, default=_D.seed, help="RNG seed (default %(default)s)")
    p.add_argument(
        "--workers",
        type=int,
        default=_D.workers,
        help="worker processes; the bank does not depend on it (default %(default)s)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N images of the json",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--strict",
        action="store_true",
        help="any input problem (missing/corrupt image, bad record) fails the build",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=_D.max_side,
        metavar="PX",
        help="downscale crops so the longer side is at most PX, keeping the aspect "
        "(0 = keep full size; default %(default)s)",
    )
    p.add_argument("--quality", type=int, default=_D.quality, metavar="Q",
                   help="JPEG quality (default %(default)s)")
    p.add_argument(
        "--encoding", choices=("jpeg", "png"), default=_D.encoding,
        help="crop encoding (default %(default)s)",
    )
    p.add_argument(
        "--neg-ratio",
        type=float,
        default=_D.neg_ratio,
        metavar="R",
        help="negatives per positive over the bank (default %(default)s, the paper's 10:1)",
    )
    p.add_argument(
        "--enlarge",
        type=float,
        nargs=2,
        default=list(_D.enlarge),
        metavar=("LO", "HI"),
        help="context for positives: box width and height are scaled by independent factors "
        "drawn uniformly in [LO, HI], the margin split at random between opposite sides, then "
        "clipped to the image (default %s %s)" % tuple(_D.enlarge),
    )
    p.add_argument(
        "--min-size",
        type=int,
        default=_D.min_size,
        metavar="PX",
        help="skip GT boxes whose clipped shorter side is below PX (default %(default)s)",
    )
    p.set_defaults(func=_cmd_build)
    return p


def _check_build_args(parser, args):
    lo, hi = args.enlarge
    checks = [
        (args.workers >= 1, "--workers must be >= 1"),
        (args.max_images is None or args.max_images >= 1, "--max-images must be >= 1"),
        (args.max_side >= 0, "--max-side must be >= 0 (0 = no resize)"),
        (1 <= args.quality <= 100, "--quality must be in 1..100"),
        (args.neg_ratio >= 0, "--neg-ratio must be >= 0"),
        (1.0 <= lo <= hi, "--enlarge needs 1 <= LO <= HI (1 = no enlargement)"),
        (args.min_size >= 1, "--min-size must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)


def _png_path(path):
    try:
        check_png_path(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def parse_args(argv=None):
    """
    Parses the command line.

    Args:
        argv (list[str] or None): arguments without the program name; None = ``sys.argv[1:]``.

    Returns:
        argparse.Namespace: with ``func`` set to the sub-command's handler.
    """
    parser = argparse.ArgumentParser(prog="python -m builder", description=__doc__.split("\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    build = _add_build_parser(sub)
    info = sub.add_parser("info", help="print counts, ratio, size histogram and build args")
    info.add_argument("bank", metavar="BANK.h5")
    info.add_argument(
        "--verify", action="store_true",
        help="also read every dataset and decode every crop, checking their checksums; the "
        "first damaged one is named and the exit status is 1",
    )
    info.set_defaults(func=_cmd_info)
    show = sub.add_parser("show", help="write a PNG grid of random crops per group")
    show.add_argument("bank", metavar="BANK.h5")
    show.add_argument("--out", required=True, metavar="GRID.png", type=_png_path)
    show.add_argument("--per-group", type=int, default=8, help="crops per row (default 8)")
    show.add_argument("--cell", type=int, default=128, help="cell side in px (default 128)")
    show.add_argument("--seed", type=int, default=0, help="which crops are shown (default 0)")
    show.add_argument(
        "--negatives", type=int, default=2, help="background crops per row, rightmost (default 2)"
    )
    show.set_defaults(func=_cmd_show)
    args = parser.parse_args(argv)
    if args.command == "build":
        _check_build_args(build, args)
    return args


def _format_build(report):
    c = report["counts"]
    smp, neg, ann, img = c["samples"], c["negatives"], c["annotations"], c["images"]
    groups = ", ".join(
        f"{g} {smp['positives_by_group'][g] + smp['negatives_by_group'][g]} "
        f"({smp['negatives_by_group'][g]} neg)"
        for g in smp["positives_by_group"]
    )
    problems = ", ".join(f"{k} {v}" for k, v in c["problems"].items()) or "none"
    return "\n".join(
        [
            f"wrote {report['out']} in {report['seconds']:.1f} s: {smp['total']} samples, "
            f"{smp['positives']} positives, {smp['negatives']} negatives, "
            f"pos:neg = {ratio_text(smp['positives'], smp['negatives'])}",
            f"groups: {groups}",
            f"images: {img['selected']} selected, {img['decoded']} decoded, "
            f"{img['missing']} missing, {img['failed']} failed, "
            f"{img['without_annotations']} without annotations",
            "skipped GT boxes: " + ", ".join(f"{k} {v}" for k, v in ann["skipped"].items()),
            f"negatives: target {neg['target']}, placed per pass {neg['placed_by_pass']}, "
            f"shortfall {neg['shortfall']}, images without room {neg['images_exhausted']} "
            f"{neg['exhausted_image_ids'] or ''}".rstrip(),
            f"problems: {problems}",
        ]
    )


def _cmd_build(args):
    options = BuildOptions(
        seed=args.seed,
        workers=args.workers,
        max_images=args.max_images,
        overwrite=args.overwrite,
        strict=args.strict,
        max_side=args.max_side,
        quality=args.quality,
        encoding=args.encoding,
        neg_ratio=args.neg_ratio,
        enlarge=tuple(args.enlarge),
        min_size=args.min_size,
    )
    build_args = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    report = build_bank(args.annotations, args.images, args.out, options, build_args)
    print(_format_build(report))
    return 0


def _require_bank(path):
    if not os.path.isfile(path):
        raise BankFormatError(
            f"{path}: no such bank file; build one with `python -m builder "
            f"build --annotations JSON --images DIR --out {path}`"
        )


def _cmd_info(args):
    _require_bank(args.bank)
    print(format_summary(summarize_bank(args.bank)), flush=True)
    if args.verify:
        print(format_verify(args.bank, verify_bank(args.bank)))
    return 0


def _cmd_show(args):
    _require_bank(args.bank)
    h, w = write_grid(
        args.bank,
        args.out,
        per_group=args.per_group,
        cell=args.cell,
        seed=args.seed,
        negatives=args.negatives,
    )
    print(f"wrote {args.out} ({w}x{h} px, rows S/T/W)")
    return 0


def main(argv=None):
    """
    Runs one sub-command; returns the exit status (errors are one line on stderr).
    """
    args = parse_args(argv)
    # Only configure logging when nobody else did (tests and notebooks keep their handlers).
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[builder] %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (BuildError, CocoFormatError, BankFormatError, OSError) as e:
        print(f"builder: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("builder: interrupted; no output written", file=sys.stderr)
        return 130


def exit_with(status):
    """
    Ends the process with ``status``. When HDF5 still holds a file open (a temp bank whose close
    failed after a write error), output is flushed and the process ends with ``os._exit``:
    HDF5's at-exit cleanup would flush that file through a file object that cannot serve it any
    more, and could crash (segfault, exit 139) after the one-line error.
    """
    if unclosed_files():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)

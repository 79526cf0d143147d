"""
Offline sample-bank builder for Montage pre-training (paper sec. 3.1): COCO json + images ->
one HDF5 file of positive (enlarged GT) and negative (IoU = 0 background) crops, grouped S/T/W.

Command line: ``python -m builder build|info|show ...`` (see :mod:`builder.cli`). The file
format is defined in :mod:`builder.bank`.
"""

__version__ = "1.1.0"  # 1.1: per-chunk and per-crop checksums (builder/bank.py)

__all__ = ["__version__"]

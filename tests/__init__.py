"""Tests (a package only so that pytest keeps tests/ itself off sys.path: tests/montage_pretrain
would otherwise shadow the installed montage_pretrain package)."""

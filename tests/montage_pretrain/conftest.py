"""Fixtures of the hand-off tests (export format, loading)."""
import pytest
import torch


@pytest.fixture
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def export_path(make_r18_export):
    """An R-18 export with randomised weights and statistics, recorded at iteration 5."""
    return make_r18_export(randomise=True, iteration=5)


@pytest.fixture(scope="module")
def gn_export_path(make_r18_export):
    """An R-18 GN export (no running statistics) with randomised weights, at iteration 7."""
    return make_r18_export(randomise=True, iteration=7, norm="GN")

"""Fixtures shared by the script tests (the R-18 export ``r18_export`` is in tests/conftest.py)."""
import pytest


@pytest.fixture(scope="session")
def load_script(load_module):
    """``load_script("compare")`` imports scripts/compare.py as a module (once per session)."""
    return lambda name: load_module(f"scripts/{name}.py")

import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from builder.bank import BankFormatError
from builder.bank import SampleBank

pytestmark = pytest.mark.usefixtures("few_threads")


def test_properties_and_decode(bank_path, crop_color):
    bank = SampleBank(bank_path)
    assert len(bank) == 14
    assert bank.num_classes == 3
    assert bank.category_names == ["c0", "c1", "c2"]
    assert bank.labels.dtype == np.int64 and bank.labels.max() <= 3
    assert bank.sizes.shape == (14, 2) and bank.box_areas.shape == (14,)
    assert (bank.box_areas > 0).all()
    assert [len(bank.group_indices(g)) for g in range(3)] == [8, 3, 3]
    for g in range(3):
        assert (bank.groups[bank.group_indices(g)] == g).all()
    for i in range(len(bank)):
        img = bank.decode(i)
        assert img.dtype == np.uint8 and img.shape == tuple(bank.sizes[i]) + (3,)
        assert (img == crop_color(i)).all()  # RGB order, not BGR


def test_missing_and_invalid(tmp_path):
    missing = str(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError) as e:
        SampleBank(missing)
    assert missing in str(e.value) and "make samples" in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(BankFormatError, match="not a Montage sample bank"):
        SampleBank(str(bad)).labels


def test_pickle_drops_handle(bank_path):
    bank = SampleBank(bank_path)
    first = bank.decode(0)
    assert bank._h5 is not None
    clone = pickle.loads(pickle.dumps(bank))
    assert clone._h5 is None
    assert np.array_equal(clone.decode(0), first)
    assert clone._h5 is not None and clone._h5 is not bank._h5


class _Decode(Dataset):
    def __init__(self, bank):
        self.bank = bank

    def __len__(self):
        return len(self.bank)

    def __getitem__(self, i):
        px = torch.from_numpy(self.bank.decode(i)[0, 0].copy())
        return px, os.getpid(), self.bank._pid  # the handle's owner after the access


def test_reopen_after_fork_in_dataloader_workers(bank_path, crop_color):
    bank = SampleBank(bank_path)
    bank.decode(0)  # the parent holds an open handle before the workers fork
    parent_handle = bank._h5
    loader = DataLoader(_Decode(bank), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    pixels, pids = {}, set()
    for i, (px, pid, owner) in enumerate(loader):
        assert owner == pid  # reopened in the worker, not the parent's handle
        pixels[i] = px.numpy()
        pids.add(pid)
    assert len(pixels) == len(bank) and os.getpid() not in pids and len(pids) == 2
    for i, px in pixels.items():
        assert (px == crop_color(i)).all()
    assert bank._h5 is parent_handle and bank.decode(1).shape[2] == 3  # parent unaffected


_lookups = {}  # pid -> lookups of "crops" by name (a forked worker counts its own)


def _spy_getitem(monkeypatch):
    real = h5py.Group.__getitem__

    def getitem(self, name):
        if name == "crops":
            _lookups[os.getpid()] = _lookups.get(os.getpid(), 0) + 1
        return real(self, name)

    _lookups.clear()
    monkeypatch.setattr(h5py.Group, "__getitem__", getitem)


def test_crops_dataset_looked_up_once_per_handle(bank_path, crop_color, monkeypatch):
    _spy_getitem(monkeypatch)
    bank = SampleBank(bank_path)
    for i in range(len(bank)):
        assert (bank.decode(i) == crop_color(i)).all()
    assert _lookups == {os.getpid(): 1}
    ds = bank.crops_dataset
    assert bank.crops_dataset is ds and ds.name == "/crops"
    bank.close()
    assert bank._crops is None
    bank.decode(0)
    assert bank.crops_dataset is not ds and _lookups[os.getpid()] == 2
    clone = pickle.loads(pickle.dumps(bank))
    assert clone._crops is None and clone.decode(1).shape[2] == 3
    bank.close()
    clone.close()


class _Lookups(Dataset):
    def __init__(self, bank):
        self.bank = bank

    def __len__(self):
        return len(self.bank)

    def __getitem__(self, i):
        px = torch.from_numpy(self.bank.decode(i)[0, 0].copy())
        return px, os.getpid(), _lookups.get(os.getpid(), 0)


def test_forked_worker_looks_up_its_own_dataset_once(bank_path, crop_color, monkeypatch):
    _spy_getitem(monkeypatch)
    bank = SampleBank(bank_path)
    bank.decode(0)  # the parent holds a handle and its dataset before the workers fork
    loader = DataLoader(_Lookups(bank), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    for i, (px, pid, lookups) in enumerate(loader):
        assert pid != os.getpid() and lookups == 1  # reopened, looked up once per worker
        assert (px.numpy() == crop_color(i)).all()
    assert _lookups == {os.getpid(): 1}

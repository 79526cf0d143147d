import itertools
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from builder.bank import SampleBank
from montage_pretrain import data as data_mod
from montage_pretrain.data import (MontageStream, build_montage_train_loader, collate_montages,
                                   collate_packed, is_packed)
from montage_pretrain.montage import unpack_crops

pytestmark = pytest.mark.usefixtures("few_threads")


def _indices(bank, crop_color, crops):
    """Sample index of each yielded crop, recovered from its unique constant colour."""
    lut = {tuple(crop_color(i)): i for i in range(len(bank))}
    return [lut[tuple(c[:, 0, 0].tolist())] for c in crops]


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_two_s_one_t_one_w_in_region_order(bank_path, crop_color):
    bank = SampleBank(bank_path)
    for item in _take(MontageStream(bank_path, seed=1), 40):
        crops, labels = item["crops"], item["labels"]
        assert len(crops) == 4 and labels.shape == (4,) and labels.dtype == torch.long
        assert all(c.dtype == torch.uint8 and c.shape[0] == 3 for c in crops)
        idx = _indices(bank, crop_color, crops)
        assert bank.groups[idx].tolist() == [0, 2, 1, 0]  # TL S, TR W, BL T, BR S
        assert bank.box_areas[idx[0]] <= bank.box_areas[idx[3]]  # smaller S at TL
        assert labels.tolist() == bank.labels[idx].tolist()
        assert all(tuple(c.shape[1:]) == tuple(bank.sizes[i]) for c, i in zip(crops, idx))


def test_single_crop_mode_draws_from_whole_bank(bank_path, crop_color):
    bank = SampleBank(bank_path)
    items = _take(MontageStream(bank_path, crops_per_image=1, seed=0), 200)
    idx = [_indices(bank, crop_color, it["crops"])[0] for it in items]
    assert all(len(it["crops"]) == 1 and it["labels"].shape == (1,) for it in items)
    assert set(bank.groups[idx].tolist()) == {0, 1, 2}
    assert len(set(idx)) == len(bank)


def test_determinism_by_seed(bank_path):
    def signature(seed):
        items = _take(MontageStream(bank_path, seed=seed), 10)
        return [(tuple(c.shape), int(c[0, 0, 0])) for it in items for c in it["crops"]]

    assert signature(3) == signature(3)
    assert signature(3) != signature(4)


@pytest.mark.parametrize(
    "counts,missing,source",
    [((8, 0, 3), 1, 0), ((8, 3, 0), 2, 0), ((0, 2, 5), 0, 2), ((0, 5, 2), 0, 1), ((0, 0, 4), 1, 2)],
)
def test_fallback_nearest_warns_once(make_bank, crop_color, caplog, counts, missing, source):
    path = make_bank(n_s=counts[0], n_t=counts[1], n_w=counts[2], seed=sum(counts))
    bank = SampleBank(path)
    caplog.set_level(logging.WARNING, logger=data_mod.__name__)
    stream = MontageStream(path, seed=0)
    items = _take(stream, 20) + _take(stream, 5)  # two iterators in one process
    names = "STW"
    msgs = [r.getMessage() for r in caplog.records
            if f"group {names[missing]} has" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert f"from group {names[source]}" in msgs[0] and "nearest" in msgs[0]
    slot = {0: (0, 3), 1: (2,), 2: (1,)}[missing]  # regions of the missing group
    for it in items:
        idx = _indices(bank, crop_color, it["crops"])
        assert all(bank.groups[idx[r]] == source for r in slot)


def test_min_group_size_and_error_rule(make_bank, caplog):
    path = make_bank(n_s=8, n_t=3, n_w=6)
    caplog.set_level(logging.WARNING, logger=data_mod.__name__)
    _take(MontageStream(path, min_group_size=4), 2)
    assert any("group T has 3 crops (< 4)" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="MIN_GROUP_SIZE"):
        MontageStream(path, min_group_size=4, fallback="error")
    with pytest.raises(ValueError, match="no group"):
        MontageStream(path, min_group_size=100)


def test_stream_from_config_and_erf_hook_follow_the_group_rules(make_bank):
    from montage_pretrain.hooks import ERFRefreshHook

    path = make_bank(n_s=8, n_t=3, n_w=6)
    cfg = _cfg(path, **{"MONTAGE.MIN_GROUP_SIZE": 4, "MONTAGE.GROUP_FALLBACK": "error"})
    # The training stream and the ERF hook's montage set both read the config's group rules.
    with pytest.raises(ValueError, match="MIN_GROUP_SIZE"):
        MontageStream.from_config(cfg, seed=0)
    with pytest.raises(ValueError, match="MIN_GROUP_SIZE"):
        ERFRefreshHook(cfg)._montages()
    stream = MontageStream.from_config(_cfg(path, **{"MONTAGE.MIN_GROUP_SIZE": 4}), seed=0)
    assert (stream.min_group_size, stream.fallback, stream.crops_per_image) == (4, "nearest", 4)
    single = _cfg(path, **{"MONTAGE.LOSS": "single", "MONTAGE.ERF_NUM_IMAGES": 3})
    assert MontageStream.from_config(single, seed=0).crops_per_image == 1
    batch = ERFRefreshHook(single)._montages()
    assert tuple(batch["labels"].shape) == (3, 4)  # ERF maps are always measured on montages


def test_collate(bank_path):
    items = _take(MontageStream(bank_path, seed=2), 3)
    batch = collate_montages(items)
    crops, sizes, labels = batch["crops"], batch["sizes"], batch["labels"]
    assert crops.dtype == torch.uint8 and crops.shape[:2] == (12, 3)
    assert sizes.dtype == torch.long and sizes.shape == (12, 2)
    assert labels.shape == (3, 4) and labels.dtype == torch.long
    assert crops.shape[2] == sizes[:, 0].max() and crops.shape[3] == sizes[:, 1].max()
    flat = [c for it in items for c in it["crops"]]
    for i, c in enumerate(flat):
        h, w = c.shape[1:]
        assert sizes[i].tolist() == [h, w]
        assert torch.equal(crops[i, :, :h, :w], c)
        assert crops[i, :, h:, :].sum() == 0 and crops[i, :, :, w:].sum() == 0


def test_two_workers_give_distinct_streams(bank_path):
    loader = DataLoader(MontageStream(bank_path, seed=0), batch_size=2, num_workers=2,
                        collate_fn=collate_montages, multiprocessing_context="fork")
    batches = list(itertools.islice(iter(loader), 4))  # round-robin: workers 0, 1, 0, 1
    assert all(b["crops"].shape[:2] == (8, 3) and b["labels"].shape == (2, 4) for b in batches)
    assert not torch.equal(batches[0]["sizes"], batches[1]["sizes"])


def _cfg(bank_path, **overrides):
    from detectron2.config import get_cfg

    from montage_pretrain.config import add_montage_config

    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.MONTAGE.BANK = bank_path
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 0
    for k, v in overrides.items():
        node, key = cfg, k.split(".")
        for part in key[:-1]:
            node = getattr(node, part)
        setattr(node, key[-1], v)
    return cfg


def test_build_loader(bank_path, monkeypatch):
    batch = next(iter(build_montage_train_loader(_cfg(bank_path))))
    assert is_packed(batch)  # the default, MONTAGE.PACKED_CROPS True
    assert batch["sizes"].shape[0] == 16 and batch["labels"].shape == (4, 4)
    batch = next(iter(build_montage_train_loader(_cfg(bank_path, **{"MONTAGE.LOSS": "single"}))))
    assert batch["offsets"].shape[0] == 4 and batch["labels"].shape == (4, 1)
    padded = _cfg(bank_path, **{"MONTAGE.PACKED_CROPS": False})
    batch = next(iter(build_montage_train_loader(padded)))
    assert not is_packed(batch) and batch["crops"].shape[0] == 16
    seeded = [next(iter(build_montage_train_loader(_cfg(bank_path))))["sizes"] for _ in range(2)]
    assert torch.equal(*seeded)
    monkeypatch.setattr(data_mod.comm, "get_world_size", lambda: 3)
    with pytest.raises(ValueError, match="not divisible"):
        build_montage_train_loader(_cfg(bank_path))


def test_build_loader_workers_and_random_seed(bank_path):
    loader = build_montage_train_loader(_cfg(bank_path, SEED=-1, **{"DATALOADER.NUM_WORKERS": 1}))
    assert loader.persistent_workers and loader.num_workers == 1
    batch = next(iter(loader))
    assert batch["labels"].shape == (4, 4)
    assert np.isin(batch["labels"].numpy(), np.arange(4)).all()


def test_stream_yields_chw_views_of_decoded_arrays(bank_path):
    # No per-crop HWC -> CHW copy in the stream: the collate's copy is the only one.
    for item in _take(MontageStream(bank_path, seed=5), 5):
        for c in item["crops"]:
            h, w = c.shape[1:]
            assert c.stride() == (1, 3 * w, 3)


def test_collate_writes_every_pixel_of_an_uninitialised_batch(bank_path, monkeypatch):
    items = _take(MontageStream(bank_path, seed=6), 4)
    reference = collate_montages(
        [{"crops": [c.contiguous() for c in it["crops"]], "labels": it["labels"]} for it in items])
    # Whatever torch.empty hands out, padding is zeroed and crops are copied in full.
    monkeypatch.setattr(data_mod, "_new_uint8",
                        lambda shape: torch.full(shape, 255, dtype=torch.uint8))
    batch = collate_montages(items)
    for k in ("crops", "sizes", "labels"):
        assert torch.equal(batch[k], reference[k]), k
    assert not batch["crops"].is_shared()  # outside a worker: ordinary memory


def _collate_and_report_shared(items):
    batch = collate_montages(items)
    batch["shared_in_worker"] = torch.tensor(batch["crops"].is_shared())
    return batch


def test_collate_allocates_shared_memory_in_workers(bank_path):
    loader = DataLoader(MontageStream(bank_path, seed=0), batch_size=3, num_workers=1,
                        collate_fn=_collate_and_report_shared, multiprocessing_context="fork")
    batch = next(iter(loader))
    assert bool(batch["shared_in_worker"])
    assert batch["crops"].shape[:2] == (12, 3)
    sizes = batch["sizes"]
    for i, (h, w) in enumerate(sizes.tolist()):
        assert batch["crops"][i, :, h:, :].sum() == 0 and batch["crops"][i, :, :, w:].sum() == 0


def test_loader_worker_settings(bank_path):
    loader = build_montage_train_loader(_cfg(bank_path, **{"DATALOADER.NUM_WORKERS": 2}))
    assert loader.prefetch_factor == 2 and loader.persistent_workers
    # No cv2.setNumThreads in forked workers: it deadlocked on the parent's OpenCV pool lock
    # (seen in a fresh-clone run); crop decoding is single-threaded in OpenCV anyway.
    assert loader.worker_init_fn is None


# -- packed (ragged) batches -----------------------------------------------------------------


def test_packed_round_trip_and_offsets(bank_path):
    items = _take(MontageStream(bank_path, seed=2), 3)
    batch = collate_packed(items)
    pixels, offsets, sizes = batch["pixels"], batch["offsets"], batch["sizes"]
    assert pixels.dtype == torch.uint8 and pixels.dim() == 1
    assert offsets.dtype == torch.long and offsets.shape == (12,) and sizes.shape == (12, 2)
    assert batch["labels"].shape == (3, 4) and batch["labels"].dtype == torch.long
    nbytes = 3 * sizes.prod(1)
    # Back to back, no padding: offset i = sum of the bytes of crops 0..i-1.
    assert offsets[0] == 0 and torch.equal(offsets[1:], torch.cumsum(nbytes, 0)[:-1])
    assert pixels.numel() == int(nbytes.sum())
    flat = [c for it in items for c in it["crops"]]
    for i, c in enumerate(flat):
        h, w = c.shape[1:]
        assert sizes[i].tolist() == [h, w]
        hwc = pixels[offsets[i]:offsets[i] + 3 * h * w].view(h, w, 3)
        assert torch.equal(hwc.permute(2, 0, 1), c)  # crop i, HWC, at its offset
    # Unpacked on the device, it is the padded batch of collate_montages, byte for byte.
    padded = collate_montages(items)
    assert torch.equal(unpack_crops(pixels, offsets, sizes), padded["crops"])
    for k in ("sizes", "labels"):
        assert torch.equal(batch[k], padded[k]), k


def test_packed_holds_only_the_pixels(bank_path):
    items = _take(MontageStream(bank_path, seed=3), 4)
    packed, padded = collate_packed(items), collate_montages(items)
    real = 3 * int(packed["sizes"].prod(1).sum())
    assert packed["pixels"].numel() == real < padded["crops"].numel()


def test_packed_accepts_contiguous_chw_crops_and_checks_offsets(bank_path):
    items = _take(MontageStream(bank_path, seed=4), 2)
    contiguous = [{"crops": [c.contiguous() for c in it["crops"]], "labels": it["labels"]}
                  for it in items]
    a, b = collate_packed(items), collate_packed(contiguous)
    assert torch.equal(a["pixels"], b["pixels"])
    bad = a["offsets"].clone()
    bad[1] += 3
    with pytest.raises(ValueError, match="offsets"):
        unpack_crops(a["pixels"], bad, a["sizes"])
    with pytest.raises(ValueError, match="pixels holds"):
        unpack_crops(a["pixels"][:-3], a["offsets"], a["sizes"])


def test_packed_buffer_is_shared_memory_in_workers(bank_path):
    def collate(items):
        batch = collate_packed(items)
        batch["shared_in_worker"] = torch.tensor(batch["pixels"].is_shared())
        return batch

    loader = DataLoader(MontageStream(bank_path, seed=0), batch_size=3, num_workers=1,
                        collate_fn=collate, multiprocessing_context="fork")
    batch = next(iter(loader))
    assert bool(batch["shared_in_worker"]) and batch["sizes"].shape == (12, 2)

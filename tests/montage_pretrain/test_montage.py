import math

import pytest
import torch
from torchvision.ops import roi_align

from montage_pretrain.montage import (
    MontageTemplate,
    _prepare,
    _resample,
    _sampling_bound,
    assemble_montages,
    assemble_single,
)

pytestmark = pytest.mark.usefixtures("few_threads")


def _padded(sizes, fill, hm=None, wm=None):
    """uint8 (n, 3, Hm, Wm) crops; crop i = fill(i, h, w) -> (3, h, w) uint8, zero padding."""
    hm = hm or max(h for h, _ in sizes) + 3
    wm = wm or max(w for _, w in sizes) + 5
    crops = torch.zeros(len(sizes), 3, hm, wm, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        crops[i, :, :h, :w] = fill(i, h, w)
    return crops, torch.tensor(sizes, dtype=torch.long)


def _ramp(i, h, w):
    # value = x + y: linear, so bilinear resampling reproduces it exactly; its slopes along the
    # two output axes reveal the two scale factors.
    y = torch.arange(h)[:, None]
    x = torch.arange(w)[None, :]
    return (x + y).to(torch.uint8).expand(3, h, w)


SIZES = [(30, 30), (20, 60), (70, 20), (50, 45), (40, 40), (25, 90), (100, 30), (60, 70)]


def test_template_geometry():
    t = MontageTemplate(224, 0.3)
    assert t.a == 67
    assert t.regions == ((0, 0, 67, 67), (0, 67, 67, 224), (67, 0, 224, 67), (67, 67, 224, 224))
    assert t.region_hw == ((67, 67), (67, 157), (157, 67), (157, 157))
    (wh, ww), (th, tw) = t.region_hw[1], t.region_hw[2]
    assert ww / wh == pytest.approx(2.343, abs=1e-3) and ww / wh > 1.5
    assert tw / th == pytest.approx(0.427, abs=1e-3) and tw / th < 0.5
    masks = t.region_masks()
    assert masks.shape == (4, 224, 224)
    assert torch.equal(masks.sum(0), torch.ones(224, 224))
    areas = t.region_areas()
    assert areas.sum().item() == pytest.approx(1.0)
    assert torch.allclose(areas, masks.sum((1, 2)) / 224**2)
    t.validate(32)
    t.validate(16)


@pytest.mark.parametrize("size,stride", [(224, 32), (224, 16), (160, 32), (320, 32), (448, 32)])
def test_region_map_matches_masks(size, stride):
    t = MontageTemplate(size, 0.3)
    fh = t.feature_size(stride)
    rmap = t.region_map(fh, fh, stride)
    assert rmap.shape == (fh, fh) and rmap.dtype == torch.long
    masks = t.region_masks()
    for j in range(fh):
        for k in range(fh):
            cy, cx = int(math.floor((j + 0.5) * stride)), int(math.floor((k + 0.5) * stride))
            assert masks[rmap[j, k], cy, cx] == 1
    assert (torch.bincount(rmap.flatten(), minlength=4) > 0).all()
    t.validate(stride)


def test_region_map_counts_224_32():
    rmap = MontageTemplate(224, 0.3).region_map(7, 7, 32)
    # centres 16, 48 | 80 ... < 67 -> 2 rows/cols in TL
    assert torch.bincount(rmap.flatten(), minlength=4).tolist() == [4, 10, 10, 25]


def test_validate_errors():
    with pytest.raises(ValueError, match="aspect"):
        MontageTemplate(224, 0.34).validate(32)
    with pytest.raises(ValueError, match="no feature position"):
        MontageTemplate(96, 0.3).validate(64)  # a = 29 < first centre 32


def test_no_padding_in_canvas():
    crops, sizes = _padded(SIZES, lambda i, h, w: 200)
    g = torch.Generator().manual_seed(0)
    out = assemble_montages(crops, sizes, MontageTemplate(64, 0.3), scale_jitter=(1.0, 1.5),
                            generator=g)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert out.min() > 0
    assert torch.allclose(out, torch.full_like(out, 200.0), atol=1e-3)
    single = assemble_single(crops, sizes, 48, generator=g)
    assert single.shape == (8, 3, 48, 48)
    assert torch.allclose(single, torch.full_like(single, 200.0), atol=1e-3)


def test_aspect_kept_and_cover_scale():
    crops, sizes = _padded(SIZES, _ramp)
    t = MontageTemplate(64, 0.3)
    out = assemble_montages(crops, sizes, t, flip=False, scale_jitter=(1.0, 1.0))
    for i, (h, w) in enumerate(SIZES):
        b, r = divmod(i, 4)
        y0, x0, y1, x1 = t.regions[r]
        rh, rw = y1 - y0, x1 - x0
        reg = out[b, 0, y0:y1, x0:x1]
        s = max(rh / h, rw / w)  # the cover scale: the region is exactly filled on one axis
        dy = reg[1:, :].sub(reg[:-1, :])[1:-1, 1:-1]
        dx = reg[:, 1:].sub(reg[:, :-1])[1:-1, 1:-1]
        # Same slope (1/s source pixels per output pixel) on both axes: no warping.
        assert torch.allclose(dy, torch.full_like(dy, 1 / s), atol=1e-3), (i, s)
        assert torch.allclose(dx, torch.full_like(dx, 1 / s), atol=1e-3), (i, s)


def test_aspect_kept_with_zoom_jitter():
    crops, sizes = _padded(SIZES, _ramp)
    g = torch.Generator().manual_seed(3)
    out = assemble_single(crops, sizes, 32, flip=False, scale_jitter=(1.0, 1.25), generator=g)
    for i, (h, w) in enumerate(SIZES):
        dy = out[i, 0, 1:, :].sub(out[i, 0, :-1, :])[1:-1, 1:-1]
        dx = out[i, 0, :, 1:].sub(out[i, 0, :, :-1])[1:-1, 1:-1]
        s_cover = max(32 / h, 32 / w)
        slope = dy.mean().item()
        assert 1 / (1.25 * s_cover) - 1e-4 <= slope <= 1 / s_cover + 1e-4
        assert torch.allclose(dy, torch.full_like(dy, slope), atol=1e-3)
        assert torch.allclose(dx, torch.full_like(dx, slope), atol=1e-3)


def test_flip():
    crops, sizes = _padded(SIZES * 2, _ramp)
    t = MontageTemplate(64, 0.3)
    a = assemble_montages(crops, sizes, t, flip=False, generator=torch.Generator().manual_seed(5))
    b = assemble_montages(crops, sizes, t, flip=True, generator=torch.Generator().manual_seed(5))
    flipped = 0
    for m in range(4):
        for (y0, x0, y1, x1) in t.regions:
            ra, rb = a[m, :, y0:y1, x0:x1], b[m, :, y0:y1, x0:x1]
            if torch.equal(ra, rb):
                continue
            assert torch.equal(ra.flip(-1), rb)
            flipped += 1
    assert 0 < flipped < 16


def test_placement_order():
    # crop b*4 + r has value 10 + 20*b + 5*r and must land in region r of montage b
    sizes = [(30, 30), (20, 60), (60, 20), (40, 40)] * 3
    crops, sizes = _padded(sizes, lambda i, h, w: 10 + 20 * (i // 4) + 5 * (i % 4))
    t = MontageTemplate(96, 0.3)
    out = assemble_montages(crops, sizes, t, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        for r, (y0, x0, y1, x1) in enumerate(t.regions):
            reg = out[b, :, y0:y1, x0:x1]
            assert torch.allclose(reg, torch.full_like(reg, 10 + 20 * b + 5 * r), atol=1e-3)


def test_color_jitter_and_determinism():
    crops, sizes = _padded(SIZES, lambda i, h, w: torch.tensor([200, 100, 30])[:, None, None])
    t = MontageTemplate(64, 0.3)
    plain = assemble_montages(crops, sizes, t, generator=torch.Generator().manual_seed(1))
    jit = assemble_montages(crops, sizes, t, color_jitter=0.4,
                            generator=torch.Generator().manual_seed(1))
    again = assemble_montages(crops, sizes, t, color_jitter=0.4,
                              generator=torch.Generator().manual_seed(1))
    assert torch.equal(jit, again)
    assert not torch.allclose(jit, plain)
    assert jit.min() >= 0 and jit.max() <= 255
    with pytest.raises(ValueError, match="scale_jitter"):
        assemble_montages(crops, sizes, t, scale_jitter=(0.8, 1.0))


def test_downscale_antialias():
    # A 1-pixel checkerboard downscaled 4x must average to grey, not alias to black/white.
    h = w = 128
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = (((yy + xx) % 2) * 200).to(torch.uint8)
    crops = board.expand(1, 3, h, w).contiguous()
    out = assemble_single(crops, torch.tensor([[h, w]]), 32, flip=False, scale_jitter=(1.0, 1.0))
    assert torch.allclose(out, torch.full_like(out, 100.0), atol=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    crops, sizes = _padded(SIZES, _ramp)
    t = MontageTemplate(64, 0.3)
    cpu = assemble_montages(crops, sizes, t, generator=torch.Generator().manual_seed(2))
    gpu = assemble_montages(crops.cuda(), sizes.cuda(), t,
                            generator=torch.Generator().manual_seed(2))
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-2)


def _reference_prepare(crops, sizes):
    # The edge replication as first written (nonzero-selected rows, then columns).
    x = crops.float()
    for i, (h, w) in enumerate(sizes.tolist()):
        if h < x.shape[2]:
            x[i, :, h, :] = x[i, :, h - 1, :]
    for i, (h, w) in enumerate(sizes.tolist()):
        if w < x.shape[3]:
            x[i, :, :, w] = x[i, :, :, w - 1]
    return x


def test_prepare_edge_replication_without_sync():
    # Crops that fill the padded tensor in height, width, both or neither.
    sizes = [(10, 7), (12, 7), (10, 9), (12, 9), (5, 3)]
    def noise(i, h, w):
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)

    crops, sz = _padded(sizes, noise, hm=12, wm=9)
    x, out_sizes = _prepare(crops, sz)
    assert torch.equal(x, _reference_prepare(crops, sz))
    assert torch.equal(out_sizes, sz)


def test_padding_values_are_never_read():
    # The collate zero-pads, but the assembly must not depend on it: garbage padding gives the
    # same montages (only the replicated first padding row/column is sampled).
    crops, sizes = _padded(SIZES * 2, _ramp)
    garbage = crops.clone()
    for i, (h, w) in enumerate(sizes.tolist()):
        garbage[i, :, h:, :] = 255
        garbage[i, :, :, w:] = 255
    t = MontageTemplate(64, 0.3)
    for kw in (dict(), dict(color_jitter=0.3), dict(flip=False, scale_jitter=(1.0, 1.0))):
        a = assemble_montages(crops, sizes, t, generator=torch.Generator().manual_seed(4), **kw)
        b = assemble_montages(garbage, sizes, t, generator=torch.Generator().manual_seed(4), **kw)
        assert torch.equal(a, b), kw
        a = assemble_single(crops, sizes, 40, generator=torch.Generator().manual_seed(4), **kw)
        b = assemble_single(garbage, sizes, 40, generator=torch.Generator().manual_seed(4), **kw)
        assert torch.equal(a, b), kw


def test_sizes_validation():
    crops, sizes = _padded(SIZES, lambda i, h, w: 100)
    t = MontageTemplate(64, 0.3)
    for bad in ([0, 5], [crops.shape[2] + 1, 5], [5, crops.shape[3] + 1]):
        wrong = sizes.clone()
        wrong[2] = torch.tensor(bad)
        with pytest.raises(ValueError, match="sizes must be"):
            assemble_montages(crops, wrong, t)
        with pytest.raises(ValueError, match="sizes must be"):
            assemble_single(crops, wrong, 32, validate=True)
        # Unchecked: wrong pixels at worst, never an out-of-bounds access.
        out = assemble_montages(crops, wrong, t, validate=False,
                                generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="sizes must be"):
        assemble_montages(crops, sizes[:-1], t)


def test_sampling_bound_from_shapes():
    assert _sampling_bound((187, 209), (67, 67)) == 3
    assert _sampling_bound((256, 256), (67, 157)) == 2  # the cover scale uses the tighter axis
    assert _sampling_bound((128, 128), (32, 32)) == 4  # exactly 4, not 5
    assert _sampling_bound((256, 40), (32, 32)) == 2


@pytest.mark.parametrize("big", [False, True])
def test_sampling_ratio_when_shapes_exceed_the_cap(big):
    # Padded 200 x 200 into 32 x 32: the shapes allow a 6.25x downscale (> cap 4), so the data
    # decide, as before: ratio 0 (exact per crop) while every crop needs <= 4 samples, else
    # the cap for the whole call. The CPU reads the need; an accelerator computes both and
    # selects on the device: both give the same pixels.
    sizes = [(40, 50), (30, 30)] + ([(200, 190)] if big else [])
    crops, sz = _padded(sizes, _ramp, hm=200, wm=200)
    x, sz = _prepare(crops, sz)
    h, w = sz[:, 0].float(), sz[:, 1].float()
    s = torch.maximum(32 / h, 32 / w)
    boxes = torch.stack([torch.arange(len(sizes)).float(), torch.zeros_like(h),
                         torch.zeros_like(h), 32 / s, 32 / s], dim=1)
    read = _resample(x, boxes, (32, 32), 1 / s, 4, select_on_device=False)
    select = _resample(x, boxes, (32, 32), 1 / s, 4, select_on_device=True)
    assert torch.equal(read, select)
    expect = roi_align(x, boxes, output_size=(32, 32), spatial_scale=1.0,
                       sampling_ratio=4 if big else 0, aligned=True)
    assert torch.equal(read, expect)


def test_downscale_antialias_with_large_padding():
    # A 4x downscale in a tensor padded to 8x: the shapes exceed the cap, the data do not.
    h = w = 128
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = (((yy + xx) % 2) * 200).to(torch.uint8)
    crops = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    crops[0, :, :h, :w] = board
    out = assemble_single(crops, torch.tensor([[h, w]]), 32, flip=False, scale_jitter=(1.0, 1.0))
    assert torch.allclose(out, torch.full_like(out, 100.0), atol=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hm", [None, 400])  # 400: shapes exceed the sampling cap (select path)
def test_cuda_assembly_never_syncs(hm):
    crops, sizes = _padded(SIZES, _ramp, hm=hm, wm=hm)
    t = MontageTemplate(64, 0.3)
    crops, sizes = crops.cuda(), sizes.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in (dict(color_jitter=0.4), dict(flip=False),
                   dict(generator=torch.Generator().manual_seed(0))):  # CPU draws, moved
            assemble_montages(crops, sizes, t, **kw)
            assemble_single(crops, sizes, 48, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = assemble_montages(crops.cpu(), sizes.cpu(), t, generator=torch.Generator().manual_seed(2))
    gpu = assemble_montages(crops, sizes, t, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-2)


def test_single_random_resized_crop_windows():
    """"w/o Montage" trains on ImageNet-style random-resized crops: window area and aspect."""
    crops, sizes = _padded(SIZES, _ramp)
    # area 1 with the crop's own aspect: the whole crop, warped to the square canvas.
    for i, (h, w) in enumerate(SIZES):
        out = assemble_single(crops[i:i + 1], sizes[i:i + 1], 32, flip=False, area=(1.0, 1.0),
                              ratio=(w / h, w / h))
        dy = out[0, 0, 1:, :].sub(out[0, 0, :-1, :])[1:-1, 1:-1]
        dx = out[0, 0, :, 1:].sub(out[0, 0, :, :-1])[1:-1, 1:-1]
        assert torch.allclose(dy, torch.full_like(dy, h / 32), atol=1e-3), (h, w)
        assert torch.allclose(dx, torch.full_like(dx, w / 32), atol=1e-3), (h, w)
    # A quarter of a square crop at aspect 1: a 15 px window of the 30 px crop, inside it.
    g = torch.Generator().manual_seed(0)
    out = assemble_single(crops[:1], sizes[:1], 32, flip=False, area=(0.25, 0.25),
                          ratio=(1.0, 1.0), generator=g)
    dy = out[0, 0, 1:, :].sub(out[0, 0, :-1, :])[1:-1, 1:-1]
    assert torch.allclose(dy, torch.full_like(dy, 15 / 32), atol=1e-3)
    assert out.min() >= 0 and out.max() <= 2 * 29


def test_single_random_resized_crop_never_reads_padding_and_checks_args():
    crops, sizes = _padded(SIZES, lambda i, h, w: 90)
    garbage = crops.clone()
    for i, (h, w) in enumerate(SIZES):
        garbage[i, :, h:, :] = 255
        garbage[i, :, :, w:] = 255
    kw = dict(area=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    a = assemble_single(crops, sizes, 40, generator=torch.Generator().manual_seed(4), **kw)
    b = assemble_single(garbage, sizes, 40, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and torch.allclose(a, torch.full_like(a, 90.0), atol=1e-3)
    with pytest.raises(ValueError, match="area"):
        assemble_single(crops, sizes, 40, area=(0.0, 1.0))


# -- packed (ragged) crops: the same montages as padded ones -----------------------------------


@pytest.fixture(scope="module")
def real_bank(tmp_path_factory):
    """A bank of real JPEG crops cut by the builder from a small synthetic COCO set."""
    from builder.build import BuildOptions, build_bank
    from builder.testing import write_synthetic_coco

    root = tmp_path_factory.mktemp("real_bank")
    json_path, img_dir = write_synthetic_coco(str(root / "coco"), num_images=4, size=(200, 160))
    out = str(root / "bank.h5")
    build_bank(json_path, img_dir, out, BuildOptions(workers=1, progress=False))
    return out


def test_montages_from_packed_crops_equal_padded_pixel_for_pixel(real_bank):
    import itertools

    from montage_pretrain.data import MontageStream, collate_montages, collate_packed
    from montage_pretrain.montage import unpack_crops

    items = list(itertools.islice(iter(MontageStream(real_bank, seed=0)), 6))
    padded, packed = collate_montages(items), collate_packed(items)
    assert packed["pixels"].numel() < padded["crops"].numel()
    t = MontageTemplate(64, 0.3)
    for scatter in (False, True):  # the CPU's per-crop copy and the accelerators' scatter
        crops = unpack_crops(packed["pixels"], packed["offsets"], packed["sizes"],
                             scatter=scatter)
        assert torch.equal(crops, padded["crops"]), scatter
        for kw in (dict(), dict(color_jitter=0.3), dict(flip=False, scale_jitter=(1.0, 1.0))):
            a = assemble_montages(padded["crops"], padded["sizes"], t,
                                  generator=torch.Generator().manual_seed(1), **kw)
            b = assemble_montages(crops, packed["sizes"], t,
                                  generator=torch.Generator().manual_seed(1), **kw)
            assert torch.equal(a, b), kw


def test_unpack_crops_checks_its_inputs():
    from montage_pretrain.montage import unpack_crops

    sizes = torch.tensor([[2, 3], [1, 1]])
    pixels = torch.arange(21, dtype=torch.uint8)
    offsets = torch.tensor([0, 18])
    out = unpack_crops(pixels, offsets, sizes)
    assert out.shape == (2, 3, 2, 3)
    assert out[0, :, 0, 0].tolist() == [0, 1, 2] and out[0, :, 1, 2].tolist() == [15, 16, 17]
    assert out[1, :, 0, 0].tolist() == [18, 19, 20] and out[1, :, 1:, :].sum() == 0
    assert torch.equal(unpack_crops(pixels, offsets, sizes, scatter=True), out)
    with pytest.raises(ValueError, match="sizes must be"):
        unpack_crops(pixels, offsets, torch.tensor([[2, 3], [0, 1]]))
    assert unpack_crops(pixels[:0], offsets[:0], sizes[:0]).shape[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_unpack_never_syncs_and_matches_cpu(real_bank):
    import itertools

    from montage_pretrain.data import MontageStream, collate_packed
    from montage_pretrain.montage import unpack_crops

    packed = collate_packed(list(itertools.islice(iter(MontageStream(real_bank, seed=0)), 6)))
    pixels = packed["pixels"].pin_memory()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = unpack_crops(pixels.cuda(non_blocking=True), packed["offsets"], packed["sizes"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = unpack_crops(packed["pixels"], packed["offsets"], packed["sizes"])
    assert torch.equal(gpu.cpu(), cpu)

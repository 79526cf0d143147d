"""
The Montage template (Sec. 3.2, Fig. 3b) and batched, on-device montage assembly.

Region order everywhere: 0 = TL (smaller-area S), 1 = TR (W), 2 = BL (T), 3 = BR (larger-area S).
"""
import math

import torch
from torchvision.ops import roi_align

from builder.bank import S_MAX_ASPECT, S_MIN_ASPECT

__all__ = ["MontageTemplate", "assemble_montages", "assemble_single", "unpack_crops"]

# Cap of roi_align's samples per output pixel and axis: a 4x4 grid already antialiases a 4x
# downscale exactly; larger downscales (rare once the builder bounds crop sizes) alias mildly.
# Applied without waiting for the device (see _resample).
MAX_SAMPLING_RATIO = 4


class MontageTemplate:
    """
    A square S x S canvas split into four regions at ``a = round(split * S)`` (pixels)::

        +-------+-------------+        TL (0,0,a,a)   small S     (a x a)
        |  TL   |     TR (W)  |  a     TR (0,a,a,S)   W, a tall and S - a wide
        +-------+-------------+        BL (a,0,S,a)   T, S - a tall and a wide
        |       |             |        BR (a,a,S,S)   large S     (S - a) x (S - a)
        | BL(T) |     BR      | S - a
        |       |             |
        +-------+-------------+
           a         S - a

    Each region must have the aspect of the group it receives, as the bank files them
    (:func:`builder.bank.group_of`: T w/h < 0.5, W w/h > 1.5), so that cover-cropping a crop into
    its region cuts little. The T region's aspect is a / (S - a) < 0.5 iff split < 1/3 (the W
    condition, split < 0.4, is then implied); the constructor checks it on the rounded pixels.
    ``split = 0.3`` (the default) gives 67 | 157 on a 224 canvas (W 157 x 67, w/h 2.34; T 67 x
    157, w/h 0.43) and 38 | 90 on the 128 px demo canvas (w/h 2.37 and 0.42).

    Boxes are (y0, x0, y1, x1) in pixels, half-open: pixel rows y0..y1-1. A continuous point
    (y, x) lies in pixel (floor(y), floor(x)).
    """

    def __init__(self, input_size, split):
        """
        Args:
            input_size (int): canvas side S, pixels.
            split (float): side of the TL region as a fraction of S.
        """
        self.size = int(input_size)
        self.split = float(split)
        self.a = int(round(self.split * self.size))
        S, a = self.size, self.a
        self.regions = ((0, 0, a, a), (0, a, a, S), (a, 0, S, a), (a, a, S, S))
        self.region_hw = tuple((y1 - y0, x1 - x0) for (y0, x0, y1, x1) in self.regions)
        (th, tw), (wh, ww) = self.region_hw[2], self.region_hw[1]
        if not (0 < a < S and tw / th < S_MIN_ASPECT and ww / wh > S_MAX_ASPECT):
            raise ValueError(
                f"MONTAGE.SPLIT={split} on a {S} px canvas gives a {tw}x{th} T region and a "
                f"{ww}x{wh} W region, whose aspects must be < {S_MIN_ASPECT} and > "
                f"{S_MAX_ASPECT}: use 0 < split < 1/3 (e.g. 0.3)"
            )

    @classmethod
    def from_config(cls, cfg):
        """The template of ``cfg.MONTAGE.INPUT_SIZE`` / ``cfg.MONTAGE.SPLIT``."""
        return cls(cfg.MONTAGE.INPUT_SIZE, cfg.MONTAGE.SPLIT)

    def __repr__(self):
        return f"MontageTemplate(input_size={self.size}, split={self.split}, a={self.a})"

    def region_masks(self, device=None):
        """
        Returns:
            Tensor: (4, S, S) float32 in {0, 1}; mask i is 1 on region i. They sum to 1.
        """
        masks = torch.zeros(4, self.size, self.size, device=device)
        for i, (y0, x0, y1, x1) in enumerate(self.regions):
            masks[i, y0:y1, x0:x1] = 1.0
        return masks

    def region_areas(self):
        """
        Returns:
            Tensor: (4,) float32, each region's fraction of the canvas area (sum 1).
        """
        hw = torch.tensor(self.region_hw, dtype=torch.float64)
        return (hw[:, 0] * hw[:, 1] / float(self.size**2)).float()

    def feature_size(self, stride):
        """Side of the feature map of a stride-``stride`` network, ceil(S / stride) (ResNet)."""
        return int(math.ceil(self.size / stride))

    def region_map(self, feat_h, feat_w, stride):
        """
        Assigns every feature position to the region that contains its centre.

        Position (j, k) of a stride-``stride`` feature map is centred at input pixel coordinates
        ((j + 0.5) * stride, (k + 0.5) * stride); a centre exactly on the split line belongs to
        the lower/right region (half-open boxes).

        Args:
            feat_h, feat_w (int): feature-map size (measure it from the backbone).
            stride (int or float): input pixels per feature position.

        Returns:
            Tensor: (feat_h, feat_w) int64 region ids 0..3.
        """
        cy = (torch.arange(feat_h, dtype=torch.float64) + 0.5) * stride
        cx = (torch.arange(feat_w, dtype=torch.float64) + 0.5) * stride
        bottom = (cy >= self.a).long()[:, None]
        right = (cx >= self.a).long()[None, :]
        return bottom * 2 + right  # TL 0, TR 1, BL 2, BR 3

    def validate(self, stride, feat_hw=None):
        """
        Raises ValueError (one line) unless every region contains at least one feature-position
        centre (the region aspects are checked by the constructor).

        Args:
            stride (int): network stride of the classified feature map.
            feat_hw (tuple[int, int] or None): feature-map size; default ceil(S / stride).
        """
        if feat_hw is None:
            feat_hw = (self.feature_size(stride),) * 2
        rmap = self.region_map(feat_hw[0], feat_hw[1], stride)
        counts = torch.bincount(rmap.flatten(), minlength=4)
        if (counts == 0).any():
            raise ValueError(
                f"{self}: with stride {stride} regions {counts.tolist()} (TL, TR, BL, BR) get no "
                "feature position; use a larger INPUT_SIZE or SPLIT"
            )


def _uniform(n, lo, hi, generator, device):
    # Random numbers are drawn on the generator's device (a CPU generator cannot fill a CUDA
    # tensor) and then moved; they are tiny. A host-to-device move does not wait for the device
    # (non_blocking; the fresh CPU tensor is staged at once); towards the CPU it must wait.
    gdev = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gdev, dtype=torch.float32)
    u = u.to(device, non_blocking=torch.device(device).type != "cpu")
    return lo + (hi - lo) * u


def unpack_crops(pixels, offsets, sizes, validate=None, scatter=None):
    """
    The padded crops of :func:`montage_pretrain.data.collate_montages` rebuilt from a packed
    batch (:func:`montage_pretrain.data.collate_packed`) on the buffer's device, pixel for pixel
    (zero padding at the bottom/right); nothing waits for the device.

    On an accelerator: one scatter of the crops' pixels per channel, straight into the CHW
    layout (a handful of kernels whatever the batch). The destination of every pixel is computed
    on the device from per-row deltas: the pixels of crop row r are contiguous in both the
    packed buffer and the padded tensor, so ``dst = src + delta[row of src]``. On the CPU: one
    strided copy per crop (cheaper there than building the index). ``sizes`` must be on the CPU
    (they size the work without a device sync); ``offsets`` may be anywhere.

    Args:
        pixels (Tensor): uint8 (sum of 3*h*w,), crops back to back, each HWC.
        offsets (Tensor): int64 (N,) byte offset of each crop in ``pixels``.
        sizes (Tensor): int64 (N, 2) (h, w), on the CPU.
        validate (bool or None): check ``offsets`` against ``sizes`` (ValueError); None: when
            ``offsets`` is on the CPU (free), True: always (a device sync), False: never.
        scatter (bool or None): force (True) or forbid (False) the scatter; None: on any device
            but the CPU. Both give the same bytes.

    Returns:
        Tensor: uint8 (N, 3, Hm, Wm), Hm/Wm the largest crop height/width.
    """
    if sizes.device.type != "cpu":
        raise ValueError("unpack_crops: sizes must be on the CPU (they size the work)")
    if pixels.dtype != torch.uint8 or pixels.dim() != 1:
        raise ValueError(f"pixels must be flat uint8, got {pixels.dtype} {tuple(pixels.shape)}")
    n, dev = sizes.shape[0], pixels.device
    sizes = sizes.long()
    if n == 0:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8, device=dev)
    if (sizes < 1).any():
        raise ValueError("sizes must be (h, w) >= 1")
    h, w = sizes[:, 0], sizes[:, 1]
    area = h * w
    starts = torch.cumsum(area, 0) - area  # pixel index of each crop in the buffer
    total, rows = int(area.sum()), int(h.sum())
    if pixels.numel() != 3 * total:
        raise ValueError(f"pixels holds {pixels.numel()} bytes, sizes need {3 * total}")
    if validate or (validate is None and offsets.device.type == "cpu"):
        if not torch.equal(offsets.cpu().long(), 3 * starts):
            raise ValueError("offsets do not match sizes (crops must lie back to back)")
    hm, wm = int(h.max()), int(w.max())
    if scatter is None:
        scatter = dev.type != "cpu"
    if not scatter:
        out = torch.empty(n, 3, hm, wm, dtype=torch.uint8, device=dev)
        # Through numpy, as the padded collate: its slicing costs less per crop than torch's;
        # only the padding is zeroed.
        dst, src = out.numpy(), pixels.numpy()
        for i, (start, hh, ww) in enumerate(zip((3 * starts).tolist(), h.tolist(), w.tolist())):
            crop = src[start:start + 3 * hh * ww].reshape(hh, ww, 3)
            dst[i, :, :hh, :ww] = crop.transpose(2, 0, 1)
            dst[i, :, hh:, :] = 0
            dst[i, :, :hh, ww:] = 0
        return out
    # Per crop, on the CPU (N values): pixel index of row 0 in the padded (N, Hm, Wm) plane
    # minus its index in the buffer, and the extra step per row (Wm - w).
    base = torch.arange(n) * (hm * wm) - starts
    gap = wm - w
    nb = dev.type != "cpu"
    crop_of_row = torch.repeat_interleave(torch.arange(n, device=dev), h.to(dev, non_blocking=nb),
                                          output_size=rows)
    row_starts = (torch.cumsum(h, 0) - h).to(dev, non_blocking=nb)
    y = torch.arange(rows, device=dev) - row_starts[crop_of_row]
    base, gap = base.to(dev, non_blocking=nb), gap.to(dev, non_blocking=nb)
    delta = base[crop_of_row] + y * gap[crop_of_row]
    width_of_row = w.to(dev, non_blocking=nb)[crop_of_row]
    dst = torch.arange(total, device=dev) + torch.repeat_interleave(delta, width_of_row,
                                                                     output_size=total)
    # dst indexes the (N, Hm, Wm) plane; channel c of crop i is plane (3 i + c) of the output.
    dst = dst + (dst // (hm * wm)) * (2 * hm * wm)
    out = torch.zeros(n, 3, hm, wm, dtype=torch.uint8, device=dev)
    flat, src = out.view(-1), pixels.view(total, 3)
    for c in range(3):
        flat.index_copy_(0, dst + c * hm * wm, src[:, c])
    return out


def _check_sizes(sizes, hm, wm):
    """ValueError unless every (h, w) is within 1..(hm, wm). ``sizes`` on the CPU (no sync)."""
    if (sizes < 1).any() or (sizes[:, 0] > hm).any() or (sizes[:, 1] > wm).any():
        raise ValueError("sizes must be (h, w) >= 1 and within the padded crop tensor")


def _prepare(crops, sizes, validate=None):
    """
    Float copy of the padded crops whose first padding row/column replicates the last real
    one. roi_align interpolates bilinearly against the full padded tensor, so a sample within
    half a pixel of a crop's bottom/right edge would otherwise blend in the padding; no sample
    reaches further (see :func:`_cover_crop`), so the rest of the padding may hold anything.

    No host-device synchronisation: the edge copy indexes every crop (a crop that fills the
    padded tensor copies its last row/column onto itself), and ``sizes`` are checked only
    where that is free (see ``validate``).

    Args:
        validate (bool or None): check ``sizes`` (ValueError). None: only when ``sizes`` is on
            the CPU (free); True: always (a device sync when ``sizes`` is on an accelerator);
            False: never. Unchecked invalid sizes give wrong pixels, never an out-of-bounds
            access (the indexes are clamped).
    """
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(
            f"crops must be uint8 (N, 3, H, W), got {crops.dtype} {tuple(crops.shape)}")
    n, _, H, W = crops.shape
    if sizes.shape != (n, 2):
        raise ValueError(f"sizes must be ({n}, 2) for {n} crops, got {tuple(sizes.shape)}")
    if validate or (validate is None and sizes.device.type == "cpu"):
        _check_sizes(sizes.cpu(), H, W)
    x = crops.float()
    # CPU sizes (free to check) go to an accelerator without waiting for it (a host-to-device
    # copy; never non_blocking towards the CPU, whose result could be read before it lands).
    sizes = sizes.to(crops.device, non_blocking=crops.device.type != "cpu").long()
    if n:
        ar = torch.arange(n, device=crops.device)
        h, w = sizes[:, 0].clamp(1, H), sizes[:, 1].clamp(1, W)
        x[ar, :, h.clamp(max=H - 1), :] = x[ar, :, h - 1, :]
        # After the rows, so the corner (h, w) also gets the last real pixel.
        x[ar, :, :, w.clamp(max=W - 1)] = x[ar, :, :, w - 1]
    return x, sizes


def _sampling_bound(padded_hw, out_hw):
    """
    Most roi_align samples per output pixel and axis that antialiasing any window of a crop of
    a ``padded_hw`` tensor resampled to ``out_hw`` can need, from shapes only (no device sync):
    a window is downscaled by 1/s <= min(h / rh, w / rw) <= min(Hm / rh, Wm / rw) (the cover
    scale, zoom >= 1, crops within the padded tensor).
    """
    (hm, wm), (rh, rw) = padded_hw, out_hw
    return int(math.ceil(min(hm / rh, wm / rw) - 1e-6))


def _resample(x, boxes, out_hw, inv_scale, max_sampling_ratio, select_on_device=None):
    """
    roi_align of ``boxes`` to ``out_hw``, antialiased with ceil(1/s) bilinear samples per output
    pixel and axis (``inv_scale`` = 1/s per box): sampling_ratio=0 lets roi_align pick exactly
    ceil(window / output) per crop and axis; when some crop of the call needs more than
    ``max_sampling_ratio``, one shared ratio, the cap, is used for the whole call.

    Without waiting for the device: when the shapes bound the need within the cap (the usual
    case, e.g. 224 px canvases with crops of at most 256 px) there is one call with ratio 0;
    otherwise the data decide, on the CPU by reading the need (free there) and on an
    accelerator by computing both resamplings and selecting one on the device.

    Args:
        select_on_device (bool or None): force (True) or forbid (False) the two-call select;
            None: on any device but the CPU. Both give the same pixels.
    """
    cap = max_sampling_ratio
    if inv_scale.numel() == 0 or _sampling_bound(x.shape[2:], out_hw) <= cap:
        ratio = 0
    else:
        # As ceil(max(1/s) - 1e-6) > cap, in float64 like the Python float it replaces.
        over = inv_scale.amax().double() - 1e-6 > cap
        if select_on_device is None:
            select_on_device = x.device.type != "cpu"
        if select_on_device:
            both = [roi_align(x, boxes, output_size=out_hw, spatial_scale=1.0, sampling_ratio=r,
                              aligned=True) for r in (cap, 0)]
            return torch.where(over, *both)
        ratio = cap if bool(over) else 0
    return roi_align(x, boxes, output_size=out_hw, spatial_scale=1.0, sampling_ratio=ratio,
                     aligned=True)


def _color_jitter(x, strength, generator):
    """Per-crop brightness, contrast and saturation factors in U(1 - s, 1 + s); x (n, 3, h, w)."""
    n, dev = x.shape[0], x.device
    b, c, s = (_uniform(n, 1 - strength, 1 + strength, generator, dev).view(n, 1, 1, 1)
               for _ in range(3))
    # RGB luma; built on the CPU and sent without waiting (torch.tensor(..., device=cuda) syncs).
    coef = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).to(dev, non_blocking=True)
    # In place: x is the fresh roi_align output.
    x.mul_(b)
    mean = (x * coef).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x.sub_(mean).mul_(c).add_(mean)
    gray = (x * coef).sum(1, keepdim=True)
    x.sub_(gray).mul_(s).add_(gray)
    return x.clamp_(0.0, 255.0)


def _cover_crop(x, sizes, index, out_hw, flip, scale_jitter, color_jitter, generator,
                max_sampling_ratio):
    """
    Resamples crops ``index`` of ``x`` to ``out_hw`` with ONE roi_align call (two in the rare
    case :func:`_resample` describes, on an accelerator).

    Each crop is scaled by s = max(rh / h, rw / w) * U(scale_jitter) (>= the cover scale, so the
    region is filled, no padding; one s for both axes, so no warping), and a (rh / s, rw / s)
    source window at a uniform random offset inside the crop is sampled.

    Returns:
        Tensor: (len(index), 3, rh, rw) float32, 0..255.
    """
    rh, rw = out_hw
    n, dev = index.numel(), x.device
    hw = sizes[index].float()
    h, w = hw[:, 0], hw[:, 1]
    # All random numbers are drawn whatever the flags, so that toggling one augmentation leaves
    # the others' draws unchanged for a given generator state.
    zoom = _uniform(n, scale_jitter[0], scale_jitter[1], generator, dev)
    oy, ox = _uniform(n, 0.0, 1.0, generator, dev), _uniform(n, 0.0, 1.0, generator, dev)
    coin = _uniform(n, 0.0, 1.0, generator, dev) < 0.5
    s = torch.maximum(rh / h, rw / w) * zoom
    win_h, win_w = rh / s, rw / s
    y0 = oy * (h - win_h).clamp(min=0)
    x0 = ox * (w - win_w).clamp(min=0)
    boxes = torch.stack([index.to(dev).float(), x0, y0, x0 + win_w, y0 + win_h], dim=1)
    out = _resample(x, boxes, (rh, rw), 1.0 / s, max_sampling_ratio)
    return _flip_and_jitter(out, coin, flip, color_jitter, generator)


def _flip_and_jitter(out, coin, flip, color_jitter, generator):
    """Flips the resampled crops where ``coin`` is set (if ``flip``), then colour-jitters them."""
    if flip:
        # A select, not coin.nonzero() (a device sync).
        out = torch.where(coin.view(-1, 1, 1, 1), out.flip(-1), out)
    if color_jitter > 0:
        out = _color_jitter(out, color_jitter, generator)
    return out


def _random_resized_crop(x, sizes, index, out_hw, flip, area, ratio, color_jitter, generator,
                         max_sampling_ratio):
    """
    ImageNet-style random-resized crop of crops ``index`` of ``x`` to ``out_hw`` (one roi_align):
    a window of U(area) of the crop's area and log-uniform aspect (w/h) in ``ratio`` at a uniform
    random position, resampled to the output (warping, as an ImageNet classifier's input).
    torchvision retries up to 10 draws until the window fits; here a window side larger than the
    crop is clamped to it instead (batched, no retries). roi_align with ``sampling_ratio=0``
    antialiases each axis by its own scale.

    Returns:
        Tensor: (len(index), 3, rh, rw) float32, 0..255.
    """
    rh, rw = out_hw
    n, dev = index.numel(), x.device
    hw = sizes[index].float()
    h, w = hw[:, 0], hw[:, 1]
    frac = _uniform(n, area[0], area[1], generator, dev)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, dev)
    oy, ox = _uniform(n, 0.0, 1.0, generator, dev), _uniform(n, 0.0, 1.0, generator, dev)
    coin = _uniform(n, 0.0, 1.0, generator, dev) < 0.5
    a, r = frac * h * w, torch.exp(log_r)
    win_w, win_h = torch.sqrt(a * r).clamp(max=w), torch.sqrt(a / r).clamp(max=h)
    y0, x0 = oy * (h - win_h), ox * (w - win_w)
    boxes = torch.stack([index.to(dev).float(), x0, y0, x0 + win_w, y0 + win_h], dim=1)
    out = _resample(x, boxes, (rh, rw), torch.maximum(win_h / rh, win_w / rw), max_sampling_ratio)
    return _flip_and_jitter(out, coin, flip, color_jitter, generator)


def _check_jitter(scale_jitter):
    lo, hi = float(scale_jitter[0]), float(scale_jitter[1])
    if not 1.0 <= lo <= hi:
        raise ValueError(
            f"scale_jitter={tuple(scale_jitter)}: need 1 <= lo <= hi (a zoom < 1 would leave the "
            "region partly uncovered)"
        )
    return lo, hi


def assemble_montages(crops, sizes, template, *, flip=True, scale_jitter=(1.0, 1.25),
                      color_jitter=0.0, generator=None, max_sampling_ratio=MAX_SAMPLING_RATIO,
                      validate=None):
    """
    Assembles montages on the crops' device (batched: one roi_align call per region).

    Args:
        crops (Tensor): uint8 (B*4, 3, Hm, Wm) RGB crops, padded at the bottom/right (the
            padding's values are never used); crop ``b*4 + r`` goes to region r of montage b.
        sizes (Tensor): int64 (B*4, 2) true (h, w) of each crop, pixels; on any device.
        template (MontageTemplate): canvas and regions.
        flip (bool): flip each crop horizontally with probability 0.5.
        scale_jitter (tuple[float, float]): zoom U(lo, hi) on top of the cover scale; lo >= 1.
        color_jitter (float): strength s of per-crop brightness/contrast/saturation factors
            U(1 - s, 1 + s); 0 = off.
        generator (torch.Generator or None): source of randomness (any device).
        max_sampling_ratio (int): cap of roi_align samples per output pixel and axis.
        validate (bool or None): check that ``sizes`` lie within 1..(Hm, Wm) (ValueError).
            None (default): only when ``sizes`` is on the CPU, where it is free; True: always,
            which waits for the device when ``sizes`` is on an accelerator; False: never.

    Nothing here waits for the device (no ``.item()``, ``nonzero()`` or data-dependent
    branch), so the call only queues kernels. Pass ``sizes`` on the CPU (they are moved
    without waiting) to get the check for free with CUDA crops.

    Returns:
        Tensor: (B, 3, S, S) float32 pixel values in 0..255, same channel order as ``crops``.
    """
    if crops.shape[0] % 4:
        raise ValueError(f"assemble_montages needs 4 crops per montage, got {crops.shape[0]}")
    jitter = _check_jitter(scale_jitter)
    x, sizes = _prepare(crops, sizes, validate)
    B, S = crops.shape[0] // 4, template.size
    canvas = torch.empty(B, 3, S, S, device=crops.device)
    base = torch.arange(B, device=crops.device) * 4
    for r, (y0, x0, y1, x1) in enumerate(template.regions):
        canvas[:, :, y0:y1, x0:x1] = _cover_crop(
            x, sizes, base + r, (y1 - y0, x1 - x0), flip, jitter, color_jitter, generator,
            max_sampling_ratio)
    return canvas


def assemble_single(crops, sizes, input_size, *, flip=True, scale_jitter=(1.0, 1.25),
                    color_jitter=0.0, generator=None, max_sampling_ratio=MAX_SAMPLING_RATIO,
                    validate=None, area=None, ratio=(3 / 4, 4 / 3)):
    """
    The no-montage baseline ("w/o Montage"): one crop per image fills the whole S x S canvas.

    Args:
        crops (Tensor): uint8 (B, 3, Hm, Wm), padded; sizes (Tensor): int64 (B, 2).
        input_size (int): canvas side S. Other arguments as in :func:`assemble_montages`.
        area (tuple[float, float] or None): None: cover-crop (scale to cover the canvas, no
            warping, centre-ish window; what evaluation uses). Else an ImageNet-style
            random-resized crop (:func:`_random_resized_crop`) of U(area) of the crop's area and
            aspect in ``ratio``, as an ImageNet classifier is trained (training uses it; a tall
            or wide crop would keep only ~1/5 of itself under a square cover-crop).

    Returns:
        Tensor: (B, 3, S, S) float32 in 0..255.
    """
    x, sizes = _prepare(crops, sizes, validate)
    index = torch.arange(crops.shape[0], device=crops.device)
    out_hw = (int(input_size),) * 2
    if area is not None:
        lo, hi = float(area[0]), float(area[1])
        if not 0.0 < lo <= hi <= 1.0 or not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"area={tuple(area)} ratio={tuple(ratio)}: need 0 < lo <= hi <= 1 "
                             "and 0 < ratio lo <= hi (e.g. (0.08, 1.0) and (0.75, 1.333))")
        return _random_resized_crop(x, sizes, index, out_hw, flip, (lo, hi), tuple(ratio),
                                    color_jitter, generator, max_sampling_ratio)
    jitter = _check_jitter(scale_jitter)
    return _cover_crop(x, sizes, index, out_hw, flip, jitter, color_jitter, generator,
                       max_sampling_ratio)

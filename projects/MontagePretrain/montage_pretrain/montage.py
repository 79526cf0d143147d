"""
The Montage template (Sec. 3.2, Fig. 3b) and batched, on-device montage assembly.

Region order everywhere: 0 = TL (smaller-area S), 1 = TR (W), 2 = BL (T), 3 = BR (larger-area S).
"""
import math

import torch
from torchvision.ops import roi_align

__all__ = ["MontageTemplate", "assemble_montages", "assemble_single"]

# Cap of roi_align's samples per output pixel and axis: a 4x4 grid already antialiases a 4x
# downscale exactly; larger downscales (rare once the builder bounds crop sizes) alias mildly.
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

    Why ``split = 0.3``: on a 224 canvas it gives 67 | 157, so the W region is 157 x 67
    (w/h = 2.34 > 1.5) and the T region 67 x 157 (w/h = 0.43 < 0.5): each region has the aspect
    of the group it receives (S: 0.5..1.5, T: < 0.5, W: > 1.5, as in the bank), so cover-cropping
    a crop into its region cuts little. The T region's aspect is a / (S - a) < 0.5 iff
    split < 1/3 (the W condition, split < 0.4, is then implied).

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
        if not 0 < self.a < self.size:
            raise ValueError(
                f"MontageTemplate: split={split} on a {input_size} canvas gives an empty region; "
                "use 0 < split < 1/3 (e.g. 0.3)"
            )
        S, a = self.size, self.a
        self.regions = ((0, 0, a, a), (0, a, a, S), (a, 0, S, a), (a, a, S, S))
        self.region_hw = tuple((y1 - y0, x1 - x0) for (y0, x0, y1, x1) in self.regions)

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
        Raises ValueError (one line) unless the T region's aspect (w/h) is < 0.5, the W region's
        is > 1.5, and every region contains at least one feature-position centre.

        Args:
            stride (int): network stride of the classified feature map.
            feat_hw (tuple[int, int] or None): feature-map size; default ceil(S / stride).
        """
        (th, tw), (wh, ww) = self.region_hw[2], self.region_hw[1]
        if not tw / th < 0.5:
            raise ValueError(
                f"{self}: T region {tw}x{th} has aspect {tw / th:.2f} >= 0.5; use split < 1/3"
            )
        if not ww / wh > 1.5:
            raise ValueError(
                f"{self}: W region {ww}x{wh} has aspect {ww / wh:.2f} <= 1.5; use split < 0.4"
            )
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
    # tensor) and then moved; they are tiny.
    gdev = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gdev, dtype=torch.float32).to(device)
    return lo + (hi - lo) * u


def _prepare(crops, sizes):
    """
    Float copy of the padded crops whose first padding row/column replicates the last real
    one. roi_align interpolates bilinearly against the full padded tensor, so a sample within
    half a pixel of a crop's bottom/right edge would otherwise blend in the zero padding.
    """
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(
            f"crops must be uint8 (N, 3, H, W), got {crops.dtype} {tuple(crops.shape)}")
    x = crops.float()
    sizes = sizes.to(crops.device).long()
    if (sizes < 1).any() or (sizes[:, 0] > x.shape[2]).any() or (sizes[:, 1] > x.shape[3]).any():
        raise ValueError("sizes must be (h, w) >= 1 and within the padded crop tensor")
    h, w = sizes[:, 0], sizes[:, 1]
    rows = (h < x.shape[2]).nonzero().flatten()
    if rows.numel():
        x[rows, :, h[rows], :] = x[rows, :, h[rows] - 1, :]
    cols = (w < x.shape[3]).nonzero().flatten()
    if cols.numel():
        # After the rows, so the corner (h, w) also gets the last real pixel.
        x[cols, :, :, w[cols]] = x[cols, :, :, w[cols] - 1]
    return x, sizes


def _color_jitter(x, strength, generator):
    """Per-crop brightness, contrast and saturation factors in U(1 - s, 1 + s); x (n, 3, h, w)."""
    n, dev = x.shape[0], x.device
    b, c, s = (_uniform(n, 1 - strength, 1 + strength, generator, dev).view(n, 1, 1, 1)
               for _ in range(3))
    coef = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)  # RGB luma
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
    Resamples crops ``index`` of ``x`` to ``out_hw`` with ONE roi_align call.

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
    # Antialiasing: ceil(1/s) bilinear samples per output pixel and axis when downscaling.
    # sampling_ratio=0 lets roi_align pick exactly ceil(window / output) per crop; above the cap
    # one shared ratio is used for the whole call.
    need = int(math.ceil(float((1.0 / s).max()) - 1e-6)) if n else 1
    ratio = 0 if need <= max_sampling_ratio else max_sampling_ratio
    out = roi_align(x, boxes, output_size=(rh, rw), spatial_scale=1.0,
                    sampling_ratio=ratio, aligned=True)
    if flip:
        sel = coin.nonzero().flatten()
        if sel.numel():
            out[sel] = out[sel].flip(-1)
    if color_jitter > 0:
        out = _color_jitter(out, color_jitter, generator)
    return out


def _check_jitter(scale_jitter):
    lo, hi = float(scale_jitter[0]), float(scale_jitter[1])
    if not 1.0 <= lo <= hi:
        raise ValueError(
            f"scale_jitter={tuple(scale_jitter)}: need 1 <= lo <= hi (a zoom < 1 would leave the "
            "region partly uncovered)"
        )
    return lo, hi


def assemble_montages(crops, sizes, template, *, flip=True, scale_jitter=(1.0, 1.25),
                      color_jitter=0.0, generator=None, max_sampling_ratio=MAX_SAMPLING_RATIO):
    """
    Assembles montages on the crops' device (batched: one roi_align call per region).

    Args:
        crops (Tensor): uint8 (B*4, 3, Hm, Wm) RGB crops, zero-padded at the bottom/right;
            crop ``b*4 + r`` goes to region r of montage b.
        sizes (Tensor): int64 (B*4, 2) true (h, w) of each crop, pixels.
        template (MontageTemplate): canvas and regions.
        flip (bool): flip each crop horizontally with probability 0.5.
        scale_jitter (tuple[float, float]): zoom U(lo, hi) on top of the cover scale; lo >= 1.
        color_jitter (float): strength s of per-crop brightness/contrast/saturation factors
            U(1 - s, 1 + s); 0 = off.
        generator (torch.Generator or None): source of randomness (any device).
        max_sampling_ratio (int): cap of roi_align samples per output pixel and axis.

    Returns:
        Tensor: (B, 3, S, S) float32 pixel values in 0..255, same channel order as ``crops``.
    """
    if crops.shape[0] % 4:
        raise ValueError(f"assemble_montages needs 4 crops per montage, got {crops.shape[0]}")
    jitter = _check_jitter(scale_jitter)
    x, sizes = _prepare(crops, sizes)
    B, S = crops.shape[0] // 4, template.size
    canvas = torch.empty(B, 3, S, S, device=crops.device)
    base = torch.arange(B, device=crops.device) * 4
    for r, (y0, x0, y1, x1) in enumerate(template.regions):
        canvas[:, :, y0:y1, x0:x1] = _cover_crop(
            x, sizes, base + r, (y1 - y0, x1 - x0), flip, jitter, color_jitter, generator,
            max_sampling_ratio)
    return canvas


def assemble_single(crops, sizes, input_size, *, flip=True, scale_jitter=(1.0, 1.25),
                    color_jitter=0.0, generator=None, max_sampling_ratio=MAX_SAMPLING_RATIO):
    """
    The no-montage baseline: cover-crops one crop per image into the whole S x S canvas.

    Args:
        crops (Tensor): uint8 (B, 3, Hm, Wm), zero-padded; sizes (Tensor): int64 (B, 2).
        input_size (int): canvas side S. Other arguments as in :func:`assemble_montages`.

    Returns:
        Tensor: (B, 3, S, S) float32 in 0..255.
    """
    jitter = _check_jitter(scale_jitter)
    x, sizes = _prepare(crops, sizes)
    index = torch.arange(crops.shape[0], device=crops.device)
    return _cover_crop(x, sizes, index, (int(input_size),) * 2, flip, jitter, color_jitter,
                       generator, max_sampling_ratio)

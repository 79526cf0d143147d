"""
Pyramid Montage pre-training (beyond the paper, which pre-trains the backbone only and names FPN
integration as future work): Detectron2's own FPN backbone + a 1x1 dense classifier on several
pyramid levels, each level with the ERF-adaptive soft labels of its own stride and ERF maps. The
export then carries ``bottom_up`` and ``fpn_*`` under the stock names (``export.py``), so a stock
FPN detector starts its whole backbone from the file.
"""
import logging

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import FPN
from detectron2.utils.events import get_event_storage

from .erf import compute_erf_region_mass, erf_weights_from_mass, pack_levels
from .losses import blockwise_loss, blockwise_weights, erf_dense_loss, level_mean
from .meta_arch import MontageClassifier

__all__ = ["MontageFPNClassifier", "FPN_LOSSES", "weighted_levels"]

# Per-position objectives only: "global" and "single" pool the whole canvas, so a pyramid adds
# nothing to them but cost.
FPN_LOSSES = ("erf", "blockwise")
logger = logging.getLogger(__name__)


def weighted_levels(backbone):
    """
    The outputs of an FPN that have weights of their own (p2..p5 of a stock FPN: their output
    convs; p6/p7 too when the top block has weights, as RetinaNet's LastLevelP6P7). A level left
    out of the loss would leave its weights untrained yet exported, and DDP refuses parameters
    without gradient. Any other backbone: [].
    """
    if not isinstance(backbone, FPN):
        return []
    outs = list(backbone.output_shape())
    top = backbone.top_block
    n_top = top.num_levels if top is not None else 0
    weighted = outs[: len(outs) - n_top]
    if n_top and any(True for _ in top.parameters()):
        weighted += outs[len(outs) - n_top :]
    return weighted


def _dense_head(channels, num_logits):
    head = nn.Conv2d(channels, num_logits, kernel_size=1)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.constant_(head.bias, 0.0)
    return head


@META_ARCH_REGISTRY.register()
class MontageFPNClassifier(MontageClassifier):
    """
    Montage pre-training of backbone + feature pyramid.

    Input: a montage batch, as for :class:`MontageClassifier` (4 crops per montage). The
    montages are assembled and normalised on the model's device (``make_images``) and fed to
    the FPN ``backbone``; a 1x1 conv (shared by the levels, or one per level) classifies every
    position of every level in ``levels`` into C + 1 classes.

    Loss: per level, the ERF-adaptive dense loss (or the block-wise one) averaged over the 4
    regions; then the mean over levels with ``level_weights``. A level's region map assigns each
    position to the region holding its centre ((j + 0.5) * stride px, the level's stride), and its
    soft labels come from its own positions' ERF maps (Eq. 2).

    Training returns ``{"loss_montage": loss}``; eval returns ``{level: logits (N, C+1, h, w)}``.

    Buffers, packed over levels so that :class:`~montage_pretrain.hooks.ERFRefreshHook` refreshes,
    broadcasts and logs them as it does a single map: ``region_map`` (P,) int64 and
    ``erf_weights`` (4, P) float32, P = sum of h_l * w_l, the levels concatenated in ``levels``
    order, row-major within a level (:meth:`level_view` gives a level's (..., h_l, w_l) view);
    ``erf_weights`` and ``erf_iter`` are saved in checkpoints.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        num_classes,
        template,
        levels=("p2", "p3", "p4", "p5"),
        level_weights=(),
        shared_head=True,
        loss="erf",
        tau=0.7,
        pixel_mean,
        pixel_std,
        flip=True,
        scale_jitter=(1.0, 1.25),
        color_jitter=0.0,
        erf_chunk=64,
        channels_last=False,
        erf_calibrate_bn=True,
        erf_level_budget=0,
    ):
        """
        Args:
            backbone (Backbone): a multi-level backbone, e.g. Detectron2's FPN.
            num_classes (int): foreground categories C; the head predicts C + 1.
            template (MontageTemplate): canvas size and region split.
            levels (list[str]): backbone outputs to classify (``MONTAGE.FPN.LEVELS``).
            level_weights (list[float]): weight of each level's loss, [] = equal.
            shared_head (bool): one classifier for every level, else one per level.
            loss (str): one of :data:`FPN_LOSSES`.
            erf_level_budget (int): ERF backward passes per level and refresh, at least one
                montage per level (``MONTAGE.FPN.ERF_LEVEL_BUDGET``); 0 = all montages.
            Other arguments: as for :class:`MontageClassifier`.
        """
        # MontageClassifier.__init__ builds one head on the coarsest map only; its methods used
        # here (make_images, _calibrate_bn, device) read the attributes set below.
        nn.Module.__init__(self)
        if loss not in FPN_LOSSES:
            raise ValueError(
                f"MONTAGE.LOSS={loss!r} with MontageFPNClassifier: use erf or blockwise ("
                "global and single pool the whole canvas; pre-train them with MontageClassifier)"
            )
        levels = list(levels)
        shapes = backbone.output_shape()
        unknown = [k for k in levels if k not in shapes]
        if not levels or unknown or len(set(levels)) != len(levels):
            raise ValueError(
                f"MONTAGE.FPN.LEVELS={levels}: list each level once, among the backbone's "
                f"outputs {list(shapes)}"
            )
        left_out = [k for k in weighted_levels(backbone) if k not in levels]
        if left_out:
            raise ValueError(
                f"MONTAGE.FPN.LEVELS={levels} leaves out {left_out}, whose FPN weights would get "
                f"no gradient (exported untrained; DDP refuses them): add {left_out} to the levels"
            )
        level_weights = [float(w) for w in level_weights]
        if level_weights and (len(level_weights) != len(levels) or min(level_weights) < 0
                              or sum(level_weights) <= 0):
            raise ValueError(
                f"MONTAGE.FPN.LEVEL_WEIGHTS={level_weights}: give one non-negative weight per "
                f"level of {levels} (positive sum), or [] for equal weights"
            )
        widths = {shapes[k].channels for k in levels}
        if shared_head and len(widths) > 1:
            raise ValueError(
                f"MONTAGE.FPN.SHARED_HEAD=True needs levels of one width, got {sorted(widths)} "
                "channels: set MONTAGE.FPN.SHARED_HEAD False"
            )
        divisibility = getattr(backbone, "size_divisibility", 0)
        if divisibility and template.size % divisibility:
            raise ValueError(
                f"MONTAGE.INPUT_SIZE={template.size} with an FPN: use a multiple of "
                f"{divisibility} (the top-down pathway doubles each level's size)"
            )

        self.backbone = backbone
        self.levels = levels
        self.strides = {k: shapes[k].stride for k in levels}
        self.level_weights = level_weights
        self.num_classes = num_classes
        self.template = template
        self.loss_name = loss
        self.tau = tau
        self.aug = dict(flip=flip, scale_jitter=tuple(scale_jitter), color_jitter=color_jitter)
        self.single_aug = {}
        self.erf_chunk = erf_chunk
        self.channels_last = channels_last
        self.erf_calibrate_bn = erf_calibrate_bn
        self.erf_level_budget = int(erf_level_budget)
        self.shared_head = shared_head
        if shared_head:
            self.head = _dense_head(shapes[levels[0]].channels, num_classes + 1)
        else:
            self.heads = nn.ModuleDict(
                {k: _dense_head(shapes[k].channels, num_classes + 1) for k in levels})

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        # Sizes are measured, not assumed (ceil vs floor differs between backbones).
        sizes = self._level_sizes(template.size)
        self._slices, maps, start = {}, [], 0
        for k in levels:
            h, w = sizes[k]
            rmap = template.region_map(h, w, self.strides[k])
            counts = torch.bincount(rmap.flatten(), minlength=4)
            if (counts == 0).any():
                raise ValueError(
                    f"MONTAGE.FPN.LEVELS has {k} (stride {self.strides[k]}: {h}x{w} positions "
                    f"on the {template.size} px canvas) but regions {counts.tolist()} (TL, TR, BL, "
                    f"BR) get no position: raise MONTAGE.INPUT_SIZE or drop {k}"
                )
            self._slices[k] = (start, h, w)
            start += h * w
            maps.append(rmap.flatten())
        self.register_buffer("region_map", torch.cat(maps), False)
        # Until the first ERF refresh the targets are the block-wise ones (tau = 1).
        self.register_buffer("erf_weights", blockwise_weights(self.region_map[None])[:, 0])
        self.register_buffer("erf_iter", torch.tensor(-1, dtype=torch.long))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        name = cfg.MODEL.BACKBONE.NAME
        if not cfg.MODEL.FPN.IN_FEATURES:
            raise ValueError(
                "MODEL.FPN.IN_FEATURES is empty: set it as in the detector to fine-tune, e.g. "
                "[res2, res3, res4, res5] (and MODEL.RESNETS.OUT_FEATURES to match)"
            )
        try:
            backbone = build_backbone(cfg)
        except (AssertionError, KeyError) as e:  # Detectron2 asserts on inconsistent features
            raise ValueError(
                f"{name} could not build an FPN from MODEL.FPN.IN_FEATURES="
                f"{list(cfg.MODEL.FPN.IN_FEATURES)} ({type(e).__name__}: {e}): list them in "
                "MODEL.RESNETS.OUT_FEATURES too, with strides doubling level to level"
            ) from e
        if not isinstance(backbone, FPN):
            raise ValueError(
                f"MODEL.BACKBONE.NAME={name!r} builds a {type(backbone).__name__}, not an FPN: "
                "MontageFPNClassifier pre-trains a pyramid; use build_resnet_fpn_backbone (or "
                "another FPN builder) with the detector's MODEL.FPN.*"
            )
        return {
            "backbone": backbone,
            **cls.shared_config(cfg),
            "levels": cfg.MONTAGE.FPN.LEVELS,
            "level_weights": cfg.MONTAGE.FPN.LEVEL_WEIGHTS,
            "shared_head": cfg.MONTAGE.FPN.SHARED_HEAD,
            "erf_level_budget": cfg.MONTAGE.FPN.ERF_LEVEL_BUDGET,
        }

    @torch.no_grad()
    def _level_sizes(self, size):
        """{level: (h, w)} of a ``size`` x ``size`` canvas, measured with one forward pass."""
        was_training = self.backbone.training
        self.backbone.eval()
        feats = self.backbone(torch.zeros(1, 3, size, size, device=self.device))
        self.backbone.train(was_training)
        return {k: tuple(feats[k].shape[-2:]) for k in self.levels}

    def level_view(self, packed, level):
        """The (..., h, w) part of a packed (..., P) tensor (``region_map``, ``erf_weights``)
        that belongs to ``level``."""
        start, h, w = self._slices[level]
        return packed[..., start : start + h * w].reshape(*packed.shape[:-1], h, w)

    def erf_images_per_level(self, num_images):
        """{level: montages its ERF maps average over} of a refresh on ``num_images``
        montages (``erf_level_budget``)."""
        if self.erf_level_budget <= 0:
            return {k: num_images for k in self.levels}
        return {k: min(num_images, max(1, self.erf_level_budget // (h * w)))
                for k, (_, h, w) in self._slices.items()}

    def _logits(self, features):
        if self.shared_head:
            return {k: self.head(features[k]) for k in self.levels}
        return {k: self.heads[k](features[k]) for k in self.levels}

    def forward(self, batch):
        """
        Args:
            batch (dict): see :class:`MontageClassifier`.

        Returns:
            dict[str, Tensor]: ``loss_montage`` in training, else ``{level: logits}``.
        """
        images = self.make_images(batch)
        logits = self._logits(self.backbone(images))
        if not self.training:
            return logits
        labels = batch["labels"].to(self.device, non_blocking=True)
        # The loss runs in fp32 even under AMP, as MontageClassifier's.
        with torch.autocast(self.device.type, enabled=False):
            losses = []
            for k in self.levels:
                level_logits = logits[k].float()
                rmap = self.level_view(self.region_map, k)
                if self.loss_name == "erf":
                    weights = self.level_view(self.erf_weights, k)
                    losses.append(erf_dense_loss(level_logits, labels, weights, rmap))
                else:
                    losses.append(blockwise_loss(level_logits, labels, rmap))
            loss = level_mean(losses, self.level_weights)
            storage = get_event_storage()
            # .item() waits for the device: monitor every LOG_PERIOD iterations only.
            if storage.iter % self.LOG_PERIOD == 0:
                self._log_levels(logits, labels, losses, storage)
        return {"loss_montage": loss}

    @torch.no_grad()
    def _log_levels(self, logits, labels, losses, storage):
        """Per level: crop top-1 from each region's pooled logits, and the level's loss;
        ``montage/crop_acc`` is the mean over levels."""
        accs = []
        for k, loss in zip(self.levels, losses):
            onehot = F.one_hot(self.level_view(self.region_map, k), 4).permute(2, 0, 1).float()
            pooled = torch.einsum("nkhw,rhw->nrk", logits[k].float(), onehot)
            pred = (pooled / onehot.sum((1, 2))[:, None]).argmax(-1)
            accs.append((pred == labels).float().mean().item())
            storage.put_scalar(f"montage/crop_acc_{k}", accs[-1])
            storage.put_scalar(f"montage/loss_{k}", loss.item())
        storage.put_scalar("montage/crop_acc", sum(accs) / len(accs))

    def refresh_erf_weights(self, batch, iteration):
        """
        Recomputes ``erf_weights`` (Eq. 2) of every level from the ERF of the current network,
        as :meth:`MontageClassifier.refresh_erf_weights` does for one map: eval mode, BN
        calibrated before the first refresh, each position's ERF averaged over the montages of
        ``batch`` (the first :meth:`erf_images_per_level` of them). One forward pass per montage
        serves all levels (:func:`pack_levels`); the cost is one backward pass per position and
        montage (p2..p5 have 1360 positions at 128 px, 4165 at 224 px), ``ERF_CHUNK`` at a time.

        Returns:
            Tensor: (P, 4) float64, each packed position's share of ERF mass in each region.
        """
        was_training = self.training
        self.eval()
        try:
            images = self.make_images(batch)
            if self.erf_calibrate_bn:
                self._calibrate_bn(images)
            per_level = self.erf_images_per_level(len(images))
            counts = torch.cat([torch.full((h * w,), per_level[k], dtype=torch.long)
                                for k, (_, h, w) in self._slices.items()])
            mass = compute_erf_region_mass(
                lambda x: pack_levels(self.backbone(x), self.levels), images,
                self.template.region_masks(device=self.device), chunk=self.erf_chunk,
                module=self.backbone, images_per_position=counts,
            )
        finally:
            self.train(was_training)
        weights = erf_weights_from_mass(mass, self.region_map, self.tau)  # (P, 4)
        self.erf_weights.copy_(weights.t())
        self.erf_iter.fill_(iteration)
        own = self.erf_weights.gather(0, self.region_map[None])[0]
        logger.info("ERF own-region weight per level at iter %d (mean; montages): %s", iteration,
                    ", ".join(f"{k} {self.level_view(own, k).mean().item():.3f} ({per_level[k]})"
                              for k in self.levels))
        return mass / mass.sum(1, keepdim=True).clamp(min=1e-300)

"""The Montage pre-training model: any Detectron2 backbone + a 1x1 dense classification head."""
import logging

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.utils.events import get_event_storage

from builder.bank import SampleBank
from .erf import compute_erf_maps, erf_region_weights, erf_weight_map
from .losses import blockwise_loss, blockwise_weights, erf_dense_loss, global_loss, single_loss
from .montage import MontageTemplate, assemble_montages, assemble_single, unpack_crops

__all__ = ["MontageClassifier", "LOSSES"]

LOSSES = ("erf", "blockwise", "global", "single")
logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class MontageClassifier(nn.Module):
    """
    Montage pre-training (:paper:`Montage`, Zhou et al. ECCV 2020).

    Input: a batch from :func:`montage_pretrain.data.build_montage_train_loader`, a dict with
    ``sizes`` (N*k, 2), ``labels`` (N, k), k = 4 crops per montage (1 for the "single"
    baseline), and the crops either packed (``pixels`` flat uint8 + ``offsets``,
    :func:`~montage_pretrain.data.collate_packed`; only the crops' pixels are copied to the
    device, which rebuilds the padded crops) or padded (``crops`` uint8 (N*k, 3, Hm, Wm),
    :func:`~montage_pretrain.data.collate_montages`): the same montages either way. The montages
    are assembled on the model's device (GPU when present), normalised, and fed to ``backbone``;
    a 1x1 conv classifies every position of the last (largest-stride) feature map into C + 1
    classes.

    Training monitors (``montage/crop_acc``) are read every ``LOG_PERIOD`` iterations only
    (``MONTAGE.LOG_PERIOD``): a reading waits for the device, the steps in between never do.
    The step's phases are named for torch.profiler (``record_function``): ``h2d_copy``,
    ``montage_assembly``, ``forward``, ``loss``, ``metrics``.

    Training returns ``{"loss_montage": loss}``; eval returns the logits (N, C+1, h, w).

    Buffers: ``erf_weights`` (4, h, w) label weights of Eq. 2 for every feature position,
    refreshed by :class:`montage_pretrain.hooks.ERFRefreshHook` and saved in checkpoints (so a
    resumed run continues with the same targets); ``erf_iter`` the iteration of the last refresh
    (-1 = never computed).
    """

    LOG_PERIOD = 20  # iterations between training-monitor readings (MONTAGE.LOG_PERIOD)

    @configurable
    def __init__(
        self,
        *,
        backbone,
        num_classes,
        template,
        loss="erf",
        tau=0.7,
        pixel_mean,
        pixel_std,
        flip=True,
        scale_jitter=(1.0, 1.25),
        color_jitter=0.0,
        erf_chunk=64,
        channels_last=False,
        single_area=(0.08, 1.0),
        single_ratio=(3 / 4, 4 / 3),
        erf_calibrate_bn=True,
        log_period=20,
    ):
        """
        Args:
            backbone (Backbone): e.g. from ``build_backbone(cfg)``; its largest-stride output
                feeds the head.
            num_classes (int): foreground categories C; the head predicts C + 1.
            template (MontageTemplate): canvas size and region split.
            loss (str): one of :data:`LOSSES`.
            tau (float): least weight of a position's own region (Eq. 2).
            pixel_mean, pixel_std (list[float]): per channel, in the crops' RGB order, 0..255.
            flip, scale_jitter, color_jitter: per-crop augmentation (see ``assemble_montages``).
            erf_chunk (int): images per forward/backward pass when computing ERF maps.
            channels_last (bool): run the backbone in channels_last memory format.
            single_area, single_ratio: the random-resized crop of loss "single" in training.
            erf_calibrate_bn (bool): see :meth:`refresh_erf_weights`.
            log_period (int): iterations between training-monitor readings.
        """
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"MONTAGE.LOSS={loss!r} is unknown; use one of {LOSSES}")
        self.backbone = backbone
        shapes = backbone.output_shape()
        self.in_feature = max(shapes, key=lambda k: shapes[k].stride)
        shape = shapes[self.in_feature]
        self.stride = shape.stride
        self.num_classes = num_classes
        self.template = template
        self.loss_name = loss
        self.tau = tau
        self.aug = dict(flip=flip, scale_jitter=tuple(scale_jitter), color_jitter=color_jitter)
        self.erf_chunk = erf_chunk
        self.channels_last = channels_last
        self.single_aug = dict(area=tuple(single_area), ratio=tuple(single_ratio))
        self.erf_calibrate_bn = erf_calibrate_bn
        self.LOG_PERIOD = max(int(log_period), 1)

        self.head = nn.Conv2d(shape.channels, num_classes + 1, kernel_size=1)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.constant_(self.head.bias, 0.0)

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        # The feature-map size is measured, not assumed: backbones round odd sizes differently.
        feat_h, feat_w = self._feature_size(template.size)
        template.validate(self.stride)
        self.register_buffer("region_map", template.region_map(feat_h, feat_w, self.stride), False)
        self.register_buffer("region_areas", template.region_areas(), False)
        # Until the first ERF refresh the targets are the block-wise ones (tau = 1).
        self.register_buffer("erf_weights", blockwise_weights(self.region_map))
        self.register_buffer("erf_iter", torch.tensor(-1, dtype=torch.long))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg):
        return {
            "backbone": build_backbone(cfg),
            **cls.shared_config(cfg),
            "single_area": cfg.MONTAGE.AUG.SINGLE_AREA,
            "single_ratio": cfg.MONTAGE.AUG.SINGLE_RATIO,
            "log_period": cfg.MONTAGE.LOG_PERIOD,
        }

    @staticmethod
    def shared_config(cfg):
        """The constructor arguments every Montage pre-training model reads the same way (the
        pyramid model too): classes, template, objective, pixel format, augmentation, ERF."""
        return {
            "num_classes": cfg.MONTAGE.NUM_CLASSES or SampleBank(cfg.MONTAGE.BANK).num_classes,
            "template": MontageTemplate.from_config(cfg),
            "loss": cfg.MONTAGE.LOSS,
            "tau": cfg.MONTAGE.TAU,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "flip": cfg.MONTAGE.AUG.FLIP,
            "scale_jitter": cfg.MONTAGE.AUG.SCALE_JITTER,
            "color_jitter": cfg.MONTAGE.AUG.COLOR_JITTER,
            "erf_chunk": cfg.MONTAGE.ERF_CHUNK,
            "channels_last": cfg.MONTAGE.CHANNELS_LAST,
            "erf_calibrate_bn": cfg.MONTAGE.ERF_CALIBRATE_BN,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    @torch.no_grad()
    def _feature_size(self, size):
        was_training = self.backbone.training
        self.backbone.eval()
        probe = torch.zeros(1, 3, size, size, device=self.device)
        feat = self.backbone(probe)[self.in_feature]
        self.backbone.train(was_training)
        return feat.shape[-2:]

    @torch.no_grad()
    def make_images(self, batch):
        """
        Assembles and normalises the montages of ``batch`` (packed or padded) on the model's
        device. Nothing here waits for the device: the host->device copies are non_blocking
        (asynchronous from the loader's pinned batches) and ``sizes`` stay on the host, where
        they are checked for free and size the work.

        Returns:
            Tensor: (N, 3, S, S) float32, normalised.
        """
        # sizes stay on the host: assembly validates them there for free, then moves them.
        sizes = batch["sizes"]
        with record_function("h2d_copy"):
            if "pixels" in batch:  # packed: the crops' pixels only
                pixels = batch["pixels"].to(self.device, non_blocking=True)
                offsets = batch["offsets"]
            else:
                crops = batch["crops"].to(self.device, non_blocking=True)
        with record_function("montage_assembly"):
            if "pixels" in batch:
                crops = unpack_crops(pixels, offsets, sizes)
            aug = self.aug if self.training else dict(flip=False, scale_jitter=(1.0, 1.0))
            if self.loss_name == "single":
                single = self.single_aug if self.training else {}
                images = assemble_single(crops, sizes, self.template.size, **aug, **single)
            else:
                images = assemble_montages(crops, sizes, self.template, **aug)
            images = (images - self.pixel_mean) / self.pixel_std
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, batch):
        """
        Args:
            batch (dict): see the class docstring.

        Returns:
            dict[str, Tensor] in training (``loss_montage``), else logits (N, C+1, h, w).
        """
        images = self.make_images(batch)
        with record_function("forward"):
            logits = self.head(self.backbone(images)[self.in_feature])
        if not self.training:
            return logits
        with record_function("h2d_copy"):
            labels = batch["labels"].to(self.device, non_blocking=True)
        # The loss runs in fp32 even under AMP (log-softmax over C+1 classes, region einsums).
        with torch.autocast(self.device.type, enabled=False), record_function("loss"):
            logits = logits.float()
            if self.loss_name == "erf":
                loss = erf_dense_loss(logits, labels, self.erf_weights, self.region_map)
            elif self.loss_name == "blockwise":
                loss = blockwise_loss(logits, labels, self.region_map)
            elif self.loss_name == "global":
                loss = global_loss(logits, labels, self.region_areas)
            else:
                loss = single_loss(logits, labels)
        storage = get_event_storage()
        # .item() waits for the device: monitor every LOG_PERIOD iterations only.
        if storage.iter % self.LOG_PERIOD == 0:
            with torch.autocast(self.device.type, enabled=False), record_function("metrics"):
                self._log_accuracy(logits, labels, storage)
        return {"loss_montage": loss}

    @torch.no_grad()
    def _log_accuracy(self, logits, labels, storage):
        """Top-1 accuracy of each crop from its region's pooled logits (a training monitor)."""
        if labels.shape[1] == 1:
            pred = logits.mean(dim=(2, 3)).argmax(1, keepdim=True)
        else:
            onehot = F.one_hot(self.region_map, 4).permute(2, 0, 1).to(logits.dtype)  # (4, h, w)
            pooled = torch.einsum("nkhw,rhw->nrk", logits, onehot) / onehot.sum((1, 2))[:, None]
            pred = pooled.argmax(-1)
        storage.put_scalar("montage/crop_acc", (pred == labels).float().mean().item())

    @torch.no_grad()
    def _calibrate_bn(self, images):
        """
        Sets the running statistics of the backbone's BN layers to the exact mean of their batch
        statistics over ``images``, if no BN layer has seen a batch yet (random init: running
        mean 0 / var 1 would make eval-mode BN the identity, unlike any trained state). Later
        refreshes use the statistics training accumulated. Returns True if it calibrated.
        """
        bns = [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        if not bns or any(int(m.num_batches_tracked) > 0 for m in bns):
            return False
        momenta = [m.momentum for m in bns]
        was_training = self.backbone.training
        chunks = images.split(max(self.erf_chunk, 1))
        try:
            for m in bns:
                m.reset_running_stats()
            self.backbone.train()
            for k, chunk in enumerate(chunks):
                # Momentum 1/(k+1) is the cumulative average over the chunks, spelled out:
                # Detectron2's naiveSyncBN (several CPU processes) has no momentum=None.
                for m in bns:
                    m.momentum = 1.0 / (k + 1)
                self.backbone(chunk)
            for m in bns:
                # naiveSyncBN does not count batches on several processes; without the count a
                # later refresh would take the statistics for unset and calibrate again.
                m.num_batches_tracked.fill_(len(chunks))
        finally:
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
            self.backbone.train(was_training)
        logger.info("BN running statistics calibrated on %d montages before the first ERF",
                    len(images))
        return True

    def refresh_erf_weights(self, batch, iteration):
        """
        Recomputes ``erf_weights`` (Eq. 2) from the ERF of the current network.

        Each feature position's ERF map is the input-gradient magnitude of its output, averaged
        over the montages of ``batch``; the network runs in eval mode so that the images of a
        batch are independent (BN uses its running statistics), which is what lets one batched
        backward pass compute many positions' ERFs at once. A never-trained network's BN
        running statistics are first set from the batch (:meth:`_calibrate_bn`).

        Args:
            batch (dict): montage batch as in :meth:`forward`.
            iteration (int): stored in ``erf_iter``.
        """
        was_training = self.training
        self.eval()
        try:
            images = self.make_images(batch)
            if self.erf_calibrate_bn:
                self._calibrate_bn(images)
            maps = compute_erf_maps(
                lambda x: self.backbone(x)[self.in_feature], images, chunk=self.erf_chunk
            )
        finally:
            self.train(was_training)
        h, w = self.region_map.shape
        masks = self.template.region_masks(device=self.device)
        weights = erf_region_weights(maps, masks, self.region_map.flatten(), self.tau)
        self.erf_weights.copy_(erf_weight_map(weights, h, w))
        self.erf_iter.fill_(iteration)
        return maps

"""Config keys of Montage pre-training: all of them live under ``cfg.MONTAGE``."""
from detectron2.config import CfgNode as CN

__all__ = ["add_montage_config"]


def add_montage_config(cfg):
    """
    Adds the ``cfg.MONTAGE`` namespace to a Detectron2 config (in place).

    Stock keys are reused rather than duplicated: montages per batch is ``SOLVER.IMS_PER_BATCH``,
    loader workers ``DATALOADER.NUM_WORKERS``, normalisation ``MODEL.PIXEL_MEAN/STD`` and
    ``INPUT.FORMAT``, the backbone ``MODEL.BACKBONE.NAME`` / ``MODEL.RESNETS.*``, AMP
    ``SOLVER.AMP.ENABLED``.
    """
    _C = cfg
    _C.MONTAGE = CN()
    # Path of the HDF5 sample bank written by `python -m builder build`.
    _C.MONTAGE.BANK = ""
    # Number of foreground categories C; the head predicts C + 1 (last = background).
    # 0 = read it from the bank at build time.
    _C.MONTAGE.NUM_CLASSES = 0
    # Side of the square montage canvas, in pixels.
    _C.MONTAGE.INPUT_SIZE = 224
    # Side of the top-left (small S) region as a fraction of INPUT_SIZE; rounded to pixels.
    # 0.3 on 224 gives 67 | 157: W region 157x67 (aspect 2.34 > 1.5), T region 67x157
    # (aspect 0.43 < 0.5). It must be < 1/3 for the T region to stay below aspect 0.5.
    _C.MONTAGE.SPLIT = 0.3
    # Classification objective: "erf" (ERF-adaptive dense, the paper's), "blockwise"
    # (per-region pooling, hard labels), "global" (global pooling, area-mixed label),
    # "single" (no montage: one crop resized to the canvas, global label; "w/o Montage").
    _C.MONTAGE.LOSS = "erf"
    # tau of Eq. 2: the least weight of a position's own region label.
    _C.MONTAGE.TAU = 0.7
    # Refresh the ERF weights every ERF_PERIOD iterations (0 = only once, before training).
    _C.MONTAGE.ERF_PERIOD = 5000
    # Montages averaged to estimate the ERF maps G^{jk}.
    _C.MONTAGE.ERF_NUM_IMAGES = 8
    # Images per forward/backward chunk when computing the ERF (memory bound).
    _C.MONTAGE.ERF_CHUNK = 64
    # Convert the model and the montages to channels_last memory format (helps on CUDA + AMP).
    _C.MONTAGE.CHANNELS_LAST = False
    # Rule when a group (S/T/W) has too few crops to sample from: "nearest" draws from the
    # nearest non-empty group by aspect (T->S->W) and cover-crops into the region.
    _C.MONTAGE.GROUP_FALLBACK = "nearest"
    # A group with fewer crops than this is treated as empty.
    _C.MONTAGE.MIN_GROUP_SIZE = 1

    _C.MONTAGE.AUG = CN()
    # Random horizontal flip of each crop, probability 0.5.
    _C.MONTAGE.AUG.FLIP = True
    # Zoom of the cover-and-crop: the cover scale is multiplied by U(lo, hi) >= 1, so the region
    # is always filled (no padding) and the aspect ratio is kept (no warping).
    _C.MONTAGE.AUG.SCALE_JITTER = (1.0, 1.25)
    # Strength of per-crop brightness/contrast/saturation jitter (0 = off).
    _C.MONTAGE.AUG.COLOR_JITTER = 0.0

    # Export written at the end of training (and by `python -m montage_pretrain.export`).
    _C.MONTAGE.EXPORT_NAME = "montage_backbone.pkl"

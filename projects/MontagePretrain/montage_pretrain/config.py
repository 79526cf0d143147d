"""Config keys of Montage pre-training: all of them live under ``cfg.MONTAGE``."""

from detectron2.config import CfgNode as CN

from .montage import MontageTemplate

__all__ = ["add_montage_config", "assert_montage_cfg", "bank_iterations", "command_line_length",
           "fit_schedule_to_bank",
           "TRAINABLE_NORMS"]

# Values of MODEL.RESNETS.NORM that pre-training accepts (the export records which one).
TRAINABLE_NORMS = ("BN", "SyncBN", "naiveSyncBN", "nnSyncBN", "GN")


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
    # Must be < 1/3 so the T and W regions have the T and W groups' aspects (MontageTemplate).
    _C.MONTAGE.SPLIT = 0.3
    # Classification objective: "erf" (ERF-adaptive dense, the paper's), "blockwise"
    # (per-region pooling, hard labels), "global" (global pooling, area-mixed label),
    # "single" (no montage: one crop resized to the canvas, global label; "w/o Montage").
    _C.MONTAGE.LOSS = "erf"
    # tau of Eq. 2: the least weight of a position's own region label.
    _C.MONTAGE.TAU = 0.7
    # Refresh the ERF weights every ERF_PERIOD iterations (0 = only once, before training).
    _C.MONTAGE.ERF_PERIOD = 5000
    # Before the first ERF (random init), set BN running statistics from the ERF montages
    # themselves (eval-mode BN would otherwise normalise with the initial 0 / 1).
    _C.MONTAGE.ERF_CALIBRATE_BN = True
    # Montages averaged to estimate the ERF maps G^{jk}.
    _C.MONTAGE.ERF_NUM_IMAGES = 8
    # Images per forward/backward chunk when computing the ERF (memory bound).
    _C.MONTAGE.ERF_CHUNK = 64
    # Convert the model and the montages to channels_last memory format (helps on CUDA + AMP).
    _C.MONTAGE.CHANNELS_LAST = False
    # Loader batches: True = packed (the crops' pixels back to back + offsets/sizes: only the
    # pixels are pinned and copied to the device, which rebuilds the padded crops); False =
    # padded to the batch's largest crop on the host (~9x the pixels on COCO-like banks).
    _C.MONTAGE.PACKED_CROPS = True
    # Iterations between the training monitors (montage/* scalars such as montage/crop_acc, and
    # Detectron2's loss metrics): each reading waits for the device, so the steps in between
    # never do. 1 = every iteration.
    _C.MONTAGE.LOG_PERIOD = 20
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
    # LOSS "single" ("w/o Montage") trains like an ImageNet classifier: random-resized crops of
    # SINGLE_AREA of the crop's area and aspect (w/h) in SINGLE_RATIO, resized to the canvas.
    _C.MONTAGE.AUG.SINGLE_AREA = (0.08, 1.0)
    _C.MONTAGE.AUG.SINGLE_RATIO = (3.0 / 4.0, 4.0 / 3.0)

    # RegNet preset when MODEL.BACKBONE.NAME is build_montage_regnet_backbone (backbones.py).
    _C.MONTAGE.REGNET = "RegNetX-4GF"
    # AMP compute dtype on CUDA when SOLVER.AMP.ENABLED: "bfloat16" (no loss scaling needed on
    # Ampere/Hopper) or "float16".
    _C.MONTAGE.AMP_DTYPE = "bfloat16"

    # Export written at the end of training (and by `python -m montage_pretrain.export`).
    _C.MONTAGE.EXPORT_NAME = "montage_backbone.pkl"
    # Scale of the exported BN-followed conv filters: "init" rescales each filter to the norm of
    # Detectron2's init and its BN statistics with it (the same outputs under BN and FrozenBN,
    # but fine-tuning then moves those layers at random init's effective step lr / |w|^2; a hot
    # pre-training inflates them up to 9-25x, which made fine-tuning leave them nearly frozen:
    # montage_pretrain/weight_scale.py, issue 20); "trained" exports them as trained.
    _C.MONTAGE.EXPORT_WEIGHT_SCALE = "init"

    # Pre-training length in passes over the bank (0 = SOLVER.MAX_ITER as written). The paper's
    # 64k iterations x 512 montages x 4 crops over its COCO bank (<= 946k crops) is >= 139
    # passes; the same MAX_ITER over a bank 400x smaller is 400x more passes, and a CPU demo's
    # 300 x 16 montages over chess's 2,319 crops is 8. With PASSES > 0, MAX_ITER becomes
    # ceil(PASSES x crops / (4 x IMS_PER_BATCH)), and WARMUP_ITERS, STEPS, ERF_PERIOD and
    # CHECKPOINT_PERIOD scale with it: the config's schedule shape, sized to the bank. The
    # shipped configs set 139 (Base-Montage.yaml): on chess, R-18 pre-trained that long beat
    # random init at 30 epochs of fine-tuning on every seed, where 8 and 33 passes tied or lost
    # (issue 20). A SOLVER.MAX_ITER on the command line turns it off (command_line_length).
    _C.MONTAGE.BANK_PASSES = 0

    # Feature-collapse guard (issue 20). Too high a pre-training LR for the bank collapses the
    # last feature map onto a few directions (participation ratio 1-4 of 512 channels at res5,
    # most channels dead) while the loss looks normal; that export fine-tuned 9.6 AP *below*
    # random init on chess. Every PERIOD iterations the participation ratio of the backbone's
    # coarsest output on a fixed set of montages is compared with the random init's (measured
    # before the first step): below MIN_PR_RATIO of it, the run has collapsed. Measured
    # (scripts/collapse_check.py, R-18 res5, 16 montages at 128 px) on 13 runs over the chess
    # and coco_tiny banks: random init 78-82, healthy runs 0.34-0.66 of it, collapsed ones
    # 0.022-0.063 (the 64 px runs: see MAX_DEAD).
    _C.MONTAGE.COLLAPSE = CN()
    # Iterations between checks (0 = off). A check is one forward pass on NUM_IMAGES montages.
    _C.MONTAGE.COLLAPSE.PERIOD = 50
    # Montages of the fixed set: every position of the coarsest map is a sample of the C x C
    # covariance, so few positions cap the PR (4 montages x 4 x 4 positions at 128 px: <= 63).
    _C.MONTAGE.COLLAPSE.NUM_IMAGES = 16
    _C.MONTAGE.COLLAPSE.MIN_PR_RATIO = 0.1
    # ... or when at least this fraction of its channels is dead (<= 0 at every position of
    # every montage; random init and every healthy run measured: 0). It catches what a PR
    # capped by few positions misses: the low-start hot run at 64 px kept 0.12 of random
    # init's (capped) PR with 97 % of res5 dead.
    _C.MONTAGE.COLLAPSE.MAX_DEAD = 0.5
    # "stop": end the run with a one-line error before it exports; "warn": log and go on.
    _C.MONTAGE.COLLAPSE.ACTION = "stop"

    # Pyramid pre-training (beyond the paper): MODEL.META_ARCHITECTURE "MontageFPNClassifier" with
    # an FPN MODEL.BACKBONE.NAME (build_resnet_fpn_backbone, ...; MODEL.FPN.* as the detector's).
    # The export then carries backbone + pyramid (montage_pretrain/fpn_meta_arch.py).
    _C.MONTAGE.FPN = CN()
    # Levels classified, each with its own region map and ERF weights. Every FPN output with
    # weights must be listed (p2..p5 for a stock FPN); p6 of LastLevelMaxPool (p5 subsampled, no
    # weights) is optional. Each level must keep >= 1 position per region on the canvas: at
    # SPLIT 0.3, p5 (stride 32) needs INPUT_SIZE >= 64, p6 (stride 64) >= 128.
    _C.MONTAGE.FPN.LEVELS = ["p2", "p3", "p4", "p5"]
    # Weight of each level's loss in the mean over levels, one per LEVELS entry; [] = equal.
    _C.MONTAGE.FPN.LEVEL_WEIGHTS = []
    # One 1x1 classifier shared by every level (True), or one per level (False).
    _C.MONTAGE.FPN.SHARED_HEAD = True
    # Cost cap of an ERF refresh, per level: each position costs one backward pass per ERF
    # montage, so a level of P_l positions averages over min(ERF_NUM_IMAGES, max(1,
    # ERF_LEVEL_BUDGET // P_l)) of the montages. 0 = every level uses all ERF_NUM_IMAGES.
    _C.MONTAGE.FPN.ERF_LEVEL_BUDGET = 0
    # A BN-family MODEL.FPN.NORM of pre-training is folded into the FPN convs' weights and biases
    # at export (eval statistics), so that stock FPN detectors (MODEL.FPN.NORM "") load the
    # pyramid and compute what it computed. An unnormalised pyramid diverged within 10
    # iterations at 512 montages and the paper's LR 0.8 (issue 21; project README, "Pyramid
    # pre-training"); a normalised one trains there.
    _C.MONTAGE.FPN.FOLD_NORM = True


# SOLVER.BASE_LR per montage of the batch: the paper's 0.8 for 512 montages.
PAPER_LR_PER_MONTAGE = 0.8 / 512


def assert_montage_cfg(cfg, world_size=1):
    """
    Checks cross-key invariants of a Montage pre-training config and adapts it to the machine,
    in place (the cfg must not be frozen). Raises ValueError with a one-line message naming the
    key and the fix.

    Adaptations (each logged): SyncBN on a single process becomes BN (SyncBN needs a process
    group; on one device it is plain BN anyway); AMP without CUDA is switched off;
    MODEL.DEVICE "cuda" without CUDA falls back to "cpu".
    """
    import logging

    import torch

    logger = logging.getLogger(__name__)
    m = cfg.MONTAGE
    if m.LOSS not in ("erf", "blockwise", "global", "single"):
        raise ValueError(f"MONTAGE.LOSS={m.LOSS!r}: use erf, blockwise, global or single")
    if not 0.0 <= m.TAU <= 1.0:
        raise ValueError(f"MONTAGE.TAU={m.TAU}: must lie in [0, 1] (the paper uses 0.7)")
    if int(m.LOG_PERIOD) < 1:
        raise ValueError(f"MONTAGE.LOG_PERIOD={m.LOG_PERIOD}: use >= 1 (iterations between the "
                         "training monitors; 20 is the default)")
    MontageTemplate.from_config(cfg)  # checks MONTAGE.SPLIT against MONTAGE.INPUT_SIZE
    if cfg.INPUT.FORMAT != "RGB":
        # The bank decodes crops to RGB (SampleBank.decode) and the export records INPUT.FORMAT
        # for fine-tuning: any other value would hand off the wrong channel order.
        raise ValueError(
            f"INPUT.FORMAT={cfg.INPUT.FORMAT!r}: Montage pre-training feeds RGB crops; set "
            "INPUT.FORMAT RGB (with MODEL.PIXEL_MEAN/STD in RGB order, configs/Base-RGB.yaml)"
        )
    if m.EXPORT_WEIGHT_SCALE not in ("init", "trained"):
        raise ValueError(f"MONTAGE.EXPORT_WEIGHT_SCALE={m.EXPORT_WEIGHT_SCALE!r}: use init (the "
                         "default) or trained")
    if m.COLLAPSE.ACTION not in ("stop", "warn"):
        raise ValueError(f"MONTAGE.COLLAPSE.ACTION={m.COLLAPSE.ACTION!r}: use stop (the default) "
                         "or warn")
    if int(m.COLLAPSE.NUM_IMAGES) < 1:
        raise ValueError(f"MONTAGE.COLLAPSE.NUM_IMAGES={m.COLLAPSE.NUM_IMAGES}: use >= 1 "
                         "(montages of the guard's fixed set; 16 is the default)")
    if int(m.COLLAPSE.PERIOD) < 0 or not 0.0 <= m.COLLAPSE.MIN_PR_RATIO < 1.0:
        raise ValueError(f"MONTAGE.COLLAPSE.PERIOD={m.COLLAPSE.PERIOD}, MIN_PR_RATIO="
                         f"{m.COLLAPSE.MIN_PR_RATIO}: use a period >= 0 (0 = off) and a ratio in "
                         "[0, 1) (0.1 is the default)")
    if not 0.0 < m.COLLAPSE.MAX_DEAD <= 1.0:
        raise ValueError(f"MONTAGE.COLLAPSE.MAX_DEAD={m.COLLAPSE.MAX_DEAD}: use a fraction in "
                         "(0, 1] (0.5 is the default)")
    if not m.BANK:
        raise ValueError("MONTAGE.BANK is empty: pass MONTAGE.BANK path/to/bank.h5 (make samples)")
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
            f"{world_size} processes; choose a multiple of {world_size}"
        )
    if cfg.SOLVER.WARMUP_ITERS >= cfg.SOLVER.MAX_ITER:
        raise ValueError(
            f"SOLVER.WARMUP_ITERS={cfg.SOLVER.WARMUP_ITERS} must be below SOLVER.MAX_ITER="
            f"{cfg.SOLVER.MAX_ITER}: the cosine phase follows the warm-up"
        )
    # The paper's 0.8 for 512 montages, scaled linearly; well above it the features collapsed
    # while the loss looked normal (projects/MontagePretrain/README.md, "Investigation").
    scaled = PAPER_LR_PER_MONTAGE * cfg.SOLVER.IMS_PER_BATCH
    if cfg.SOLVER.BASE_LR > 1.5 * scaled:
        logger.warning(
            "SOLVER.BASE_LR=%g is %.1fx the paper's LR scaled to %d montages (%g); from 2x on the "
            "features collapsed in our runs: check the export with scripts/feature_rank.py or "
            "lower it",
            cfg.SOLVER.BASE_LR, cfg.SOLVER.BASE_LR / scaled, cfg.SOLVER.IMS_PER_BATCH, scaled)
    norm = cfg.MODEL.RESNETS.NORM
    if norm not in TRAINABLE_NORMS:
        # FrozenBN (or no norm) cannot train a ResNet from random init; GN is Detectron2's
        # GroupNorm(32, C), the only group count its "GN" builds.
        raise ValueError(
            f"MODEL.RESNETS.NORM={norm!r}: pre-training starts from random init and needs a "
            f"trainable norm; use one of {', '.join(TRAINABLE_NORMS)} (BN for BN/FrozenBN "
            "detectors, GN for GN detectors)"
        )
    if norm in ("SyncBN", "naiveSyncBN") and world_size == 1:
        logger.warning("MODEL.RESNETS.NORM=%s on one process: using plain BN", cfg.MODEL.RESNETS.NORM)
        cfg.MODEL.RESNETS.NORM = "BN"
    if cfg.MODEL.META_ARCHITECTURE == "MontageFPNClassifier":
        fpn_norm = cfg.MODEL.FPN.NORM
        if fpn_norm in ("SyncBN", "naiveSyncBN") and world_size == 1:
            logger.warning("MODEL.FPN.NORM=%s on one process: using plain BN", fpn_norm)
            cfg.MODEL.FPN.NORM = "BN"
        elif not fpn_norm:
            logger.warning(
                "MODEL.FPN.NORM is empty: the pyramid and head train unnormalised at the "
                "backbone's LR (%g), which diverged within 10 iterations at 512 montages and LR "
                "0.8; use BN (folded into the export, which stock FPN detectors load)",
                cfg.SOLVER.BASE_LR)
    if not torch.cuda.is_available():
        if cfg.MODEL.DEVICE.startswith("cuda"):
            logger.warning("CUDA is not available: MODEL.DEVICE=cpu")
            cfg.MODEL.DEVICE = "cpu"
        if cfg.SOLVER.AMP.ENABLED:
            logger.warning("CUDA is not available: SOLVER.AMP.ENABLED=False")
            cfg.SOLVER.AMP.ENABLED = False
    return cfg


def bank_iterations(passes, num_crops, montages):
    """Iterations for ``passes`` passes over a bank of ``num_crops`` crops at ``montages``
    montages a step (4 crops a montage): ceil(passes x crops / (4 x montages)), at least 2 (a
    warm-up needs an iteration after it)."""
    return max(2, -(-int(passes * num_crops) // (4 * int(montages))))


def command_line_length(cfg, opts):
    """
    An explicit ``SOLVER.MAX_ITER`` in ``opts`` (the command line's KEY VALUE list) wins over a
    config's ``MONTAGE.BANK_PASSES``: sets it to 0 in place and returns a line for the log (None
    when nothing changed). Both given in ``opts``, with passes > 0: ValueError, one line (which
    one the user meant is not ours to guess).
    """
    keys = list(opts[0::2])
    if "SOLVER.MAX_ITER" not in keys or not cfg.MONTAGE.BANK_PASSES:
        return None
    if "MONTAGE.BANK_PASSES" in keys:
        raise ValueError(
            f"SOLVER.MAX_ITER and MONTAGE.BANK_PASSES={cfg.MONTAGE.BANK_PASSES} are both on the "
            "command line: give one (MONTAGE.BANK_PASSES 0 runs SOLVER.MAX_ITER as written)")
    note = (f"SOLVER.MAX_ITER={cfg.SOLVER.MAX_ITER} from the command line: MONTAGE.BANK_PASSES "
            f"{cfg.MONTAGE.BANK_PASSES} -> 0 (the schedule as written, not sized to the bank)")
    cfg.MONTAGE.BANK_PASSES = 0
    return note


def fit_schedule_to_bank(cfg, num_crops):
    """
    ``MONTAGE.BANK_PASSES`` > 0: sizes the schedule to ``num_crops`` (the bank's crops), in
    place (the cfg must not be frozen): MAX_ITER = ceil(passes x crops / (4 crops a montage x
    IMS_PER_BATCH montages)); WARMUP_ITERS, STEPS, MONTAGE.ERF_PERIOD and CHECKPOINT_PERIOD
    scaled by the same factor (each at least 1). Returns that factor (1.0 when off).
    """
    passes = int(cfg.MONTAGE.BANK_PASSES)
    if passes < 0 or num_crops < 1:
        raise ValueError(f"MONTAGE.BANK_PASSES={passes} over a bank of {num_crops} crops: use "
                         "passes >= 0 (0 = SOLVER.MAX_ITER as written) and a non-empty bank")
    if passes == 0:
        return 1.0
    import logging

    s = cfg.SOLVER
    iters, written = bank_iterations(passes, num_crops, s.IMS_PER_BATCH), s.MAX_ITER
    factor = iters / written

    def scaled(n):  # n x iters / MAX_ITER as written, rounded from the exact integer product
        return max(1, round(n * iters / written))

    old = (s.MAX_ITER, s.WARMUP_ITERS, cfg.MONTAGE.ERF_PERIOD)
    s.MAX_ITER = iters
    s.WARMUP_ITERS = min(scaled(s.WARMUP_ITERS), iters - 1) if s.WARMUP_ITERS else 0
    s.STEPS = tuple(scaled(n) for n in s.STEPS)
    s.CHECKPOINT_PERIOD = scaled(s.CHECKPOINT_PERIOD)
    cfg.MONTAGE.ERF_PERIOD = scaled(cfg.MONTAGE.ERF_PERIOD)
    logging.getLogger(__name__).info(
        "MONTAGE.BANK_PASSES=%d over %d crops at %d montages a step: SOLVER.MAX_ITER %d -> %d, "
        "WARMUP_ITERS %d -> %d, MONTAGE.ERF_PERIOD %d -> %d", passes, num_crops,
        s.IMS_PER_BATCH, old[0], iters, old[1], s.WARMUP_ITERS, old[2], cfg.MONTAGE.ERF_PERIOD)
    return factor


# ---------------------------------------------------------------------------------------------
# Fine-tuning configs: stock model-zoo bases
# ---------------------------------------------------------------------------------------------
__all__ += ["MODEL_ZOO_PREFIX", "ConfigFileError", "resolve_model_zoo_path", "merge_config_file"]

# A _BASE_ (or config path) ``model_zoo://REL`` names the stock config REL inside the installed
# detectron2 package, whose location a relative _BASE_ cannot know.
MODEL_ZOO_PREFIX = "model_zoo://"


def _stock_config_dir():
    """The installed ``detectron2/model_zoo/configs`` folder."""
    import importlib.util
    import os

    # find_spec locates the package without importing it (its import pulls in pkg_resources).
    spec = importlib.util.find_spec("detectron2.model_zoo")
    return os.path.join(list(spec.submodule_search_locations)[0], "configs")


def resolve_model_zoo_path(path):
    """
    Maps ``model_zoo://REL`` (also after being joined to a folder by ``_BASE_`` resolution) to
    the stock config file ``REL`` inside the installed ``detectron2/model_zoo/configs``.
    Other paths are returned unchanged.
    """
    import os

    if MODEL_ZOO_PREFIX not in path:
        return path
    rel = path.split(MODEL_ZOO_PREFIX, 1)[1]
    full = os.path.join(_stock_config_dir(), rel)
    if not os.path.isfile(full):
        raise FileNotFoundError(
            f"{MODEL_ZOO_PREFIX}{rel}: no such stock config in {os.path.dirname(full)}; "
            "check the name against detectron2/model_zoo/configs."
        )
    return full


class ConfigFileError(ValueError):
    """A config file that is refused (it would run code when loaded): one line, file and fix."""


def _is_stock_config(path):
    """True for a file inside the installed ``detectron2/model_zoo/configs`` (trusted like the
    package's code: ``Base-RetinaNet.yaml`` computes its anchor sizes with a python/eval tag)."""
    import os

    stock = os.path.realpath(_stock_config_dir())
    return os.path.commonpath([stock, os.path.realpath(path)]) == stock


class _ModelZooCfgNode(CN):
    """
    A CfgNode whose ``_BASE_`` may name a stock config as ``model_zoo://REL`` and whose YAML is
    loaded safely: ``yaml.safe_load`` only, except for stock configs and ``UNSAFE_OPT_IN``.
    """

    # Set on the subclass that merge_config_file(..., allow_unsafe=True) uses.
    UNSAFE_OPT_IN = False

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        import re

        import yaml

        path = resolve_model_zoo_path(filename)
        # fvcore passes a file's allow_unsafe down its _BASE_ chain: ignore it and decide per
        # file, so a trusted stock config cannot lend its trust to anything else.
        unsafe = cls.UNSAFE_OPT_IN or _is_stock_config(path)
        try:
            return super().load_yaml_with_base(path, allow_unsafe=unsafe)
        except yaml.constructor.ConstructorError as e:
            found = re.search(r"tag:yaml\.org,2002:([^'\s]+)", e.problem or "")
            tag = f" (!!{found.group(1)})" if found else ""
            raise ConfigFileError(
                f"{path}: refusing a YAML tag that runs Python code when loaded{tag}, line "
                f"{e.problem_mark.line + 1 if e.problem_mark else '?'}. Fix: write the value as "
                "plain YAML (numbers, strings, lists); only for a file you trust, pass "
                "allow_unsafe=True to merge_config_file."
            ) from e


class _UnsafeModelZooCfgNode(_ModelZooCfgNode):
    """The explicit opt-in: ``yaml.unsafe_load`` for files ``yaml.safe_load`` refuses."""

    UNSAFE_OPT_IN = True


def merge_config_file(cfg, path, allow_unsafe=False):
    """
    Merges a YAML config into ``cfg`` like ``cfg.merge_from_file``, resolving ``model_zoo://``.

    Unlike Detectron2's ``merge_from_file`` (``allow_unsafe=True`` by default), every file of the
    ``_BASE_`` chain is read with ``yaml.safe_load``: a ``!!python/...`` tag, which would run
    code, is refused with one line naming the file. The stock configs of the installed
    detectron2 package are trusted like its code.

    Args:
        cfg (CfgNode): e.g. ``get_cfg()`` with ``add_montage_config`` applied.
        path (str): YAML file; its ``_BASE_`` chain may use ``model_zoo://`` and relative paths.
        allow_unsafe (bool): the explicit opt-in to ``yaml.unsafe_load`` (files you trust only).

    Returns:
        CfgNode: ``cfg``, merged in place.

    Raises:
        ConfigFileError: a file of the chain holds a Python tag and ``allow_unsafe`` is False.
    """
    import os

    if not os.path.isfile(path) and MODEL_ZOO_PREFIX not in path:
        raise FileNotFoundError(f"Config file not found: {path}")
    loader = _UnsafeModelZooCfgNode if allow_unsafe else _ModelZooCfgNode
    loaded = loader.load_yaml_with_base(path)
    loaded = type(cfg)(loaded)
    if loaded.get("VERSION", cfg.VERSION) != cfg.VERSION:
        raise ValueError(
            f"{path} has VERSION {loaded.VERSION}, expected {cfg.VERSION}; "
            "use cfg.merge_from_file for legacy configs."
        )
    cfg.merge_from_other_cfg(loaded)
    return cfg

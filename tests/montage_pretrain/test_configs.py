"""Every YAML config of the project loads, and the solver matches the paper's defaults."""
import glob
import os

import pytest

from detectron2.config import get_cfg
from montage_pretrain.config import (add_montage_config, assert_montage_cfg, fit_schedule_to_bank,
                                     merge_config_file)

PROJECT = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "MontagePretrain")
ALL_CONFIGS = sorted(glob.glob(os.path.join(PROJECT, "configs", "**", "*.yaml"), recursive=True))
PIXEL_FORMAT = os.path.join(PROJECT, "configs", "Base-RGB.yaml")
PRETRAIN_CONFIGS = [p for p in ALL_CONFIGS
                    if os.sep + "finetune" + os.sep not in p and p != PIXEL_FORMAT]


def load(path):
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=os.path.basename)
def test_pretrain_config_loads(path, caplog):
    cfg = load(path)
    # backbone only, or backbone + pyramid (configs with an FPN MODEL.BACKBONE.NAME)
    assert cfg.MODEL.META_ARCHITECTURE == (
        "MontageFPNClassifier" if "fpn" in cfg.MODEL.BACKBONE.NAME else "MontageClassifier")
    assert cfg.MODEL.WEIGHTS == ""  # from scratch, nothing downloaded
    cfg.MONTAGE.BANK = "bank.h5"
    assert_montage_cfg(cfg, world_size=1)
    assert "BASE_LR" not in caplog.text  # every shipped LR is within 1.5x of the scaled paper LR
    assert cfg.MODEL.RESNETS.NORM != "SyncBN"  # fell back to BN on one process


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=os.path.basename)
def test_every_config_inherits_the_one_pixel_format(path):
    """Pre-training and fine-tuning configs take MODEL.PIXEL_* / INPUT.FORMAT from Base-RGB.yaml."""
    with open(path) as f:
        text = f.read()
    if path != PIXEL_FORMAT:
        assert "PIXEL_MEAN" not in text and "FORMAT:" not in text, "declare it in Base-RGB.yaml"
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, path)
    fmt = load(PIXEL_FORMAT)
    assert (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT) == (
        fmt.MODEL.PIXEL_MEAN, fmt.MODEL.PIXEL_STD, "RGB")


def test_paper_defaults():
    cfg = load(os.path.join(PROJECT, "configs", "montage_R_50.yaml"))
    s = cfg.SOLVER
    assert (s.MAX_ITER, s.IMS_PER_BATCH, s.WARMUP_ITERS) == (64000, 512, 1250)
    assert s.BASE_LR * s.WARMUP_FACTOR == pytest.approx(0.2) and s.BASE_LR == 0.8
    assert s.WEIGHT_DECAY == 1e-4 and s.MOMENTUM == 0.9
    assert cfg.MONTAGE.TAU == 0.7 and cfg.MONTAGE.ERF_PERIOD == 5000
    assert cfg.MODEL.RESNETS.DEPTH == 50


def test_lr_schedule_is_warmup_then_cosine_to_zero():
    """0.2 -> 0.8 linearly over 1250 iterations, then cosine from 0.8 to 0 over the rest."""
    import math

    import torch
    from detectron2.solver import build_lr_scheduler

    cfg = load(os.path.join(PROJECT, "configs", "montage_R_50.yaml"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(cfg.SOLVER.MAX_ITER):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[625] == pytest.approx(0.5, abs=1e-3)
    assert lrs[1250] == pytest.approx(0.8, abs=1e-4)
    mid = 1250 + (64000 - 1250) // 2
    assert lrs[mid] == pytest.approx(0.4, abs=1e-3)
    assert lrs[-1] < 1e-5
    t = (40000 - 1250) / (64000 - 1250)
    assert lrs[40000] == pytest.approx(0.4 * (1 + math.cos(math.pi * t)), abs=1e-4)


def test_bank_passes_sizes_the_schedule_to_the_bank():
    """MONTAGE.BANK_PASSES, 139 in every shipped pre-training config: the paper's config over a
    COCO-sized bank (946k crops) keeps its 64k iterations; over chess's 2,319 crops the toy
    config shrinks warm-up, ERF period, checkpoints and steps by the same factor, and warm-up and
    ERF period land at the paper's shares (1,250 and 5,000 of 64k); 0 leaves the config as
    written."""
    cfg = load(os.path.join(PROJECT, "configs", "montage_R_50.yaml"))
    assert cfg.MONTAGE.BANK_PASSES == 139 and cfg.SOLVER.MAX_ITER == 64000
    plain = cfg.clone()
    plain.MONTAGE.BANK_PASSES = 0
    assert fit_schedule_to_bank(plain, 2319) == 1.0 and plain.SOLVER.MAX_ITER == 64000
    fit_schedule_to_bank(cfg, 946_000)
    assert cfg.SOLVER.MAX_ITER == 64207  # ceil(139 x 946k / (4 x 512))
    assert (cfg.SOLVER.WARMUP_ITERS, cfg.MONTAGE.ERF_PERIOD) == (1254, 5016)

    cfg = load(os.path.join(PROJECT, "configs", "demo", "montage_R_18_toy.yaml"))
    assert cfg.MONTAGE.BANK_PASSES == 139
    cfg.merge_from_list(["SOLVER.STEPS", (200,)])
    factor = fit_schedule_to_bank(cfg, 2319)
    s = cfg.SOLVER
    assert s.MAX_ITER == 5037 and factor == pytest.approx(5037 / 1280)  # 16 montages a step
    assert (s.WARMUP_ITERS, cfg.MONTAGE.ERF_PERIOD, s.CHECKPOINT_PERIOD, s.STEPS) == (
        round(25 * factor), round(100 * factor), round(200 * factor), (round(200 * factor),))
    assert (s.WARMUP_ITERS, cfg.MONTAGE.ERF_PERIOD) == (
        round(5037 * 1250 / 64000), round(5037 * 5000 / 64000)) == (98, 394)
    cfg = load(os.path.join(PROJECT, "configs", "demo", "montage_R_18_toy.yaml"))
    cfg.MONTAGE.BANK_PASSES = 1
    fit_schedule_to_bank(cfg, 65)  # shrinking keeps every period >= 1, warm-up below MAX_ITER
    assert cfg.SOLVER.MAX_ITER == 2 and cfg.SOLVER.WARMUP_ITERS == 1
    assert cfg.MONTAGE.ERF_PERIOD >= 1 and cfg.SOLVER.CHECKPOINT_PERIOD >= 1
    cfg.MONTAGE.BANK_PASSES = -1
    with pytest.raises(ValueError, match="MONTAGE.BANK_PASSES") as e:
        fit_schedule_to_bank(cfg, 65)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,match", [
    ("MONTAGE.LOSS", "dense", "MONTAGE.LOSS"),
    ("MONTAGE.TAU", 1.5, "MONTAGE.TAU"),
    ("MONTAGE.SPLIT", 0.4, "MONTAGE.SPLIT"),
    ("INPUT.FORMAT", "BGR", "INPUT.FORMAT"),
    ("SOLVER.IMS_PER_BATCH", 7, "divisible"),
    ("MODEL.RESNETS.NORM", "FrozenBN", "trainable norm"),
    ("MODEL.RESNETS.NORM", "", "trainable norm"),
])
def test_bad_config_gives_one_line_error(key, value, match):
    cfg = load(os.path.join(PROJECT, "configs", "montage_R_50.yaml"))
    cfg.MONTAGE.BANK = "bank.h5"
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=match) as e:
        assert_montage_cfg(cfg, world_size=2)
    assert "\n" not in str(e.value)


def test_lr_far_above_linear_scaling_warns(caplog):
    cfg = load(os.path.join(PROJECT, "configs", "demo", "montage_R_18_toy.yaml"))
    cfg.MONTAGE.BANK = "bank.h5"
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == pytest.approx(0.8 * 16 / 512)
    assert_montage_cfg(cfg, world_size=1)
    assert "BASE_LR" not in caplog.text
    cfg.SOLVER.BASE_LR = 0.035  # 1.4x: tolerated
    assert_montage_cfg(cfg, world_size=1)
    assert "BASE_LR" not in caplog.text
    cfg.SOLVER.BASE_LR = 0.1  # 4x: the setting whose features collapsed
    assert_montage_cfg(cfg, world_size=1)
    lines = [r.getMessage() for r in caplog.records if "BASE_LR" in r.getMessage()]
    assert len(lines) == 1 and "4.0x" in lines[0] and "\n" not in lines[0]


@pytest.mark.parametrize("pretrain,finetune", [
    ("montage_R_50.yaml", "faster_rcnn_R_50_C4_1x_montage.yaml"),
    ("montage_R_50.yaml", "faster_rcnn_R_50_FPN_1x_montage.yaml"),
    ("montage_R_101.yaml", "faster_rcnn_R_101_C4_1x_montage.yaml"),
    ("montage_X101_32x4d.yaml", "faster_rcnn_X_101_32x4d_C4_1x_montage.yaml"),
    ("montage_R_50_gn.yaml", "faster_rcnn_R_50_C4_1x_montage_gn.yaml"),
    ("montage_R_50_gn.yaml", "faster_rcnn_R_50_FPN_1x_montage_gn.yaml"),
    ("montage_R_50_gn.yaml", "mask_rcnn_R_50_FPN_3x_montage_gn.yaml"),
    ("demo/montage_R_18_toy_gn.yaml", "demo/faster_rcnn_R_18_FPN_toy_gn.yaml"),
    ("demo/montage_R_18_toy.yaml", "demo/faster_rcnn_R_18_FPN_toy.yaml"),
])
def test_finetune_config_matches_its_pretraining_export(pretrain, finetune):
    """Each fine-tuning leaf accepts what its pre-training config records in the export."""
    from montage_pretrain.export_format import ExportFile, check_export_settings, export_settings

    pre = load(os.path.join(PROJECT, "configs", pretrain))
    pre.MONTAGE.BANK = "bank.h5"
    assert_montage_cfg(pre, world_size=1)
    export = ExportFile("x.pkl", {"model": {}}, export_settings(pre, iteration=1))
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, os.path.join(PROJECT, "configs", "finetune", finetune))
    assert check_export_settings(cfg, export) is not None
    cfg.MODEL.RESNETS.NUM_GROUPS = 8  # a shape the export does not have: one-line error
    with pytest.raises(ValueError, match="NUM_GROUPS"):
        check_export_settings(cfg, export)


def test_scratch_c4_twin_uses_gn_in_backbone_and_head():
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, os.path.join(PROJECT, "configs", "finetune",
                                        "scratch_faster_rcnn_R_50_C4_1x_gn.yaml"))
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads" and cfg.MODEL.RESNETS.NORM == "GN"
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0


@pytest.mark.parametrize("bn,gn", [
    ("montage_R_50.yaml", "montage_R_50_gn.yaml"),
    ("demo/montage_R_18_toy.yaml", "demo/montage_R_18_toy_gn.yaml"),
    ("finetune/faster_rcnn_R_50_FPN_1x_montage.yaml", "finetune/faster_rcnn_R_50_FPN_1x_montage_gn.yaml"),
    ("finetune/faster_rcnn_R_50_C4_1x_montage.yaml", "finetune/faster_rcnn_R_50_C4_1x_montage_gn.yaml"),
    ("finetune/demo/faster_rcnn_R_18_FPN_toy.yaml", "finetune/demo/faster_rcnn_R_18_FPN_toy_gn.yaml"),
])
def test_gn_twins_differ_from_bn_configs_in_norms(bn, gn):
    """A GN twin has GN wherever the detector has a norm, and keeps the BN config's schedule."""
    def get(path):
        cfg = get_cfg()
        add_montage_config(cfg)
        merge_config_file(cfg, os.path.join(PROJECT, "configs", path))
        return cfg

    b, g = get(bn), get(gn)
    assert g.MODEL.RESNETS.NORM == "GN" and b.MODEL.RESNETS.NORM != "GN"
    assert g.MODEL.WEIGHTS == "" or "gn" in g.MODEL.WEIGHTS  # never a BN export's path
    if "FPN" in g.MODEL.BACKBONE.NAME.upper():
        assert g.MODEL.FPN.NORM == "GN"
    if g.MODEL.META_ARCHITECTURE == "MontageClassifier":
        assert not g.TEST.PRECISE_BN.ENABLED  # nothing to recompute
    for key in ("SOLVER.MAX_ITER", "SOLVER.BASE_LR", "SOLVER.IMS_PER_BATCH", "INPUT.FORMAT",
                "MODEL.RESNETS.DEPTH", "MODEL.PIXEL_MEAN"):
        a, c = b, g
        for part in key.split("."):
            a, c = a[part], c[part]
        assert a == c, key


def test_gn_detector_twin_differs_from_scratch_only_in_weights():
    def get(path):
        cfg = get_cfg()
        add_montage_config(cfg)
        merge_config_file(cfg, os.path.join(PROJECT, "configs", "finetune", "demo", path))
        return cfg

    scratch, gn = get("faster_rcnn_R_18_FPN_toy_scratch.yaml"), get("faster_rcnn_R_18_FPN_toy_gn.yaml")
    assert gn.MODEL.WEIGHTS and not scratch.MODEL.WEIGHTS
    gn.MODEL.WEIGHTS = ""
    assert gn.dump() == scratch.dump()

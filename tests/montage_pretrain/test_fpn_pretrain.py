"""Pyramid pre-training (MontageFPNClassifier): per-level region maps and ERF weights
(hand-checked), the level-weighted loss, the backbone + pyramid export into stock FPN detectors,
the config and settings checks, train_net end to end, the benchmark's pyramid / backbone ratio."""
import os
import pickle

import pytest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_backbone, build_model
from detectron2.utils.events import EventStorage

from finetune_helpers import FINETUNE, TOY, finetune_cfg
from montage_pretrain import MontageFPNClassifier, MontageStream, add_montage_config
from montage_pretrain import collate_montages
from montage_pretrain.config import merge_config_file
from montage_pretrain.erf import compute_erf_maps, compute_erf_region_mass, pack_levels
from montage_pretrain.export import FOLDABLE_NORMS, export_backbone
from montage_pretrain.export import main as export_main
from montage_pretrain.export_format import PYRAMID_SETTING_KEYS, read_export
from montage_pretrain.loading import load_and_verify, read_checked_weights
from montage_pretrain.losses import erf_dense_loss
from montage_pretrain.montage import MontageTemplate

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "MontagePretrain",
                       "configs")
DEMO = os.path.join(CONFIGS, "demo", "montage_R_18_FPN_toy.yaml")
R50_FPN = os.path.join(CONFIGS, "montage_R_50_FPN.yaml")
LEVELS = ["p2", "p3", "p4", "p5"]
# Detectron2's FPN over res2..res5: fpn_lateral{2..5} + fpn_output{2..5}, weight + bias each.
FPN_TENSORS = 16

pytestmark = pytest.mark.usefixtures("one_thread")


def fpn_cfg(bank, *opts, config=DEMO, size=64):
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, config)
    cfg.merge_from_list(["MONTAGE.BANK", bank, "MODEL.DEVICE", "cpu", "MONTAGE.INPUT_SIZE",
                         str(size), *opts])
    return cfg


def batch_of(bank, n, seed=0):
    stream = iter(MontageStream(bank, crops_per_image=4, seed=seed))
    return collate_montages([next(stream) for _ in range(n)])


def randomise_(module):
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif not name.endswith("num_batches_tracked"):
                t.normal_(0.0, 0.1)
    return module


def pyramid_export(cfg, path, seed=0):
    """Exports a pyramid pre-training of ``cfg`` whose every backbone tensor is random."""
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.backbone = randomise_(build_backbone(cfg))
    return export_backbone(model, cfg, str(path), iteration=11), model


# ---------------------------------------------------------------------------------------------
# Region maps and ERF weights per level
# ---------------------------------------------------------------------------------------------
def test_level_region_maps_hand_checked(bank_path):
    # 64 px, SPLIT 0.3: a = 19 px. Level of stride s: position j is centred at (j + 0.5) s and
    # is top/left iff that is < 19: p2 (s 4) j <= 4, p3 (s 8) j <= 1, p4 (s 16) and p5 j = 0.
    model = build_model(fpn_cfg(bank_path))
    assert isinstance(model, MontageFPNClassifier) and model.levels == LEVELS
    assert model._slices == {"p2": (0, 16, 16), "p3": (256, 8, 8), "p4": (320, 4, 4),
                             "p5": (336, 2, 2)}
    assert model.region_map.shape == (340,) and model.erf_weights.shape == (4, 340)
    assert model.level_view(model.region_map, "p5").tolist() == [[0, 1], [2, 3]]
    assert model.level_view(model.region_map, "p4").tolist() == [
        [0, 1, 1, 1], [2, 3, 3, 3], [2, 3, 3, 3], [2, 3, 3, 3]]
    p3 = model.level_view(model.region_map, "p3")
    assert p3[0].tolist() == p3[1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(row.tolist() == [2, 2, 3, 3, 3, 3, 3, 3] for row in p3[2:])
    counts = {k: torch.bincount(model.level_view(model.region_map, k).flatten(), minlength=4)
              .tolist() for k in LEVELS}
    assert counts == {"p2": [25, 55, 55, 121], "p3": [4, 12, 12, 36], "p4": [1, 3, 3, 9],
                      "p5": [1, 1, 1, 1]}
    # before the first refresh: block-wise targets, one-hot of the own region
    own = model.erf_weights.gather(0, model.region_map[None])[0]
    assert torch.equal(own, torch.ones(340)) and torch.equal(model.erf_weights.sum(0), own)
    assert int(model.erf_iter) == -1

    # The demo canvas (128 px, a = 38): p5 4x4 splits 1x1 / 1x3 / 3x1 / 3x3, p2 32x32 9 | 23.
    model = build_model(fpn_cfg(bank_path, size=128))
    counts = {k: torch.bincount(model.level_view(model.region_map, k).flatten(), minlength=4)
              .tolist() for k in LEVELS}
    assert counts["p5"] == [1, 3, 3, 9] and counts["p2"] == [81, 207, 207, 529]


class PoolPyramid(Backbone):
    """Two 'levels' of average pooling (kernel = stride = 2 and 4): each position's ERF is
    uniform on its s x s block, so its region shares are areas, countable by hand."""

    def forward(self, x):
        return {"s2": F.avg_pool2d(x, 2), "s4": F.avg_pool2d(x, 4)}

    def output_shape(self):
        return {"s2": ShapeSpec(channels=3, stride=2), "s4": ShapeSpec(channels=3, stride=4)}


def test_level_erf_weights_hand_checked():
    # 12 px canvas, SPLIT 0.25: a = 3 (T region 3x9, W 9x3). tau = 0.7.
    model = MontageFPNClassifier(
        backbone=PoolPyramid(), num_classes=3, template=MontageTemplate(12, 0.25),
        levels=["s2", "s4"], pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3, tau=0.7)
    crops = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    batch = dict(crops=crops, sizes=torch.full((4, 2), 16), labels=torch.tensor([[0, 1, 2, 3]]))
    shares = model.refresh_erf_weights(batch, iteration=4)
    assert int(model.erf_iter) == 4 and shares.shape == (36 + 9, 4)
    s4 = model.level_view(model.erf_weights, "s4").permute(1, 2, 0)  # (3, 3, 4)
    # stride 4: blocks [0, 4) [4, 8) [8, 12); centres 2, 6, 10 -> only 2 < 3 is top/left.
    assert model.level_view(model.region_map, "s4").tolist() == [[0, 1, 1], [2, 3, 3], [2, 3, 3]]
    # (0, 0): block rows/cols 0..3 = TL 3x3 = 9 px, TR 3x1, BL 1x3, BR 1x1 -> shares 9:3:3:1 /16;
    # own TL 9/16 < tau -> 0.7, the others split 0.3 as 3:3:1.
    assert torch.allclose(shares[36], torch.tensor([9, 3, 3, 1], dtype=torch.float64) / 16)
    torch.testing.assert_close(s4[0, 0], torch.tensor([0.7, 0.9 / 7, 0.9 / 7, 0.3 / 7]))
    # (0, 1), (0, 2): rows 0..2 TR (12 px), row 3 BR (4 px): own TR 0.75 > tau, kept as is.
    for pos in ((0, 1), (0, 2)):
        torch.testing.assert_close(s4[pos], torch.tensor([0.0, 0.75, 0.0, 0.25]))
    for pos in ((1, 0), (2, 0)):  # cols 0..2 BL, col 3 BR
        torch.testing.assert_close(s4[pos], torch.tensor([0.0, 0.0, 0.75, 0.25]))
    for pos in ((1, 1), (1, 2), (2, 1), (2, 2)):  # inside BR
        torch.testing.assert_close(s4[pos], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    # stride 2: blocks [0, 2) [2, 4) ...; the split at 3 cuts the second block of each axis, and
    # a centre on the split (3) belongs to the right / lower region.
    s2 = model.level_view(model.erf_weights, "s2").permute(1, 2, 0)  # (6, 6, 4)
    torch.testing.assert_close(s2[0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # all TL
    torch.testing.assert_close(s2[0, 1], torch.tensor([0.3, 0.7, 0.0, 0.0]))  # TL|TR, own TR
    torch.testing.assert_close(s2[1, 0], torch.tensor([0.3, 0.0, 0.7, 0.0]))  # TL/BL, own BL
    torch.testing.assert_close(s2[1, 1], torch.tensor([0.1, 0.1, 0.1, 0.7]))  # 1 px each, own BR
    torch.testing.assert_close(s2[0, 4], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # all TR
    torch.testing.assert_close(s2[5, 5], torch.tensor([0.0, 0.0, 0.0, 1.0]))  # all BR
    torch.testing.assert_close(model.erf_weights.sum(0), torch.ones(45))


def test_region_mass_equals_the_maps_per_level_and_images_per_position():
    """compute_erf_region_mass (batched VJPs, reduced on the fly) = compute_erf_maps (one copy per
    position) reduced by region; a packed pyramid level = that level alone."""
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
                         "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.RESNETS.NORM", "BN", "MODEL.RESNETS.OUT_FEATURES", str(
                             ["res2", "res3", "res4", "res5"]), "MODEL.FPN.IN_FEATURES", str(
                             ["res2", "res3", "res4", "res5"]), "MODEL.FPN.OUT_CHANNELS", "32"])
    torch.manual_seed(0)
    net = build_backbone(cfg).eval()
    trainable = [p.requires_grad for p in net.parameters()]  # FREEZE_AT 2: stem, res2 frozen
    images = torch.randn(2, 3, 32, 32)
    masks = MontageTemplate(32, 0.3).region_masks()
    fn = lambda x: pack_levels(net(x), LEVELS)  # noqa: E731
    maps = compute_erf_maps(fn, images, chunk=32)  # (85, 32, 32): 64 + 16 + 4 + 1 positions
    want = torch.einsum("phw,rhw->pr", maps.double(), masks.double())
    got = compute_erf_region_mass(fn, images, masks, chunk=13, module=net)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert [p.requires_grad for p in net.parameters()] == trainable  # restored
    p4 = compute_erf_maps(lambda x: net(x)["p4"], images)
    torch.testing.assert_close(maps[80:84], p4, rtol=1e-5, atol=1e-9)
    # the first 80 positions average over image 0 only
    counts = torch.tensor([1] * 80 + [2] * 5)
    first = compute_erf_maps(fn, images[:1], chunk=32)
    want = torch.cat([first[:80], maps[80:]])
    got = compute_erf_region_mass(fn, images, masks, images_per_position=counts)
    torch.testing.assert_close(got, torch.einsum("phw,rhw->pr", want.double(), masks.double()),
                               rtol=1e-5, atol=1e-9)


def test_erf_level_budget_caps_montages_per_level(bank_path):
    model = build_model(fpn_cfg(bank_path, "MONTAGE.FPN.ERF_LEVEL_BUDGET", "8"))
    # 256 / 64 / 16 / 4 positions: 8 // P montages, at least 1, at most the 4 given
    assert model.erf_images_per_level(4) == {"p2": 1, "p3": 1, "p4": 1, "p5": 2}
    model.erf_level_budget = 0
    assert model.erf_images_per_level(4) == {k: 4 for k in LEVELS}


# ---------------------------------------------------------------------------------------------
# Loss and training
# ---------------------------------------------------------------------------------------------
def test_loss_is_the_level_weighted_mean_of_region_means(bank_path):
    torch.manual_seed(0)
    # weights summing to 3, not to the number of levels (4): a mean over levels that divides by
    # the count instead of the weights' sum fails here
    model = build_model(fpn_cfg(bank_path, "MONTAGE.FPN.LEVEL_WEIGHTS", "[1.0, 0.0, 0.0, 2.0]",
                                "MONTAGE.FPN.SHARED_HEAD", "False")).train()
    assert set(model.heads) == set(LEVELS) and not hasattr(model, "head")
    model.aug = dict(flip=False, scale_jitter=(1.0, 1.0), color_jitter=0.0)  # deterministic
    model.refresh_erf_weights(batch_of(bank_path, 1, seed=3), iteration=0)
    batch = batch_of(bank_path, 2)
    with EventStorage(0) as storage:
        loss = model(batch)["loss_montage"]
        logged = storage.latest()
    assert {f"montage/crop_acc_{k}" for k in LEVELS} | {"montage/crop_acc"} <= set(logged)
    with torch.no_grad():
        logits = model._logits(model.backbone(model.make_images(batch)))
        per_level = {k: erf_dense_loss(logits[k], batch["labels"],
                                       model.level_view(model.erf_weights, k),
                                       model.level_view(model.region_map, k)) for k in LEVELS}
    torch.testing.assert_close(loss.detach(), (per_level["p2"] + 2 * per_level["p5"]) / 3)


@pytest.mark.parametrize("loss", ["erf", "blockwise"])
def test_every_backbone_and_pyramid_weight_trains(bank_path, loss):
    torch.manual_seed(0)
    model = build_model(fpn_cfg(bank_path, "MONTAGE.LOSS", loss)).train()
    with EventStorage(0):
        out = model(batch_of(bank_path, 2))
    assert set(out) == {"loss_montage"} and torch.isfinite(out["loss_montage"])
    out["loss_montage"].backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad  # every fpn_lateral/output and bottom-up weight, and the shared head
    logits = model.eval()(batch_of(bank_path, 2))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        "p2": (2, 4, 16, 16), "p3": (2, 4, 8, 8), "p4": (2, 4, 4, 4), "p5": (2, 4, 2, 2)}


@pytest.mark.parametrize("opts,message", [
    (["MONTAGE.LOSS", "global"], "MONTAGE.LOSS='global' with MontageFPNClassifier: use erf"),
    (["MONTAGE.FPN.LEVELS", "['p3', 'p4', 'p5']"], "leaves out ['p2']"),
    (["MONTAGE.FPN.LEVELS", "['p2', 'p3', 'p4', 'p5', 'p6']"],
     "MONTAGE.FPN.LEVELS has p6 (stride 64: 1x1 positions on the 64 px canvas)"),
    (["MONTAGE.FPN.LEVELS", "['p2', 'p3', 'p4', 'p5', 'p9']"], "among the backbone's outputs"),
    (["MONTAGE.INPUT_SIZE", "80"], "MONTAGE.INPUT_SIZE=80 with an FPN: use a multiple of 32"),
    (["MONTAGE.FPN.LEVEL_WEIGHTS", "[1.0, 2.0]"], "one non-negative weight per level"),
    (["MODEL.BACKBONE.NAME", "build_resnet_backbone"], "builds a ResNet, not an FPN"),
    (["MODEL.FPN.IN_FEATURES", "[]"], "MODEL.FPN.IN_FEATURES is empty"),
])
def test_config_errors_are_one_line_naming_the_key(bank_path, opts, message):
    with pytest.raises(ValueError) as e:
        build_model(fpn_cfg(bank_path, *opts))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_p6_is_optional_from_128_px(bank_path):
    model = build_model(fpn_cfg(bank_path, "MONTAGE.FPN.LEVELS", str(LEVELS + ["p6"]), size=128))
    assert model.level_view(model.region_map, "p6").tolist() == [[0, 1], [2, 3]]


# ---------------------------------------------------------------------------------------------
# Export, settings and loading
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r50_pyramid_export(tmp_path_factory):
    # one process: BN for the config's SyncBN (as assert_montage_cfg does)
    cfg = fpn_cfg("", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", config=R50_FPN, size=224)
    path = tmp_path_factory.mktemp("pyramid") / "montage_backbone.pkl"
    summary, model = pyramid_export(cfg, path)
    return str(path), summary, model


def test_pyramid_export_records_the_fpn_and_its_tensors(r50_pyramid_export):
    path, summary, model = r50_pyramid_export
    export = read_export(path)
    settings = export.settings
    assert {k: settings[k] for k in PYRAMID_SETTING_KEYS} == {
        "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
        "MODEL.FPN.OUT_CHANNELS": 256, "MODEL.FPN.NORM": "", "MODEL.FPN.FUSE_TYPE": "sum"}
    fpn = sorted(k for k in export.weights if k.startswith("fpn_"))
    assert fpn == sorted(f"fpn_{kind}{s}.{p}" for kind in ("lateral", "output")
                         for s in range(2, 6) for p in ("weight", "bias"))
    assert summary["num_tensors"] == 265 + FPN_TENSORS and summary["num_pyramid_tensors"] == 16
    # the pre-training's FPN BN is folded into the convs
    assert settings["MONTAGE.FPN.FOLDED_NORM"] == "BN"
    conv, bn = model.backbone.fpn_output3, model.backbone.fpn_output3.norm
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    torch.testing.assert_close(torch.as_tensor(export.weights["fpn_output3.weight"]),
                               conv.weight.detach() * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(torch.as_tensor(export.weights["fpn_output3.bias"]),
                               (bn.bias - bn.running_mean * scale).detach())
    assert "FPN:\n    IN_FEATURES:" in open(path + ".yaml").read()


@pytest.mark.parametrize("config", ["faster_rcnn_R_50_FPN_1x_montage.yaml",
                                    "mask_rcnn_R_50_FPN_1x_montage.yaml"])
def test_pyramid_export_fills_every_fpn_key_of_stock_detectors(r50_pyramid_export, config):
    path, _, pre = r50_pyramid_export
    cfg = finetune_cfg(os.path.join(FINETUNE, config), "MODEL.WEIGHTS", path)
    model = build_model(cfg)
    summary = load_and_verify(model, read_checked_weights(cfg))
    assert summary["pyramid"] and not summary["not_loaded"]
    assert summary["loaded"] == summary["total"] == 265 + FPN_TENSORS
    state = model.backbone.state_dict()
    assert len([k for k in state if k.startswith("fpn_")]) == FPN_TENSORS
    assert_same_pyramid(pre.backbone, model.backbone)


def assert_same_pyramid(pre, det, size=64):
    """The detector's FPN (no norm, folded weights) computes what the pre-training's FPN with BN
    computed in eval mode, on every level."""
    pre, det = pre.eval(), det.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = pre(x), det(x)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_pyramid_export_into_c4_loads_the_backbone_only(r50_pyramid_export):
    path, _, _ = r50_pyramid_export
    cfg = finetune_cfg(os.path.join(FINETUNE, "faster_rcnn_R_50_C4_1x_montage.yaml"),
                       "MODEL.WEIGHTS", path)
    summary = load_and_verify(build_model(cfg), read_checked_weights(cfg))
    assert summary["loaded"] == summary["total"] == 265 and not summary["pyramid"]
    assert sum(k.startswith("fpn_") for k in summary["unused"]) == FPN_TENSORS


def test_pyramid_check_fails_when_an_fpn_tensor_is_not_in_the_file(r50_pyramid_export, tmp_path):
    path, _, _ = r50_pyramid_export
    with open(path, "rb") as f:
        data = pickle.load(f)
    del data["model"]["fpn_output4.weight"]
    broken = tmp_path / "broken.pkl"
    with open(broken, "wb") as f:
        pickle.dump(data, f)
    cfg = finetune_cfg(os.path.join(FINETUNE, "faster_rcnn_R_50_FPN_1x_montage.yaml"))
    with pytest.raises(RuntimeError, match=r"280/281 .*backbone.fpn_output4.weight"):
        load_and_verify(build_model(cfg), str(broken))


def test_backbone_only_export_still_loads_into_fpn(export_path):
    cfg = finetune_cfg(TOY, "MODEL.WEIGHTS", export_path)
    summary = load_and_verify(build_model(cfg), read_checked_weights(cfg))
    assert summary["loaded"] == summary["total"] == 100 and not summary["pyramid"]


@pytest.fixture(scope="module")
def r18_pyramid_export(tmp_path_factory):
    cfg = fpn_cfg("", size=128)
    path = tmp_path_factory.mktemp("pyramid18") / "montage_backbone.pkl"
    return str(pyramid_export(cfg, path, seed=1)[0]["path"])


def test_demo_pyramid_export_fills_the_toy_detector(r18_pyramid_export):
    cfg = finetune_cfg(TOY, "MODEL.WEIGHTS", r18_pyramid_export)
    summary = load_and_verify(build_model(cfg), read_checked_weights(cfg))
    assert summary["loaded"] == summary["total"] == 100 + FPN_TENSORS and summary["pyramid"]


@pytest.mark.parametrize("key,value,recorded", [
    ("MODEL.FPN.OUT_CHANNELS", "256", "128"),
    ("MODEL.FPN.NORM", "GN", "''"),
    ("MODEL.FPN.FUSE_TYPE", "avg", "'sum'"),
    ("MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']", "['res2', 'res3', 'res4', 'res5']"),
])
def test_fpn_mismatch_is_refused_in_one_line(r18_pyramid_export, export_path, key, value,
                                             recorded):
    cfg = finetune_cfg(TOY, "MODEL.WEIGHTS", r18_pyramid_export, key, value)
    with pytest.raises(ValueError) as e:
        read_checked_weights(cfg)
    msg = str(e.value)
    assert "\n" not in msg and r18_pyramid_export in msg
    assert f"{key} is " in msg and f"but {recorded} in the export's pre-trained pyramid" in msg
    assert f"set {key} " in msg.split("Fix: ")[1]
    merge_config_file(cfg, r18_pyramid_export + ".yaml")  # the sidecar restores the match
    assert read_checked_weights(cfg).settings["MODEL.FPN.OUT_CHANNELS"] == 128
    # a backbone-only export holds no pyramid: any FPN shape takes it
    read_checked_weights(finetune_cfg(TOY, "MODEL.WEIGHTS", export_path, key, value))


# ---------------------------------------------------------------------------------------------
# End to end and cost
# ---------------------------------------------------------------------------------------------
def test_train_net_pretrains_refreshes_checkpoints_and_exports_the_pyramid(
        load_module, bank_path, tmp_path):
    train_net = load_module("projects/MontagePretrain/train_net.py")
    out = tmp_path / "run"
    argv = ["--config-file", DEMO, "MONTAGE.BANK", bank_path, "OUTPUT_DIR", str(out),
            "MONTAGE.INPUT_SIZE", "64", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3",
            "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2",
            "MONTAGE.ERF_PERIOD", "2", "MONTAGE.ERF_NUM_IMAGES", "1",
            "TEST.PRECISE_BN.NUM_ITER", "2", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.DEVICE", "cpu", "SEED", "1"]
    train_net.main(default_argument_parser().parse_args(argv))
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    mid = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=True)["model"]
    assert int(mid["erf_iter"]) == 0 and int(final["erf_iter"]) == 2
    assert final["erf_weights"].shape == (4, 340) and not torch.equal(
        mid["erf_weights"], final["erf_weights"])
    torch.testing.assert_close(final["erf_weights"].sum(0), torch.ones(340))

    export = str(out / "montage_backbone.pkl")
    # the export CLI makes the same pyramid export of the checkpoint (config.yaml of the run)
    again = export_main(["--config-file", str(out / "config.yaml"), "--checkpoint",
                         str(out / "model_final.pth"), "--out", str(tmp_path / "again.pkl")])
    assert again["num_pyramid_tensors"] == FPN_TENSORS
    assert sorted(read_export(again["path"]).weights) == sorted(read_export(export).weights)
    cfg = finetune_cfg(TOY, "MODEL.WEIGHTS", export)
    model = build_model(cfg)
    summary = load_and_verify(model, read_checked_weights(cfg))
    assert summary["loaded"] == summary["total"] == 100 + FPN_TENSORS and summary["pyramid"]
    state = model.state_dict()
    # the default export: the trained ResNet at init scale (same function, checked below)
    from montage_pretrain.export import convert_state_dict
    from montage_pretrain.weight_scale import reset_to_init_scale

    expected = reset_to_init_scale(convert_state_dict(final, pyramid=True)[0])[0]
    for k in ("res5.0.conv1.weight", "res5.0.conv1.norm.running_var"):
        torch.testing.assert_close(state["backbone.bottom_up." + k], torch.as_tensor(expected[k]))
    pre = build_model(fpn_cfg(bank_path, config=str(out / "config.yaml")))
    pre.load_state_dict(final)
    assert_same_pyramid(pre.backbone, model.backbone)


def test_benchmark_pyramid_ratio(load_module, tmp_path, capsys):
    bench = load_module("scripts/benchmark.py")
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--task", "pyramid", "--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "goal pyramid / backbone-only step time <= 1.3" in text
    res = __import__("json").loads(out.read_text())["results"]
    goal = res["goal_pyramid_over_backbone"]
    ratio = res["pyramid_step_ms"] / res["backbone_step_ms"]
    # The goal is judged, not timed, here: its value is the measured ratio, and PASS means
    # <= 1.3 whatever this machine measured (speed itself: make bench, never a test).
    assert goal["value"] == pytest.approx(ratio) and goal["goal"] == "<= 1.3"
    assert goal["pass"] == (ratio <= bench.GOAL_PYRAMID) and bench.GOAL_PYRAMID == 1.3
    assert f"{ratio:.2f} -> {'PASS' if goal['pass'] else 'FAIL'}" in text
    assert res["levels"] == LEVELS and res["pyramid_erf_passes"] > res["backbone_erf_passes"]


@pytest.mark.parametrize("pretrain,detector,twin", [
    (DEMO, TOY, os.path.join(CONFIGS, "demo", "montage_R_18_toy.yaml")),
    (R50_FPN, os.path.join(FINETUNE, "faster_rcnn_R_50_FPN_1x_montage.yaml"),
     os.path.join(CONFIGS, "montage_R_50.yaml")),
])
def test_pyramid_configs_copy_the_detectors_fpn_and_the_backbone_twins_schedule(
        pretrain, detector, twin):
    def load(path):
        cfg = get_cfg()
        add_montage_config(cfg)
        merge_config_file(cfg, path)
        return cfg

    pre, det, base = load(pretrain), load(detector), load(twin)
    for key in PYRAMID_SETTING_KEYS:
        name = key.split(".")[-1]
        if name == "NORM":  # trained with a BN, folded at export into the stock no-norm FPN
            assert pre.MODEL.FPN.NORM in FOLDABLE_NORMS and pre.MONTAGE.FPN.FOLD_NORM
            assert det.MODEL.FPN.NORM == ""
            continue
        assert pre.MODEL.FPN[name] == det.MODEL.FPN[name], key
    assert list(pre.MODEL.RESNETS.OUT_FEATURES) == list(det.MODEL.FPN.IN_FEATURES)
    for key in ("SOLVER", "INPUT", "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.NORM",
                "MONTAGE.INPUT_SIZE", "MONTAGE.SPLIT", "MONTAGE.LOSS", "MONTAGE.TAU",
                "MONTAGE.ERF_PERIOD", "MONTAGE.ERF_NUM_IMAGES"):
        a, b = pre, base
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key  # same schedule, canvas and batch: only the pyramid differs

"""MontageClassifier: every loss trains, ERF refresh follows Eq. 2, any backbone plugs in."""
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from montage_pretrain import MontageStream, add_montage_config, collate_montages
from montage_pretrain.losses import blockwise_weights, erf_dense_loss


def tiny_cfg(bank, loss="erf", size=96, **extra):
    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "MontageClassifier", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.RESNETS.OUT_FEATURES", ["res5"], "MODEL.RESNETS.NORM", "BN",
        "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53],
        "MODEL.PIXEL_STD", [58.395, 57.12, 57.375], "INPUT.FORMAT", "RGB",
        "MONTAGE.BANK", bank, "MONTAGE.LOSS", loss, "MONTAGE.INPUT_SIZE", size,
    ])
    cfg.merge_from_list([x for kv in extra.items() for x in kv])
    return cfg


def batch_of(bank, n, k=4, seed=0):
    stream = iter(MontageStream(bank, crops_per_image=k, seed=seed))
    return collate_montages([next(stream) for _ in range(n)])


@pytest.mark.parametrize("loss", ["erf", "blockwise", "global", "single"])
def test_each_loss_trains_the_backbone(bank_path, loss):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(bank_path, loss)).train()
    batch = batch_of(bank_path, 4, k=1 if loss == "single" else 4)
    with EventStorage() as storage:
        losses = model(batch)
        assert 0.0 <= storage.latest()["montage/crop_acc"][0] <= 1.0
    assert set(losses) == {"loss_montage"} and torch.isfinite(losses["loss_montage"])
    losses["loss_montage"].backward()
    grad = model.backbone.stem.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_eval_returns_dense_logits_of_c_plus_1_classes(bank_path):
    model = build_model(tiny_cfg(bank_path)).eval()
    logits = model(batch_of(bank_path, 2))
    # 3 foreground classes in the synthetic bank + background; 96 px / stride 32 = 3x3 positions
    assert logits.shape == (2, 4, 3, 3)
    assert model.region_map.tolist() == [[0, 1, 1], [2, 3, 3], [2, 3, 3]]


def test_initial_targets_are_blockwise_then_erf_refresh_obeys_eq2(bank_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(bank_path, **{"MONTAGE.TAU": 0.7})).train()
    assert torch.equal(model.erf_weights, blockwise_weights(model.region_map))
    assert int(model.erf_iter) == -1
    maps = model.refresh_erf_weights(batch_of(bank_path, 2), iteration=5)
    assert model.training  # restored after the eval-mode ERF pass
    assert maps.shape == (9, 96, 96)
    w = model.erf_weights
    assert torch.allclose(w.sum(0), torch.ones(3, 3), atol=1e-5)
    own = w.gather(0, model.region_map[None])[0]
    assert (own >= 0.7 - 1e-6).all()
    assert (w > 0).sum() > 9  # a random net's ERF spills over region borders: soft labels
    assert int(model.erf_iter) == 5
    # ERF weights are part of the checkpointed state, so a resumed run uses the same targets
    assert "erf_weights" in model.state_dict() and "erf_iter" in model.state_dict()


def test_erf_loss_with_blockwise_weights_is_hard_label_dense_ce(bank_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(bank_path)).eval()
    batch = batch_of(bank_path, 2)
    logits = model(batch)
    hard = torch.nn.functional.cross_entropy(
        logits, batch["labels"].gather(1, model.region_map.flatten()[None].expand(2, -1))
        .view(2, 3, 3), reduction="none")
    per_region = [hard[:, model.region_map == r].mean() for r in range(4)]
    expected = torch.stack(per_region).mean()
    got = erf_dense_loss(logits, batch["labels"], blockwise_weights(model.region_map),
                         model.region_map)
    assert torch.allclose(got, expected, atol=1e-5)


def test_other_backbones_plug_in_by_config(bank_path):
    """A RegNet (registered builder) and a ResNeXt replace R-18 with no code change."""
    cfg = tiny_cfg(bank_path, **{"MODEL.BACKBONE.NAME": "build_montage_regnet_backbone",
                                 "MONTAGE.REGNET": "RegNetX-400MF",
                                 "MODEL.RESNETS.OUT_FEATURES": ["s4"]})
    model = build_model(cfg).train()
    with EventStorage():
        model(batch_of(bank_path, 2))["loss_montage"].backward()
    assert model.in_feature == "s4" and model.region_map.shape == (3, 3)
    cfg = tiny_cfg(bank_path, **{"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
                                 "MODEL.RESNETS.NUM_GROUPS": 32,
                                 "MODEL.RESNETS.WIDTH_PER_GROUP": 4}, size=64)
    model = build_model(cfg).eval()
    assert model(batch_of(bank_path, 1)).shape == (1, 4, 2, 2)


def test_channels_last_gives_the_same_loss(bank_path):
    torch.manual_seed(0)
    a = build_model(tiny_cfg(bank_path)).eval()
    b = build_model(tiny_cfg(bank_path, **{"MONTAGE.CHANNELS_LAST": True})).eval()
    b.load_state_dict(a.state_dict())
    batch = batch_of(bank_path, 2)
    assert torch.allclose(a(batch), b(batch), atol=1e-4)


def test_bn_calibrated_from_the_erf_montages_before_the_first_erf(bank_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(bank_path)).train()
    bn = model.backbone.stem.conv1.norm
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # random init
    batch = batch_of(bank_path, 3)
    model.refresh_erf_weights(batch, iteration=0)
    # The stem BN now holds the exact batch statistics of its input on those montages.
    model.eval()
    with torch.no_grad():
        images = model.make_images(batch)  # eval mode: no augmentation, the same montages
        pre = torch.nn.functional.conv2d(images, model.backbone.stem.conv1.weight, None, 2, 3)
    assert torch.allclose(bn.running_mean, pre.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, pre.var((0, 2, 3), unbiased=True), rtol=1e-3)
    # Once statistics exist (after training steps or this calibration), they are kept.
    before = bn.running_mean.clone()
    assert model._calibrate_bn(images) is False
    model.refresh_erf_weights(batch, iteration=3)
    assert torch.equal(bn.running_mean, before)


def test_single_trains_on_random_resized_crops(bank_path):
    cfg = tiny_cfg(bank_path, "single", **{"MONTAGE.AUG.SINGLE_AREA": (0.5, 0.9)})
    model = build_model(cfg)
    assert model.single_aug == {"area": (0.5, 0.9), "ratio": (3 / 4, 4 / 3)}


def test_monitors_only_every_log_period(bank_path):
    """montage/crop_acc (a device sync) is read at iterations 0, N, 2N ... only."""
    model = build_model(tiny_cfg(bank_path, **{"MONTAGE.LOG_PERIOD": 3})).train()
    assert model.LOG_PERIOD == 3
    batch = batch_of(bank_path, 2)
    with EventStorage(0) as storage:
        for it in range(8):
            storage.iter = it
            model(batch)
        logged = [it for _, it in storage.history("montage/crop_acc").values()]
    assert logged == [0, 3, 6]


def test_packed_and_padded_batches_make_the_same_montages(bank_path):
    from montage_pretrain import collate_packed

    model = build_model(tiny_cfg(bank_path)).eval()
    stream = iter(MontageStream(bank_path, seed=3))
    items = [next(stream) for _ in range(3)]
    padded, packed = collate_montages(items), collate_packed(items)
    for train in (False, True):
        model.train(train)
        torch.manual_seed(5)  # the same window offsets (and flips, zooms in training)
        a = model.make_images(padded)
        torch.manual_seed(5)
        assert torch.equal(a, model.make_images(packed)), train

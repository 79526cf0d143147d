"""
montage_pretrain/probes.py and scripts/probe.py: kNN / linear probes on synthetic features,
bitwise determinism, and the whole probe of an R-18 export and random init on a tiny COCO set.
"""
import json
import logging
import os

import pytest
import torch

from builder.testing import write_synthetic_coco
from montage_pretrain.probes import (
    knn_predict, knn_top1, linear_probe, load_boxes, probe_export, probe_exports,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
C4_CONFIG = os.path.join(ROOT, "projects", "MontagePretrain", "configs", "finetune",
                         "faster_rcnn_R_50_C4_1x_montage.yaml")
# Small test images: the features of ~30 boxes take about a second per model.
SMALL = ("INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128")


@pytest.fixture(autouse=True)
def _quiet_checkpointer():
    # The detector heads stay random by design; Detectron2 lists them as a warning.
    logging.getLogger("fvcore.common.checkpoint").setLevel(logging.ERROR)


def gaussians(n_per_class, num_classes, dim, sep, seed, noise_seed=None):
    """Unit-variance Gaussian classes around means drawn with ``seed`` (scaled by ``sep``)."""
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * sep
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    gen = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    return means[y] + torch.randn(len(y), dim, generator=gen), y


# ---------------------------------------------------------------------------------------------
# Probes on synthetic features
# ---------------------------------------------------------------------------------------------
def test_separated_classes_score_about_100(few_threads):
    # Two classes whose means lie ~24 standard deviations apart; fresh noise for the queries.
    xtr, ytr = gaussians(200, 2, 32, sep=3.0, seed=0)
    xte, yte = gaussians(200, 2, 32, sep=3.0, seed=0, noise_seed=1)
    assert knn_top1(xtr, ytr, xte, yte, k=20) >= 99.0
    assert linear_probe(xtr, ytr, xte, yte, epochs=100) >= 99.0


def test_random_labels_and_features_score_near_chance(few_threads):
    gen = torch.Generator().manual_seed(0)
    num_classes, n, dim = 5, 1000, 32
    xtr, xte = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)
    ytr = torch.randint(num_classes, (n,), generator=gen)
    yte = torch.randint(num_classes, (n,), generator=gen)
    chance = 100.0 / num_classes
    assert abs(knn_top1(xtr, ytr, xte, yte, k=20) - chance) < 15
    assert abs(linear_probe(xtr, ytr, xte, yte, epochs=100) - chance) < 15
    # Informative features with random labels are still at chance.
    xg, _ = gaussians(n // num_classes, num_classes, dim, sep=3.0, seed=2)
    assert abs(knn_top1(xg, ytr, xg + 0.01, yte, k=20) - chance) < 15


def test_knn_vote_and_tie_break():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    train_y = torch.tensor([1, 0, 2, 2, 2])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    # k=2: one vote each for 1 and 0; class 1 has the nearer neighbour.
    assert knn_predict(train_x, train_y, query, k=2, num_classes=3).tolist() == [1, 2]
    # k=5: the majority (class 2, three votes) wins even for the first query.
    assert knn_predict(train_x, train_y, query, k=5, num_classes=3).tolist() == [2, 2]
    # Equal similarities (duplicates): the lower train index ranks first.
    dup_x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert knn_predict(dup_x, torch.tensor([4, 3]), query[:1], k=2).tolist() == [4]
    assert knn_predict(dup_x, torch.tensor([3, 4]), query[:1], k=2).tolist() == [3]


def test_probes_are_bitwise_deterministic(few_threads):
    xtr, ytr = gaussians(150, 4, 64, sep=0.3, seed=3)
    xte, yte = gaussians(50, 4, 64, sep=0.3, seed=3, noise_seed=4)
    assert knn_top1(xtr, ytr, xte, yte, k=7) == knn_top1(xtr, ytr, xte, yte, k=7)
    for batch_size in (None, 64):
        runs = [linear_probe(xtr, ytr, xte, yte, epochs=30, seed=5, batch_size=batch_size)
                for _ in range(2)]
        assert runs[0] == runs[1]
    # The probe draws from its own generator: the global RNG is untouched.
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    linear_probe(xtr, ytr, xte, yte, epochs=3, batch_size=64)
    assert torch.equal(before, torch.random.get_rng_state())


# ---------------------------------------------------------------------------------------------
# End to end on a tiny COCO dataset
# ---------------------------------------------------------------------------------------------
def non_crowd_boxes(json_path):
    with open(json_path) as f:
        return sum(1 for a in json.load(f)["annotations"] if not a.get("iscrowd", 0))


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    """(train json, train images, val json, val images): 4 + 3 images of 160 x 120 px."""
    root = tmp_path_factory.mktemp("probe_coco")
    train = write_synthetic_coco(str(root / "train"), num_images=4, seed=0)
    val = write_synthetic_coco(str(root / "val"), num_images=3, seed=1)
    return train + val


def test_probe_export_and_random_init_end_to_end(tiny_splits, r18_export, few_threads):
    num_train, num_val = non_crowd_boxes(tiny_splits[0]), non_crowd_boxes(tiny_splits[2])
    both = probe_exports(["", r18_export], *tiny_splits, opts=SMALL, threads=1, k=5, epochs=20)
    assert [r["weights"] for r in both] == ["", r18_export]
    for result in both:
        for stage, dim in (("res4", 256), ("res5", 512)):
            entry = result[stage]
            assert set(entry) == {"knn_top1", "linear_top1", "num_train", "num_val", "dim"}
            assert (entry["num_train"], entry["num_val"], entry["dim"]) == (num_train, num_val,
                                                                             dim)
            assert 0.0 <= entry["knn_top1"] <= 100.0 and 0.0 <= entry["linear_top1"] <= 100.0
        assert result["threads"] == 1 and result["num_classes"] == 3
        assert result["image_size"] == [96, 128]
    loaded, total = both[1]["backbone_tensors_loaded"].split("/")
    assert loaded == total and int(total) > 0
    assert both[0]["backbone_tensors_loaded"] == ""

    # Bitwise rerun, alone this time: the same numbers as next to random init.
    alone = probe_export(r18_export, *tiny_splits, opts=SMALL, threads=1, k=5, epochs=20)
    assert {k: v for k, v in alone.items() if k != "seconds"} == {
        k: v for k, v in both[1].items() if k != "seconds"}
    assert torch.get_num_threads() == 1  # restored to the fixture's setting


def test_max_boxes_and_plain_resnet_c4(tiny_splits, few_threads):
    """A C4 detector: res4 from the plain ResNet, res5 through roi_heads.res5."""
    result = probe_export("", *tiny_splits, config_file=C4_CONFIG, max_boxes=7,
                          opts=SMALL + ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "6"),
                          k=3, epochs=5)
    assert (result["res4"]["dim"], result["res5"]["dim"]) == (1024, 2048)
    assert result["res4"]["num_train"] == result["res5"]["num_val"] == 7
    assert result["backbone_tensors_loaded"] == ""


def test_load_boxes_maps_categories_and_skips_crowd(tiny_splits):
    train = load_boxes(tiny_splits[0], tiny_splits[1])
    assert train.category_ids == [1, 3, 5]  # non-contiguous json ids -> labels 0, 1, 2
    assert train.num_boxes == non_crowd_boxes(tiny_splits[0])
    assert sorted(set(train.labels.tolist())) <= [0, 1, 2]
    with pytest.raises(ValueError, match="category_id"):
        load_boxes(tiny_splits[2], tiny_splits[3], categories=([1], ["cat1"]))
    with pytest.raises(ValueError, match="same categories"):  # same ids, other names
        load_boxes(tiny_splits[2], tiny_splits[3], categories=([1, 3, 5], ["a", "b", "c"]))


# ---------------------------------------------------------------------------------------------
# scripts/probe.py
# ---------------------------------------------------------------------------------------------
def test_cli_table_and_json(tiny_splits, load_module, tmp_path, capsys, few_threads):
    probe = load_module("scripts/probe.py")
    out = tmp_path / "probe.json"
    train_json, train_images, val_json, val_images = tiny_splits
    rc = probe.main(["--weights", "", "--train-json", train_json, "--train-images", train_images,
                     "--val-json", val_json, "--val-images", val_images, "--max-boxes", "10",
                     "--k", "3", "--epochs", "5", "--json", str(out), *SMALL])
    assert rc == 0
    text = capsys.readouterr().out
    assert "random init (seed 0)" in text and "res5 linear" in text
    results = json.loads(out.read_text())["results"]
    assert results[0]["res4"]["num_train"] == 10 and results[0]["opts"] == list(SMALL)


def test_cli_missing_file_is_one_line(tiny_splits, load_module, tmp_path):
    probe = load_module("scripts/probe.py")
    train_json, train_images, val_json, val_images = tiny_splits
    missing = str(tmp_path / "nowhere.pkl")
    args = ["--train-json", train_json, "--train-images", train_images, "--val-json", val_json,
            "--val-images", val_images]
    with pytest.raises(SystemExit) as err:
        probe.main(["--weights", missing] + args)
    message = str(err.value)
    assert missing in message and "random init" in message and "\n" not in message
    args[1] = str(tmp_path / "none.json")
    with pytest.raises(SystemExit, match="--train-json .*none.json: file not found"):
        probe.main(["--weights", ""] + args)

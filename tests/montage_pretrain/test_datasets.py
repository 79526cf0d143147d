"""Fine-tuning datasets: registration errors, the --train/--val flags, classes from the data."""
import json
import os

import pytest

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from montage_pretrain.datasets import register_coco_dataset, set_finetune_datasets, set_num_classes


def write_coco(root, categories=("thing",)):
    os.makedirs(root / "images", exist_ok=True)
    cats = [{"id": 3 + i, "name": name} for i, name in enumerate(categories)]
    data = {"images": [], "annotations": [], "categories": cats}
    (root / "ann.json").write_text(json.dumps(data))
    return str(root / "ann.json"), str(root / "images")


def test_register_missing_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*--train-json"):
        register_coco_dataset("datasets_missing_json", str(tmp_path / "nope.json"), str(tmp_path))


def test_register_missing_images(tmp_path):
    json_file, _ = write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no_images.*--train-images"):
        register_coco_dataset("datasets_missing_images", json_file, str(tmp_path / "no_images"))


def test_register_is_idempotent_and_refuses_other_paths(tmp_path):
    json_file, images = write_coco(tmp_path / "a")
    name = "datasets_idempotent"
    assert register_coco_dataset(name, json_file, images) == name
    assert register_coco_dataset(name, json_file, images) == name  # same paths: no error
    assert name in DatasetCatalog.list()
    assert MetadataCatalog.get(name).json_file == json_file
    other_json, other_images = write_coco(tmp_path / "b")
    with pytest.raises(ValueError, match="already registered.*--dataset-name"):
        register_coco_dataset(name, other_json, other_images)


def test_flags_set_datasets_and_num_classes(tmp_path):
    train = write_coco(tmp_path / "train", ("cat", "dog"))
    val = write_coco(tmp_path / "val", ("cat", "dog"))
    cfg = get_cfg()
    set_finetune_datasets(cfg, "datasets_flags", *train, *val)
    assert cfg.DATASETS.TRAIN == ("datasets_flags_train",)
    assert cfg.DATASETS.TEST == ("datasets_flags_val",)
    assert set_num_classes(cfg) == ["cat", "dog"]
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == cfg.MODEL.RETINANET.NUM_CLASSES == 2


def test_json_without_images_and_unknown_names(tmp_path):
    json_file, _ = write_coco(tmp_path)
    with pytest.raises(ValueError, match="--val-json and --val-images go together"):
        set_finetune_datasets(get_cfg(), "datasets_half", val_json=json_file)
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("datasets_nowhere",)
    with pytest.raises(ValueError, match="'datasets_nowhere' is not registered"):
        set_finetune_datasets(cfg, "datasets_unknown")


def test_test_set_with_other_classes_is_refused(tmp_path):
    cfg = get_cfg()
    set_finetune_datasets(cfg, "datasets_other", *write_coco(tmp_path / "t", ("cat",)),
                          *write_coco(tmp_path / "v", ("dog",)))
    with pytest.raises(ValueError, match="same categories"):
        set_num_classes(cfg)

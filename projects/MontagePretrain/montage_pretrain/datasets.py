"""
Fine-tuning datasets: COCO-format files registered under a name, or Detectron2's builtin ones.

Missing files fail at registration with the path and the fix, not deep inside the data loader;
``MODEL.ROI_HEADS.NUM_CLASSES`` is read from the training set instead of being configured.
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["check_coco_paths", "register_coco_dataset", "set_finetune_datasets",
           "set_num_classes"]


def check_coco_paths(json_file, image_root, what="dataset"):
    """
    Raises FileNotFoundError (one line, naming ``what`` and the fix) unless ``json_file`` is a
    file and ``image_root`` a folder.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"COCO annotation file not found: {json_file} ({what}); pass an existing "
            "instances_*.json (--train-json/--val-json), or write the toy set with `make toy`."
        )
    if not os.path.isdir(image_root):
        raise FileNotFoundError(
            f"Image folder not found: {image_root} ({what}); pass the folder holding the "
            "json's file_name entries (--train-images/--val-images)."
        )


def register_coco_dataset(name, json_file, image_root):
    """
    Registers a COCO-format instance dataset under ``name`` (idempotent).

    Args:
        name (str): dataset name for ``DATASETS.TRAIN/TEST``.
        json_file (str): ``instances_*.json``.
        image_root (str): folder the json's ``file_name`` entries are relative to.

    Returns:
        str: ``name``.

    Raises:
        FileNotFoundError: the json or the image folder is missing.
        ValueError: ``name`` is already registered with other paths.
    """
    check_coco_paths(json_file, image_root, f"dataset {name!r}")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        same = os.path.abspath(meta.get("json_file", "")) == os.path.abspath(json_file) and (
            os.path.abspath(meta.get("image_root", "")) == os.path.abspath(image_root)
        )
        if same:
            return name
        raise ValueError(
            f"Dataset {name!r} is already registered with json_file={meta.get('json_file')!r}, "
            f"image_root={meta.get('image_root')!r}; choose another name (--dataset-name)."
        )
    register_coco_instances(name, {}, json_file, image_root)
    return name


def set_finetune_datasets(cfg, name, train_json="", train_images="", val_json="", val_images=""):
    """
    Registers the training/evaluation COCO files and points ``cfg.DATASETS`` at them (in place).

    A split given as json + image folder is registered as ``<name>_train`` / ``<name>_val`` and
    becomes ``DATASETS.TRAIN`` / ``DATASETS.TEST``; without them the config's DATASETS stay, e.g.
    the builtin ``coco_2017_train`` under ``$DETECTRON2_DATASETS/coco``. Every dataset of the
    config is then checked to be registered and, for a COCO json, present.

    Args:
        cfg (CfgNode): the fine-tuning config (not frozen).
        name (str): prefix of the registered names (``--dataset-name``).
        train_json, train_images, val_json, val_images (str): ``--train-json`` etc.; "" = unset.

    Raises:
        ValueError: a json without its image folder (or the reverse), or an unknown dataset.
        FileNotFoundError: a builtin dataset's json is missing.
    """
    for split, json_file, images in (
        ("train", train_json, train_images),
        ("val", val_json, val_images),
    ):
        if bool(json_file) != bool(images):
            raise ValueError(f"--{split}-json and --{split}-images go together")
        if json_file:
            registered = register_coco_dataset(f"{name}_{split}", json_file, images)
            if split == "train":
                cfg.DATASETS.TRAIN = (registered,)
            else:
                cfg.DATASETS.TEST = (registered,)
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    for dataset in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
        if dataset not in DatasetCatalog.list():
            raise ValueError(
                f"Dataset {dataset!r} is not registered; pass --train-json/--train-images and "
                "--val-json/--val-images, or a builtin name such as coco_2017_train."
            )
        json_file = MetadataCatalog.get(dataset).get("json_file")
        if json_file and not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"Dataset {dataset!r} expects {json_file}, which is missing; place COCO under "
                f"$DETECTRON2_DATASETS/coco (now {root!r}) or pass --train-json/--val-json."
            )


def _thing_classes(name):
    """Category names of a registered dataset (loads a custom COCO json once if needed)."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        DatasetCatalog.get(name)  # load_coco_json fills thing_classes and the id mapping
    return list(meta.thing_classes)


def set_num_classes(cfg):
    """
    Sets ``MODEL.ROI_HEADS/RETINANET.NUM_CLASSES`` from the training set (in place).

    Returns:
        list[str] or None: the category names, or None when there is no training set.

    Raises:
        ValueError: a test set has other categories than the training set.
    """
    train_names = tuple(cfg.DATASETS.TRAIN)
    if not train_names:
        return None
    classes = _thing_classes(train_names[0])
    for name in train_names[1:] + tuple(cfg.DATASETS.TEST):
        other = _thing_classes(name)
        if other != classes:
            raise ValueError(
                f"Dataset {name!r} has categories {other[:5]}... but {train_names[0]!r} has "
                f"{classes[:5]}...; train and evaluate on datasets with the same categories."
            )
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
    cfg.MODEL.RETINANET.NUM_CLASSES = len(classes)
    return classes

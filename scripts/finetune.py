#!/usr/bin/env python
"""
Fine-tunes a stock Detectron2 detector from a Montage backbone export and reports COCO AP.

The driver is ``tools/train_net.py`` plus the hand-off checks of ``montage_pretrain.handoff``:

* datasets: ``--train-json/--train-images/--val-json/--val-images`` register a COCO-format
  dataset (``<dataset-name>_train`` / ``_val``); without them the config's DATASETS are used,
  e.g. the builtin ``coco_2017_train``/``coco_2017_val`` under ``$DETECTRON2_DATASETS/coco``.
  ``MODEL.ROI_HEADS.NUM_CLASSES`` is read from the training set's categories;
* weights: a Montage export is checked against the config (pixel mean/std, format, ResNet
  shape) before anything is built, then loaded with a check that every backbone tensor came from
  the file. ``--weights-config <export>.pkl.yaml`` merges the export's recorded settings;
* results: ``OUTPUT_DIR/metrics_final.json`` holds AP, AP50, AP75, APs, APm, APl per task
  (``bbox``, and ``segm`` for Mask R-CNN; NaN is written as null), ``wall_s`` and ``cpu_s``
  (process plus reaped children, e.g. data-loader workers), and the run's settings.

Example (toy data, CPU)::

    OMP_NUM_THREADS=1 python scripts/finetune.py \\
        --config-file projects/MontagePretrain/configs/finetune/demo/faster_rcnn_R_18_FPN_toy.yaml \\
        --train-json datasets/toy/annotations/instances_train.json \\
        --train-images datasets/toy/train \\
        --val-json datasets/toy/annotations/instances_val.json --val-images datasets/toy/val \\
        MODEL.WEIGHTS output/demo/pretrain/montage_backbone.pkl OUTPUT_DIR output/demo/finetune
"""
import gc
import json
import logging
import math
import os
import time


import torch
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import (
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.logger import setup_logger

from montage_pretrain.config import add_montage_config
from montage_pretrain.handoff import (
    check_pixel_format,
    load_and_verify,
    merge_config_file,
    read_montage_settings,
    register_coco_dataset,
)

try:  # registers the RegNet builders, so RegNet exports fine-tune like ResNet ones
    from montage_pretrain import backbones as _  # noqa: F401
except ImportError:  # pragma: no cover - optional module
    pass

logger = logging.getLogger("montage.finetune")

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Norms that need torch.distributed; one process falls back to plain BN.
_SYNC_NORMS = ("SyncBN", "nnSyncBN")


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCO evaluation and checked loading of pre-trained backbones."""

    eval_seconds = 0.0

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box (and mask) AP; the pure-Python COCOeval since this build has no _C."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        start = time.perf_counter()
        results = super().test(cfg, model, evaluators)
        cls.eval_seconds += time.perf_counter() - start
        return results

    def resume_or_load(self, resume=True):
        """Resumes OUTPUT_DIR's last checkpoint, else loads MODEL.WEIGHTS with load_and_verify."""
        self.load_summary = None
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            return
        weights = self.cfg.MODEL.WEIGHTS
        if weights:
            self.load_summary = load_and_verify(self.model, weights)
        else:
            logger.info("MODEL.WEIGHTS is empty: every layer starts from random init (scratch)")
        self.start_iter = 0


def parse_args(argv=None):
    """Parses the command line: Detectron2's standard flags plus the dataset flags."""
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--train-json", default="", help="COCO instances json for training")
    parser.add_argument("--train-images", default="", help="image folder of --train-json")
    parser.add_argument("--val-json", default="", help="COCO instances json for evaluation")
    parser.add_argument("--val-images", default="", help="image folder of --val-json")
    parser.add_argument(
        "--dataset-name", default="finetune",
        help="registered names are <name>_train and <name>_val",
    )
    parser.add_argument(
        "--weights-config", default="",
        help="YAML merged after --config-file, e.g. the export's <weights>.pkl.yaml",
    )
    return parser.parse_args(argv)


def _register_datasets(cfg, args):
    """Registers --train/--val data and points DATASETS.TRAIN/TEST at it."""
    for split, json_file, images in (
        ("train", args.train_json, args.train_images),
        ("val", args.val_json, args.val_images),
    ):
        if bool(json_file) != bool(images):
            raise ValueError(f"--{split}-json and --{split}-images go together")
        if json_file:
            name = register_coco_dataset(f"{args.dataset_name}_{split}", json_file, images)
            if split == "train":
                cfg.DATASETS.TRAIN = (name,)
            else:
                cfg.DATASETS.TEST = (name,)
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    for name in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list():
            raise ValueError(
                f"Dataset {name!r} is not registered; pass --train-json/--train-images and "
                "--val-json/--val-images, or a builtin name such as coco_2017_train."
            )
        json_file = MetadataCatalog.get(name).get("json_file")
        if json_file and not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"Dataset {name!r} expects {json_file}, which is missing; place COCO under "
                f"$DETECTRON2_DATASETS/coco (now {root!r}) or pass --train-json/--val-json."
            )


def _thing_classes(name):
    """Category names of a registered dataset (loads a custom COCO json once if needed)."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        DatasetCatalog.get(name)  # load_coco_json fills thing_classes and the id mapping
    return list(meta.thing_classes)


def _set_num_classes(cfg):
    """Sets NUM_CLASSES from the training set; every test set must have the same classes."""
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


def _fallback_sync_norms(node, prefix=""):
    """Replaces SyncBN by BN in every ``*.NORM`` key (one process has no process group)."""
    for key, value in node.items():
        if hasattr(value, "items"):
            _fallback_sync_norms(value, f"{prefix}{key}.")
        elif key == "NORM" and value in _SYNC_NORMS:
            logger.warning("%s%s=%s needs several processes: using BN", prefix, key, value)
            node[key] = "BN"


def _check_weights(cfg, args):
    """Fails early on weight settings that would train a broken model silently."""
    weights = cfg.MODEL.WEIGHTS
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if args.eval_only or resuming:
        return
    if not weights and cfg.MODEL.RESNETS.NORM == "FrozenBN":
        raise ValueError(
            "MODEL.RESNETS.NORM is FrozenBN but MODEL.WEIGHTS is empty: frozen identity BN "
            "diverges from random init. Pass MODEL.WEIGHTS <export.pkl>, or use a scratch config "
            "(MODEL.RESNETS.NORM GN or BN, MODEL.BACKBONE.FREEZE_AT 0)."
        )
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS {weights} does not exist; export the pre-trained backbone first "
            "(python -m montage_pretrain.export ...) or pass MODEL.WEIGHTS <path>."
        )
    if weights and read_montage_settings(weights) is not None:
        check_pixel_format(cfg, weights)


def setup(args):
    """Builds the frozen config: file (+ stock base) + weights config + opts + data + checks."""
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, args.config_file)
    if args.weights_config:
        merge_config_file(cfg, args.weights_config)
    cfg.merge_from_list(args.opts)
    # default_setup configures only the detectron2/fvcore loggers; the hand-off logs matter too.
    for name in ("montage_pretrain", "montage"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu" and torch.get_num_threads() > 1 and not os.environ.get(
        "OMP_NUM_THREADS"
    ):
        logger.info(
            "CPU run with %d intra-op threads; on a machine shared with other jobs "
            "OMP_NUM_THREADS=1 is several times faster (threads spin-wait for each other).",
            torch.get_num_threads(),
        )
    if args.num_gpus * args.num_machines == 1:
        _fallback_sync_norms(cfg)
    _register_datasets(cfg, args)
    _set_num_classes(cfg)
    _check_weights(cfg, args)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def _cpu_seconds():
    """User + system CPU time of this process and of its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def summarize(results):
    """
    Keeps AP, AP50, AP75, APs, APm, APl of each task from Detectron2's evaluation results.

    Args:
        results (dict): ``{task: {metric: value}}`` or ``{dataset: {task: {...}}}``.

    Returns:
        dict: ``{task: {metric: float or None}}`` (per dataset when there are several).
    """
    if not results:
        return {}
    if all(isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())
           for v in results.values()):
        return {name: summarize(res) for name, res in results.items()}
    summary = {}
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        values = {k: _finite_or_none(metrics[k]) for k in METRIC_KEYS if k in metrics}
        if values and all(v is None for v in values.values()):
            # COCOEvaluator reports NaN everywhere when the model made no detection at all:
            # AP, AP50 and AP75 are 0 then; the size buckets stay undefined.
            logger.warning("No %s predictions: AP, AP50, AP75 written as 0", task)
            values.update(AP=0.0, AP50=0.0, AP75=0.0)
        summary[task] = values
    return summary


def write_metrics(cfg, args, metrics, extra):
    """Writes OUTPUT_DIR/metrics_final.json and prints the AP table."""
    record = dict(metrics)
    record.update(extra)
    record.update(
        {
            "config_file": args.config_file,
            "weights": cfg.MODEL.WEIGHTS,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "device": cfg.MODEL.DEVICE,
            "train_datasets": list(cfg.DATASETS.TRAIN),
            "test_datasets": list(cfg.DATASETS.TEST),
            "eval_only": bool(args.eval_only),
        }
    )
    path = os.path.join(cfg.OUTPUT_DIR, "metrics_final.json")
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    rows = []
    for task, values in metrics.items():
        if isinstance(values, dict) and all(not isinstance(v, dict) for v in values.values()):
            rows.append([task] + [values.get(k) for k in METRIC_KEYS])
    table = tabulate(rows, headers=["task", *METRIC_KEYS], floatfmt=".2f", missingval="nan")
    print(table)
    print(f"wall {extra['wall_s']:.1f}s, cpu {extra['cpu_s']:.1f}s -> {path}")
    return path


def main(args):
    """Trains (unless --eval-only), evaluates and writes metrics_final.json."""
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    cfg = setup(args)
    extra = {}
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        if trainer.load_summary is not None:
            extra["backbone_tensors_loaded"] = trainer.load_summary["loaded"]
        train0 = time.perf_counter()
        trainer.train()
        extra["train_wall_s"] = time.perf_counter() - train0 - Trainer.eval_seconds
        # After a finished run trainer.iter == MAX_ITER.
        extra["iterations_run"] = trainer.iter - trainer.start_iter
        if extra["iterations_run"] > 0:
            extra["s_per_iter"] = extra["train_wall_s"] / extra["iterations_run"]
        results = getattr(trainer, "_last_eval_results", None) or {}
        # Dropping the trainer shuts its loader workers down, so their CPU time is counted.
        del trainer
        gc.collect()
    extra["eval_wall_s"] = Trainer.eval_seconds
    extra["wall_s"] = time.perf_counter() - wall0
    extra["cpu_s"] = _cpu_seconds() - cpu0
    if comm.is_main_process():
        write_metrics(cfg, args, summarize(results), extra)
    return results


def invoke_main(argv=None):
    """Parses ``argv`` and runs :func:`main` through Detectron2's ``launch``."""
    args = parse_args(argv)
    if args.num_gpus > 1 and not torch.cuda.is_available():
        raise SystemExit("--num-gpus > 1 needs CUDA; on the CPU run with --num-gpus 1")
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()

"""
COCO evaluation of a fine-tuned detector and the ``metrics_final.json`` a fine-tuning run writes.

``metrics_final.json`` holds AP, AP50, AP75, APs, APm, APl per task (``bbox``, and ``segm`` for
Mask R-CNN; NaN is written as null), the timings the caller passes (``wall_s``, ``cpu_s``, ...)
and the run's settings (config file, weights, schedule, classes, device, datasets).
"""
import importlib
import json
import logging
import math
import os

from tabulate import tabulate

from detectron2.evaluation import COCOEvaluator

__all__ = [
    "METRIC_KEYS",
    "fast_coco_eval_available",
    "build_coco_evaluator",
    "summarize",
    "write_metrics",
    "format_table",
]

logger = logging.getLogger(__name__)

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def fast_coco_eval_available():
    """Returns True when Detectron2's compiled ops (``detectron2._C``, fast COCOeval) import."""
    try:
        importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return True


def build_coco_evaluator(cfg, dataset_name, output_folder=None):
    """
    Returns a :class:`COCOEvaluator` (box AP, plus mask AP for Mask R-CNN) of ``dataset_name``.

    The compiled COCOeval is used when this Detectron2 build has ``_C``; the pure-Python
    (official) one otherwise.

    Args:
        cfg (CfgNode): the fine-tuning config (``OUTPUT_DIR``).
        dataset_name (str): a registered dataset.
        output_folder (str or None): default ``OUTPUT_DIR/inference/<dataset_name>``.
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return COCOEvaluator(
        dataset_name, output_dir=output_folder, use_fast_impl=fast_coco_eval_available()
    )


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


def write_metrics(cfg, metrics, extra, config_file="", eval_only=False):
    """
    Writes ``OUTPUT_DIR/metrics_final.json`` atomically (temporary file + ``os.replace``).

    Args:
        cfg (CfgNode): the fine-tuning config.
        metrics (dict): from :func:`summarize`.
        extra (dict): timings and counters of the run (``wall_s``, ``cpu_s``, ...).
        config_file (str): the ``--config-file`` of the run.
        eval_only (bool): whether the run only evaluated.

    Returns:
        str: the path written.
    """
    record = dict(metrics)
    record.update(extra)
    record.update(
        {
            "config_file": config_file,
            "weights": cfg.MODEL.WEIGHTS,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "device": cfg.MODEL.DEVICE,
            "train_datasets": list(cfg.DATASETS.TRAIN),
            "test_datasets": list(cfg.DATASETS.TEST),
            "eval_only": bool(eval_only),
        }
    )
    path = os.path.join(cfg.OUTPUT_DIR, "metrics_final.json")
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    return path


def format_table(metrics):
    """Returns the AP table of :func:`summarize`'s output: one row per task."""
    rows = []
    for task, values in metrics.items():
        if isinstance(values, dict) and all(not isinstance(v, dict) for v in values.values()):
            rows.append([task] + [values.get(k) for k in METRIC_KEYS])
    return tabulate(rows, headers=["task", *METRIC_KEYS], floatfmt=".2f", missingval="nan")

#!/usr/bin/env python
"""
Fine-tunes a stock Detectron2 detector from a Montage backbone export and reports COCO AP.

``tools/train_net.py`` plus the hand-off of ``montage_pretrain``:

* datasets: ``--train-json/--train-images/--val-json/--val-images`` register a COCO-format
  dataset (``<dataset-name>_train`` / ``_val``); without them the config's DATASETS are used,
  e.g. the builtin ``coco_2017_train``/``coco_2017_val`` under ``$DETECTRON2_DATASETS/coco``.
  ``MODEL.ROI_HEADS.NUM_CLASSES`` is read from the training set's categories;
* weights: a Montage export is read once, checked against the config (pixel mean/std, format,
  ResNet shape) before anything is built, then loaded with a check that every backbone tensor
  came from the file. ``--weights-config <export>.pkl.yaml`` merges the export's overrides.
  Weight files are read without running code in them (restricted unpickler for ``.pkl``,
  ``torch.load(weights_only=True)`` otherwise), for ``MODEL.WEIGHTS`` and for the checkpoint
  ``--resume`` finds in ``OUTPUT_DIR/last_checkpoint`` alike, and YAML with ``yaml.safe_load``;
  a refused file, or a missing input file, ends the run with one line before OUTPUT_DIR is
  written to; a non-finite loss ends it with one line too (iteration, loss terms, knobs to try,
  last checkpoint with finite weights);
* results: ``OUTPUT_DIR/metrics_final.json`` holds AP, AP50, AP75, APs, APm, APl per task
  (``bbox``, and ``segm`` for Mask R-CNN; NaN is written as null), ``wall_s`` and ``cpu_s``
  (process plus reaped children, e.g. data-loader workers), and the run's settings.

Example (toy data, CPU)::

    OMP_NUM_THREADS=1 python projects/MontagePretrain/finetune_net.py --config-file \\
        projects/MontagePretrain/configs/finetune/demo/faster_rcnn_R_18_FPN_toy.yaml \\
        --train-json datasets/toy/annotations/instances_train.json \\
        --train-images datasets/toy/train \\
        --val-json datasets/toy/annotations/instances_val.json --val-images datasets/toy/val \\
        MODEL.WEIGHTS output/demo/pretrain/montage_backbone.pkl OUTPUT_DIR output/demo/finetune
"""
import gc
import logging
import os
import time

import torch

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.utils.logger import setup_logger

from montage_pretrain import backbones as _  # noqa: F401  (registers the RegNet builders)
from montage_pretrain.config import ConfigFileError, add_montage_config, merge_config_file
from montage_pretrain.datasets import set_finetune_datasets, set_num_classes
from montage_pretrain.distributed import cpu_ddp, fit_sync_norms
from montage_pretrain.evaluation import build_coco_evaluator, format_table, summarize, write_metrics
from montage_pretrain.export_format import WeightFileError
from montage_pretrain.handoff_trace import HandoffTrace
from montage_pretrain.loading import (
    ExportCheckpointer,
    check_weights_path,
    load_and_verify,
    read_checked_weights,
    use_safe_checkpointer,
)
from montage_pretrain.nonfinite import latest_losses, nonfinite_message
from montage_pretrain.plain_logs import plain_config_logs

logger = logging.getLogger("montage.finetune")

# Norms that need torch.distributed; one process falls back to plain BN.
_SYNC_NORMS = ("SyncBN", "nnSyncBN")


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCO evaluation and checked loading of the pre-trained backbone."""

    # The weight file setup() read and checked; resume_or_load loads it from memory, so the
    # file is unpickled once.
    export = None
    eval_seconds = 0.0
    # --trace-iters: iterations recorded by HandoffTrace (0 = none).
    trace_iters = 0

    def __init__(self, cfg):
        with cpu_ddp():  # several CPU processes: DDP without device_ids
            super().__init__(cfg)
        # --resume reads OUTPUT_DIR/last_checkpoint's file: without running code in it.
        use_safe_checkpointer(self)

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.trace_iters > 0:  # before the writers, so its last row is logged with them
            path = os.path.join(self.cfg.OUTPUT_DIR, "handoff_trace.json")
            hooks.insert(len(hooks) - 1, HandoffTrace(self.trace_iters, path))
        return hooks

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        start = time.perf_counter()
        results = super().test(cfg, model, evaluators)
        cls.eval_seconds += time.perf_counter() - start
        return results

    def resume_or_load(self, resume=True):
        """Resumes OUTPUT_DIR's last checkpoint, else loads MODEL.WEIGHTS with load_and_verify."""
        self.load_summary = None
        export, Trainer.export = Trainer.export, None
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            return
        weights = self.cfg.MODEL.WEIGHTS
        if weights:
            source = export if export is not None and export.path == weights else weights
            self.load_summary = load_and_verify(self.model, source)
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
    parser.add_argument(
        "--trace-iters", type=int, default=0,
        help="record loss, weight/gradient norms and relative updates per backbone stage for "
             "the first N iterations in OUTPUT_DIR/handoff_trace.json (0 = off)",
    )
    return parser.parse_args(argv)


def _fit_to_machine(cfg):
    """
    CPU when CUDA is missing, plain BN on one process, naiveSyncBN for SyncBN on several CPU
    processes, and a hint about CPU threads.
    """
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
    # The process group's size, not the flags: setup also runs outside launch (tests, tools).
    if comm.get_world_size() == 1:
        _fallback_sync_norms(cfg)
    else:
        fit_sync_norms(cfg, comm.get_world_size())


def _fallback_sync_norms(node, prefix=""):
    """Replaces SyncBN by BN in every ``*.NORM`` key (one process has no process group)."""
    for key, value in node.items():
        if hasattr(value, "items"):
            _fallback_sync_norms(value, f"{prefix}{key}.")
        elif key == "NORM" and value in _SYNC_NORMS:
            logger.warning("%s%s=%s needs several processes: using BN", prefix, key, value)
            node[key] = "BN"


def setup(args):
    """Builds the frozen config: file (+ stock base) + weights config + opts + data + checks."""
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, args.config_file)
    if args.weights_config:
        merge_config_file(cfg, args.weights_config)
    cfg.merge_from_list(args.opts)
    check_weights_path(cfg.MODEL.WEIGHTS)  # a missing file: one line, before any log is written
    plain_config_logs()  # log.txt and captured stdout without ANSI colour codes
    # default_setup configures only the detectron2/fvcore loggers; the hand-off logs matter too.
    for name in ("montage_pretrain", "montage"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    _fit_to_machine(cfg)
    set_finetune_datasets(cfg, args.dataset_name, args.train_json, args.train_images,
                          args.val_json, args.val_images)
    set_num_classes(cfg)
    # Fails before anything is built on bad weights; the export read here is loaded from memory.
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    Trainer.export = None if args.eval_only or resuming else read_checked_weights(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def _cpu_seconds():
    """User + system CPU time of this process and of its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(args):
    """
    Runs :func:`run`; a refused config or weight file, or a missing input file named on the
    command line, ends it with its one-line message.
    """
    try:
        return run(args)
    except (ConfigFileError, WeightFileError, _InputError) as e:
        raise SystemExit(f"finetune_net.py: {e}") from None


class _InputError(Exception):
    """A known user error found by :func:`setup` (missing file, bad flag): one line."""


def run(args):
    """Trains (unless --eval-only), evaluates and writes metrics_final.json."""
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        cfg = setup(args)
    except (FileNotFoundError, ValueError) as e:  # messages name the input and the fix
        raise _InputError(str(e)) from None
    extra = {}
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # ExportCheckpointer: Detectron2's own would pickle.load a .pkl, running code in it.
        ExportCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
    else:
        Trainer.trace_iters = max(0, args.trace_iters)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        if trainer.load_summary is not None:
            extra["backbone_tensors_loaded"] = trainer.load_summary["loaded"]
        train0 = time.perf_counter()
        try:
            trainer.train()
        except FloatingPointError as e:  # Detectron2's non-finite loss check: one line
            raise SystemExit(nonfinite_message("finetune_net.py", e, cfg, trainer.iter,
                                               logged=latest_losses(trainer))) from None
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
        metrics = summarize(results)
        path = write_metrics(cfg, metrics, extra, args.config_file, args.eval_only)
        print(format_table(metrics))
        print(f"wall {extra['wall_s']:.1f}s, cpu {extra['cpu_s']:.1f}s -> {path}")
    return results


def invoke_main(argv=None):
    """Parses ``argv`` and runs :func:`main` through Detectron2's ``launch``."""
    args = parse_args(argv)
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
    invoke_main()  # pragma: no cover

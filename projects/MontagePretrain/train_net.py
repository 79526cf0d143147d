#!/usr/bin/env python
"""
Montage pre-training with Detectron2's trainer.

    python projects/MontagePretrain/train_net.py --config-file configs/montage_R_50.yaml \
        --num-gpus 8 MONTAGE.BANK datasets/coco_bank.h5 OUTPUT_DIR output/montage_R_50

Several machines: add ``--num-machines M --machine-rank R --dist-url tcp://HOST:PORT``.
Without CUDA, ``--num-gpus N`` starts N CPU processes (gloo); SyncBN becomes naiveSyncBN there.
At the end of training the backbone is exported to ``OUTPUT_DIR/MONTAGE.EXPORT_NAME`` for
``MODEL.WEIGHTS`` of stock Detectron2 detection configs.

Weight files (``MODEL.WEIGHTS``, and the checkpoint ``--resume`` finds in
``OUTPUT_DIR/last_checkpoint``) are read without running code in them (restricted unpickler for
``.pkl``, ``torch.load(weights_only=True)`` otherwise). The inputs a user names (the config, the
bank, the weights) are checked before anything is written to OUTPUT_DIR, and a refused one ends
the run with one line. So does a non-finite loss: the iteration, the loss terms, the knobs to try
and the last checkpoint with finite weights (:mod:`montage_pretrain.nonfinite`).
"""
import logging
import os

import torch

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import (DefaultTrainer, SimpleTrainer, default_argument_parser,
                               default_setup, launch)
from detectron2.utils.logger import setup_logger

from montage_pretrain import (
    ERFRefreshHook,
    ExportHook,
    FeatureCollapseError,
    FeatureCollapseHook,
    add_montage_config,
    assert_montage_cfg,
    build_montage_train_loader,
    command_line_length,
    fit_schedule_to_bank,
)
from builder.bank import BankFormatError, SampleBank
from montage_pretrain.config import merge_config_file
from montage_pretrain.distributed import cpu_ddp, fit_sync_norms
from montage_pretrain.export_format import WeightFileError
from montage_pretrain.loading import check_weights_path, use_safe_checkpointer
from montage_pretrain.nonfinite import latest_losses, nonfinite_message
from montage_pretrain.plain_logs import plain_config_logs


class Trainer(DefaultTrainer):
    """
    DefaultTrainer with the montage loader, bf16 AMP, the ERF and export hooks, and training
    monitors every ``MONTAGE.LOG_PERIOD`` iterations only (each reading waits for the device).
    """

    def __init__(self, cfg):
        with cpu_ddp():  # several CPU processes: DDP without device_ids
            super().__init__(cfg)
        # MODEL.WEIGHTS and --resume: read without running code in the file.
        use_safe_checkpointer(self)
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer.precision = getattr(torch, cfg.MONTAGE.AMP_DTYPE)
            if self._trainer.precision == torch.bfloat16:
                # bf16 has fp32's range: loss scaling only adds an unscale pass and a sync.
                self._trainer.grad_scaler = torch.amp.GradScaler("cuda", enabled=False)
        periodic_metrics(self._trainer, cfg.MONTAGE.LOG_PERIOD, cfg.SOLVER.MAX_ITER)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        # Every Montage model (the pyramid one too) reads its monitors every LOG_PERIOD.
        model.LOG_PERIOD = cfg.MONTAGE.LOG_PERIOD
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        return build_montage_train_loader(cfg)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        # Pre-training has no detection test set; the training monitor is montage/crop_acc.
        return {}

    def build_hooks(self):
        cfg = self.cfg
        ret = super().build_hooks()
        # ERF weights must be ready before the first step; export once training has finished.
        ret.insert(0, ERFRefreshHook(cfg))
        # After the ERF hook (its BN calibration sets the random init's statistics), before
        # the checkpointer, so a collapsed state raises before it is saved or exported.
        ret.insert(1, FeatureCollapseHook(cfg))
        ret.append(ExportHook(cfg, os.path.join(cfg.OUTPUT_DIR, cfg.MONTAGE.EXPORT_NAME)))
        return ret


def periodic_metrics(trainer, period, max_iter):
    """
    Detectron2's loss metrics (``.item()`` of every loss: a device sync) of ``trainer`` (a
    SimpleTrainer / AMPTrainer) at the iterations of the model's monitors only: 0, ``period``,
    2 ``period``, ... and the last. The NaN / inf check of the loss runs there too.
    """
    def write(loss_dict, data_time, prefix="", iter=None):
        it = trainer.iter if iter is None else iter
        if it % period == 0 or it + 1 >= max_iter:
            SimpleTrainer.write_metrics(loss_dict, data_time, it, prefix)

    trainer._write_metrics = write


def check_inputs(cfg):
    """
    Checks the files a user names before anything is written to OUTPUT_DIR (a failed start must
    not replace the ``config.yaml`` of a finished run): the bank opens as a sample bank
    (:class:`~builder.bank.SampleBank`: format, label and group ranges), ``MODEL.WEIGHTS``
    exists. Raises ValueError or FileNotFoundError with a one-line message. Returns the bank's
    number of crops.
    """
    if not cfg.MONTAGE.BANK:
        raise ValueError("MONTAGE.BANK is empty: pass MONTAGE.BANK path/to/bank.h5 (make samples)")
    bank = SampleBank(cfg.MONTAGE.BANK)
    try:
        bank.num_classes  # opens and checks the file
        num_crops = len(bank.labels)
    finally:
        bank.close()
    check_weights_path(cfg.MODEL.WEIGHTS)
    return num_crops


def setup(args):
    """Creates the config: defaults -> cfg.MONTAGE -> file -> command line -> checks."""
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, args.config_file)  # plain YAML only: a config file runs no code
    cfg.merge_from_list(args.opts)
    length_note = command_line_length(cfg, args.opts)  # explicit SOLVER.MAX_ITER: no BANK_PASSES
    num_crops = check_inputs(cfg)  # before the first file is written
    plain_config_logs()  # log.txt and captured stdout without ANSI colour codes
    # default_setup only sets up the detectron2 and fvcore loggers; ours report the config
    # adaptations below, ERF refreshes, group fallbacks and the export.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="montage_pretrain")
    if length_note:
        logging.getLogger("montage_pretrain").info(length_note)
    fit_schedule_to_bank(cfg, num_crops)  # MONTAGE.BANK_PASSES; before the schedule's checks
    assert_montage_cfg(cfg, world_size=comm.get_world_size())
    fit_sync_norms(cfg, comm.get_world_size())
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def _last_line(error):
    """A worker's error arrives as "Caught X in DataLoader worker ...\nOriginal Traceback ...":
    its own message is the last line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def main(args):
    try:
        # A refused config, bank or weight path (ValueError subclasses: ConfigFileError,
        # BankFormatError, WeightFileError; assert_montage_cfg's) or a missing file: one line.
        cfg = setup(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train_net.py: {e}") from None
    if args.eval_only:
        raise SystemExit("--eval-only: pre-training has no evaluation; fine-tune the export instead")
    trainer = Trainer(cfg)
    try:
        trainer.resume_or_load(resume=args.resume)
    except WeightFileError as e:  # MODEL.WEIGHTS or the --resume checkpoint refused
        raise SystemExit(f"train_net.py: {e}") from None
    try:
        return trainer.train()
    except BankFormatError as e:  # a damaged crop met during training
        raise SystemExit(f"train_net.py: {_last_line(e)}") from None
    except FeatureCollapseError as e:  # MONTAGE.COLLAPSE: nothing is exported
        raise SystemExit(f"train_net.py: {e}") from None
    except FloatingPointError as e:  # Detectron2's non-finite loss check
        raise SystemExit(nonfinite_message("train_net.py", e, cfg, trainer.iter,
                                           cfg.MONTAGE.LOG_PERIOD, latest_losses(trainer))) from None


def invoke_main():
    args = default_argument_parser().parse_args()
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

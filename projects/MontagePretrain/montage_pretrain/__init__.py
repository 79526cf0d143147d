"""Montage pre-training (Zhou et al., "Cheaper Pre-training Lunch", ECCV 2020) for Detectron2."""
from .config import (add_montage_config, assert_montage_cfg, bank_iterations, command_line_length,
                     fit_schedule_to_bank)
from .data import MontageStream, build_montage_train_loader, collate_montages, collate_packed
from .export import convert_state_dict, export_backbone
from .hooks import ERFRefreshHook, ExportHook, FeatureCollapseError, FeatureCollapseHook
from .meta_arch import MontageClassifier
from .fpn_meta_arch import MontageFPNClassifier
from .montage import MontageTemplate, assemble_montages, unpack_crops
from . import backbones as _  # noqa: F401  (registers the RegNet builders)

__all__ = [k for k in globals().keys() if not k.startswith("_")]

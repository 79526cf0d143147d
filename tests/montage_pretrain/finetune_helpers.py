"""
Shared helpers of the hand-off tests (a plain module, not conftest.py, so test files can import
it by a name unique in the repo).
"""
import os

from detectron2.config import get_cfg
from montage_pretrain.config import add_montage_config, merge_config_file

FINETUNE = os.path.join(
    os.path.dirname(__file__), "..", "..", "projects", "MontagePretrain", "configs", "finetune"
)
TOY = os.path.join(FINETUNE, "demo", "faster_rcnn_R_18_FPN_toy.yaml")
TOY_GN = os.path.join(FINETUNE, "demo", "faster_rcnn_R_18_FPN_toy_gn.yaml")


def finetune_cfg(config=TOY, *opts):
    """The fine-tuning config ``config`` on the CPU with 3 classes, plus ``opts``."""
    cfg = get_cfg()
    add_montage_config(cfg)
    merge_config_file(cfg, config)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3", *opts])
    return cfg

"""COCO evaluation helpers: the AP summary, metrics_final.json and the COCOeval choice."""
import json
import sys
import types

import pytest

from detectron2.config import get_cfg
from montage_pretrain import evaluation
from montage_pretrain.evaluation import (
    build_coco_evaluator,
    fast_coco_eval_available,
    format_table,
    summarize,
    write_metrics,
)


def test_summarize_keeps_ap_and_maps_nan():
    results = {"bbox": {"AP": 1.5, "AP50": 3.0, "AP75": float("nan"), "APs": 0.5, "APm": 1.0,
                        "APl": 2.0, "AP-cat": 4.0}}
    assert summarize(results) == {"bbox": {"AP": 1.5, "AP50": 3.0, "AP75": None, "APs": 0.5,
                                           "APm": 1.0, "APl": 2.0}}


def test_summarize_no_detections_is_zero_ap():
    nan = float("nan")
    summary = summarize({"bbox": dict.fromkeys(evaluation.METRIC_KEYS, nan)})
    assert summary["bbox"]["AP"] == summary["bbox"]["AP50"] == summary["bbox"]["AP75"] == 0.0
    assert summary["bbox"]["APs"] is None


def test_summarize_per_dataset():
    results = {"a": {"bbox": {"AP": 1.0}}, "b": {"bbox": {"AP": 2.0}}}
    assert summarize(results) == {"a": {"bbox": {"AP": 1.0}}, "b": {"bbox": {"AP": 2.0}}}
    assert summarize({}) == {}


def test_write_metrics_record_and_table(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("t",), ("v",)
    metrics = {"bbox": {"AP": 1.0, "AP50": None}}
    path = write_metrics(cfg, metrics, {"wall_s": 2.0}, config_file="c.yaml", eval_only=True)
    with open(path) as f:
        record = json.load(f)
    assert record["bbox"] == {"AP": 1.0, "AP50": None} and record["wall_s"] == 2.0
    assert record["config_file"] == "c.yaml" and record["eval_only"] is True
    assert record["train_datasets"] == ["t"] and record["test_datasets"] == ["v"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics_final.json"]
    table = format_table(metrics)
    assert "AP50" in table and "1.00" in table and "nan" in table


@pytest.mark.parametrize("compiled", [True, False])
def test_fast_coco_eval_follows_compiled_ops(compiled, monkeypatch):
    # None in sys.modules makes the import fail; a module object makes it succeed.
    monkeypatch.setitem(sys.modules, "detectron2._C", types.ModuleType("_C") if compiled else None)
    assert fast_coco_eval_available() is compiled
    seen = {}

    def fake_evaluator(dataset_name, output_dir=None, use_fast_impl=None):
        seen.update(dataset_name=dataset_name, output_dir=output_dir, use_fast_impl=use_fast_impl)

    monkeypatch.setattr(evaluation, "COCOEvaluator", fake_evaluator)
    cfg = get_cfg()
    cfg.OUTPUT_DIR = "out"
    build_coco_evaluator(cfg, "val")
    assert seen == {"dataset_name": "val", "output_dir": "out/inference/val",
                    "use_fast_impl": compiled}

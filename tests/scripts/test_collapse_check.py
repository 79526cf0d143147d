"""scripts/collapse_check.py: the guard's measurement on a finished run folder."""
import json

import pytest
import torch


def _run_folder(tmp_path, bank, res5_shift=None):
    """A pre-training OUTPUT_DIR (config.yaml + model_final.pth) of a random-init R-18 Montage
    model; ``res5_shift`` sets the bias of res5's last BN (a dead-unit collapse)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from tests.conftest import _r18_pretrain_cfg

    cfg = _r18_pretrain_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "MontageClassifier", "MONTAGE.BANK", bank,
                         "MONTAGE.INPUT_SIZE", "64", "MONTAGE.COLLAPSE.NUM_IMAGES", "4",
                         "MODEL.DEVICE", "cpu", "SEED", "3"])
    torch.manual_seed(3)
    model = build_model(cfg)
    if res5_shift is not None:
        with torch.no_grad():
            model.backbone.res5[-1].conv2.norm.bias.fill_(res5_shift)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    return str(tmp_path)


def test_healthy_and_collapsed_runs(load_script, bank_path, tmp_path):
    check = load_script("collapse_check")
    healthy = _run_folder(tmp_path / "healthy", bank_path)
    dead = _run_folder(tmp_path / "dead", bank_path, res5_shift=-100.0)
    out = tmp_path / "rows.json"
    assert check.main([healthy, "--json", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    # random init rebuilt from the config's seed: the same network as the checkpoint
    assert row["pr"] == pytest.approx(row["random_pr"], rel=1e-3) and row["ratio"] > 0.99
    assert row["dead"] == 0.0 and not row["collapsed"]
    assert check.main([healthy, dead, "--json", str(out)]) == 1
    rows = json.loads(out.read_text())
    assert rows[1]["dead"] == 1.0 and rows[1]["pr"] == 0.0 and rows[1]["collapsed"]


def test_missing_checkpoint_is_one_line(load_script, bank_path, tmp_path):
    check = load_script("collapse_check")
    run = _run_folder(tmp_path / "run", bank_path)
    with pytest.raises(SystemExit, match=r"model_0000009\.pth: not found; pass a pre-training"):
        check.main([run, "--checkpoint", "model_0000009.pth"])

"""End to end on a tiny bank: train_net trains, refreshes ERF weights, checkpoints, resumes, exports."""
import os
import pickle

import pytest
import numpy as np
import torch

from detectron2.engine import default_argument_parser

TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MONTAGE.INPUT_SIZE", "64", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "6",
    "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.CHECKPOINT_PERIOD", "3",
    "MONTAGE.ERF_PERIOD", "3", "MONTAGE.ERF_NUM_IMAGES", "2", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.DEVICE", "cpu", "SEED", "1",
]
CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "projects", "MontagePretrain", "configs",
                      "Base-Montage.yaml")


@pytest.fixture(scope="module")
def train_net(load_module):
    return load_module("projects/MontagePretrain/train_net.py")


def run(train_net, bank, out, resume=False, extra=()):
    argv = ["--config-file", CONFIG] + (["--resume"] if resume else [])
    argv += ["MONTAGE.BANK", bank, "OUTPUT_DIR", str(out)] + TINY + list(extra)
    return train_net.main(default_argument_parser().parse_args(argv))


def test_pretrain_end_to_end_then_resume(train_net, bank_path, tmp_path):
    out = tmp_path / "run"
    run(train_net, bank_path, out)
    files = set(os.listdir(out))
    assert {"model_final.pth", "model_0000002.pth", "config.yaml", "metrics.json",
            "montage_backbone.pkl", "montage_backbone.pkl.yaml"} <= files

    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    mid = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=False)["model"]
    # refreshed before iteration 0 (random init) and at iteration 3 by the hook
    assert int(mid["erf_iter"]) == 0 and int(final["erf_iter"]) == 3
    assert not torch.equal(mid["erf_weights"], final["erf_weights"])
    assert torch.allclose(final["erf_weights"].sum(0), torch.ones(2, 2), atol=1e-5)

    with open(out / "montage_backbone.pkl", "rb") as f:
        export = pickle.load(f)
    assert export["matching_heuristics"] and export["__author__"] == "MontagePretrain"
    assert all(k.startswith(("stem.", "res")) for k in export["model"])
    # the default export is the trained weights at init scale (MONTAGE.EXPORT_WEIGHT_SCALE init)
    from montage_pretrain.export import convert_state_dict
    from montage_pretrain.weight_scale import reset_to_init_scale

    expected = reset_to_init_scale(convert_state_dict(final)[0])[0]
    assert export["montage"]["weight_scale"] == "init"
    np.testing.assert_allclose(export["model"]["res5.1.conv2.weight"],
                               expected["res5.1.conv2.weight"], rtol=1e-5, atol=1e-7)

    # Resume from the iteration-2 checkpoint: the ERF targets come from the checkpoint, are not
    # recomputed before the first resumed step, and the run finishes at the same iteration.
    os.remove(out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_0000002.pth")
    cfg = train_net.setup(default_argument_parser().parse_args(
        ["--config-file", CONFIG, "MONTAGE.BANK", bank_path, "OUTPUT_DIR", str(out)] + TINY))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3
    assert torch.equal(trainer.model.erf_weights, mid["erf_weights"])
    trainer.train()
    resumed = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert int(resumed["erf_iter"]) == 3


def test_bank_passes_sets_the_schedule_from_the_bank(train_net, bank_path, tmp_path):
    """MONTAGE.BANK_PASSES (139 from Base-Montage.yaml) in setup: the iterations come from the
    bank's crops (read once when the bank is checked), before the warm-up < MAX_ITER check; a
    SOLVER.MAX_ITER on the command line wins, logged; both on the command line: one line."""
    from builder.bank import SampleBank

    bank = SampleBank(bank_path)
    crops = len(bank.labels)
    bank.close()
    no_length = [k_v for pair in zip(TINY[0::2], TINY[1::2]) if pair[0] != "SOLVER.MAX_ITER"
                 for k_v in pair]

    def setup(out, opts):
        return train_net.setup(default_argument_parser().parse_args(
            ["--config-file", CONFIG, "MONTAGE.BANK", bank_path, "OUTPUT_DIR", str(out)] + opts))

    cfg = setup(tmp_path / "default", no_length)
    assert cfg.MONTAGE.BANK_PASSES == 139
    assert cfg.SOLVER.MAX_ITER == -(-139 * crops // (4 * 4))
    assert cfg.MONTAGE.ERF_PERIOD == max(1, round(3 * cfg.SOLVER.MAX_ITER / 64000))
    assert "MONTAGE.BANK_PASSES=139" in (tmp_path / "default" / "log.txt").read_text()

    cfg = setup(tmp_path / "passes8", no_length + ["MONTAGE.BANK_PASSES", "8"])
    assert cfg.SOLVER.MAX_ITER == -(-8 * crops // (4 * 4))

    cfg = setup(tmp_path / "explicit", TINY)
    assert (cfg.SOLVER.MAX_ITER, cfg.MONTAGE.BANK_PASSES, cfg.MONTAGE.ERF_PERIOD) == (6, 0, 3)
    log = (tmp_path / "explicit" / "log.txt").read_text()
    assert "SOLVER.MAX_ITER=6 from the command line: MONTAGE.BANK_PASSES 139 -> 0" in log

    with pytest.raises(ValueError, match="both on the command line") as e:
        setup(tmp_path / "both", TINY + ["MONTAGE.BANK_PASSES", "8"])
    assert "\n" not in str(e.value) and not (tmp_path / "both").exists()


def test_gn_pretraining_hands_off_to_gn_detector(train_net, bank_path, tmp_path):
    """MODEL.RESNETS.NORM GN: pre-trains (PreciseBN / BN calibration have nothing to do), the
    export records GN and holds no running statistics, and the GN toy detector loads every
    backbone tensor of it unchanged."""
    from detectron2.modeling import build_model
    from finetune_helpers import TOY_GN, finetune_cfg
    from montage_pretrain.loading import load_and_verify, read_checked_weights

    out = tmp_path / "gn"
    run(train_net, bank_path, out, extra=["MODEL.RESNETS.NORM", "GN", "SOLVER.MAX_ITER", "3"])
    export = str(out / "montage_backbone.pkl")
    with open(export, "rb") as f:
        data = pickle.load(f)
    assert data["montage"]["MODEL.RESNETS.NORM"] == "GN" and data["montage"]["iteration"] == 3
    assert not any("running" in k for k in data["model"])
    assert "NORM: GN" in (out / "montage_backbone.pkl.yaml").read_text()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]

    cfg = finetune_cfg(TOY_GN, "MODEL.WEIGHTS", export)
    model = build_model(cfg)
    summary = load_and_verify(model, read_checked_weights(cfg))
    assert summary["loaded"] == summary["total"] == 60
    state = model.backbone.bottom_up.state_dict()
    assert all(torch.equal(state[k], final["backbone." + k]) for k in data["model"])


def test_loss_metrics_only_every_log_period(train_net, monkeypatch):
    """Detectron2's loss metrics (.item() of every loss, a device sync) at 0, N, 2N ... and the
    last iteration only, as the model's montage/* monitors."""
    written = []
    monkeypatch.setattr(train_net.SimpleTrainer, "write_metrics",
                        staticmethod(lambda loss, data_time, it, prefix="": written.append(it)))
    inner = type("Inner", (), {"iter": 0})()
    train_net.periodic_metrics(inner, 4, max_iter=11)
    for it in range(11):
        inner.iter = it
        inner._write_metrics({"loss": torch.tensor(1.0)}, 0.0)
    assert written == [0, 4, 8, 10]


def _fake_health(monkeypatch, train_net, prs, dead=None):
    """The guard's measurements return ``prs`` (and ``dead``, default 0) in turn (the last one
    repeats)."""
    calls = []
    dead = dead or [0.0] * len(prs)

    def measure(self):
        calls.append(self.trainer.iter)
        i = min(len(calls), len(prs)) - 1
        return {"pr": prs[i], "dead": dead[i]}

    monkeypatch.setattr(train_net.FeatureCollapseHook, "measure", measure)
    return calls


def test_collapse_guard_stops_before_checkpoint_and_export(train_net, bank_path, tmp_path,
                                                            monkeypatch):
    """MONTAGE.COLLAPSE: a participation ratio below MIN_PR_RATIO x the random init's ends the
    run with one line; the collapsed state is neither checkpointed nor exported."""
    out = tmp_path / "run"
    calls = _fake_health(monkeypatch, train_net, [80.0, 60.0, 2.0])
    with pytest.raises(SystemExit) as e:
        run(train_net, bank_path, out, extra=["MONTAGE.COLLAPSE.PERIOD", "2"])
    msg = str(e.value)
    assert "\n" not in msg and "collapsed by iteration 4" in msg and "80.0" in msg
    assert "2.0" in msg and "SOLVER.BASE_LR" in msg
    assert calls == [0, 1, 3]  # before training, then after iterations 2 and 4
    files = set(os.listdir(out))
    assert "montage_backbone.pkl" not in files and "model_final.pth" not in files
    assert "model_0000002.pth" in files  # the healthy checkpoint before the collapse is kept


def test_collapse_guard_warn_goes_on_and_resumes_with_the_reference(train_net, bank_path,
                                                                    tmp_path, monkeypatch):
    import json

    out = tmp_path / "run"
    _fake_health(monkeypatch, train_net, [80.0, 2.0])
    run(train_net, bank_path, out, extra=["MONTAGE.COLLAPSE.PERIOD", "3",
                                          "MONTAGE.COLLAPSE.ACTION", "warn"])
    assert (out / "montage_backbone.pkl").exists()
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    # Detectron2's writers log the latest value at their period (here: the last iteration)
    assert [r["montage/feature_pr"] for r in rows if "montage/feature_pr" in r] == [2.0]
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["trainer"]["hooks"]["FeatureCollapseHook"] == {"reference": 80.0}
    # Resuming the collapsed run with the default action: the reference comes from the
    # checkpoint (no new random-init measurement) and the check fails at once.
    calls = _fake_health(monkeypatch, train_net, [2.0])
    with pytest.raises(SystemExit, match="collapsed by iteration 6.*random init's 80.0"):
        run(train_net, bank_path, out, resume=True)
    assert calls == [6]


def test_collapse_guard_stops_on_dead_channels_whatever_the_ratio(train_net, bank_path,
                                                                  tmp_path, monkeypatch):
    """MAX_DEAD: half the channels dead stops the run even with the PR above its threshold (a PR
    capped by few positions, as at a 64 px canvas, can miss a collapse)."""
    _fake_health(monkeypatch, train_net, [30.0, 12.0, 12.0], dead=[0.0, 0.49, 0.5])
    with pytest.raises(SystemExit, match=r"iteration 4.* 50 % of its channels are dead"):
        run(train_net, bank_path, tmp_path / "run", extra=["MONTAGE.COLLAPSE.PERIOD", "2"])


def test_collapse_guard_real_measurement_passes_a_healthy_run(train_net, bank_path, tmp_path):
    import json

    out = tmp_path / "run"
    run(train_net, bank_path, out, extra=["MONTAGE.COLLAPSE.PERIOD", "3"])
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    prs = [r["montage/feature_pr"] for r in rows if "montage/feature_pr" in r]
    assert prs and all(p > 1.0 for p in prs)


@pytest.mark.parametrize("key,value,needle", [
    ("MONTAGE.COLLAPSE.ACTION", "ignore", "use stop"),
    ("MONTAGE.COLLAPSE.MIN_PR_RATIO", "1.5", "ratio in [0, 1)"),
    ("MONTAGE.COLLAPSE.PERIOD", "-1", "period >= 0"),
    ("MONTAGE.COLLAPSE.NUM_IMAGES", "0", "use >= 1"),
    ("MONTAGE.COLLAPSE.MAX_DEAD", "0.0", "fraction in (0, 1]"),
])
def test_collapse_guard_bad_config_is_one_line(train_net, bank_path, tmp_path, key, value, needle):
    with pytest.raises(SystemExit) as e:
        run(train_net, bank_path, tmp_path / "run", extra=[key, value])
    assert needle in str(e.value) and key.split(".")[-1] in str(e.value)

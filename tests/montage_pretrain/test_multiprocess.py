"""
Several processes for real: Detectron2's ``launch`` starts 2 CPU processes (gloo) and each rank
dumps what it saw to ``rank<r>.pt``; the tests compare the ranks. Pre-training: each rank draws
its own montages, all ranks hold the same ERF weights and parameters, exactly one export is
written, a resume continues on every rank. Fine-tuning from an export finishes with the same
model on both ranks. And a pre-training loader worker killed with SIGKILL stops training with a
clear error within seconds.

The worker functions live at module level: ``launch`` spawns its processes, which import them
by name.
"""
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import time

import pytest
import numpy as np
import torch
from torch.multiprocessing import ProcessRaisedException

from detectron2.engine import HookBase, default_argument_parser, launch
from detectron2.utils import comm

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROJECT = os.path.join(ROOT, "projects", "MontagePretrain")
CONFIG = os.path.join(PROJECT, "configs", "Base-Montage.yaml")
# test_train_net's TINY with 2 montages per rank, a 2-batch PreciseBN, and the config's own
# NORM (SyncBN: on 2 CPU processes it must become naiveSyncBN, which synchronises for real).
TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MONTAGE.INPUT_SIZE", "64", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "6",
    "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.CHECKPOINT_PERIOD", "3",
    "MONTAGE.ERF_PERIOD", "3", "MONTAGE.ERF_NUM_IMAGES", "2", "DATALOADER.NUM_WORKERS", "0",
    "TEST.PRECISE_BN.NUM_ITER", "2", "MODEL.DEVICE", "cpu", "SEED", "1",
]
WORLD = 2


def _load(relpath):
    """Imports an entry-point file of the checkout (conftest's load_module, in a spawned rank)."""
    name = os.path.splitext(os.path.basename(relpath))[0] + "_rank"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fingerprint(model):
    """Per-tensor float64 sum and absolute sum of the state dict (equal for equal models)."""
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    return {k: (v.double().sum().item(), v.double().abs().sum().item())
            for k, v in state.items() if v.is_floating_point()}


def _batch_hash(batch):
    crops = batch["pixels"] if "pixels" in batch else batch["crops"]  # packed or padded
    return hashlib.sha1(crops.numpy().tobytes() + batch["labels"].numpy().tobytes()
                        ).hexdigest()


class _RecordedLoader:
    """Iterates ``loader`` and appends each batch's hash to ``hashes``."""

    def __init__(self, loader, hashes):
        self._loader, self._hashes = loader, hashes

    def __iter__(self):
        for batch in self._loader:
            self._hashes.append(_batch_hash(batch))
            yield batch


class _Recorder(HookBase):
    """Records the rank's start iteration, ERF weights after every step and final parameters."""

    def __init__(self, dump_dir, record):
        self._path = os.path.join(dump_dir, f"rank{comm.get_rank()}.pt")
        self._record = record

    def _model(self):
        from montage_pretrain.hooks import unwrap_model

        return unwrap_model(self.trainer.model)

    def before_train(self):
        # Runs after ERFRefreshHook.before_train (registered later).
        model = self._model()
        self._record.update(start_iter=self.trainer.start_iter, erf_iter_at_start=int(
            model.erf_iter), erf_at_start=model.erf_weights.clone(), erf={})

    def after_step(self):
        model = self._model()
        self._record["erf"][self.trainer.iter] = (int(model.erf_iter), model.erf_weights.clone())

    def after_train(self):
        self._record["params"] = _fingerprint(self.trainer.model)
        torch.save(self._record, self._path)


def _pretrain_worker(argv, dump_dir):
    """One rank of train_net.main, recording its batches, ERF weights, export calls, model."""
    torch.set_num_threads(1)
    train_net = _load("projects/MontagePretrain/train_net.py")
    import montage_pretrain.hooks as hooks

    record = {"batches": [], "exports": 0}
    real_export = hooks.export_backbone

    def counting_export(*args, **kwargs):
        record["exports"] += 1
        return real_export(*args, **kwargs)

    hooks.export_backbone = counting_export  # this spawned process only

    class RecordingTrainer(train_net.Trainer):
        loaders = 0

        @classmethod
        def build_train_loader(cls, cfg):
            cls.loaders += 1
            # The first loader is the training one; PreciseBN builds its own later.
            loader = super().build_train_loader(cfg)
            return _RecordedLoader(loader, record["batches"]) if cls.loaders == 1 else loader

    args = default_argument_parser().parse_args(argv)
    cfg = train_net.setup(args)
    record["norm"] = cfg.MODEL.RESNETS.NORM
    trainer = RecordingTrainer(cfg)
    trainer.register_hooks([_Recorder(dump_dir, record)])
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


def _launch(worker, *args):
    launch(worker, WORLD, dist_url="auto", args=args)


def _ranks(dump_dir):
    return [torch.load(os.path.join(dump_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


def _pretrain(bank, out, dump_dir, resume=False):
    os.makedirs(dump_dir, exist_ok=True)
    argv = ["--config-file", CONFIG] + (["--resume"] if resume else [])
    argv += ["MONTAGE.BANK", bank, "OUTPUT_DIR", str(out)] + TINY
    _launch(_pretrain_worker, argv, str(dump_dir))
    return _ranks(dump_dir)


def _assert_same_erf_and_params(ranks):
    a, b = ranks
    assert a["erf"].keys() == b["erf"].keys()
    for it in a["erf"]:
        assert a["erf"][it][0] == b["erf"][it][0], f"erf_iter differs at iter {it}"
        assert torch.equal(a["erf"][it][1], b["erf"][it][1]), f"ERF weights differ at iter {it}"
    assert a["params"] == b["params"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-process pre-training run: (bank, OUTPUT_DIR, per-rank records)."""
    from tests.conftest import write_bank  # the bank_path fixture is per test

    root = tmp_path_factory.mktemp("two_ranks")
    bank = write_bank(root / "bank.h5")
    out = root / "run"
    return bank, out, _pretrain(bank, out, root / "dump")


def test_pretrain_two_processes(two_rank_run):
    from montage_pretrain.data import MontageStream, collate_packed

    bank, out, ranks = two_rank_run
    assert [r["norm"] for r in ranks] == ["naiveSyncBN"] * WORLD  # SyncBN needs CUDA

    # Each rank draws its own montages: rank r's stream (seed, r), none shared between ranks.
    for rank, rec in enumerate(ranks):
        assert len(rec["batches"]) == 6
        stream = iter(MontageStream(bank, seed=1, rank=rank))
        assert rec["batches"][0] == _batch_hash(collate_packed([next(stream) for _ in range(2)]))
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])

    # All ranks hold the same ERF weights at every step (refreshed before iter 0 and at iter 3)
    # and end with the same parameters.
    _assert_same_erf_and_params(ranks)
    assert ranks[0]["erf"][2][0] == 0 and ranks[0]["erf"][5][0] == 3
    assert not torch.equal(ranks[0]["erf"][2][1], ranks[0]["erf"][5][1])

    # Exactly one export, by rank 0.
    assert [r["exports"] for r in ranks] == [1, 0]
    with open(out / "montage_backbone.pkl", "rb") as f:
        export = pickle.load(f)
    assert export["montage"]["MODEL.RESNETS.NORM"] == "naiveSyncBN"
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    # the default export is the trained weights at init scale (MONTAGE.EXPORT_WEIGHT_SCALE init)
    from montage_pretrain.export import convert_state_dict
    from montage_pretrain.weight_scale import reset_to_init_scale

    expected = reset_to_init_scale(convert_state_dict(final)[0])[0]
    assert export["montage"]["weight_scale"] == "init"
    np.testing.assert_allclose(export["model"]["res5.1.conv2.weight"],
                               expected["res5.1.conv2.weight"], rtol=1e-5, atol=1e-7)


def test_pretrain_resume_on_two_processes(two_rank_run, tmp_path):
    """From the iteration-2 checkpoint every rank starts at 3 with the checkpoint's ERF weights
    (not recomputed), and the ranks stay in step to the end."""
    bank, run, _ = two_rank_run
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(run / "model_0000002.pth", out)
    (out / "last_checkpoint").write_text("model_0000002.pth")
    mid = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=False)["model"]
    resumed = _pretrain(bank, out, tmp_path / "dump", resume=True)
    for rec in resumed:
        assert rec["start_iter"] == 3 and rec["erf_iter_at_start"] == 0
        assert torch.equal(rec["erf_at_start"], mid["erf_weights"])
        assert sorted(rec["erf"]) == [3, 4, 5] and len(rec["batches"]) == 3
    _assert_same_erf_and_params(resumed)
    assert resumed[0]["erf"][5][0] == 3
    assert [r["exports"] for r in resumed] == [1, 0]
    assert (out / "montage_backbone.pkl").is_file()


def test_erf_montages_are_the_same_on_every_rank(bank_path, monkeypatch):
    """The ERF set is rank 0's stream everywhere (plain BN calibrates from it, unsynchronised);
    the training stream takes the rank it was built on, also inside spawned workers."""
    from detectron2.config import get_cfg
    from montage_pretrain import add_montage_config
    from montage_pretrain import data as data_mod
    from montage_pretrain.data import MontageStream
    from montage_pretrain.hooks import ERFRefreshHook

    cfg = get_cfg()
    add_montage_config(cfg)
    cfg.merge_from_list(["MONTAGE.BANK", bank_path, "MONTAGE.ERF_NUM_IMAGES", "2", "SEED", "1"])
    on_rank0 = ERFRefreshHook(cfg)._montages()
    rank0_stream = MontageStream(bank_path, seed=1)
    monkeypatch.setattr(data_mod.comm, "get_rank", lambda: 1)
    on_rank1 = ERFRefreshHook(cfg)._montages()
    assert all(torch.equal(on_rank0[k], on_rank1[k]) for k in on_rank0)
    assert rank0_stream.rank == 0 and MontageStream(bank_path, seed=1).rank == 1


def _finetune_worker(argv, dump_dir):
    """One rank of finetune_net.main, dumping its final parameters."""
    torch.set_num_threads(1)
    finetune_net = _load("projects/MontagePretrain/finetune_net.py")
    record = {}
    build_hooks = finetune_net.Trainer.build_hooks

    class Fingerprint(HookBase):
        def after_train(self):
            record["params"] = _fingerprint(self.trainer.model)
            record["iter"] = self.trainer.iter
            record["norm"] = self.trainer.cfg.MODEL.RESNETS.NORM
            torch.save(record, os.path.join(dump_dir, f"rank{comm.get_rank()}.pt"))

    finetune_net.Trainer.build_hooks = lambda self: build_hooks(self) + [Fingerprint()]
    finetune_net.main(finetune_net.parse_args(argv))


def test_finetune_two_processes(tmp_path, r18_export):
    from finetune_helpers import TOY
    from test_finetune_net import TINY as FT_TINY, tiny_args, write_tiny_coco

    root = tmp_path / "coco"
    tiny = write_tiny_coco(root, "train", 4, seed=0), write_tiny_coco(root, "val", 2, seed=1)
    out = tmp_path / "ft"
    argv = ["--config-file", TOY, "--num-gpus", str(WORLD), *tiny_args(tiny, "tiny_ddp"), *FT_TINY,
            "MODEL.WEIGHTS", r18_export, "MODEL.RESNETS.NORM", "SyncBN", "OUTPUT_DIR", str(out)]
    _launch(_finetune_worker, argv, str(tmp_path))
    ranks = _ranks(tmp_path)
    assert [r["norm"] for r in ranks] == ["naiveSyncBN"] * WORLD
    assert [r["iter"] for r in ranks] == [4, 4]  # a finished run ends at MAX_ITER
    assert ranks[0]["params"] == ranks[1]["params"]
    metrics = json.loads((out / "metrics_final.json").read_text())
    assert metrics["iterations_run"] == 4 and metrics["backbone_tensors_loaded"] == 100


WORKER_DIED = (r"DataLoader worker \(pid \d+, killed by SIGKILL\) of the montage loader died"
               r"|DataLoader worker \(pid \d+\) is killed by signal")
# A long run (it must be stopped by the error) with one loader worker and nothing after it.
KILL_OPTS = ["DATALOADER.NUM_WORKERS", "1", "SOLVER.MAX_ITER", "1000",
             "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.PRECISE_BN.ENABLED", "False"]


class _KillLoaderWorker(HookBase):
    """SIGKILLs the training loader's worker after iteration ``at``; the time goes to ``note``."""

    def __init__(self, at, note=None):
        self._at = at
        self._note = note
        self.killed_at = None

    def after_step(self):
        if self.trainer.iter == self._at:
            workers = self.trainer._trainer.data_loader._iterator._workers  # persistent
            os.kill(workers[0].pid, signal.SIGKILL)
            self.killed_at = time.time()
            if self._note:
                with open(self._note, "w") as f:
                    f.write(repr(self.killed_at))


def test_killed_loader_worker_stops_pretraining_with_a_clear_error(load_module, bank_path,
                                                                    tmp_path, few_threads):
    train_net = load_module("projects/MontagePretrain/train_net.py")
    argv = ["--config-file", CONFIG, "MONTAGE.BANK", bank_path, "OUTPUT_DIR", str(tmp_path)]
    argv += TINY + KILL_OPTS
    cfg = train_net.setup(default_argument_parser().parse_args(argv))
    trainer = train_net.Trainer(cfg)
    killer = _KillLoaderWorker(at=1)
    trainer.register_hooks([killer])
    # MontageLoader's message, or torch's own when its SIGCHLD handler fires outside next()
    # ("DataLoader worker (pid N) is killed by signal: Killed."); never a bare
    # ConnectionResetError from the dead worker's queued batch.
    with pytest.raises(RuntimeError, match=WORKER_DIED):
        trainer.train()
    assert killer.killed_at is not None
    assert time.time() - killer.killed_at < 15
    assert trainer.iter < 20  # stopped right away: at most the prefetched batches were used


def _kill_worker_rank(argv, dump_dir):
    """Pre-trains; rank 1 SIGKILLs its loader worker after iteration 1 and notes when."""
    torch.set_num_threads(1)
    train_net = _load("projects/MontagePretrain/train_net.py")
    trainer = train_net.Trainer(train_net.setup(default_argument_parser().parse_args(argv)))
    if comm.get_rank() == 1:
        killer = _KillLoaderWorker(at=1, note=os.path.join(dump_dir, "killed_at"))
        trainer.register_hooks([killer])
    trainer.train()


def test_killed_loader_worker_on_one_rank_stops_every_rank(bank_path, tmp_path):
    """Rank 0 waits in the gradient all-reduce for rank 1, which died: launch must end it."""
    argv = ["--config-file", CONFIG, "MONTAGE.BANK", bank_path, "OUTPUT_DIR", str(tmp_path)]
    argv += TINY + KILL_OPTS
    with pytest.raises(ProcessRaisedException, match=WORKER_DIED):
        _launch(_kill_worker_rank, argv, str(tmp_path))
    killed_at = float((tmp_path / "killed_at").read_text())
    assert time.time() - killed_at < 15


class _RaisingIterator:
    """A loader iterator over ``workers`` whose next() raises ``error``, first SIGKILLing
    ``kill`` if given."""

    def __init__(self, workers, error, kill=None):
        self._workers, self._error, self._kill = workers, error, kill

    def __next__(self):
        if self._kill is not None:
            os.kill(self._kill.pid, signal.SIGKILL)
        raise self._error


def test_loader_names_a_dead_worker_instead_of_the_broken_connection():
    """The race the end-to-end kills hit only sometimes: the dead worker had queued a batch, and
    fetching its shared memory fails with ConnectionResetError before torch sees the death."""
    import multiprocessing

    from montage_pretrain.data import _WorkerDeathCheck

    fork = multiprocessing.get_context("fork")
    dying, alive = (fork.Process(target=time.sleep, args=(60,)) for _ in range(2))
    dying.start()
    alive.start()
    try:
        broken = _RaisingIterator([alive, dying], ConnectionResetError(104, "reset"), kill=dying)
        with pytest.raises(RuntimeError, match=rf"DataLoader worker \(pid {dying.pid}, killed by "
                                               r"SIGKILL\) .* lower DATALOADER.NUM_WORKERS"):
            next(_WorkerDeathCheck(broken, grace=5.0))
        # An error while every worker lives is not about workers: it passes unchanged.
        with pytest.raises(ValueError, match="bad crop"):
            next(_WorkerDeathCheck(_RaisingIterator([alive], ValueError("bad crop")), grace=0.1))
    finally:
        alive.kill()
        alive.join()

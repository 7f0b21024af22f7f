"""Resume after an interruption ends exactly where an uninterrupted run ends (CPU, same seed).

The slow test runs ``python cli.py fit`` (the ``unipair`` entry point) in subprocesses on the Hateful
Memes fixture with the tiny encoders, BERT dropout active, train augmentation on, a dynamic train
missing table (re-drawn per epoch) and a persisted validation missing table:

1. an uninterrupted 3-epoch run (the reference);
2. the same run, sent SIGTERM from outside in the middle of epoch 1 (it saves ``last.ckpt`` after the
   current batch and exits);
3. resumed with ``--ckpt_path last``, killed with SIGKILL in the middle of epoch 2 (no chance to save:
   the newest checkpoint is the one written at the end of epoch 1);
4. resumed again with ``--ckpt_path last`` to the end.

Every validation metric of every epoch and every trained tensor of the final checkpoint (weights,
AdamW moments, scheduler) must be bitwise equal to the reference. The fast tests check the pieces:
the train loader's order and mid-epoch position, and the random states in checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback

from datamodules.sampling import EpochShuffleSampler, ResumableDataLoader
from lightning_modules.callbacks import capture_rng_state, restore_rng_state
from tests.fixtures_data import make_hateful_memes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ------------------------------------------------------------------ callbacks used in the subprocesses


class RecordValMetrics(Callback):
    """Appends ``{"epoch", "step", "metrics"}`` (every ``val/*`` value) to a JSONL file after each
    validation.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        with open(self.path, "a") as handle:
            handle.write(
                json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics})
                + "\n"
            )


class PauseAt(Callback):
    """At the end of training step ``step``, write ``marker`` and wait (up to 5 min) to be signalled.

    The test process sends the signal from outside once the marker exists: SIGKILL ends the process
    here; after SIGTERM Lightning finishes this batch and stops.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


# --------------------------------------------------------------------------------------- fast tests


class _Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 22

    def __getitem__(self, index: int) -> int:
        return index


def _loader(num_workers: int = 0, seed: int = 3) -> ResumableDataLoader:
    dataset = _Numbers()
    return ResumableDataLoader(
        dataset,
        batch_size=4,
        sampler=EpochShuffleSampler(dataset, seed=seed),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def _epoch(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch(num_workers):
    reference = _loader()
    epochs = [_epoch(reference, e) for e in range(3)]
    assert epochs[0] != epochs[1] and sorted(sum(epochs[1], [])) == list(range(22))
    assert _epoch(_loader(), 1) == epochs[1]  # not the global random state: a fresh loader agrees
    assert _epoch(_loader(seed=4), 1) != epochs[1]

    interrupted = _loader(num_workers)
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator).tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {
        "epoch": 1,
        "batches_done": 2,
        "batch_size": 4,
        "num_samples": 22,
        "num_replicas": 1,
        "seed": 3,
    }
    del iterator

    resumed = _loader(num_workers)
    resumed.load_state_dict(state)
    rest = _epoch(resumed, 1)  # Lightning calls set_epoch(1) before the resumed epoch's first batch
    assert seen + rest == epochs[1]
    assert resumed.state_dict()["batches_done"] == 6
    assert _epoch(resumed, 2) == epochs[2]  # the position applies to its own epoch only

    at_epoch_end = _loader(num_workers)
    at_epoch_end.load_state_dict({**state, "batches_done": 6})
    assert _epoch(at_epoch_end, 2) == epochs[2]  # a checkpoint at the end of epoch 1 resumes at epoch 2


def test_the_trainer_batch_count_wins_over_a_mid_step_position():
    """A checkpoint written during batch 2 (the loader had handed it out; the Trainer will redo it)."""
    reference = _epoch(_loader(), 1)
    resumed = _loader()
    resumed.load_state_dict(
        {"epoch": 1, "batches_done": 2, "batch_size": 4, "num_samples": 22, "num_replicas": 1, "seed": 3}
    )
    resumed.trainer_batches_done = lambda: 1
    with pytest.warns(
        UserWarning,
        match=r"written during batch 2 of epoch 1 .*resuming at batch 2, which the Trainer redoes",
    ):
        assert _epoch(resumed, 1) == reference[1:]


def test_mid_epoch_position_with_different_data_settings_is_a_clear_error():
    state = {"epoch": 1, "batches_done": 2, "batch_size": 8, "num_samples": 22, "num_replicas": 1, "seed": 3}
    with pytest.raises(ValueError, match=r"saved after 2 of 6 batches of epoch 1.*'batch_size': \(8, 4\)"):
        _loader().load_state_dict(state)
    _loader().load_state_dict({**state, "batches_done": 0})  # epoch boundary: nothing to continue


def test_iterating_the_loader_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in _loader(num_workers=0):
        pass
    assert torch.equal(before, torch.get_rng_state())


def test_random_states_round_trip_and_load_with_weights_only(tmp_path):
    import random

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.save({"rng": state}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["rng"]
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(loaded)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


# -------------------------------------------------------------------------- slow: mid-step checkpoint


class _RecordIds(Callback):
    def __init__(self) -> None:
        self.ids: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids[trainer.global_step] = list(batch["id"])


class _SaveMidStepAndStop(Callback):
    """What Lightning's SLURM SIGUSR1 handler does: save from inside a step (here: before backward), then
    the job dies.
    """

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise KeyboardInterrupt  # stands in for the process being killed


@pytest.mark.slow
def test_a_checkpoint_written_mid_step_resumes_with_the_same_data(tmp_path):
    from lightning.pytorch import Trainer, seed_everything

    from datamodules import HatefulMemesDataModule
    from lightning_modules.callbacks import ResumeState
    from tests.method_fixtures import tiny_system

    root = make_hateful_memes(tmp_path, n_train=12, n_dev=4)

    def run(callbacks, ckpt_path=None):
        seed_everything(5)
        data = HatefulMemesDataModule(
            root=str(root),
            image_encoder="test_vit",
            text_encoder="tiny-bert",
            image_size=32,
            batch_size=4,
            missing_table_dir=str(tmp_path / "tables"),
            train_missing={"missing_rate": 0.5, "dynamic": True},
        )
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=tmp_path,
            callbacks=[ResumeState(), *callbacks],
        )
        trainer.fit(tiny_system(task="binary", num_classes=2), datamodule=data, ckpt_path=ckpt_path)

    reference = _RecordIds()
    run([reference])
    with pytest.raises(SystemExit):  # Lightning turns the KeyboardInterrupt into exit(1)
        run([_SaveMidStepAndStop(4, tmp_path / "mid.ckpt")])
    resumed = _RecordIds()
    with pytest.warns(UserWarning, match=r"written during batch 2 of epoch 1"):
        run([resumed], ckpt_path=str(tmp_path / "mid.ckpt"))
    assert sorted(resumed.ids) == [4, 5]  # batch 2 of epoch 1 (step 4) is redone, then the rest of the epoch
    assert {step: reference.ids[step] for step in resumed.ids} == resumed.ids


# ---------------------------------------------------------------------------------------- slow test

STEPS_PER_EPOCH = 3  # 12 train samples, batch 4


def _config(tmp_path: Path, root: Path, version: str, extra_callbacks: list[dict]) -> Path:
    callbacks = [
        {
            "class_path": "tests.test_resume.RecordValMetrics",
            "init_args": {"path": str(tmp_path / f"{version}.jsonl")},
        }
    ]
    config = {
        "seed_everything": 7,
        "trainer": {
            "max_epochs": 3,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "resume", "version": version},
            },
            "callbacks": callbacks + extra_callbacks,
        },
        "model": {"init_args": {"head_dropout": 0.1}},
        "data": {
            "init_args": {
                "root": str(root),
                "batch_size": 4,
                "num_workers": 0,
                "train_augment": True,
                "missing_table_dir": str(tmp_path / "tables"),
                "train_missing": {"missing_rate": 0.5, "missing_type": "both", "dynamic": True},
                "val_missing": {"missing_rate": 0.5, "missing_type": "both"},
            }
        },
    }
    path = tmp_path / f"{version}-{len(extra_callbacks)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _command(config: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "cli.py"),
        "fit",
        "--config",
        str(CONFIGS / "data" / "hateful_memes.yaml"),
        "--config",
        str(CONFIGS / "debug" / "tiny.yaml"),
        "--config",
        str(config),
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(command: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    with open(tmp_path / f"{name}.log", "w") as log:
        result = subprocess.run(
            command, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, timeout=600
        )
    return result


def _run_and_signal(
    command: list[str], tmp_path: Path, name: str, marker: Path, signum: int
) -> tuple[int, str]:
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not marker.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"{name} ended before the pause point:\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(0.2)
            process.send_signal(signum)  # from outside, as a scheduler would
            code = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    return code, log_path.read_text()


def _records(path: Path) -> dict[int, dict]:
    return {r["epoch"]: r for r in map(json.loads, path.read_text().splitlines())}


def _trained_state(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {
        "state_dict": checkpoint["state_dict"],
        "optimizer": checkpoint["optimizer_states"],
        "scheduler": checkpoint["lr_schedulers"],
        "global_step": checkpoint["global_step"],
        "epoch": checkpoint["epoch"],
    }


def _assert_equal(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.slow
def test_sigterm_mid_epoch_and_sigkill_after_a_checkpoint_resume_to_the_uninterrupted_result(tmp_path):
    root = make_hateful_memes(tmp_path, n_train=12, n_dev=6)

    reference = _run(_command(_config(tmp_path, root, "reference", [])), tmp_path, "reference")
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    reference_dir = tmp_path / "runs" / "resume" / "reference" / "checkpoints"

    # 2. SIGTERM in the middle of epoch 1 (after its first batch, global step 4).
    marker = tmp_path / "sigterm.marker"
    pause = [
        {
            "class_path": "tests.test_resume.PauseAt",
            "init_args": {"step": STEPS_PER_EPOCH + 1, "marker": str(marker)},
        }
    ]
    code, log = _run_and_signal(
        _command(_config(tmp_path, root, "interrupted", pause)), tmp_path, "sigterm", marker, signal.SIGTERM
    )
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Stopped by SIGTERM after global step 4" in log
    run_dir = tmp_path / "runs" / "resume" / "interrupted" / "checkpoints"
    saved = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == STEPS_PER_EPOCH + 1
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0] == {
        "epoch": 1,
        "batches_done": 1,
        "batch_size": 4,
        "num_samples": 12,
        "num_replicas": 1,
        "seed": 7,
    }

    # 3. Resume; SIGKILL in the middle of epoch 2 (the newest checkpoint: end of epoch 1, step 6).
    marker = tmp_path / "sigkill.marker"
    pause = [
        {
            "class_path": "tests.test_resume.PauseAt",
            "init_args": {"step": 2 * STEPS_PER_EPOCH + 2, "marker": str(marker)},
        }
    ]
    code, log = _run_and_signal(
        _command(_config(tmp_path, root, "interrupted", pause), "--ckpt_path", "last"),
        tmp_path,
        "sigkill",
        marker,
        signal.SIGKILL,
    )
    assert code == -signal.SIGKILL, log[-3000:]
    assert (
        torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
        == 2 * STEPS_PER_EPOCH
    )

    # 4. Resume to the end.
    resumed = _run(
        _command(_config(tmp_path, root, "interrupted", []), "--ckpt_path", "last"), tmp_path, "resumed"
    )
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]

    expected, got = _records(tmp_path / "reference.jsonl"), _records(tmp_path / "interrupted.jsonl")
    assert sorted(expected) == sorted(got) == [0, 1, 2]
    for epoch in expected:  # every validation metric of every epoch, bitwise
        assert got[epoch] == expected[epoch], (epoch, got[epoch], expected[epoch])
    assert "val/auroc" in expected[2]["metrics"] and "val/complete/accuracy" in expected[2]["metrics"]
    _assert_equal(_trained_state(run_dir / "last.ckpt"), _trained_state(reference_dir / "last.ckpt"))
    # The persisted validation table was reused, not redrawn differently.
    assert len(list((tmp_path / "tables").glob("*.csv"))) == 1

"""1 process vs 2 DDP processes: the same data, the same missing tables, the same validation metrics.

Fast tests check the samplers (every evaluation sample exactly once with equal batch counts per
process, Lightning's sampler injection, the same global train batches on 1 or 2 processes) and the
coverage check. Slow tests run real 2-process CPU DDP (gloo):

- ``unipair fit`` with ``--trainer.strategy ddp --trainer.devices 2`` and batch 4 per process, against
  one process with batch 8 (the same global batch), on the Hateful Memes fixture with an odd
  validation split (so the shards are uneven): the missing tables are identical, every validation
  sample is evaluated exactly once, and the validation metrics agree within ``METRIC_TOLERANCE``;
- the non-finite-loss decision is agreed across ranks: a NaN on rank 1 only makes both ranks skip
  (parameters stay identical across ranks and unchanged by that step), or both ranks raise with a
  message naming rank 1.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.utilities.data import _update_dataloader
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from datamodules.sampling import EpochShuffleSampler, EvenShardBatchSampler
from lightning_modules.callbacks import EvaluationCoverage
from tests.fixtures_data import make_hateful_memes
from tests.method_fixtures import (
    COMPLETE,
    IMAGE_MISSING,
    TEXT_MISSING,
    SyntheticDataModule,
    collate,
    quiet_trainer,
    tiny_system,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Validation metrics (accuracy, AUROC, per-missing-case accuracy, the task loss) of a 2-process run
# and a 1-process run with the same global batch: equal up to float reduction order.
METRIC_TOLERANCE = 1e-5

warnings.filterwarnings("ignore", message=".*does not have many workers.*")


# ------------------------------------------------------------------------------------ fast tests


class _Range(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("batch_size", [2, 3, 8])
@pytest.mark.parametrize("n", [5, 9, 16, 17, 31])
def test_evaluation_shards_cover_every_sample_once_with_equal_batch_counts(n, world, batch_size):
    if n < world:
        return
    dataset = _Range(n)
    per_rank = []
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)  # pads
        batches = list(EvenShardBatchSampler(sampler, batch_size))
        assert len(batches) == len(EvenShardBatchSampler(sampler, batch_size))
        assert all(1 <= len(b) <= batch_size for b in batches)
        assert max(map(len, batches)) - min(map(len, batches)) <= 1
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1, "every process must run the same number of batches"
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(flat) == list(range(n))


def test_evaluation_shards_on_one_process_are_plain_batches():
    assert list(EvenShardBatchSampler(SequentialSampler(_Range(10)), 4)) == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    with pytest.raises(ValueError, match="drop_last must be False"):
        EvenShardBatchSampler(SequentialSampler(_Range(10)), 4, drop_last=True)


def test_impossible_even_split_is_a_clear_error():
    sampler = DistributedSampler(_Range(5), num_replicas=2, rank=1, shuffle=False)
    with pytest.raises(
        ValueError, match=r"cannot evaluate 5 samples on 2 processes with batch_size 1 .*process 1 has only 2"
    ):
        list(EvenShardBatchSampler(sampler, 1))


def test_lightning_sampler_injection_keeps_the_even_unpadded_shards():
    """What Lightning does to an evaluation loader under DDP (use_distributed_sampler=True)."""
    dataset = _Range(9)
    loader = DataLoader(dataset, batch_sampler=EvenShardBatchSampler(SequentialSampler(dataset), 4))
    seen = []
    for rank in range(2):
        injected = _update_dataloader(
            loader, DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        )
        assert isinstance(injected.batch_sampler, EvenShardBatchSampler)
        batches = [b.tolist() for b in injected]
        assert len(batches) == 2
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(9))


def test_prediction_shards_through_lightnings_unrepeated_wrapper():
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper

    dataset = _Range(11)
    seen, counts = [], set()
    for rank in range(3):
        wrapper = UnrepeatedDistributedSamplerWrapper(
            SequentialSampler(dataset), num_replicas=3, rank=rank, shuffle=False
        )
        batches = list(EvenShardBatchSampler(wrapper, 2))
        counts.add(len(batches))
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(11)) and counts == {2}


def test_train_batches_are_the_same_global_batches_on_one_or_two_processes():
    dataset = _Range(32)
    single = list(torch.utils.data.BatchSampler(EpochShuffleSampler(dataset, seed=5), 8, drop_last=False))
    shards = [
        list(
            torch.utils.data.BatchSampler(
                EpochShuffleSampler(dataset, num_replicas=2, rank=r, seed=5), 4, drop_last=False
            )
        )
        for r in range(2)
    ]
    for step, batch in enumerate(single):
        assert sorted(batch) == sorted(shards[0][step] + shards[1][step])


class _DuplicatingData(SyntheticDataModule):
    """A validation loader that evaluates sample 0 twice (what a padding DistributedSampler does)."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=4, sampler=[*range(len(self.val_set)), 0], collate_fn=collate
        )


def test_evaluation_coverage_catches_duplicated_samples(tmp_path):
    seed_everything(0)
    trainer = quiet_trainer(tmp_path, callbacks=[EvaluationCoverage()])
    with pytest.raises(
        RuntimeError,
        match=(
            r"val: evaluated 9 samples \(8 distinct\) over 1 process\(es\), but the split has 8; duplicated "
            r"ids \(first 5\): \['synthetic-0'\]"
        ),
    ):
        trainer.validate(tiny_system(), datamodule=_DuplicatingData(num_eval=8), verbose=False)
    coverage = EvaluationCoverage()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[coverage],
    )
    trainer.validate(tiny_system(), datamodule=SyntheticDataModule(num_eval=8), verbose=False)
    assert coverage.last_counts == {"evaluated": 8, "distinct": 8, "split": 8}


def test_validation_losses_are_sample_weighted_means_over_the_split(tmp_path):
    """Batches of 4, 4 and 1: the logged loss is the mean over the 9 samples, not over the 3 batches."""
    from lightning_modules.losses import per_sample_task_loss

    seed_everything(0)
    model, data = tiny_system(), SyntheticDataModule(num_eval=9, batch_size=4)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    logged = trainer.validate(model, datamodule=data, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        per_sample = torch.cat(
            [per_sample_task_loss(model(b), b["label"], "multiclass") for b in data.val_dataloader()]
        )
    assert per_sample.shape == (9,)
    assert logged["val/task_loss"] == pytest.approx(per_sample.mean().item(), rel=1e-6)


# --------------------------------------------------------------------- slow: CLI, 1 vs 2 processes

LAUNCHER = """
import sys
sys.path.insert(0, {repo!r})
from lightning_modules.encoders import sources

# No dropout in the tiny BERT: a 1-process and a 2-process run draw different dropout masks, and the
# comparison is about data, tables, gradients and metrics, not about random masks.
sources.TINY_BERT_CONFIG.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
import cli

cli.cli_main()
"""


def _fit(tmp_path: Path, name: str, root: Path, devices: int, batch_size: int) -> Path:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(repo=str(REPO)))
    record = tmp_path / f"{name}.jsonl"
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": "ddp" if devices > 1 else "auto",
            "max_epochs": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": name},
            },
            "callbacks": [
                {"class_path": "tests.test_resume.RecordValMetrics", "init_args": {"path": str(record)}}
            ],
        },
        "data": {
            "init_args": {
                "root": str(root),
                "batch_size": batch_size,
                "num_workers": 0,
                "missing_table_dir": str(tmp_path / f"tables-{name}"),
                "train_missing": {"missing_rate": 0.5, "missing_type": "both"},
                "val_missing": {"missing_rate": 0.6, "missing_type": "both"},
            }
        },
    }
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        str(launcher),
        "fit",
        "--config",
        str(CONFIGS / "data" / "hateful_memes.yaml"),
        "--config",
        str(CONFIGS / "model" / "encoders" / "tiny.yaml"),
        "--config",
        str(config_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(tmp_path / f"{name}.log", "w") as log:
        result = subprocess.run(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900
        )
    assert result.returncode == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    return record


@pytest.mark.slow
def test_two_process_ddp_fit_matches_one_process_with_the_same_global_batch(tmp_path):
    root = make_hateful_memes(tmp_path, n_train=16, n_dev=9)  # 9: uneven shards (5 + 4)
    single = [
        json.loads(line)
        for line in _fit(tmp_path, "single", root, devices=1, batch_size=8).read_text().splitlines()
    ]
    ddp = [
        json.loads(line)
        for line in _fit(tmp_path, "ddp", root, devices=2, batch_size=4).read_text().splitlines()
    ]

    # The same missing tables (persisted independently by each run).
    tables = {name: sorted((tmp_path / f"tables-{name}").glob("*.csv")) for name in ("single", "ddp")}
    assert [p.name for p in tables["single"]] == [p.name for p in tables["ddp"]] and len(
        tables["single"]
    ) == 2
    for a, b in zip(tables["single"], tables["ddp"], strict=True):
        assert a.read_bytes() == b.read_bytes()

    assert [r["step"] for r in single] == [r["step"] for r in ddp] == [2, 4]
    compared = (
        "val/accuracy",
        "val/auroc",
        "val/task_loss",
        "val/complete/accuracy",
        "val/text_missing/accuracy",
        "val/image_missing/accuracy",
    )
    for one, two in zip(single, ddp, strict=True):
        # Every validation sample exactly once over the two processes (EvaluationCoverage would have
        # stopped the run otherwise; here from the per-case counts, summed over ranks).
        counts = [
            two["metrics"][f"val/{case}/num_samples"]
            for case in ("complete", "text_missing", "image_missing")
        ]
        assert sum(counts) == 9 and counts == [
            one["metrics"][f"val/{case}/num_samples"]
            for case in ("complete", "text_missing", "image_missing")
        ]
        for key in compared:
            assert math.isclose(
                one["metrics"][key], two["metrics"][key], rel_tol=METRIC_TOLERANCE, abs_tol=METRIC_TOLERANCE
            ), (key, one["metrics"][key], two["metrics"][key])


# -------------------------------------------------------------- slow: non-finite decision agreement


class _NanOnRankOne(Callback):
    """Makes the images of rank 1's batch NaN at step 1 (rank 0's batch stays finite)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 1:
            batch["image"][:] = float("nan")


class _Report(Callback):
    """Each rank writes its skip count and a copy of its trainable parameters before/after step 1."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            after = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            torch.save(
                {"before": self.before, "after": after, "skipped": pl_module.nonfinite_skipped_batches},
                Path(self.folder) / f"rank{trainer.global_rank}.pt",
            )


def _ddp_trainer(tmp_path: Path, callbacks: list[Callback]) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def _synthetic() -> SyntheticDataModule:
    return SyntheticDataModule(
        num_train=32,
        num_eval=8,
        batch_size=4,
        train_missing=[COMPLETE, TEXT_MISSING, COMPLETE, IMAGE_MISSING],
    )


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path):
    seed_everything(0)
    trainer = _ddp_trainer(tmp_path, [_NanOnRankOne(), _Report(str(tmp_path))])
    trainer.fit(
        tiny_system(nonfinite_policy="skip"), datamodule=_synthetic()
    )  # (warnings stay in the workers)
    reports = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["skipped"] for r in reports] == [1, 1]
    for name in reports[0]["after"]:
        assert torch.equal(reports[0]["after"][name], reports[1]["after"][name]), (
            name
        )  # ranks did not diverge
        assert torch.equal(reports[0]["before"][name], reports[0]["after"][name]), (
            name
        )  # and step 1 updated nothing


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_stops_every_rank_naming_it(tmp_path):
    seed_everything(0)
    trainer = _ddp_trainer(tmp_path, [_NanOnRankOne()])
    # The task loss is per rank (NaN on rank 1 only); VICReg uses the global batch (NaN on both).
    with pytest.raises(
        Exception,
        match=(
            r"non-finite loss term\(s\): task_loss \(rank\(s\) \[1\]\), vicreg_invariance \(rank\(s\) \[0, "
            r"1\]\), .* at global step 1 "
        ),
    ):
        trainer.fit(tiny_system(), datamodule=_synthetic())

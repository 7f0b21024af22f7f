"""DDP on 2 CPU processes (gloo): global-batch gathering with gradient, a short fit with missing
modalities, and a resume from the checkpoint written at the end of an epoch's validation.
"""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_modules.losses import all_gather_with_grad, vicreg_loss
from tests.method_fixtures import (
    COMPLETE,
    IMAGE_MISSING,
    TEXT_MISSING,
    SyntheticDataModule,
    collate,
    quiet_trainer,
    tiny_system,
)

pytestmark = pytest.mark.slow
WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_rows(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank 0 holds 3 rows, rank 1 holds 2 (uneven on purpose)."""
    generator = torch.Generator().manual_seed(10 + rank)
    rows = 3 if rank == 0 else 2
    mask = torch.tensor([True, False, True]) if rank == 0 else torch.tensor([True, True])
    return torch.randn(rows, 4, generator=generator), torch.randn(rows, 4, generator=generator), mask


def _gather_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        x, y, mask = _rank_rows(rank)
        x.requires_grad_(True)
        all_x = torch.cat([_rank_rows(r)[0] for r in range(WORLD_SIZE)])
        all_y = torch.cat([_rank_rows(r)[1] for r in range(WORLD_SIZE)])
        all_mask = torch.cat([_rank_rows(r)[2] for r in range(WORLD_SIZE)])

        gathered = all_gather_with_grad(x)
        assert torch.equal(gathered.detach(), all_x)
        assert torch.equal(all_gather_with_grad(mask), all_mask)

        # Every rank computes the same global loss; the gradient reaching a rank's rows is the sum of
        # what every rank's loss sends them: WORLD_SIZE * d(loss)/d(rows).
        weights = torch.arange(all_x.numel(), dtype=torch.float32).view_as(all_x)
        (gathered * weights).sum().backward()
        start = 0 if rank == 0 else 3
        assert torch.equal(x.grad, WORLD_SIZE * weights[start : start + x.shape[0]])

        terms = vicreg_loss(x.detach(), y, mask=mask, gather=all_gather_with_grad)
        expected = vicreg_loss(all_x[all_mask], all_y[all_mask])
        for got, want in zip(terms, expected, strict=True):
            assert torch.allclose(got, want, rtol=1e-6), (got, want)
    finally:
        dist.destroy_process_group()


def test_all_gather_with_grad_and_global_vicreg_on_two_processes():
    mp.spawn(_gather_worker, args=(_free_port(),), nprocs=WORLD_SIZE, join=True)


class _UnshuffledData(SyntheticDataModule):
    """Unshuffled, so DistributedSampler deals rows alternately: with codes cycling complete,
    text-missing, complete, image-missing, rank 0 gets only complete samples and rank 1 none."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, collate_fn=collate)


class _RecordSteps(Callback):
    """ddp_spawn returns little to the launching process: each rank writes its step count to a file."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        (self.folder / f"rank{trainer.global_rank}.txt").write_text(
            f"{trainer.global_step} {trainer.world_size}"
        )


def _unshuffled_binary_data() -> _UnshuffledData:
    """32 training samples: 4 steps per epoch on each of the 2 ranks at batch size 4."""
    return _UnshuffledData(
        num_train=32,
        num_eval=16,
        batch_size=4,
        task="binary",
        num_classes=2,
        train_missing=[COMPLETE, TEXT_MISSING, COMPLETE, IMAGE_MISSING],
    )


def _ddp_trainer(tmp_path, **overrides):
    return quiet_trainer(tmp_path, devices=WORLD_SIZE, strategy="ddp_spawn", **overrides)


def test_ddp_fit_with_missing_modalities_uses_every_parameter(tmp_path):
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    seed_everything(0)
    model = tiny_system(task="binary", num_classes=2, substitution=True)
    trainer = _ddp_trainer(
        tmp_path, max_steps=4, limit_val_batches=2, val_check_interval=4, callbacks=[_RecordSteps(tmp_path)]
    )
    # DDP without find_unused_parameters: an unused parameter raises.
    trainer.fit(model, datamodule=_unshuffled_binary_data())
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD_SIZE)] == ["4 2", "4 2"]
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert "val/auroc" in metrics and "val/image_missing/accuracy" in metrics
    # 16 val samples over 2 ranks (rank 0 all complete, rank 1 none): counts summed once each.
    assert metrics["val/complete/num_samples"] == 8
    assert metrics["val/text_missing/num_samples"] == 4 and metrics["val/image_missing/num_samples"] == 4


def test_ddp_resume_from_the_checkpoint_written_at_the_end_of_validation(tmp_path):
    # ModelCheckpoint writes it after the epoch's validation, before the epoch's end hooks: the resumed
    # run trains exactly one more epoch and logs its metrics on both ranks.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}")
    first = _ddp_trainer(
        tmp_path, max_epochs=1, limit_val_batches=2, enable_checkpointing=True, callbacks=[checkpoints]
    )
    first.fit(tiny_system(task="binary", num_classes=2), datamodule=_unshuffled_binary_data())
    (written,) = (tmp_path / "ckpt").iterdir()
    assert written.name == "step=4.ckpt"
    second = _ddp_trainer(tmp_path, max_epochs=2, limit_val_batches=2, callbacks=[_RecordSteps(tmp_path)])
    second.fit(
        tiny_system(task="binary", num_classes=2), datamodule=_unshuffled_binary_data(), ckpt_path=written
    )
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD_SIZE)] == ["8 2", "8 2"]
    assert torch.isfinite(second.callback_metrics["train/accuracy"])
    assert "val/accuracy" in second.callback_metrics

"""Sampling that makes training resumable exactly and evaluation exact under DDP.

Training: :class:`EpochShuffleSampler` draws the order of epoch ``e`` from ``(seed, e)`` only (a
``DistributedSampler``: the permutation of the whole split is the same whatever the number of
processes; rank ``r`` of ``W`` takes positions ``r, r + W, ...``, padded to equal shares as
Lightning's own sampler does). :class:`ResumableDataLoader` knows how many batches of the current
epoch it has handed out and implements ``state_dict`` / ``load_state_dict``, so Lightning stores
that position in every checkpoint and restores it on resume: a run stopped after batch ``k`` of
epoch ``e`` continues with batch ``k + 1`` of the same order (the skipped batches are not loaded).
Together with the per-epoch dynamic-dropout tables (pure functions of seed, epoch and sample) and
the persisted missing tables, the data a resumed run sees is exactly the data of an uninterrupted
run. The loader also carries its own random generator (re-seeded per epoch from the same seed) for
DataLoader worker seeds, so creating an iterator never advances the global random state (which
checkpoints restore for dropout and augmentation; see ``lightning_modules/callbacks.py``).

Evaluation: :class:`EvenShardBatchSampler` evaluates every sample exactly once on ``W`` processes
*and* gives every process the same number of batches (batch sizes vary by at most one), which DDP
needs: each forward pass synchronises buffers, and VICReg gathers the global batch. Lightning's
``use_distributed_sampler`` replaces the sampler of evaluation loaders by a padded
``DistributedSampler`` (duplicated samples would count twice in the metrics); this batch sampler
reads the number of processes and the rank from that sampler and ignores its padding. On one
process it is an ordinary ``BatchSampler``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler


def default_shuffle_seed() -> int:
    """The seed of ``seed_everything`` (``PL_GLOBAL_SEED``), else 0: what Lightning's own samplers use."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochShuffleSampler(DistributedSampler):
    """Order of epoch ``e`` drawn from ``(seed, e)``; rank ``rank`` of ``num_replicas`` takes its share.

    A ``DistributedSampler`` (so Lightning does not replace it) that works without a process group
    when ``num_replicas=1``. ``start_index`` (set by :class:`ResumableDataLoader` when resuming)
    makes the next iteration start at that position of this rank's share; it applies once.

    Args:
        dataset: The split (only its length is used).
        num_replicas: Number of processes.
        rank: This process's rank.
        shuffle: Shuffle (train) or keep the split's order.
        seed: Seed of the per-epoch permutation.
        drop_last: Drop the tail instead of padding to equal shares (``DistributedSampler``'s meaning).
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start_index = self.start_index, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochShuffleSampler` whose position in the epoch is checkpointed.

    Lightning saves ``state_dict()`` of a train loader that has one (``fit_loop`` → ``combined_loader``)
    and calls ``load_state_dict`` before the resumed epoch starts. The state is the epoch and the
    number of batches handed out in it; it is applied only if the resumed epoch is that epoch
    (a checkpoint at the end of an epoch resumes at the start of the next, with nothing skipped).

    Takes the arguments of ``torch.utils.data.DataLoader`` with ``sampler`` an
    :class:`EpochShuffleSampler` and an integer ``batch_size``. With any other sampler (Lightning's
    ``overfit_batches`` swaps in a sequential one) it is a plain DataLoader with an empty state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch = getattr(self.sampler, "epoch", 0)
        self._batches_done = 0
        self._resume_at: dict[str, int] | None = None
        # Set by lightning_modules.callbacks.ResumeState: the number of batches of the resumed epoch
        # the Trainer counts as done (read when the first batch is requested).
        self.trainer_batches_done: Callable[[], int] | None = None

    @property
    def resumable(self) -> bool:
        return isinstance(self.sampler, EpochShuffleSampler) and self.batch_size is not None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is requested, i.e. after Lightning has
        # called set_epoch() for the epoch being started (or resumed).
        if not self.resumable:
            yield from super().__iter__()
            return
        sampler: EpochShuffleSampler = self.sampler
        epoch, skip = sampler.epoch, 0
        if self._resume_at is not None:
            if self._resume_at["epoch"] == epoch:
                skip = self._resume_at["batches_done"]
                if self.trainer_batches_done is not None and self.trainer_batches_done() != skip:
                    # A checkpoint written in the middle of a step (Lightning's SLURM SIGUSR1 handler saves
                    # from inside the signal handler): the Trainer redoes that step, so follow its count.
                    trainer_count = self.trainer_batches_done()
                    warnings.warn(
                        f"the checkpoint was written during batch {skip} of epoch {epoch} (not after a "
                        f"batch); resuming at batch {trainer_count + 1}, which the Trainer redoes. Random "
                        "draws of that batch (dropout, augmentation) differ from an uninterrupted run.",
                        stacklevel=2,
                    )
                    skip = trainer_count
            self._resume_at = None
        sampler.start_index = skip * self.batch_size
        if self.generator is not None:
            self.generator.manual_seed(sampler.seed + epoch)  # worker seeds of this epoch
        self._epoch, self._batches_done = epoch, skip
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not self.resumable:
            return {}
        sampler: EpochShuffleSampler = self.sampler
        return {
            "epoch": self._epoch,
            "batches_done": self._batches_done,
            "batch_size": int(self.batch_size),
            "num_samples": len(sampler.dataset),
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not self.resumable or not state:
            return
        sampler: EpochShuffleSampler = self.sampler
        current = {
            "batch_size": int(self.batch_size),
            "num_samples": len(sampler.dataset),
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
        }
        mid_epoch = 0 < state["batches_done"] < len(self)
        changed = {k: (state.get(k), v) for k, v in current.items() if state.get(k) != v}
        if mid_epoch and changed:
            raise ValueError(
                f"the checkpoint was saved after {state['batches_done']} of {len(self)} batches of epoch "
                f"{state['epoch']}, but the training data differ from that run (checkpoint, now): {changed}. "
                "The epoch cannot be continued exactly. Resume with the same data, batch_size, number of "
                "processes and seed, or from a checkpoint saved at the end of an epoch."
            )
        self._resume_at = {"epoch": int(state["epoch"]), "batches_done": int(state["batches_done"])}
        # Lightning calls set_epoch(resumed epoch) before the first batch; this only matters when
        # a loader is iterated outside the Trainer after loading.
        sampler.set_epoch(int(state["epoch"]))


class EvenShardBatchSampler(BatchSampler):
    """Evaluation batches: every sample once overall, the same number of batches on every process.

    On one process (``sampler`` any sized sampler) it behaves as ``BatchSampler(sampler, batch_size)``.
    When ``sampler`` is a ``DistributedSampler`` with ``num_replicas > 1`` (Lightning injects one under
    ``use_distributed_sampler``), rank ``r`` takes positions ``r, r + W, ...`` of the split without any
    padding, in ``ceil(ceil(N / W) / batch_size)`` batches whose sizes differ by at most one.

    Args:
        sampler: The split's sampler (sequential) or Lightning's ``DistributedSampler`` around it.
        batch_size: Largest batch size.
        drop_last: Must be False (evaluation never drops samples).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False) -> None:
        if drop_last:
            raise ValueError("EvenShardBatchSampler evaluates every sample: drop_last must be False")
        super().__init__(sampler, batch_size, drop_last=False)

    def _distributed(self) -> bool:
        return isinstance(self.sampler, DistributedSampler) and self.sampler.num_replicas > 1

    def _rank_batches(self) -> list[list[int]]:
        sampler: DistributedSampler = self.sampler
        from lightning.fabric.utilities.distributed import _DatasetSamplerWrapper

        dataset = sampler.dataset
        total, world, rank = len(dataset), sampler.num_replicas, sampler.rank
        positions = list(range(total))
        if sampler.shuffle:
            generator = torch.Generator().manual_seed(sampler.seed + sampler.epoch)
            positions = torch.randperm(total, generator=generator).tolist()
        mine = positions[rank::world]
        if isinstance(dataset, _DatasetSamplerWrapper):  # predict: Lightning wraps the original sampler
            mine = [dataset[p] for p in mine]
        num_batches = math.ceil(math.ceil(total / world) / self.batch_size)
        if len(mine) < num_batches:
            raise ValueError(
                f"cannot evaluate {total} samples on {world} processes with batch_size {self.batch_size} so "
                f"that every process runs the same number of batches ({num_batches}) without repeating "
                f"samples: process {rank} has only {len(mine)} sample(s). Use a batch_size of at least 2 (or "
                "fewer processes)."
            )
        base, extra = divmod(len(mine), num_batches)
        batches, start = [], 0
        for b in range(num_batches):
            size = base + (1 if b < extra else 0)
            batches.append(mine[start : start + size])
            start += size
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if not self._distributed():
            yield from super().__iter__()
            return
        yield from self._rank_batches()

    def __len__(self) -> int:
        if not self._distributed():
            return super().__len__()
        sampler: DistributedSampler = self.sampler
        return math.ceil(math.ceil(len(sampler.dataset) / sampler.num_replicas) / self.batch_size)

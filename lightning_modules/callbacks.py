"""Reliability callbacks: exact resume after an interruption, and evaluation that covers each sample once.

:class:`ResumeState` (what ``unipair fit`` always adds):

- hands the train loader its checkpointed position in the epoch (Lightning 2.6 drops it when
  ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``, as ours does);
- puts the random-number states of every process (torch, CUDA, numpy, Python; as tensors and
  plain numbers, so checkpoints still load with ``weights_only=True``) into every checkpoint and
  restores them when the resumed training starts: dropout and augmentation draw the same numbers
  as in an uninterrupted run;
- on SIGTERM (preemption, ``scancel``, a time limit) saves ``last.ckpt`` after the current batch,
  mid-epoch position included (the train loader is resumable, see ``datamodules/sampling.py``),
  so ``unipair fit ... --ckpt_path last`` continues from that batch; under SLURM, the requeue signal
  (SIGUSR1) does the same and then requeues the job (``scontrol requeue``), which resumes there;
- keeps ``last.ckpt`` current at the end of every epoch: Lightning's ``ModelCheckpoint`` with a
  monitored metric rewrites it only when the metric improves, so after a SIGKILL the "last"
  checkpoint could be several epochs old.

:class:`EvaluationCoverage` checks, after every full validation/test epoch, that the evaluated
sample ids are exactly the split (no duplicates from padding distributed samplers, nothing
dropped), gathering the ids of all processes under DDP.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from collections import Counter
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from datamodules.sampling import ResumableDataLoader
from lightning_modules.numerics import distributed


def capture_rng_state() -> dict[str, Any]:
    """This process's random states as tensors and primitives (``weights_only``-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


def _last_checkpoint(trainer: Trainer) -> tuple[ModelCheckpoint, str] | None:
    """The ModelCheckpoint that keeps a ``last`` file, and that file's path (None if there is none)."""
    callback = trainer.checkpoint_callback
    if not isinstance(callback, ModelCheckpoint) or not callback.save_last or callback.dirpath is None:
        return None
    return callback, os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (an array task as ``<array job>_<task>``), as Lightning does."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        error = result.stderr.strip() if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exception:
        error = str(exception)
    if error:
        rank_zero_warn(f"ResumeState: `scontrol requeue {job}` failed ({error}); resubmit the job to resume")
    else:
        rank_zero_info(f"ResumeState: requeued SLURM job {job}")


class ResumeState(Callback):
    """Exact resume: random states in checkpoints, ``last.ckpt`` on SIGTERM and at every epoch end.

    Args:
        save_on_sigterm: On SIGTERM, save ``last.ckpt`` (in the ``ModelCheckpoint`` folder) after the
            current batch before the process exits; resume with ``--ckpt_path last``.
        last_every_epoch: Rewrite ``last.ckpt`` at the end of every training epoch (Lightning does only
            when the monitored metric improves).
        restore_rng: Restore the random states saved in the checkpoint when resumed training starts.
    """

    def __init__(
        self, save_on_sigterm: bool = True, last_every_epoch: bool = True, restore_rng: bool = True
    ) -> None:
        self.save_on_sigterm = save_on_sigterm
        self.last_every_epoch = last_every_epoch
        self.restore_rng = restore_rng
        self._pending_rng: list[dict[str, Any]] | None = None
        self.signalled = False  # a stop signal arrived; acted on at the end of the current batch
        self._requeue = False

    # -------------------------------------------------------------------- random states

    def state_dict(self) -> dict[str, Any]:
        # Called on every process while a checkpoint is assembled (all of them save together).
        state = capture_rng_state()
        if distributed():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        return {"rng_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng_states")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning 2.6 hands the checkpointed train-loader position to the loader only when it sets
        # up the train data after restoring the loops; ``configure_optimizers`` asking for
        # ``trainer.estimated_stepping_batches`` sets it up earlier, and the position is silently
        # dropped (the resumed epoch would restart from its first batch). Hand it over here: the
        # loader's iterator has not produced a batch yet. A no-op when Lightning already did it.
        trainer.fit_loop._load_combined_loader_states()
        # The loaders resume after the batches the Trainer counts as done when the epoch restarts
        # (the same number unless the checkpoint was written in the middle of a step).
        progress = trainer.fit_loop.epoch_loop.batch_progress
        for loader in getattr(trainer.fit_loop._combined_loader, "flattened", []):
            if isinstance(loader, ResumableDataLoader):
                loader.trainer_batches_done = lambda: progress.current.ready
        self._take_over_signals(trainer)
        # After the sanity check and the data setup of the resumed run, right before its first batch:
        # the states are those of the interrupted run at the moment its checkpoint was written.
        states, self._pending_rng = self._pending_rng, None
        if not states or not self.restore_rng:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds random states of {len(states)} process(es) but this run has "
                f"{trainer.world_size}; random states are not restored (dropout/augmentation draws will "
                "differ from the interrupted run)"
            )
            return
        restore_rng_state(states[trainer.global_rank])

    # ------------------------------------------------------------------------------ signals

    def _take_over_signals(self, trainer: Trainer) -> None:
        """Replace Lightning's SIGTERM and SLURM requeue-signal handlers by ones that only take note.

        Lightning's run collectives inside the handler (SIGTERM: a broadcast; SIGUSR1 under SLURM: a
        checkpoint save, with its gathers and barrier; Lightning issue #21406). Under DDP a signal reaches
        the processes at different points of a step, so these meet another process's gradient all-reduce
        and the job hangs. Here the processes agree at the end of every batch (``on_train_batch_end``).
        """
        if not self.save_on_sigterm or threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, frame: Any) -> None:
            if not self.signalled and signum == signal.SIGTERM and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # processes it started itself (not under SLURM)
            self.signalled = True
            self._requeue = self._requeue or signum != signal.SIGTERM
            if trainer.world_size == 1:
                trainer._signal_connector.received_sigterm = True

        signal.signal(signal.SIGTERM, on_signal)
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            signal.signal(environment.requeue_signal, on_signal)

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_over_signals(trainer)  # Lightning has just registered its handlers

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not self.save_on_sigterm:
            return
        stop = self.signalled
        if distributed():
            flag = torch.tensor([int(stop)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:  # every process raises SIGTERMException after this batch (Lightning's loop)
            trainer._signal_connector.received_sigterm = True

    # --------------------------------------------------------------------- last.ckpt

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not (self.save_on_sigterm or self.last_every_epoch):
            return
        found = _last_checkpoint(trainer)
        if found is None:
            rank_zero_warn(
                "ResumeState: no ModelCheckpoint with save_last=True, so no last.ckpt is kept and a SIGTERM "
                "cannot save a resumable checkpoint"
            )
        elif found[0].save_last == "link" and self.last_every_epoch:
            rank_zero_warn(
                "ResumeState: checkpoint.save_last='link' makes last.ckpt a link to the newest top-k "
                "checkpoint, so it is not refreshed at every epoch end; use save_last: true for an "
                "up-to-date last.ckpt"
            )

    def _save_last(self, trainer: Trainer, why: str) -> str | None:
        found = _last_checkpoint(trainer)
        if found is None:
            return None
        callback, path = found
        if os.path.islink(path):  # save_last="link": never write through the link into another checkpoint
            trainer.strategy.remove_checkpoint(path)
        callback.last_model_path = path  # part of the saved callback state
        trainer.save_checkpoint(path, weights_only=False)
        if callback.save_last is True:
            # Tell ModelCheckpoint a last checkpoint exists, so it does not write it again at train end
            # (with the loop counters of a finished run). Not in link mode: it would link last to itself.
            callback._last_checkpoint_saved = path
        rank_zero_info(
            f"ResumeState: saved {path} ({why}, global step {trainer.global_step}, epoch "
            f"{trainer.current_epoch})"
        )
        return path

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.last_every_epoch or trainer.sanity_checking or trainer.fast_dev_run:
            return
        found = _last_checkpoint(trainer)
        if found is not None and found[0].save_last == "link":
            return
        # ModelCheckpoint callbacks run after this one; it may already have written last at this step
        # (validation end of a new best). Every process takes the same decision.
        if found is not None and getattr(found[0], "_last_global_step_saved", None) != trainer.global_step:
            self._save_last(trainer, "end of epoch")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Only SIGTERM: every process raises it at the same point (Lightning broadcasts the signal),
        # so saving (a collective under DDP) is safe; other errors may hit one process only.
        if not (self.save_on_sigterm and isinstance(exception, SIGTERMException)):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.fast_dev_run:
            return
        path = self._save_last(trainer, "SIGTERM")
        if path is not None:
            rank_zero_info(
                f"Stopped by SIGTERM after global step {trainer.global_step}. Resume exactly from here with "
                "`unipair fit <same arguments> --ckpt_path last` in the same run folder (same "
                "--trainer.logger.init_args.version)."
            )
        if self._requeue and trainer.is_global_zero:
            requeue_slurm_job()  # after the save: SLURM then stops the job and starts it again


class EvaluationCoverage(Callback):
    """Check that a full validation/test epoch evaluated each sample of the split exactly once.

    Counts ``batch["id"]`` per process, gathers them under DDP and compares with the length of the
    evaluation dataset. Skipped during the sanity check and when ``limit_{val,test}_batches``
    evaluates part of the split.

    Args:
        on_mismatch: ``error`` (raise naming the counts and a few duplicated ids) or ``warn``.
    """

    def __init__(self, on_mismatch: str = "error") -> None:
        if on_mismatch not in ("error", "warn"):
            raise ValueError(f"on_mismatch must be 'error' or 'warn', got {on_mismatch!r}")
        self.on_mismatch = on_mismatch
        self._ids: list[str] = []
        self.last_counts: dict[str, int] = {}

    def _reset(self, *args: Any) -> None:
        self._ids = []

    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    def _collect(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        if isinstance(batch, dict) and "id" in batch:
            self._ids.extend(str(i) for i in batch["id"])

    on_validation_batch_end = _collect
    on_test_batch_end = _collect

    def _check(self, trainer: Trainer, stage: str) -> None:
        if trainer.sanity_checking:
            return
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        num_batches = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
        try:
            if any(n != len(loader) for n, loader in zip(num_batches, loaders, strict=True)):
                return  # limit_{val,test}_batches: part of the split on purpose
            expected = sum(len(loader.dataset) for loader in loaders)
        except (TypeError, AttributeError, ValueError):
            return  # iterable datasets have no length to compare with
        ids = self._ids
        if distributed():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, ids)
            ids = [i for part in gathered for i in part]
        counts = Counter(ids)
        self.last_counts = {"evaluated": len(ids), "distinct": len(counts), "split": expected}
        if len(ids) == expected and len(counts) == expected:
            return
        duplicated = [i for i, c in counts.items() if c > 1][:5]
        message = (
            f"{stage}: evaluated {len(ids)} samples ({len(counts)} distinct) over {trainer.world_size} "
            f"process(es), but the split has {expected}; duplicated ids (first 5): {duplicated}. Metrics "
            "over duplicated or missing samples are wrong. Use the DataModule's own evaluation loaders "
            "(every sample once on every number of processes) or evaluate on one process."
        )
        if self.on_mismatch == "error":
            raise RuntimeError(message)
        rank_zero_warn(message)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer, "test")

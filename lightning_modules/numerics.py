"""The non-finite guard of ``UnipairSystem``: NaN/inf loss terms, gradients and evaluation logits.

:class:`NonFiniteGuard` keeps the count of skipped batches and the gradient-accumulation window, and
decides per batch and per optimiser step:

- a loss term that is NaN/inf (``check_losses``) stops training with :class:`NonFiniteLossError`
  naming the global step, the term(s), the rank(s), the values and sample ids (policy ``error``), or
  skips that batch's update (policy ``skip``: counted and warned);
- a non-finite gradient (``before_optimizer_step``) does the same for the update;
- non-finite validation/test logits (``check_logits``) are always an error naming the sample ids.

Under DDP the decisions are max-reduced over the ranks, so every rank skips or raises together and
none is left waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

NONFINITE_POLICIES: tuple[str, ...] = ("error", "skip")
# Loss terms a non-finite value is reported by, components before the sums they make up.
LOSS_COMPONENTS: tuple[str, ...] = (
    "task_loss",
    "substitution_loss",
    "vicreg_invariance",
    "vicreg_variance",
    "vicreg_covariance",
)


class NonFiniteLossError(FloatingPointError):
    """A training loss term or gradient (or an evaluation logit) is NaN or infinite."""


def distributed() -> bool:
    """True under an initialised process group of more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a float flag tensor over DDP ranks (identity on one process)."""
    if distributed():
        flags = flags.clone()
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags


def step_position(module: Any) -> str:
    """Where training is, for messages: global step, epoch and batch of a LightningModule's Trainer."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return "outside a Trainer"
    return (
        f"global step {module.global_step} (optimizer steps done), epoch {module.current_epoch}, "
        f"batch {trainer.fit_loop.epoch_loop.batch_idx + 1} of the epoch"
    )


def skipped_batch_loss(module: nn.Module, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero loss reaching every trainable parameter: backward (and DDP's gradient all-reduce) runs
    as usual with zero gradients; :meth:`NonFiniteGuard.before_optimizer_step` then drops them so the
    optimizer leaves the parameters and its moments untouched."""
    trainable = (param.sum() * 0.0 for param in module.parameters() if param.requires_grad)
    return sum(trainable, torch.zeros((), device=device))


class NonFiniteGuard:
    """State and decisions of the non-finite checks (see the module docstring).

    Attributes:
        skipped_batches: batches (or updates) skipped under policy ``skip`` so far; checkpointed by
            the system.
    """

    def __init__(self) -> None:
        self.skipped_batches = 0
        # Batches and skips since the last optimizer step (a gradient-accumulation window).
        self._window_batches = 0
        self._window_skipped = 0

    def check_losses(
        self, losses: dict[str, torch.Tensor], ids: Sequence[str], where: str, policy: str
    ) -> bool:
        """Check every loss term of a training batch; True when its update must be skipped.

        A [ranks x terms] flag matrix (each rank fills its row) is max-reduced over the ranks: one
        device sync, the same decision on every rank, and a message saying which term went
        non-finite on which rank (the VICReg terms use the global batch, so a NaN row of one rank makes
        them NaN on every rank; the task loss is per rank). Raises under policy ``error``.
        """
        self._window_batches += 1
        names = list(losses)
        values = torch.stack([losses[name].detach().float() for name in names])
        world = torch.distributed.get_world_size() if distributed() else 1
        rank = torch.distributed.get_rank() if distributed() else 0
        flags = torch.zeros(world, len(names), device=values.device)
        flags[rank] = (~torch.isfinite(values)).float()
        flags = any_rank(flags).tolist()
        if not any(any(row) for row in flags):
            return False
        ranks_of = {name: [r for r in range(world) if flags[r][i]] for i, name in enumerate(names)}
        bad_terms = [name for name in names if ranks_of[name]]
        components = [name for name in bad_terms if name in LOSS_COMPONENTS]
        on_ranks = (lambda name: f" (rank(s) {ranks_of[name]})") if world > 1 else (lambda name: "")
        if components:
            what = "non-finite loss term(s): " + ", ".join(name + on_ranks(name) for name in components)
        else:
            what = (
                f"non-finite weighted sum ({', '.join(bad_terms)}) while every component is finite (overflow)"
            )
        local = dict(zip(names, values.tolist(), strict=True))
        details = (
            f"{what} at {where}"
            + f". Values on rank {rank}: "
            + ", ".join(f"{k}={v:.6g}" for k, v in local.items())
            + f". Batch ids (first 8, rank {rank}): {list(ids)[:8]}."
        )
        if policy == "error":
            raise NonFiniteLossError(
                f"Training stopped: {details} Lower the learning rate, check the inputs, or set "
                "model.nonfinite_policy: skip to skip such batches (counted and logged)."
            )
        self.skipped_batches += 1
        self._window_skipped += 1
        rank_zero_warn(
            f"Skipping the update of this batch (nonfinite_policy=skip, {self.skipped_batches} "
            f"skipped so far): {details}"
        )
        return True

    def check_logits(self, logits: torch.Tensor, ids: Sequence[str] | None, stage: str) -> None:
        """Raise :class:`NonFiniteLossError` naming the samples whose evaluation logits are not finite."""
        bad_rows = ~torch.isfinite(logits.detach()).all(dim=-1)
        if not any_rank(bad_rows.any().float().view(1)).item():
            return
        rows = bad_rows.nonzero().flatten().tolist()
        named = [ids[i] for i in rows] if ids is not None else rows
        raise NonFiniteLossError(
            f"{stage}: non-finite logits for sample(s) {named[:10]}"
            + (f" (and {len(named) - 10} more)" if len(named) > 10 else "")
            + ("" if named else " on another rank")
            + "; the metrics would be meaningless. The weights or these inputs hold NaN/inf values."
        )

    def before_optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Callable[[], Iterable[tuple[str, nn.Parameter]]],
        global_step: int,
        precision: str,
        policy: str,
    ) -> None:
        """Drop the gradients of an update whose batches were all skipped or whose gradients are not finite.

        AdamW leaves parameters without a gradient untouched (moments and step counts included), so
        dropping every gradient skips the update. Under fp16 mixed precision the gradient scaler
        already skips steps with inf gradients.
        """
        window_batches, window_skipped = self._window_batches, self._window_skipped
        self._window_batches = self._window_skipped = 0
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if window_batches and window_skipped == window_batches:
            for param in params:
                param.grad = None
            return
        if not params or str(precision).startswith("16"):
            return
        norms = torch._foreach_norm([p.grad for p in params])
        finite = torch.isfinite(torch.stack(norms))
        if bool(finite.all()):  # gradients are already all-reduced under DDP: the same answer on every rank
            return
        names = {id(p): n for n, p in named_parameters()}
        bad = [names.get(id(p), "?") for p, ok in zip(params, finite.tolist(), strict=True) if not ok]
        details = (
            f"non-finite gradient(s) at global step {global_step} in {len(bad)} parameter(s), e.g. {bad[:5]}"
        )
        if policy == "error":
            raise NonFiniteLossError(
                f"Training stopped: {details} (the loss terms were finite). Lower the learning rate, or set "
                "model.nonfinite_policy: skip to skip such updates (counted and logged)."
            )
        self.skipped_batches += 1
        rank_zero_warn(
            f"Skipping this update (nonfinite_policy=skip, {self.skipped_batches} skipped so far): {details}"
        )
        for param in params:
            param.grad = None

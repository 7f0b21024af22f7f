"""Losses: VICReg (the joint-embedding prediction objective) and the task losses.

``vicreg_loss`` follows the reference implementation (facebookresearch/vicreg, ``main_vicreg.py``):

* invariance: ``F.mse_loss(x, y)``;
* variance: ``mean(relu(gamma - sqrt(Var + eps)))`` per branch, averaged over the two branches;
* covariance: sum of squared off-diagonal covariance entries divided by the dimension, per branch,
  summed over the two branches;
* total: ``inv_coeff * invariance + var_coeff * variance + cov_coeff * covariance``.

Under DDP the statistics use the global batch: ``gather`` (e.g. :func:`all_gather_with_grad`)
concatenates every rank's rows, with gradients flowing back to each rank's own rows, as the
reference's ``FullGatherLayer`` does.

``space="target_matched"`` is this project's variant for a *detached* target that lives in a
pretrained encoder's space (not a unit-scale projector output): both branches are standardised per
dimension with the target's statistics (running moments, :class:`RunningMoments`), the variance
hinge asks the prediction for at least the target's own spread in the batch (instead of a fixed
gamma), and the covariance term asks the prediction's covariance to equal the target's (instead of
zero off-diagonals, which a correlated target never has). A perfect prediction then scores exactly 0
whatever the batch size; the reference's covariance term alone has a floor of about D / (N - 1) for
N rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VicregSpace = Literal["raw", "target_matched"]
VICREG_SPACES: tuple[str, ...] = ("raw", "target_matched")


class VICRegTerms(NamedTuple):
    """``total`` and the three terms before their coefficients."""

    total: torch.Tensor
    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    n = matrix.shape[0]
    return matrix.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ``[n_rank, ...]`` from every rank along dim 0, keeping gradients.

    Ranks may hold different numbers of rows (rows are padded to the largest count for the
    collective and the padding is cut off again). Without an initialised process group (or with one
    process) returns ``tensor`` unchanged. The backward pass sums the gradients that every rank's
    loss sends to a rank's rows (``torch.distributed.nn.functional.all_gather``), which with DDP's
    gradient averaging gives the gradient of the global-batch loss.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    world_size = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    largest = max(counts)
    if tensor.shape[0] < largest:
        padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, padding], dim=0)
    else:
        padded = tensor
    if not tensor.dtype.is_floating_point:
        # Integer / bool tensors carry no gradient: a plain collective is enough.
        gathered = [torch.zeros_like(padded) for _ in range(world_size)]
        dist.all_gather(gathered, padded.contiguous())
    else:
        gathered = all_gather(padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(gathered, counts, strict=True)], dim=0)


def vicreg_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    inv_coeff: float = 25.0,
    var_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    mask: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_grad_target: bool = False,
    space: VicregSpace = "raw",
    target_mean: torch.Tensor | None = None,
    target_std: torch.Tensor | None = None,
) -> VICRegTerms:
    """VICReg between predictions ``x`` ``[N, D]`` and targets ``y`` ``[N, D]``.

    Args:
        x, y: the two branches (same shape).
        inv_coeff, var_coeff, cov_coeff: coefficients of the invariance, variance, covariance terms.
        gamma: target standard deviation of the variance hinge.
        eps: added to the variance before the square root.
        mask: optional bool ``[N]``: only these rows count (e.g. samples with both modalities).
        gather: optional function concatenating the rows of all DDP ranks (with gradient), applied
            to ``x``, ``y`` and ``mask`` before anything is computed, so every term uses the global
            batch. None = the local batch only (pure function).
        stop_grad_target: detach ``y`` (the target embedding receives no gradient from this loss).
        space: ``raw`` (the reference terms) or ``target_matched`` (see the module docstring).
        target_mean, target_std: ``[D]`` statistics of the target used to standardise both branches
            in ``target_matched`` (None = the selected rows' own, detached).

    Returns:
        :class:`VICRegTerms`. With fewer than two selected rows (no variance can be estimated) every
        term is an exact zero that is still connected to ``x`` and ``y`` in the autograd graph, so
        every parameter that produced them receives a (zero) gradient: DDP sees all parameters used.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(
            f"vicreg_loss needs two [N, D] tensors of the same shape, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if stop_grad_target:
        y = y.detach()
    if gather is not None:
        x, y = gather(x), gather(y)
        if mask is not None:
            mask = gather(mask)
    if space not in VICREG_SPACES:
        raise ValueError(f"vicreg space: unknown value {space!r}; expected one of {list(VICREG_SPACES)}")
    if mask is not None:
        if mask.shape != x.shape[:1]:
            raise ValueError(f"mask must be [N]={x.shape[0]} bools, got shape {tuple(mask.shape)}")
        x, y = x[mask.bool()], y[mask.bool()]
    # Anchor connected to both inputs (selected rows only, so non-finite values in rows left out,
    # e.g. fillers, cannot leak in): an empty selection still yields a graph through all parameters
    # (with zero gradient).
    anchor = (x.sum() + y.sum()) * 0.0
    num_rows, dim = x.shape
    if num_rows < 2:
        zero = anchor
        return VICRegTerms(zero, zero, zero, zero)
    if space == "target_matched":
        return _target_matched_terms(
            x, y, inv_coeff, var_coeff, cov_coeff, eps, target_mean, target_std, anchor
        )

    invariance = F.mse_loss(x, y)

    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    variance = torch.mean(F.relu(gamma - std_x)) / 2 + torch.mean(F.relu(gamma - std_y)) / 2

    cov_x = (x.T @ x) / (num_rows - 1)
    cov_y = (y.T @ y) / (num_rows - 1)
    covariance = _off_diagonal(cov_x).pow(2).sum() / dim + _off_diagonal(cov_y).pow(2).sum() / dim

    total = inv_coeff * invariance + var_coeff * variance + cov_coeff * covariance + anchor
    return VICRegTerms(total, invariance + anchor, variance + anchor, covariance + anchor)


def _target_matched_terms(
    x: torch.Tensor,
    y: torch.Tensor,
    inv_coeff: float,
    var_coeff: float,
    cov_coeff: float,
    eps: float,
    target_mean: torch.Tensor | None,
    target_std: torch.Tensor | None,
    anchor: torch.Tensor,
) -> VICRegTerms:
    if target_mean is None or target_std is None:
        target_mean, target_std = y.detach().mean(dim=0), y.detach().std(dim=0)
    scale = target_std.detach().clamp_min(eps)
    x = (x - target_mean.detach()) / scale
    y = (y - target_mean.detach()) / scale
    num_rows, dim = x.shape
    invariance = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    variance = torch.mean(F.relu(std_y.detach() - std_x))
    cov_x = (x.T @ x) / (num_rows - 1)
    cov_y = (y.T @ y) / (num_rows - 1)
    covariance = _off_diagonal(cov_x - cov_y).pow(2).sum() / dim
    total = inv_coeff * invariance + var_coeff * variance + cov_coeff * covariance + anchor
    return VICRegTerms(total, invariance + anchor, variance + anchor, covariance + anchor)


class RunningMoments(nn.Module):
    """Per-dimension mean and standard deviation of a stream of ``[N, D]`` rows (buffers, checkpointed).

    The first batches are averaged cumulatively, later ones with weight ``momentum`` (an exponential
    moving average), so the estimate follows an embedding that moves while its encoder trains.

    Args:
        dim: width D of the rows.
        momentum: weight of a new batch once more than ``1 / momentum`` batches were seen.
    """

    def __init__(self, dim: int, momentum: float = 0.05) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"RunningMoments momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Fold in ``rows`` (fewer than two rows change nothing)."""
        if rows.shape[0] < 2:
            return
        rows = rows.detach().float()
        weight = max(self.momentum, 1.0 / float(self.num_batches + 1))
        self.mean.lerp_(rows.mean(dim=0), weight)
        self.var.lerp_(rows.var(dim=0), weight)
        self.num_batches += 1

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


TASKS: tuple[str, ...] = ("multiclass", "multilabel", "binary")


def per_sample_task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Task loss per sample ``[B]``: BCE-with-logits averaged over labels for ``multilabel``,
    cross-entropy for ``multiclass`` and ``binary`` (binary uses two logits)."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(
            dim=1
        )
    if task in ("multiclass", "binary"):
        return F.cross_entropy(logits, labels.long(), reduction="none")
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the rows where ``weights`` is nonzero; 0 (still in the graph) if there
    are none.
    """
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)

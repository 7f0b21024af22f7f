"""Metric bookkeeping of ``UnipairSystem``: task metrics per stage and per missing case, eval loss means.

:class:`StageMetrics` holds, for each stage (``train``, ``val``, ``test``), the task's torchmetrics
collection with its sample count and, on val and test, one more per missing case (``complete``,
``text_missing``, ``image_missing``) with the case's sample count, and the loss terms as
sample-weighted sums. :meth:`StageMetrics.update` takes one batch, :meth:`StageMetrics.log_epoch`
logs the epoch values through the LightningModule's ``log`` / ``log_dict`` and resets.

Whether there is anything to log is decided on the synced sample count, the same on every rank, so
no rank computes a collection that no rank updated (list states, e.g. the calibration error's,
cannot be computed empty).

The per-case collections are updated with the whole batch, the targets of other cases set to
``IGNORE_INDEX`` (no empty updates, well-typed states on every rank). The val/test loss means are
sums synced by torchmetrics: Lightning's own epoch mean under DDP syncs the counts as an integer
*mean*, truncated on gloo, which is wrong when processes hold different numbers of samples (the
unpadded evaluation shards), and torchmetrics 1.9's ``MeanMetric`` ignores weights when told to keep
NaN. NaN stays NaN: nothing is dropped silently. Metric states are not persistent: nothing of this
module is in a checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import SumMetric

from lightning_modules.metrics import (
    IGNORE_INDEX,
    MISSING_CASES,
    build_metric_collection,
    ignore_outside,
    metric_inputs,
    missing_case_masks,
)

STAGES: tuple[str, ...] = ("train", "val", "test")
CASE_STAGES: tuple[str, ...] = ("val", "test")  # stages with the per-missing-case breakdown


def _key(stage: str) -> str:
    # "<stage>_metrics" because ModuleDict keys may not shadow nn.Module.train.
    return f"{stage}_metrics"


class StageMetrics(nn.Module):
    """Task metrics per stage and missing case, and val/test loss sums (see the module docstring).

    Args:
        task: ``multiclass``, ``multilabel`` or ``binary``.
        num_classes: number of logits.
        threshold: probability threshold of the multilabel metrics.
        loss_names: names of the loss terms a batch yields (summed on val and test).
    """

    def __init__(
        self, task: str, num_classes: int, threshold: float = 0.5, loss_names: Sequence[str] = ("loss",)
    ) -> None:
        super().__init__()
        self.task = task
        base = build_metric_collection(task, num_classes, threshold)
        per_case = build_metric_collection(task, num_classes, threshold, ignore_index=IGNORE_INDEX)
        self.stage_metrics = nn.ModuleDict({_key(stage): base.clone(prefix=f"{stage}/") for stage in STAGES})
        self.case_metrics = nn.ModuleDict(
            {
                _key(stage): nn.ModuleDict(
                    {case: per_case.clone(prefix=f"{stage}/{case}/") for case in MISSING_CASES}
                )
                for stage in CASE_STAGES
            }
        )
        self.stage_counts = nn.ModuleDict({_key(stage): SumMetric() for stage in STAGES})
        self.case_counts = nn.ModuleDict(
            {
                _key(stage): nn.ModuleDict({case: SumMetric() for case in MISSING_CASES})
                for stage in CASE_STAGES
            }
        )
        self.eval_loss_sums = nn.ModuleDict(
            {
                _key(stage): nn.ModuleDict({name: SumMetric(nan_strategy="disable") for name in loss_names})
                for stage in CASE_STAGES
            }
        )

    def update(
        self,
        stage: str,
        logits: torch.Tensor,
        batch: dict[str, Any],
        losses: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Add one batch: its logits, labels and presence masks, and (val/test, required) its loss terms."""
        batch_size = logits.shape[0]
        self.stage_counts[_key(stage)].update(float(batch_size))
        if stage in CASE_STAGES:
            if losses is None:
                raise ValueError(f"StageMetrics.update: stage {stage!r} needs the batch's loss terms")
            sums = self.eval_loss_sums[_key(stage)]
            for name, value in losses.items():
                sums[name].update(value.detach().float() * batch_size)
        preds, target = metric_inputs(logits, batch["label"], self.task)
        self.stage_metrics[_key(stage)].update(preds, target)
        if stage in CASE_STAGES:
            for case, mask in missing_case_masks(batch["image_present"], batch["text_present"]).items():
                self.case_counts[_key(stage)][case].update(mask.sum().float())
                self.case_metrics[_key(stage)][case].update(preds, ignore_outside(target, mask))

    def log_epoch(self, stage: str, log: Callable[..., Any], log_dict: Callable[..., Any]) -> None:
        """Log the epoch's values with ``log`` / ``log_dict`` (a LightningModule's) and reset.

        Values are synced by torchmetrics; ``sync_dist=True`` then averages identical values (and keeps
        Lightning from warning about unsynced epoch-level logs). Under DDP every rank computes every
        count (a collective), even one that saw no batch of the stage, and then takes the same branch.
        """
        with warnings.catch_warnings():
            # A rank may see no batch of a stage (tiny sets under DDP); the synced value is still right.
            warnings.filterwarnings("ignore", message=".*compute.*before the.*update.*")
            count = _compute_and_reset(self.stage_counts[_key(stage)])
            collection = self.stage_metrics[_key(stage)]
            if count > 0:
                log_dict(collection.compute(), sync_dist=True)
            collection.reset()
            if stage not in CASE_STAGES:
                return
            for name, total in self.eval_loss_sums[_key(stage)].items():
                if count > 0:
                    log(f"{stage}/{name}", total.compute() / count, prog_bar=name == "loss", sync_dist=True)
                total.reset()
            for case in MISSING_CASES:
                case_count = _compute_and_reset(self.case_counts[_key(stage)][case])
                metrics = self.case_metrics[_key(stage)][case]
                if case_count > 0:
                    values = metrics.compute()
                    values[f"{stage}/{case}/num_samples"] = case_count.float()
                    log_dict(values, sync_dist=True)
                metrics.reset()


def _compute_and_reset(counter: SumMetric) -> torch.Tensor:
    count = counter.compute()
    counter.reset()
    return count

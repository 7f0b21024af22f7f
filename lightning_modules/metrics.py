"""Task metrics (torchmetrics) and the missing-case breakdown.

One :class:`~torchmetrics.MetricCollection` per task, cloned per stage with the prefixes
``train/``, ``val/``, ``test/`` and, on val and test, once more per missing case
(``val/complete/``, ``val/text_missing/``, ``val/image_missing/``):

* multilabel: ``f1_macro``, ``f1_micro``, ``f1_weighted``, ``f1_samples`` (threshold on sigmoid);
* multiclass: ``accuracy`` (micro), ``f1_macro``, ``ece`` (expected calibration error, 15 bins of
  the top-class probability);
* binary (two logits): ``auroc``, ``accuracy``, ``ece`` (on the softmax probability of class 1).

A stand-in for a missing modality can make the head over-confident, hence the ECE; torchmetrics has
no multilabel calibration error, so multilabel tasks have none.

torchmetrics' multilabel F1 has no ``samples`` average (sklearn's ``average="samples"``), so
:class:`MultilabelSamplesF1` implements it as a torchmetrics ``Metric`` (DDP-synced sums).

The per-case collections are built with ``ignore_index=IGNORE_INDEX`` and updated with the whole
batch, the targets of samples from other cases set to ``IGNORE_INDEX``. Updating every case on every
batch (rather than only with its own, possibly empty, subset) keeps the metric states of every rank
well-typed, which DDP synchronisation of list states (AUROC) needs when a rank saw no sample of a case.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryCalibrationError,
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MultilabelF1Score,
)

MISSING_CASES: tuple[str, ...] = ("complete", "text_missing", "image_missing")
MONITOR_METRIC: dict[str, str] = {"multilabel": "f1_macro", "multiclass": "accuracy", "binary": "auroc"}
IGNORE_INDEX = -1  # target value of samples a per-case metric must not count


class MultilabelSamplesF1(Metric):
    """Sample-averaged F1 for multilabel tasks (sklearn ``f1_score(average="samples")``).

    F1 is computed per sample between its predicted and true label sets and averaged over samples;
    a sample with neither true nor predicted labels scores ``zero_division``.

    Args:
        num_labels: number of labels (checked against the inputs).
        threshold: probability threshold; inputs outside [0, 1] are treated as logits (sigmoid first),
            as torchmetrics' multilabel metrics do.
        zero_division: score of a sample whose F1 is 0/0.
        ignore_index: target value of entries to leave out; a sample whose entries are all left out
            does not count at all.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_labels: int,
        threshold: float = 0.5,
        zero_division: float = 0.0,
        ignore_index: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.threshold = threshold
        self.zero_division = zero_division
        self.add_state("f1_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.shape != target.shape or preds.dim() != 2 or preds.shape[1] != self.num_labels:
            raise ValueError(
                f"MultilabelSamplesF1 expects preds and target of shape [N, {self.num_labels}], got "
                f"{tuple(preds.shape)} and {tuple(target.shape)}"
            )
        if preds.is_floating_point() and preds.numel() and ((preds < 0) | (preds > 1)).any():
            preds = preds.sigmoid()
        predicted = preds >= self.threshold if preds.is_floating_point() else preds.bool()
        valid = (
            target != self.ignore_index
            if self.ignore_index is not None
            else torch.ones_like(target, dtype=torch.bool)
        )
        counted = valid.any(dim=1)
        predicted, truth, valid = predicted[counted], (target == 1)[counted], valid[counted]
        true_pos = (predicted & truth & valid).sum(dim=1).double()
        false_pos = (predicted & ~truth & valid).sum(dim=1).double()
        false_neg = (~predicted & truth & valid).sum(dim=1).double()
        denominator = 2 * true_pos + false_pos + false_neg
        f1 = torch.where(
            denominator > 0,
            2 * true_pos / denominator.clamp_min(1),
            torch.full_like(denominator, self.zero_division),
        )
        self.f1_sum += f1.sum()
        self.num_samples += truth.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.f1_sum / self.num_samples.clamp_min(1)).float()


def build_metric_collection(
    task: str, num_classes: int, threshold: float = 0.5, ignore_index: int | None = None
) -> MetricCollection:
    """The metrics of ``task`` (without prefix; clone it per stage with ``.clone(prefix=...)``).

    ``ignore_index``: target value of samples (entries, for multilabel) to leave out.
    """
    if task == "multilabel":
        common = {"num_labels": num_classes, "threshold": threshold, "ignore_index": ignore_index}
        return MetricCollection(
            {
                "f1_macro": MultilabelF1Score(average="macro", **common),
                "f1_micro": MultilabelF1Score(average="micro", **common),
                "f1_weighted": MultilabelF1Score(average="weighted", **common),
                "f1_samples": MultilabelSamplesF1(**common),
            }
        )
    if task == "multiclass":
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(
                    num_classes=num_classes, average="micro", ignore_index=ignore_index
                ),
                "f1_macro": MulticlassF1Score(
                    num_classes=num_classes, average="macro", ignore_index=ignore_index
                ),
                "ece": MulticlassCalibrationError(
                    num_classes=num_classes, n_bins=15, ignore_index=ignore_index
                ),
            }
        )
    if task == "binary":
        if num_classes != 2:
            raise ValueError(f"task 'binary' uses two logits: num_classes must be 2, got {num_classes}")
        return MetricCollection(
            {
                "auroc": BinaryAUROC(ignore_index=ignore_index),
                "accuracy": BinaryAccuracy(threshold=0.5, ignore_index=ignore_index),
                "ece": BinaryCalibrationError(n_bins=15, ignore_index=ignore_index),
            }
        )
    raise ValueError(f"unknown task {task!r}; expected one of {list(MONITOR_METRIC)}")


def metric_inputs(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(preds, target) in the form the task's collection takes: probabilities and integer targets."""
    logits = logits.detach().float()
    if task == "multilabel":
        return logits.sigmoid(), labels.long()
    if task == "binary":
        return logits.softmax(dim=-1)[:, 1], labels.long()
    return logits.softmax(dim=-1), labels.long()


def ignore_outside(target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``target`` with the samples where ``keep`` is False set to :data:`IGNORE_INDEX`."""
    keep = keep.bool().view(-1, *([1] * (target.dim() - 1)))
    return torch.where(keep, target, torch.full_like(target, IGNORE_INDEX))


def missing_case_masks(image_present: torch.Tensor, text_present: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool masks ``[B]`` per missing case (keys :data:`MISSING_CASES`)."""
    image_present, text_present = image_present.bool(), text_present.bool()
    return {
        "complete": image_present & text_present,
        "text_missing": image_present & ~text_present,
        "image_missing": ~image_present & text_present,
    }


def monitor_metric(task: str) -> str:
    """Name of the validation metric that model selection should maximise for ``task`` (e.g.
    ``val/f1_macro``).
    """
    if task not in MONITOR_METRIC:
        raise ValueError(f"unknown task {task!r}; expected one of {list(MONITOR_METRIC)}")
    return f"val/{MONITOR_METRIC[task]}"

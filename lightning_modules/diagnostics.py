"""How good the predicted embeddings are, measured on complete samples (where the real ones are known).

:class:`PredictionDiagnostics` (a torchmetrics ``Metric``, DDP-synced sums) reports, per direction
(``image``: ẑ_v predicted from the text; ``text``: ẑ_t predicted from the image):

* ``cos_<m>``: mean cosine similarity between ẑ_m and z_m;
* ``std_ratio_<m>``: median over dimensions of std(ẑ_m) / std(z_m) (1 = the prediction has the
  target's spread; the head was trained on z_m's spread), over the dimensions where z_m varies;
* ``substitution_accuracy_<m>``: the fusion head's accuracy when z_m is replaced by ẑ_m on a complete
  sample ([ẑ_v; z_t] for ``image``, [z_v; ẑ_t] for ``text``): how well the stand-in works for the
  head, separately from how often the other modality is missing. Multilabel: label-wise accuracy at
  the threshold.

``compute`` also returns ``num_samples``, the number of complete samples behind the values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

DIRECTIONS: tuple[str, ...] = ("image", "text")


class PredictionDiagnostics(Metric):
    """Quality of ẑ_v and ẑ_t against z_v and z_t on the complete samples of a stage.

    Args:
        image_dim, text_dim: embedding widths.
        task: ``multiclass``, ``binary`` (two logits) or ``multilabel``.
        threshold: probability threshold of ``multilabel`` substitution accuracy.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self, image_dim: int, text_dim: int, task: str = "multiclass", threshold: float = 0.5, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.task = task
        self.threshold = threshold
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for direction, dim in zip(DIRECTIONS, (image_dim, text_dim), strict=True):
            self.add_state(
                f"cos_{direction}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(
                f"correct_{direction}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
            for name in ("sum_pred", "sq_pred", "sum_true", "sq_true"):
                self.add_state(
                    f"{name}_{direction}", default=torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum"
                )

    def _correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            return ((logits.sigmoid() >= self.threshold) == labels.bool()).double().mean(dim=1)
        return (logits.argmax(dim=1) == labels.long()).double()

    def update(
        self,
        embeddings: dict[str, torch.Tensor | None],
        substitution_logits: dict[str, torch.Tensor],
        labels: torch.Tensor,
        complete: torch.Tensor,
    ) -> None:
        """``embeddings``: ``z_v``, ``z_t``, ``zhat_v``, ``zhat_t`` ``[B, D]``; ``substitution_logits``:
        ``image`` / ``text`` ``[B, C]``; ``complete``: bool ``[B]``, the rows that count."""
        complete = complete.bool()
        self.count += complete.sum().double()
        for direction, key in zip(DIRECTIONS, ("v", "t"), strict=True):
            pred = embeddings[f"zhat_{key}"].detach()[complete].double()
            true = embeddings[f"z_{key}"].detach()[complete].double()
            getattr(self, f"cos_{direction}").add_(F.cosine_similarity(pred, true, dim=1).sum())
            getattr(self, f"sum_pred_{direction}").add_(pred.sum(dim=0))
            getattr(self, f"sq_pred_{direction}").add_(pred.pow(2).sum(dim=0))
            getattr(self, f"sum_true_{direction}").add_(true.sum(dim=0))
            getattr(self, f"sq_true_{direction}").add_(true.pow(2).sum(dim=0))
            logits = substitution_logits[direction].detach()[complete]
            getattr(self, f"correct_{direction}").add_(self._correct(logits, labels[complete]).sum())

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp_min(2.0)
        values = {}
        for direction in DIRECTIONS:

            def std(name: str, direction: str = direction) -> torch.Tensor:
                total, squares = (
                    getattr(self, f"sum_{name}_{direction}"),
                    getattr(self, f"sq_{name}_{direction}"),
                )
                return ((squares - total.pow(2) / n) / (n - 1)).clamp_min(0.0).sqrt()

            values[f"cos_{direction}"] = getattr(self, f"cos_{direction}") / n
            # The median over dimensions, leaving out those where z barely varies: a pretrained
            # embedding can have near-constant dimensions, whose ratios would dominate a mean.
            true_std = std("true")
            informative = true_std > 1e-3 * true_std.max().clamp_min(1e-12)
            ratios = std("pred")[informative] / true_std[informative]
            values[f"std_ratio_{direction}"] = (
                ratios.median() if ratios.numel() else torch.tensor(float("nan"))
            )
            values[f"substitution_accuracy_{direction}"] = getattr(self, f"correct_{direction}") / n
        values["num_samples"] = self.count
        return {name: value.float() for name, value in values.items()}

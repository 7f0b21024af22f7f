"""Metric bookkeeping (lightning_modules/stage_metrics.py): per stage, per missing case, eval loss means."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.stage_metrics import StageMetrics


def _batch(labels, image_present, text_present) -> dict:
    return {
        "label": torch.tensor(labels),
        "image_present": torch.tensor(image_present),
        "text_present": torch.tensor(text_present),
    }


def _logits(predicted: list[int], num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float() * 5


def _logged(metrics: StageMetrics, stage: str) -> dict[str, float]:
    logged: dict[str, float] = {}
    metrics.log_epoch(
        stage,
        log=lambda name, value, **kwargs: logged.__setitem__(name, float(value)),
        log_dict=lambda values, **kwargs: logged.update({k: float(v) for k, v in values.items()}),
    )
    return logged


def test_val_epoch_logs_stage_case_metrics_and_sample_weighted_loss_means():
    metrics = StageMetrics("multiclass", 3, loss_names=["task_loss", "loss"])
    # batch 1: 3 samples (complete, text missing, image missing), 2 right; batch 2: 1 complete sample, wrong
    metrics.update(
        "val",
        _logits([0, 1, 0]),
        _batch([0, 1, 2], [True, True, False], [True, False, True]),
        {"task_loss": torch.tensor(1.0), "loss": torch.tensor(2.0)},
    )
    metrics.update(
        "val",
        _logits([1]),
        _batch([0], [True], [True]),
        {"task_loss": torch.tensor(5.0), "loss": torch.tensor(6.0)},
    )
    logged = _logged(metrics, "val")
    assert logged["val/accuracy"] == pytest.approx(2 / 4)
    assert logged["val/task_loss"] == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)  # weighted by batch size
    assert logged["val/loss"] == pytest.approx((3 * 2.0 + 6.0) / 4)
    assert logged["val/complete/accuracy"] == pytest.approx(1 / 2) and logged["val/complete/num_samples"] == 2
    assert logged["val/text_missing/accuracy"] == 1.0 and logged["val/text_missing/num_samples"] == 1
    assert logged["val/image_missing/accuracy"] == 0.0
    assert _logged(metrics, "val") == {}  # reset after logging: nothing left


def test_cases_without_samples_are_not_logged_and_train_has_no_case_breakdown():
    metrics = StageMetrics("multiclass", 3, loss_names=["loss"])
    metrics.update(
        "val", _logits([0, 1]), _batch([0, 1], [True, True], [True, True]), {"loss": torch.tensor(1.0)}
    )
    logged = _logged(metrics, "val")
    assert "val/complete/num_samples" in logged and not any("missing/" in key for key in logged)
    metrics.update("train", _logits([0]), _batch([1], [True], [False]))
    train = _logged(metrics, "train")
    assert train["train/accuracy"] == 0.0 and all(key.count("/") == 1 for key in train)


def test_nan_loss_stays_nan():
    metrics = StageMetrics("multiclass", 3, loss_names=["loss"])
    metrics.update("test", _logits([0]), _batch([0], [True], [True]), {"loss": torch.tensor(float("nan"))})
    assert torch.isnan(torch.tensor(_logged(metrics, "test")["test/loss"]))


def test_multilabel_threshold_is_used():
    logits = torch.tensor([[1.0, -1.0]])  # probabilities 0.73 and 0.27
    batch = {
        "label": torch.tensor([[1.0, 1.0]]),
        "image_present": torch.tensor([True]),
        "text_present": torch.tensor([True]),
    }
    low, half = StageMetrics("multilabel", 2, threshold=0.2), StageMetrics("multilabel", 2, threshold=0.5)
    for metrics in (low, half):
        metrics.update("train", logits, batch)
    assert _logged(low, "train")["train/f1_micro"] == 1.0
    assert _logged(half, "train")["train/f1_micro"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("stage", ["train", "val"])
def test_a_stage_without_batches_logs_nothing(stage):
    # The calibration error's list states cannot be computed empty.
    assert _logged(StageMetrics("multiclass", 3, loss_names=["loss"]), stage) == {}


def test_eval_stages_need_the_loss_terms():
    with pytest.raises(ValueError, match="'val' needs the batch's loss terms"):
        StageMetrics("multiclass", 3).update("val", _logits([0]), _batch([0], [True], [True]))

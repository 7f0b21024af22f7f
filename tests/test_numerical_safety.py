"""Numerical safety: a non-finite loss term or gradient stops training (naming step and term) or is skipped.

Non-finite values are injected by wrapping the loss functions the system calls (``vicreg_loss``,
``per_sample_task_loss``) so that one chosen term turns NaN/inf at one chosen training step; the
rest of the run is real (Lightning Trainer, tiny encoders, synthetic data). The DDP agreement of
the skip decision is tested in ``tests/test_ddp_consistency.py`` (slow).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

import lightning_modules.system as system_module
from lightning_modules.losses import per_sample_task_loss, vicreg_loss
from lightning_modules.system import CHECKPOINT_SKIPPED_KEY, NonFiniteLossError
from tests.method_fixtures import (
    COMPLETE,
    IMAGE_MISSING,
    TEXT_MISSING,
    SyntheticDataModule,
    quiet_trainer,
    tiny_system,
)

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")

VICREG_TERMS = ("invariance", "variance", "covariance")


def _trainer(tmp_path, **kwargs) -> Trainer:
    return quiet_trainer(tmp_path, **{"limit_val_batches": 0, **kwargs})


def _data() -> SyntheticDataModule:
    # 6 batches of 4 with every missing case, so VICReg has complete rows to work on
    return SyntheticDataModule(
        num_train=24,
        num_eval=8,
        batch_size=4,
        train_missing=[COMPLETE, COMPLETE, TEXT_MISSING, IMAGE_MISSING],
    )


class _StepCounter:
    """Counts training forward passes (the system calls vicreg_loss twice and the task loss once per step)."""

    def __init__(self) -> None:
        self.step = -1


def _poison_vicreg(monkeypatch, term: str, at_steps: set[int], value: float = float("nan")) -> _StepCounter:
    counter = _StepCounter()
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = vicreg_loss(*args, **kwargs)
        calls["n"] += 1
        if torch.is_grad_enabled():
            counter.step = (calls["n"] - 1) // 2
        if torch.is_grad_enabled() and counter.step in at_steps and calls["n"] % 2 == 1:  # the image branch
            bad = getattr(terms, term) + value
            terms = terms._replace(**{term: bad, "total": terms.total + value})
        return terms

    monkeypatch.setattr(system_module, "vicreg_loss", poisoned)
    return counter


def _poison_task_loss(monkeypatch, at_steps: set[int], value: float = float("inf")) -> None:
    calls = {"n": 0}

    def poisoned(logits, labels, task):
        loss = per_sample_task_loss(logits, labels, task)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] - 1 in at_steps:
                loss = loss + value
        return loss

    monkeypatch.setattr(system_module, "per_sample_task_loss", poisoned)


@pytest.mark.parametrize("term", VICREG_TERMS)
def test_nonfinite_vicreg_term_stops_training_naming_step_and_term(tmp_path, monkeypatch, term):
    seed_everything(0)
    _poison_vicreg(monkeypatch, term, at_steps={2})
    model = tiny_system()
    with pytest.raises(NonFiniteLossError) as info:
        _trainer(tmp_path, max_steps=5).fit(model, datamodule=_data())
    message = str(info.value)
    assert f"non-finite loss term(s): vicreg_{term} at global step 2 " in message, message
    assert f"vicreg_{term}=nan" in message and "batch 3 of the epoch" in message
    assert "task_loss=" in message and "nonfinite_policy: skip" in message
    assert "synthetic-" in message  # the batch's sample ids


def test_nonfinite_task_loss_stops_training_naming_the_task_term(tmp_path, monkeypatch):
    seed_everything(0)
    _poison_task_loss(monkeypatch, at_steps={1})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss term\(s\): task_loss at global step 1 "):
        _trainer(tmp_path, max_steps=5).fit(tiny_system(), datamodule=_data())


def test_overflow_of_the_weighted_sum_is_named_as_such(tmp_path, monkeypatch):
    seed_everything(0)
    _poison_vicreg(monkeypatch, "variance", at_steps={0}, value=0.0)  # no-op: keep the wrapper counting
    model = tiny_system(pred_loss_weight=float("inf"))  # finite terms, infinite weighted sum
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite weighted sum \(loss\) while every component is finite"
    ):
        _trainer(tmp_path, max_steps=2).fit(model, datamodule=_data())


class _ParamSnapshots(Callback):
    """Trainable parameters before and after each training batch, and AdamW's step counts at the end."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _snapshot(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = self._snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = self._snapshot(pl_module)


def test_skip_policy_skips_the_update_counts_and_logs(tmp_path, monkeypatch):
    seed_everything(0)
    _poison_vicreg(monkeypatch, "covariance", at_steps={1, 3}, value=float("inf"))
    model = tiny_system(nonfinite_policy="skip")
    snapshots = _ParamSnapshots()
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[snapshots])
    with pytest.warns(
        UserWarning, match=r"Skipping the update of this batch.*vicreg_covariance at global step 1 "
    ) as caught:
        trainer.fit(model, datamodule=_data())
    assert sum("Skipping the update" in str(w.message) for w in caught) == 2
    assert trainer.global_step == 6  # a skipped batch still counts as a (no-op) optimizer step
    assert model.nonfinite_skipped_batches == 2
    assert trainer.callback_metrics["train/nonfinite_skipped_batches"] == 2
    for step in range(6):
        unchanged = all(
            torch.equal(snapshots.before[step][n], snapshots.after[step][n]) for n in snapshots.before[step]
        )
        assert unchanged == (step in (1, 3)), step
    # AdamW's moments and step counts did not see the skipped batches either.
    optimizer = trainer.optimizers[0]
    steps = {int(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]}
    assert steps == {4}
    # Logged epoch losses stay finite: skipped batches are not logged.
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])


def test_skip_with_gradient_accumulation_drops_only_the_bad_batch(tmp_path, monkeypatch):
    seed_everything(0)
    _poison_vicreg(monkeypatch, "variance", at_steps={0})
    model = tiny_system(nonfinite_policy="skip")
    snapshots = _ParamSnapshots()
    trainer = _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[snapshots])
    with pytest.warns(UserWarning, match="Skipping the update"):
        trainer.fit(model, datamodule=_data())
    assert trainer.global_step == 3 and model.nonfinite_skipped_batches == 1
    # The first update still happened, from the second (good) batch of its window.
    assert not all(torch.equal(snapshots.before[0][n], snapshots.after[0][n]) for n in snapshots.before[0])


class _NanGradient(Callback):
    """Turns one trainable parameter's gradient into NaN at one step (loss terms stay finite)."""

    def __init__(self, step: int, name: str = "head.net.0.weight") -> None:
        self.step, self.name = step, name

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            dict(pl_module.named_parameters())[self.name].grad[0, 0] = float("nan")


def test_nonfinite_gradient_is_an_error_naming_the_parameter(tmp_path):
    seed_everything(0)
    model = tiny_system()
    name = next(
        n for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.") and p.ndim == 2
    )
    with pytest.raises(
        NonFiniteLossError,
        match=rf"non-finite gradient\(s\) at global step 2 in 1 parameter\(s\), e\.g\. \['{name}'\]",
    ):
        _trainer(tmp_path, max_steps=4, callbacks=[_NanGradient(2, name)]).fit(model, datamodule=_data())


def test_nonfinite_gradient_is_skipped_under_skip(tmp_path):
    seed_everything(0)
    model = tiny_system(nonfinite_policy="skip")
    name = next(
        n for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.") and p.ndim == 2
    )
    snapshots = _ParamSnapshots()
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[_NanGradient(2, name), snapshots])
    with pytest.warns(UserWarning, match=r"Skipping this update .*non-finite gradient\(s\) at global step 2"):
        trainer.fit(model, datamodule=_data())
    assert model.nonfinite_skipped_batches == 1
    assert all(torch.equal(snapshots.before[2][n], snapshots.after[2][n]) for n in snapshots.before[2])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_logits_in_validation_name_the_samples(tmp_path):
    seed_everything(0)
    model = tiny_system()
    with torch.no_grad():
        model.head.net[-1].bias[1] = float("nan")  # every logit row gets a NaN
    with pytest.raises(
        NonFiniteLossError, match=r"val: non-finite logits for sample\(s\) \['synthetic-0', 'synthetic-1'"
    ):
        _trainer(tmp_path, limit_val_batches=1.0).validate(model, datamodule=_data(), verbose=False)


def test_policy_is_validated_and_the_skip_count_survives_a_checkpoint():
    with pytest.raises(
        ValueError, match=r"nonfinite_policy: unknown policy 'ignore'; expected one of \['error', 'skip'\]"
    ):
        tiny_system(nonfinite_policy="ignore")
    model = tiny_system(nonfinite_policy="skip")
    model.nonfinite_skipped_batches = 3
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_SKIPPED_KEY] == 3
    fresh = tiny_system(nonfinite_policy="skip")
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.nonfinite_skipped_batches == 3

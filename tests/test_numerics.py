"""The non-finite guard (lightning_modules/numerics.py) alone; through a Trainer: test_numerical_safety.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.numerics import NonFiniteGuard, NonFiniteLossError, skipped_batch_loss

NAN = torch.tensor(float("nan"))


def _losses(**overrides) -> dict[str, torch.Tensor]:
    losses = {"task_loss": torch.tensor(1.0), "vicreg_variance": torch.tensor(2.0), "loss": torch.tensor(3.0)}
    return losses | overrides


def test_finite_losses_pass_and_a_nan_term_is_an_error_naming_term_place_values_and_ids():
    guard = NonFiniteGuard()
    assert guard.check_losses(_losses(), ["a"], "step 3", "error") is False
    with pytest.raises(NonFiniteLossError) as error:
        guard.check_losses(_losses(vicreg_variance=NAN, loss=NAN), ["a", "b"], "step 3", "error")
    message = str(error.value)
    assert "non-finite loss term(s): vicreg_variance at step 3. Values on rank 0: task_loss=1," in message
    assert "Batch ids (first 8, rank 0): ['a', 'b']" in message and "nonfinite_policy: skip" in message


def test_overflowing_sum_of_finite_terms_is_named_as_such():
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite weighted sum \(loss\) while every component is finite"
    ):
        NonFiniteGuard().check_losses(_losses(loss=torch.tensor(float("inf"))), [], "here", "error")


def test_skip_policy_counts_warns_and_drops_the_window_update():
    guard = NonFiniteGuard()
    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    with pytest.warns(UserWarning, match="Skipping the update of this batch"):
        assert guard.check_losses(_losses(task_loss=NAN), [], "here", "skip") is True
    assert guard.skipped_batches == 1
    param.grad = torch.ones(2)
    guard.before_optimizer_step(optimizer, lambda: [("w", param)], 0, "32-true", "skip")
    assert param.grad is None  # every batch of the window was skipped: no update
    # A window with one good batch keeps its (finite) gradients.
    guard.check_losses(_losses(), [], "here", "skip")
    param.grad = torch.ones(2)
    guard.before_optimizer_step(optimizer, lambda: [("w", param)], 1, "32-true", "skip")
    assert torch.equal(param.grad, torch.ones(2))


def test_nonfinite_gradient_is_an_error_or_a_skipped_update():
    param, other = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    optimizer = torch.optim.AdamW([param, other])
    named = lambda: [("encoder.w", param), ("head.b", other)]  # noqa: E731
    guard = NonFiniteGuard()
    guard.check_losses(_losses(), [], "here", "error")
    param.grad, other.grad = torch.tensor([1.0, float("inf")]), torch.ones(1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite gradient\(s\) at global step 7 in 1 parameter\(s\), e.g. \['encoder.w'\]",
    ):
        guard.before_optimizer_step(optimizer, named, 7, "32-true", "error")
    guard.before_optimizer_step(optimizer, named, 7, "16-mixed", "error")  # the fp16 scaler's job: untouched
    assert other.grad is not None
    with pytest.warns(UserWarning, match="Skipping this update"):
        guard.before_optimizer_step(optimizer, named, 7, "32-true", "skip")
    assert param.grad is None and other.grad is None and guard.skipped_batches == 1


def test_nonfinite_logits_name_the_samples():
    guard = NonFiniteGuard()
    guard.check_logits(torch.zeros(2, 3), ["a", "b"], "val")
    logits = torch.zeros(3, 2)
    logits[1, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"val: non-finite logits for sample\(s\) \['b'\]"):
        guard.check_logits(logits, ["a", "b", "c"], "val")


def test_skipped_batch_loss_is_zero_and_reaches_every_trainable_parameter():
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    module[1].bias.requires_grad_(False)
    loss = skipped_batch_loss(module)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters() if p.requires_grad)

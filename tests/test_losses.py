"""vicreg_loss against an independent computation, its edge cases, and the task losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import masked_mean, per_sample_task_loss, vicreg_loss


def _straightforward_vicreg(x: torch.Tensor, y: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4):
    """The three terms written out with loops, in float64, from their definitions."""
    x, y = x.double(), y.double()
    n, d = x.shape
    invariance = sum(float((x[i, j] - y[i, j]) ** 2) for i in range(n) for j in range(d)) / (n * d)

    def branch_terms(z):
        mean = [sum(float(z[i, j]) for i in range(n)) / n for j in range(d)]
        cov = [
            [
                sum((float(z[i, a]) - mean[a]) * (float(z[i, b]) - mean[b]) for i in range(n)) / (n - 1)
                for b in range(d)
            ]
            for a in range(d)
        ]
        variance = sum(max(0.0, gamma - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        covariance = sum(cov[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d
        return variance, covariance

    var_x, cov_x = branch_terms(x)
    var_y, cov_y = branch_terms(y)
    return invariance, (var_x + var_y) / 2, cov_x + cov_y


def test_vicreg_matches_straightforward_computation():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=generator) * 0.7
    y = torch.randn(7, 5, generator=generator) * 1.3 + 0.2
    terms = vicreg_loss(x, y)
    invariance, variance, covariance = _straightforward_vicreg(x, y)
    assert terms.invariance.item() == pytest.approx(invariance, rel=1e-5)
    assert terms.variance.item() == pytest.approx(variance, rel=1e-5)
    assert terms.covariance.item() == pytest.approx(covariance, rel=1e-5)
    assert terms.total.item() == pytest.approx(25 * invariance + 25 * variance + covariance, rel=1e-5)
    # Coefficients are applied as given.
    custom = vicreg_loss(x, y, inv_coeff=2.0, var_coeff=3.0, cov_coeff=4.0)
    assert custom.total.item() == pytest.approx(2 * invariance + 3 * variance + 4 * covariance, rel=1e-5)


def test_vicreg_identical_inputs_have_zero_invariance():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    terms = vicreg_loss(x, x.clone())
    assert terms.invariance.item() == 0.0
    assert terms.variance.item() > 0.0  # the other terms still act


def test_vicreg_constant_inputs_give_variance_099():
    x = torch.full((8, 3), 0.5)
    y = torch.full((8, 3), -2.0)
    terms = vicreg_loss(x, y)
    # std = sqrt(0 + eps) = 0.01 in every dimension: relu(1 - 0.01) = 0.99 per branch.
    assert terms.variance.item() == pytest.approx(0.99, abs=1e-6)
    assert terms.covariance.item() == 0.0
    assert terms.invariance.item() == pytest.approx(2.5**2)


def test_vicreg_mask_selects_rows():
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 4, generator=generator), torch.randn(9, 4, generator=generator)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    masked = vicreg_loss(x, y, mask=mask)
    subset = vicreg_loss(x[mask], y[mask])
    for a, b in zip(masked, subset, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("num_selected", [0, 1])
def test_vicreg_with_fewer_than_two_rows_is_zero_and_keeps_the_graph(num_selected):
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(4, 3, requires_grad=True)
    mask = torch.zeros(4, dtype=torch.bool)
    mask[:num_selected] = True
    terms = vicreg_loss(x, y, mask=mask)
    assert all(torch.isfinite(t) and t.item() == 0.0 for t in terms)
    terms.total.backward()
    # Both inputs received a gradient (all zeros): their producers count as used under DDP.
    assert x.grad is not None and y.grad is not None
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(y.grad) == 0


def test_vicreg_stop_grad_target():
    x = torch.randn(5, 3, requires_grad=True)
    y = torch.randn(5, 3, requires_grad=True)
    vicreg_loss(x, y, stop_grad_target=True).total.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is None
    y.grad = None
    vicreg_loss(x, y).total.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_vicreg_gather_is_applied_before_statistics():
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    other_x, other_y = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    mask = torch.tensor([True, False, True, True])
    other_mask = torch.tensor([False, True, True, False])
    others = {id(x): other_x, id(y): other_y, id(mask): other_mask}

    def fake_gather(tensor):  # what two ranks would produce: own rows, then the other rank's
        return torch.cat([tensor, others[id(tensor)]])

    gathered = vicreg_loss(x, y, mask=mask, gather=fake_gather)
    full_mask = torch.cat([mask, other_mask])
    expected = vicreg_loss(torch.cat([x, other_x])[full_mask], torch.cat([y, other_y])[full_mask])
    for a, b in zip(gathered, expected, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_vicreg_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        vicreg_loss(torch.zeros(4, 3), torch.zeros(4, 5))


def test_task_losses():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 2, 1, 2])
    assert torch.allclose(
        per_sample_task_loss(logits, labels, "multiclass"), F.cross_entropy(logits, labels, reduction="none")
    )
    binary_logits, binary_labels = logits[:, :2], torch.tensor([0, 1, 1, 0])
    assert torch.allclose(
        per_sample_task_loss(binary_logits, binary_labels, "binary"),
        -binary_logits.log_softmax(-1)[torch.arange(4), binary_labels],
    )
    multi_hot = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)
    expected = -(multi_hot * F.logsigmoid(logits) + (1 - multi_hot) * F.logsigmoid(-logits)).mean(dim=1)
    assert torch.allclose(per_sample_task_loss(logits, multi_hot, "multilabel"), expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown task"):
        per_sample_task_loss(logits, labels, "regression")


def test_masked_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    assert masked_mean(values, torch.tensor([True, False, True, False])).item() == 2.0
    empty = masked_mean(values, torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()
    assert values.grad is not None


def test_target_matched_vicreg_is_zero_for_a_perfect_prediction_at_any_batch_size():
    generator = torch.Generator().manual_seed(5)
    mixing = torch.randn(16, 16, generator=generator)
    for rows in (4, 16, 64):
        y = 0.3 * torch.randn(rows, 16, generator=generator) @ mixing  # correlated, small-scale target
        terms = vicreg_loss(y.clone(), y, stop_grad_target=True, space="target_matched")
        assert terms.total.abs().item() <= 1e-5
        # The reference terms are not: the covariance floor of a correlated target, the gamma = 1 hinge.
        assert vicreg_loss(y.clone(), y, stop_grad_target=True).total.item() > 1.0


def test_target_matched_vicreg_standardises_with_the_given_statistics():
    generator = torch.Generator().manual_seed(6)
    y = torch.randn(32, 8, generator=generator) * 0.2 + 3.0
    x = y + 0.1 * torch.randn(32, 8, generator=generator)
    mean, std = torch.full((8,), 3.0), torch.full((8,), 0.2)
    terms = vicreg_loss(x, y, space="target_matched", target_mean=mean, target_std=std, stop_grad_target=True)
    assert terms.invariance.item() == pytest.approx(((x - y) / 0.2).pow(2).mean().item(), rel=1e-4)
    # A prediction with half the target's spread pays the variance hinge; one with the target's does not.
    shrunk = mean + 0.5 * (y - mean)
    assert vicreg_loss(shrunk, y, space="target_matched", stop_grad_target=True).variance.item() > 0.1
    assert vicreg_loss(y.clone(), y, space="target_matched", stop_grad_target=True).variance.item() == 0.0


def test_nonfinite_rows_outside_the_mask_do_not_reach_the_loss():
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    x[5] = float("nan")
    mask = torch.tensor([True, True, True, True, True, False])
    assert torch.isfinite(vicreg_loss(x, y, mask=mask).total)


def test_running_moments_average_cumulatively_then_exponentially():
    from lightning_modules.losses import RunningMoments

    moments = RunningMoments(2, momentum=0.5)
    moments.update(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    assert moments.mean.tolist() == [1.0, 1.0]
    moments.update(torch.tensor([[4.0, 4.0], [6.0, 6.0]]))
    assert moments.mean.tolist() == [3.0, 3.0]  # weight max(0.5, 1/2)
    moments.update(torch.tensor([[9.0, 9.0], [11.0, 11.0]]))
    assert moments.mean.tolist() == [6.5, 6.5]  # weight 0.5 (EMA), not 1/3

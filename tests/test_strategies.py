"""The missing-strategy registry (lightning_modules/strategies.py)."""

from __future__ import annotations

import pytest

from lightning_modules import fusion
from lightning_modules.strategies import (
    MISSING_STRATEGIES,
    STRATEGIES,
    check_predictor,
    get_strategy,
    untrained_stand_in_warning,
)


def test_registry_declares_what_each_strategy_needs():
    assert MISSING_STRATEGIES == ("predict", "zero", "learned", "dummy_input") == fusion.MISSING_STRATEGIES
    assert [name for name, s in STRATEGIES.items() if s.needs_predictor] == ["predict"]
    assert [name for name, s in STRATEGIES.items() if s.encodes_filler] == ["dummy_input"]
    assert [name for name, s in STRATEGIES.items() if s.learned_stand_in] == ["learned"]
    with pytest.raises(ValueError, match=r"missing_strategy: unknown strategy 'mean'; expected one of \['predict'"):
        get_strategy("mean")


def test_predictor_requirement():
    check_predictor(get_strategy("zero"), predictor_length=0, substitution=False)
    check_predictor(get_strategy("predict"), predictor_length=2, substitution=True)
    for name, substitution in (("predict", False), ("zero", True)):
        with pytest.raises(ValueError, match="predictor_length=0 leaves no predictor"):
            check_predictor(get_strategy(name), predictor_length=0, substitution=substitution)


def test_learned_vectors_under_complete_training_are_warned_about():
    message = untrained_stand_in_warning(get_strategy("learned"), 0.0)
    assert message and "never receive a gradient" in message
    assert untrained_stand_in_warning(get_strategy("learned"), 0.7) is None
    assert untrained_stand_in_warning(get_strategy("learned"), None) is None  # unknown rate: no claim
    assert all(untrained_stand_in_warning(get_strategy(n), 0.0) is None for n in ("predict", "zero", "dummy_input"))

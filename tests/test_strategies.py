"""The missing-strategy registry (lightning_modules/strategies.py)."""

from __future__ import annotations

import pytest
import torch

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
    with pytest.raises(
        ValueError, match=r"missing_strategy: unknown strategy 'mean'; expected one of \['predict'"
    ):
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
    assert all(
        untrained_stand_in_warning(get_strategy(n), 0.0) is None for n in ("predict", "zero", "dummy_input")
    )


@pytest.mark.parametrize("train_rate", [0.0, 0.5])
def test_complete_training_warns_that_learned_vectors_stay_untrained(tmp_path, train_rate):
    import warnings

    from datamodules import HatefulMemesDataModule
    from tests.fixtures_data import make_hateful_memes
    from tests.method_fixtures import quiet_trainer, tiny_system

    data = HatefulMemesDataModule(
        root=str(make_hateful_memes(tmp_path)),
        image_encoder="test_vit",
        text_encoder="tiny-bert",
        image_size=32,
        batch_size=8,
        num_workers=0,
        missing_table_dir=str(tmp_path / "tables"),
        train_missing={"missing_rate": train_rate, "missing_type": "both"},
    )
    model = tiny_system(task="binary", num_classes=2, missing_strategy="learned", predictor_length=0)
    before = model.missing_fill.missing_image.detach().clone()
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
    warned = any("never receive a gradient" in str(w.message) for w in caught)
    assert warned == (train_rate == 0.0)
    # The claim itself: under complete training the vector does not move.
    assert torch.equal(model.missing_fill.missing_image, before) == (train_rate == 0.0)

"""Missing-modality strategies: what stands in for a missing modality's embedding, and what each needs.

One entry per ``missing_strategy``; the system and the fusion read these flags instead of comparing
strategy names:

- ``predict`` (the method): ẑ_m, predicted from the other modality's read-only tokens (needs the
  predictor);
- ``zero``: a zero vector;
- ``learned``: one learned vector per modality (trained only by training samples that miss it);
- ``dummy_input``: the encoder's own output on the filler input the batch carries for a missing
  modality (all-ones image, empty text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StrategyName = Literal["predict", "zero", "learned", "dummy_input"]


@dataclass(frozen=True)
class MissingStrategy:
    """What a strategy needs.

    Attributes:
        name: the ``missing_strategy`` value.
        needs_predictor: the stand-in is the predictor's ẑ (``predictor_length`` >= 1 required).
        encodes_filler: the stand-in is the encoder's output on the filler input, so evaluating from
            embeddings of complete inputs must substitute the filler embeddings.
        learned_stand_in: the stand-in has parameters that only training samples missing that modality
            train (none under complete training).
    """

    name: str
    needs_predictor: bool = False
    encodes_filler: bool = False
    learned_stand_in: bool = False


STRATEGIES: dict[str, MissingStrategy] = {
    strategy.name: strategy
    for strategy in (
        MissingStrategy("predict", needs_predictor=True),
        MissingStrategy("zero"),
        MissingStrategy("learned", learned_stand_in=True),
        MissingStrategy("dummy_input", encodes_filler=True),
    )
}
MISSING_STRATEGIES: tuple[str, ...] = tuple(STRATEGIES)


def get_strategy(name: str) -> MissingStrategy:
    """The registry entry of ``name`` (a ValueError naming the option and the choices otherwise)."""
    if name not in STRATEGIES:
        raise ValueError(
            f"missing_strategy: unknown strategy {name!r}; expected one of {list(MISSING_STRATEGIES)}"
        )
    return STRATEGIES[name]


def check_predictor(strategy: MissingStrategy, predictor_length: int, substitution: bool) -> None:
    """A ValueError when the configuration needs a predictor but ``predictor_length`` is 0."""
    if predictor_length == 0 and (strategy.needs_predictor or substitution):
        raise ValueError(
            "predictor_length=0 leaves no predictor, but missing_strategy='predict' or substitution=True "
            "needs one"
        )


def untrained_stand_in_warning(strategy: MissingStrategy, train_missing_rate: float | None) -> str | None:
    """The warning for a stand-in that training cannot train (complete training), else None."""
    if not strategy.learned_stand_in or train_missing_rate is None or train_missing_rate > 0:
        return None
    return (
        f"missing_strategy={strategy.name!r} with train missing rate 0 (complete training): "
        "no training sample "
        "misses a modality, so the learned missing-modality vectors never receive a gradient and stay at "
        "their random initialisation (only samples with a bad input treated as missing would train them). "
        "Results at test time measure an untrained stand-in."
    )

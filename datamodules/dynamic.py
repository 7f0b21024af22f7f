"""Dynamic modality dropout (``train_missing.dynamic: true``): a fresh train table every epoch.

The epoch's table is drawn from ``(missing_seed, epoch)`` with the protocol's exact counts
(:func:`datamodules.missing.sample_missing_table`) and applied to collated train batches before
they go to the device (``on_before_batch_transfer``), so every worker and process agrees on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.batch import (
    ATTENTION_MASK,
    IMAGE,
    IMAGE_FILLER_VALUE,
    IMAGE_MISSING,
    IMAGE_PRESENT,
    INPUT_IDS,
    TEXT_MISSING,
    TEXT_PRESENT,
)
from datamodules.missing import MissingSetting, sample_missing_table


def epoch_codes(
    keys: Sequence[str], setting: MissingSetting, *, seed: int, dataset: str, split: str, epoch: int
) -> dict[str, int]:
    """Codes of ``epoch`` by key (keys deduplicated in order; exact protocol counts)."""
    keys = list(dict.fromkeys(keys))
    codes = sample_missing_table(
        keys,
        setting.missing_rate,
        setting.missing_type,
        setting.both_ratio,
        seed=seed,
        dataset=dataset,
        split=split,
        epoch=epoch,
    )
    return dict(zip(keys, codes.tolist(), strict=True))


def drop_modalities(
    batch: dict, codes: Sequence[int], empty_text_ids: torch.Tensor, pad_token_id: int
) -> int:
    """Apply one code per row to a collated batch, in place; returns how many drops were skipped.

    A drop is applied only where both modalities are present: a sample already missing one (a bad
    input) keeps the other, so no sample ends with neither. The dropped modality gets the filler.
    """
    skipped = 0
    for row, code in enumerate(codes):
        if code == 0:
            continue
        if not (batch[IMAGE_PRESENT][row] and batch[TEXT_PRESENT][row]):
            skipped += 1
            continue
        if code == IMAGE_MISSING:
            batch[IMAGE][row] = IMAGE_FILLER_VALUE
            batch[IMAGE_PRESENT][row] = False
        elif code == TEXT_MISSING:
            n = len(empty_text_ids)
            batch[INPUT_IDS][row] = pad_token_id
            batch[INPUT_IDS][row, :n] = empty_text_ids.to(batch[INPUT_IDS].device)
            batch[ATTENTION_MASK][row] = 0
            batch[ATTENTION_MASK][row, :n] = 1
            batch[TEXT_PRESENT][row] = False
    return skipped

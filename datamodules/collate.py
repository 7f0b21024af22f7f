"""Collation into the project's batch dict (see the brief / README "Batch").

Per-sample items (from :class:`datamodules.base.MissingModalityDataset`) already carry token ids
(tokenised once at setup, truncated to ``max_text_len``; a missing text carries the token ids of the
empty string) and a transformed image (the all-ones filler when the image is missing). Collation
pads the token ids to the longest sequence of the batch (never longer than ``max_text_len``, since
each sequence already is at most that) and stacks everything:

- ``image`` float32 [B, 3, H, W], ``input_ids`` / ``attention_mask`` int64 [B, L],
- ``image_present`` / ``text_present`` bool [B],
- ``label`` int64 [B] (multiclass, binary) or float32 [B, C] multi-hot (multilabel),
- ``id`` list[str].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence


class MissingModalityCollate:
    """Picklable collate function (DataLoader workers receive a copy).

    Args:
        pad_token_id: The tokenizer's padding id.
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"`` (label dtype and shape).
    """

    def __init__(self, pad_token_id: int, task: str) -> None:
        self.pad_token_id = int(pad_token_id)
        self.task = task

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        token_ids = [item["input_ids"] for item in items]
        input_ids = pad_sequence(token_ids, batch_first=True, padding_value=self.pad_token_id)
        lengths = torch.tensor([len(t) for t in token_ids])
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        if self.task == "multilabel":
            label = torch.stack([item["label"] for item in items]).float()
        else:
            label = torch.tensor([item["label"] for item in items], dtype=torch.long)
        return {
            "image": torch.stack([item["image"] for item in items]).float(),
            "input_ids": input_ids.long(),
            "attention_mask": attention_mask,
            "image_present": torch.tensor([item["image_present"] for item in items], dtype=torch.bool),
            "text_present": torch.tensor([item["text_present"] for item in items], dtype=torch.bool),
            "label": label,
            "id": [item["id"] for item in items],
        }

"""The batch contract between the data and the model side, defined once.

Every DataModule (and the JSONL prediction loader) emits batches with these fields:

=================== ============================== ===============================================
field               type                           meaning
=================== ============================== ===============================================
``image``           float32 ``[B, 3, H, W]``       normalised image; the filler where absent
``input_ids``       int64 ``[B, L]``               token ids, padded to the batch's longest
``attention_mask``  int64 ``[B, L]``               1 on real tokens
``image_present``   bool ``[B]``                   the image is real (not the filler)
``text_present``    bool ``[B]``                   the text is real (not the filler)
``label``           int64 ``[B]`` / float32 [B, C] class index, or multi-hot for ``multilabel``
``id``              ``list[str]``                  sample ids
=================== ============================== ===============================================

Missing inputs are replaced by MAP's fillers, so every strategy sees well-formed tensors: an
all-ones image *after* normalisation, and the token ids of the empty string (``[CLS] [SEP]`` for
BERT-like tokenizers). The presence masks say what is real.

Presence codes of a missing table: ``0`` complete, ``1`` text missing, ``2`` image missing. A
sample never ends up with neither modality (:func:`presence_from_codes`).

This module imports neither torch nor Lightning at import time, so pure modules (the missing-table
protocol) can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

SPLITS: tuple[str, ...] = ("train", "val", "test")
Split = Literal["train", "val", "test"]
TASKS: tuple[str, ...] = ("multiclass", "multilabel", "binary")
Task = Literal["multiclass", "multilabel", "binary"]

IMAGE = "image"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
IMAGE_PRESENT = "image_present"
TEXT_PRESENT = "text_present"
LABEL = "label"
ID = "id"
BATCH_FIELDS: tuple[str, ...] = (IMAGE, INPUT_IDS, ATTENTION_MASK, IMAGE_PRESENT, TEXT_PRESENT, LABEL, ID)

COMPLETE = 0
TEXT_MISSING = 1
IMAGE_MISSING = 2
CODE_NAMES = {COMPLETE: "complete", TEXT_MISSING: "text_missing", IMAGE_MISSING: "image_missing"}
# Names of the three cases, in code order (per-case metrics and counts use them).
CASE_NAMES: tuple[str, ...] = tuple(CODE_NAMES.values())

NO_LABEL = -1  # label of a sample whose source has no label (predict only; test refuses such splits)
IMAGE_FILLER_VALUE = 1.0  # every pixel of the missing-image filler, after normalisation


def empty_text_ids(tokenizer: Any, max_text_len: int | None = None) -> list[int]:
    """Token ids of the missing-text filler: the tokenised empty string (special tokens only)."""
    kwargs = {} if max_text_len is None else {"truncation": True, "max_length": max_text_len}
    return list(tokenizer("", **kwargs)["input_ids"])


def filler_inputs(tokenizer: Any, image_size: Sequence[int], device: Any = None) -> dict:
    """One filler sample in batch form: ``image`` [1, 3, H, W] of :data:`IMAGE_FILLER_VALUE`,
    ``input_ids`` / ``attention_mask`` [1, L] of the empty text."""
    import torch

    ids = torch.tensor([empty_text_ids(tokenizer)], dtype=torch.long, device=device)
    return {
        IMAGE: torch.full((1, 3, int(image_size[0]), int(image_size[1])), IMAGE_FILLER_VALUE, device=device),
        INPUT_IDS: ids,
        ATTENTION_MASK: torch.ones_like(ids),
    }


def presence_from_codes(codes: Any, image_usable: Any, text_usable: Any) -> tuple[Any, Any, Any]:
    """Presence masks from missing codes and what the data provide: the "never both missing" rule.

    A modality the data do not provide (absent, or a bad input) stays missing; where the table's
    drop would leave a sample with neither modality, the dropped one is restored. Works on NumPy
    bool arrays and torch bool tensors alike (``codes`` of the same kind).

    Returns:
        ``(image_present, text_present, overridden)``: ``overridden`` marks the samples whose table
        drop was undone. A sample with neither modality usable stays with neither: callers treat
        that as an error before getting here.
    """
    image_present = image_usable & (codes != IMAGE_MISSING)
    text_present = text_usable & (codes != TEXT_MISSING)
    neither = ~image_present & ~text_present
    restore_image = neither & image_usable
    restore_text = neither & text_usable
    return image_present | restore_image, text_present | restore_text, restore_image | restore_text


def case_counts(image_present: Any, text_present: Any) -> dict[str, int]:
    """Samples per case (``complete``, ``text_missing``, ``image_missing``) of two presence masks."""
    return {
        CODE_NAMES[COMPLETE]: int((image_present & text_present).sum()),
        CODE_NAMES[TEXT_MISSING]: int((image_present & ~text_present).sum()),
        CODE_NAMES[IMAGE_MISSING]: int((~image_present & text_present).sum()),
    }

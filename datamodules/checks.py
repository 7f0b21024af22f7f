"""Bad-input checks at index time, and the per-sample flags that count them.

Where bad inputs are checked:

- **At setup (index time)**, here, for everything that is cheap: an image reference that is absent
  (no file name in the source, or the file does not exist), a text that is absent (no field) or
  empty (only whitespace), a label outside the label set, duplicate sample ids. Label problems are
  always errors. Image/text problems follow ``on_bad_sample``.
- **At load time (in the DataLoader worker)**, in :class:`datamodules.dataset.MissingModalityDataset`,
  for what needs decoding: an image that exists but cannot be decoded (corrupt, truncated, not an
  image, a decompression bomb).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from datamodules.records import BadSampleError, ImageReader, SampleRecord

BadSamplePolicy = Literal["error", "missing"]

# Per-sample bit flags of bad inputs; one uint8 per sample, shared with DataLoader workers.
FLAG_IMAGE_ABSENT = 1
FLAG_IMAGE_UNREADABLE = 2
FLAG_TEXT_ABSENT = 4
FLAG_TEXT_EMPTY = 8
FLAG_TABLE_OVERRIDDEN = 16
FLAG_NAMES = {
    FLAG_IMAGE_ABSENT: "image_absent",
    FLAG_IMAGE_UNREADABLE: "image_unreadable",
    FLAG_TEXT_ABSENT: "text_absent",
    FLAG_TEXT_EMPTY: "text_empty",
    FLAG_TABLE_OVERRIDDEN: "table_overridden",
}


def flag_counts(flags: torch.Tensor) -> dict[str, int]:
    """Samples per bad-input reason (a key of :data:`FLAG_NAMES`' values) in a flags tensor."""
    return {name: int(((flags & bit) != 0).sum()) for bit, name in FLAG_NAMES.items()}


@dataclass
class Usability:
    """What the index-time checks found for a split.

    Attributes:
        image_ok: Per sample, an image is named and exists (decodability is checked at load time).
        text_ok: Per sample, a non-empty text is there.
        flags: Per-sample bad-input bits (:data:`FLAG_NAMES`), uint8.
        problems: One message per bad input, in record order.
    """

    image_ok: np.ndarray
    text_ok: np.ndarray
    flags: torch.Tensor
    problems: list[str]


def check_modalities(
    split: str,
    records: Sequence[SampleRecord],
    image_reader: ImageReader,
    on_bad_sample: BadSamplePolicy,
    owner: str,
    root: str | None,
    natural: tuple[np.ndarray, np.ndarray] | None = None,
) -> Usability:
    """Index-time checks of the images and texts of ``split``.

    A wrongly typed text and a sample with neither a usable image nor a usable text are always
    errors; other problems raise (listing the first five) when ``on_bad_sample`` is ``error``.
    ``owner`` (the DataModule's class name) and ``root`` go into the messages. ``natural``: per
    record, whether the image / text is absent by nature (missing, but not a bad input).
    """
    n = len(records)
    flags = torch.zeros(n, dtype=torch.uint8)
    problems: list[str] = []
    image_ok = np.ones(n, dtype=bool)
    text_ok = np.ones(n, dtype=bool)
    if natural is not None:
        image_ok &= ~np.asarray(natural[0], dtype=bool)
        text_ok &= ~np.asarray(natural[1], dtype=bool)
    for i, rec in enumerate(records):
        if rec.text is not None and not isinstance(rec.text, str):
            # A malformed source (a number or an object where a text belongs), not a missing text.
            raise BadSampleError(
                f"{split} sample {rec.id!r}: field 'text' ({rec.text_source}) is a {type(rec.text).__name__} "
                f"({str(rec.text)[:60]!r}); expected a string"
            )
        if image_ok[i] and (rec.image is None or not image_reader.exists(rec.image)):
            image_ok[i] = False
            flags[i] |= FLAG_IMAGE_ABSENT
            where = (
                "no image named in the source"
                if rec.image is None
                else f"{image_reader.describe(rec.image)} does not exist"
            )
            problems.append(f"{split} sample {rec.id!r}: field 'image': {where}; expected an image file")
        if not text_ok[i]:  # absent by nature
            continue
        if rec.text is None:
            text_ok[i] = False
            flags[i] |= FLAG_TEXT_ABSENT
            problems.append(
                f"{split} sample {rec.id!r}: field 'text' absent ({rec.text_source}); "
                "expected a non-empty string"
            )
        elif not rec.text.strip():
            text_ok[i] = False
            flags[i] |= FLAG_TEXT_EMPTY
            problems.append(
                f"{split} sample {rec.id!r}: field 'text' is empty ({rec.text_source}); "
                "expected a non-empty string"
            )
    neither = np.flatnonzero(~image_ok & ~text_ok)
    if len(neither):
        rec = records[neither[0]]
        raise BadSampleError(
            f"{len(neither)} {split} sample(s) have neither a usable image nor a usable text, "
            f"e.g. {rec.id!r} "
            f"(image {image_reader.describe(rec.image) if rec.image is not None else 'not named'}, "
            f"text from {rec.text_source}); a sample needs at least one modality."
        )
    if problems and on_bad_sample == "error":
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise BadSampleError(
            f"{owner}: {len(problems)} bad input(s) in the {split} split of {root}:\n  {shown}{more}\n"
            "Fix the data, or set on_bad_sample: missing to count them and treat them as missing modalities."
        )
    return Usability(image_ok, text_ok, flags, problems)


def check_unique_ids(split: str, records: Sequence[SampleRecord], owner: str) -> None:
    """Duplicate sample ids are an error naming the first one and where it comes from."""
    seen: set[str] = set()
    for rec in records:
        if rec.id in seen:
            raise ValueError(
                f"{owner}: {split} sample id {rec.id!r} appears more than once ({rec.text_source})"
            )
        seen.add(rec.id)


def check_labels(
    split: str, records: Sequence[SampleRecord], task: str, num_classes: int, owner: str
) -> None:
    """Every present label is a class index in ``[0, num_classes)`` (a tuple of them for multilabel)."""
    for rec in records:
        if rec.label is None:
            continue
        if task == "multilabel" and not isinstance(rec.label, tuple):
            raise TypeError(f"{owner}: multilabel record {rec.id!r} needs a tuple of class indices")
        values = rec.label if task == "multilabel" else (rec.label,)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < num_classes:
                raise BadSampleError(
                    f"{owner}: {split} sample {rec.id!r} ({rec.text_source}): field 'label' is {v!r}; "
                    f"expected a class index in [0, {num_classes}) ({num_classes} classes)"
                )


def check_choice(option: str, value: object, choices: object) -> None:
    """``value`` is one of ``choices`` (a ``Literal[...]`` type or a sequence); else a ValueError naming it.

    jsonargparse checks ``Literal`` arguments at parse time; this covers construction from Python.
    """
    allowed = list(get_args(choices) or choices)
    if value not in allowed:
        text = repr(allowed[-1])
        if len(allowed) > 1:
            text = ", ".join(repr(c) for c in allowed[:-1]) + f" or {text}"
        raise ValueError(f"{option} must be {text}, got {value!r}")

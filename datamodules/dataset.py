"""The dataset of one split: samples with their presence decided, loaded and checked per item.

Built by :meth:`datamodules.datamodule.MissingModalityDataModule._build_dataset`. Images are
decoded here (in the DataLoader worker); one that exists but cannot be decoded is a bad input:
with ``on_bad_sample="error"`` a :class:`BadSampleError` naming file, sample and field, with
``"missing"`` the image is treated as missing, flagged in shared memory and logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.batch import ID, IMAGE, IMAGE_PRESENT, INPUT_IDS, LABEL, NO_LABEL, TEXT_PRESENT
from datamodules.checks import FLAG_IMAGE_UNREADABLE, FLAG_TABLE_OVERRIDDEN
from datamodules.records import BadSampleError, ImageReader, SampleRecord

log = logging.getLogger(__name__)


class MissingModalityDataset(Dataset):
    """Samples of one split with their presence flags decided; yields per-sample dicts for collation.

    ``image_usable`` / ``text_usable`` say what the data provide (index-time checks passed);
    ``image_present`` / ``text_present`` are that under the split's missing table.
    """

    def __init__(
        self,
        *,
        split: str,
        records: Sequence[SampleRecord],
        image_present: np.ndarray,
        text_present: np.ndarray,
        image_usable: np.ndarray,
        text_usable: np.ndarray,
        token_flat: np.ndarray,
        token_offsets: np.ndarray,
        empty_text_ids: Sequence[int],
        image_reader: ImageReader,
        transform,
        task: str,
        num_classes: int,
        on_bad_sample: str,
        flags: torch.Tensor,
    ) -> None:
        self.split = split
        self.ids = [r.id for r in records]
        self.keys = [r.key for r in records]
        self.images = [r.image for r in records]
        self.labels = [r.label for r in records]
        self.image_present = image_present
        self.text_present = text_present
        self.image_usable = image_usable
        self.text_usable = text_usable
        self.token_flat = token_flat
        self.token_offsets = token_offsets
        self.empty_text_ids = torch.tensor(list(empty_text_ids), dtype=torch.long)
        self.image_reader = image_reader
        self.transform = transform
        self.task = task
        self.num_classes = num_classes
        self.on_bad_sample = on_bad_sample
        self.flags = flags

    def __len__(self) -> int:
        return len(self.ids)

    def token_ids(self, index: int) -> torch.Tensor:
        start, end = self.token_offsets[index], self.token_offsets[index + 1]
        return torch.from_numpy(self.token_flat[start:end].astype(np.int64))

    def _label(self, index: int):
        label = self.labels[index]
        if self.task == "multilabel":
            target = torch.zeros(self.num_classes, dtype=torch.float32)
            if label is not None:
                target[list(label)] = 1.0
            return target
        return NO_LABEL if label is None else int(label)

    def _load_image(self, index: int) -> torch.Tensor | None:
        ref = self.images[index]
        try:
            image = self.image_reader.load(ref)
        except Exception as exc:  # decoding arbitrary bytes raises many types; all mean "unreadable"
            where = self.image_reader.describe(ref)
            if self.on_bad_sample == "error":
                raise BadSampleError(
                    f"{self.split} sample {self.ids[index]!r}: field 'image' ({where}) could not be decoded "
                    f"({type(exc).__name__}: {exc}); expected a readable image. Fix or remove the file, "
                    "or set on_bad_sample: missing to treat it as a missing image."
                ) from exc
            if not int(self.flags[index]) & FLAG_IMAGE_UNREADABLE:
                log.warning(
                    "%s sample %r: image (%s) unreadable (%s: %s); treated as missing "
                    "(on_bad_sample=missing)",
                    self.split,
                    self.ids[index],
                    where,
                    type(exc).__name__,
                    exc,
                )
            self.flags[index] |= FLAG_IMAGE_UNREADABLE
            return None
        return self.transform(image)

    def __getitem__(self, index: int) -> dict:
        image_present = bool(self.image_present[index])
        text_present = bool(self.text_present[index])
        image = None
        if image_present:
            image = self._load_image(index)
            if image is None:
                image_present = False
                if not text_present:
                    if not self.text_usable[index]:
                        raise BadSampleError(
                            f"{self.split} sample {self.ids[index]!r}: image "
                            f"({self.image_reader.describe(self.images[index])}) is unreadable and the text "
                            "is absent or empty; a sample needs at least one modality."
                        )
                    # The table dropped the text, but the image turned out unreadable: keep the text.
                    text_present = True
                    self.flags[index] |= FLAG_TABLE_OVERRIDDEN
        return {
            ID: self.ids[index],
            IMAGE: image,  # uint8 [3, H, W], or None: the collate function puts the filler in
            INPUT_IDS: self.token_ids(index) if text_present else self.empty_text_ids,
            IMAGE_PRESENT: image_present,
            TEXT_PRESENT: text_present,
            LABEL: self._label(index),
        }

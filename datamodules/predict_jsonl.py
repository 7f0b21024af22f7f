"""Prediction on a JSONL file of raw inputs: the reader, its dataset, and the writer callback.

Input: one JSON object per line, with optional fields

- ``image``: path of an image file, relative to the JSONL file's folder or absolute; absent or
  ``null`` = the image is missing;
- ``text``: the text; absent or ``null`` = the text is missing;
- ``id``: the row's id in the output (default: the line number as a string).

A row needs at least one of ``image`` and ``text``. Blank lines are skipped (they are not rows).
Errors name the file, the line number, the field and what was expected: a line that is not a JSON
object, an unknown field (a typo such as ``img`` would otherwise silently drop a modality), a field
of the wrong type, an empty ``text`` or ``image`` string (omit the field or use null for "missing"),
a row with neither modality, an image file that does not exist (checked when the file is read) or
cannot be decoded (:func:`validate_prediction_file` decodes every image; ``unipair predict`` calls it
before the model is built), duplicate ids.

The rows are preprocessed exactly as the training DataModule preprocesses its samples (the same
tokenizer, ``max_text_len``, image transform and missing-modality fillers), then collated into the
project's batch. Output (:class:`JsonlPredictionWriter`): one JSON object per input row, in input
order::

    {"id": "...", "line": 3, "image_present": true, "text_present": false,
     "labels": ["Smileys & Emotion"], "scores": {"Smileys & Emotion": 0.91, ...}}

``labels`` is the predicted label (multiclass, binary: one name) or every label whose probability
reaches the threshold (multilabel); ``scores`` are softmax probabilities (multiclass, binary) or
per-label sigmoid probabilities (multilabel).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from datamodules.batch import (
    ID,
    IMAGE,
    IMAGE_PRESENT,
    INPUT_IDS,
    LABEL,
    NO_LABEL,
    TEXT_PRESENT,
    empty_text_ids,
)
from datamodules.records import read_text_file

ALLOWED_FIELDS = ("id", "image", "text")


class PredictionInputError(ValueError):
    """A row of a prediction JSONL file is unusable (the message names file, line and field)."""


@dataclass(frozen=True)
class PredictionRow:
    """One row of a prediction JSONL file.

    Attributes:
        line: 1-based line number in the file.
        id: the row id (``id`` field, or the line number).
        image: resolved image path, or None when the row has no image.
        text: the text, or None when the row has no text.
    """

    line: int
    id: str
    image: Path | None
    text: str | None


def read_prediction_rows(path: str | os.PathLike) -> list[PredictionRow]:
    """Read and validate a prediction JSONL file (see the module docstring for the rules)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction input {path} does not exist (expected a JSONL file)")
    rows: list[PredictionRow] = []
    seen: dict[str, int] = {}
    try:
        lines = read_text_file(path).split("\n")
    except ValueError as error:  # not UTF-8: the message names the line and the byte
        raise PredictionInputError(str(error)) from error
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise PredictionInputError(
                f"{where}: not valid JSON ({error.msg}); expected one JSON object per line"
            ) from error
        if not isinstance(obj, dict):
            raise PredictionInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(ALLOWED_FIELDS))
        if unknown:
            raise PredictionInputError(
                f"{where}: unknown field(s) {unknown}; expected some of {list(ALLOWED_FIELDS)}"
            )
        row_id = obj.get("id", str(line_no))
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            raise PredictionInputError(f"{where}: field 'id' must be a string or an integer, got {row_id!r}")
        row_id = str(row_id)
        if row_id in seen:
            raise PredictionInputError(
                f"{where}: id {row_id!r} was already used on line {seen[row_id]}; ids must be unique"
            )
        seen[row_id] = line_no
        text = obj.get("text")
        if text is not None:
            if not isinstance(text, str):
                raise PredictionInputError(
                    f"{where}: field 'text' must be a string or null, got {type(text).__name__}"
                )
            if not text.strip():
                raise PredictionInputError(
                    f"{where}: field 'text' is empty; give a non-empty string, or omit it (or null) for a "
                    "missing text"
                )
        image = obj.get("image")
        image_path = None
        if image is not None:
            if not isinstance(image, str) or not image.strip():
                raise PredictionInputError(
                    f"{where}: field 'image' must be a non-empty path string, or omitted (or null) for a "
                    f"missing image; got {image!r}"
                )
            image_path = Path(image).expanduser()
            if not image_path.is_absolute():
                image_path = path.parent / image_path
            if not image_path.is_file():
                raise PredictionInputError(f"{where}: field 'image': file {image_path} does not exist")
        if image_path is None and text is None:
            raise PredictionInputError(
                f"{where}: the row has neither 'image' nor 'text'; a row needs at least one modality"
            )
        rows.append(PredictionRow(line=line_no, id=row_id, image=image_path, text=text))
    if not rows:
        raise PredictionInputError(f"{path}: no rows (the file is empty)")
    return rows


def decode_row_image(path: str | os.PathLike, row: PredictionRow) -> Any:
    """Decode ``row``'s image (RGB PIL image); an unreadable file is a :class:`PredictionInputError`."""
    from datamodules.transforms import decode_image

    try:
        return decode_image(str(row.image))
    except Exception as error:  # PIL raises many types for bad bytes; all mean "unreadable"
        raise PredictionInputError(
            f"{path} line {row.line} (id {row.id!r}): field 'image': {row.image} could not be read as an "
            f"image ({type(error).__name__}: {error})"
        ) from error


def validate_prediction_file(path: str | os.PathLike) -> list[PredictionRow]:
    """:func:`read_prediction_rows` plus decoding every image once: the whole file is checked, without
    a model or a tokenizer, before anything is built."""
    rows = read_prediction_rows(path)
    for row in rows:
        if row.image is not None:
            decode_row_image(path, row)
    return rows


class JsonlPredictionDataset(Dataset):
    """Rows of a prediction JSONL file, preprocessed like a DataModule's samples.

    Items have the fields of ``MissingModalityDataset`` items (``id``, ``image``, ``input_ids``,
    ``image_present``, ``text_present``, ``label``), so the DataModule's ``collate_fn()`` batches them.

    Args:
        path: the JSONL file.
        tokenizer: the text encoder's tokenizer.
        max_text_len: maximum tokens per text (special tokens included).
        transform: PIL image -> uint8 tensor [3, H, W] (the DataModule's evaluation transform; the
            collate function normalises and puts the filler in for missing images).
        task: ``multiclass``, ``multilabel`` or ``binary`` (shape of the placeholder label).
        num_classes: number of classes (multilabel placeholder width).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: Any,
        max_text_len: int,
        transform: Any,
        task: str,
        num_classes: int,
    ) -> None:
        self.path = Path(path)
        self.rows = read_prediction_rows(self.path)
        self.transform = transform
        self.task = task
        self.num_classes = num_classes
        texts = [row.text for row in self.rows if row.text is not None]
        encoded = tokenizer(texts, truncation=True, max_length=max_text_len)["input_ids"] if texts else []
        by_row = iter(encoded)
        self.token_ids = [
            None if row.text is None else torch.tensor(next(by_row), dtype=torch.long) for row in self.rows
        ]
        self.empty_text_ids = torch.tensor(empty_text_ids(tokenizer, max_text_len), dtype=torch.long)
        self.line_of = {row.id: row.line for row in self.rows}

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, row: PredictionRow) -> torch.Tensor:
        return self.transform(decode_row_image(self.path, row))

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        label: Any = torch.zeros(self.num_classes) if self.task == "multilabel" else NO_LABEL
        return {
            ID: row.id,
            IMAGE: None if row.image is None else self._image(row),
            INPUT_IDS: self.empty_text_ids if self.token_ids[index] is None else self.token_ids[index],
            IMAGE_PRESENT: row.image is not None,
            TEXT_PRESENT: row.text is not None,
            LABEL: label,
        }

    def check_images(self) -> None:
        """Decode every image once, so an unreadable one fails before any prediction is written."""
        for row in self.rows:
            if row.image is not None:
                self._image(row)


def prediction_dataloader(
    path: str | os.PathLike,
    datamodule: Any,
    batch_size: int | None = None,
    num_workers: int | None = None,
    check_images: bool = True,
) -> DataLoader:
    """A DataLoader over a prediction JSONL file, preprocessed as ``datamodule`` preprocesses samples.

    ``datamodule`` is the training DataModule (a ``MissingModalityDataModule``): its tokenizer,
    ``max_text_len``, image data config, task, class count and batch settings are used.
    """
    from datamodules.transforms import build_image_transform

    dataset = JsonlPredictionDataset(
        path,
        tokenizer=datamodule.tokenizer,
        max_text_len=datamodule.max_text_len,
        transform=build_image_transform(datamodule.data_config, train=False),
        task=datamodule.task,
        num_classes=int(datamodule.num_classes),
    )
    if check_images:
        dataset.check_images()
    return DataLoader(
        dataset,
        batch_size=batch_size or datamodule.batch_size,
        shuffle=False,
        num_workers=datamodule.num_workers if num_workers is None else num_workers,
        collate_fn=datamodule.collate_fn(),
    )


def scores_from_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities per class: softmax (multiclass, binary) or sigmoid (multilabel)."""
    logits = logits.detach().float()
    return logits.sigmoid() if task == "multilabel" else logits.softmax(dim=-1)


def prediction_records(
    ids: Sequence[str],
    logits: torch.Tensor,
    image_present: torch.Tensor,
    text_present: torch.Tensor,
    label_names: Sequence[str],
    task: str,
    line_of: dict[str, int] | None = None,
    threshold: float = 0.5,
) -> list[dict]:
    """Output records (see the module docstring) for one batch of predictions."""
    if logits.shape[-1] != len(label_names):
        raise ValueError(
            f"the model gives {logits.shape[-1]} logits but there are {len(label_names)} label names"
        )
    scores = scores_from_logits(logits, task).cpu()
    records = []
    for row, sample_id in enumerate(ids):
        probs = scores[row].tolist()
        if task == "multilabel":
            labels = [name for name, p in zip(label_names, probs, strict=True) if p >= threshold]
        else:
            labels = [label_names[int(scores[row].argmax())]]
        record: dict[str, Any] = {"id": sample_id}
        if line_of is not None:
            record["line"] = line_of[sample_id]
        record.update(
            {
                "image_present": bool(image_present[row]),
                "text_present": bool(text_present[row]),
                "labels": labels,
                "scores": {name: round(float(p), 6) for name, p in zip(label_names, probs, strict=True)},
            }
        )
        records.append(record)
    return records


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes the predictions of ``trainer.predict`` to a JSONL file, one record per input row.

    The system's ``predict_step`` output is a dict with ``id``, ``logits``, ``image_present`` and
    ``text_present`` (a tensor of logits alone is accepted when the batch is at hand). Records
    stream to ``<output>.partial`` and the file is renamed to ``output`` only when prediction
    finished, so a failed run never leaves a truncated output under the final name.

    Args:
        output: path of the JSONL file to write.
        label_names: class names, in logit order.
        task: ``multiclass``, ``multilabel`` or ``binary``.
        line_of: input line number per id (adds a ``line`` field).
        threshold: multilabel decision threshold on the sigmoid probability.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        label_names: Sequence[str],
        task: str,
        line_of: dict[str, int] | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.partial = self.output.with_name(self.output.name + ".partial")
        self.label_names = list(label_names)
        self.task = task
        self.line_of = line_of
        self.threshold = threshold
        self.written = 0
        self._handle = None

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("JSONL prediction runs on one device: set trainer.devices=1 (and num_nodes=1)")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.partial, "w", encoding="utf-8")
        self.written = 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        if isinstance(prediction, torch.Tensor):
            prediction = {
                "id": batch["id"],
                "logits": prediction,
                "image_present": batch["image_present"],
                "text_present": batch["text_present"],
            }
        records = prediction_records(
            prediction["id"],
            prediction["logits"],
            prediction["image_present"],
            prediction["text_present"],
            self.label_names,
            self.task,
            self.line_of,
            self.threshold,
        )
        for record in records:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.written += len(records)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            os.replace(self.partial, self.output)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self.partial.unlink(missing_ok=True)

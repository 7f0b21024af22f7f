"""Hateful Memes (Kiela et al. 2020): meme image + its caption, binary (hateful or not), AUROC.

Raw layout (``root`` is the unpacked ``data`` folder)::

    img/<id>.png
    train.jsonl  dev.jsonl  test_seen.jsonl  test_unseen.jsonl     (also dev_seen/dev_unseen.jsonl)

Each JSON line has ``id``, ``img`` (path relative to root, e.g. ``img/42953.png``), ``label``
(0 or 1) and ``text``. Test files of some releases carry no labels: such a test split can be used
with ``predict`` (label -1 in the batch) but ``test`` stops with a clear error instead of inventing
labels. A file where only some lines lack a label is an error.

``format: arrow`` reads MAP's ``hatememes_{train,dev,test}.arrow`` from ``root`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from datamodules.arrow import ArrowImageReader, arrow_text_records, require_columns
from datamodules.benchmark import BenchmarkDataModule, DataFormat
from datamodules.checks import check_choice
from datamodules.records import FileImageReader, ImageReader, SampleRecord, read_text_file

HATEFUL_MEMES_LABELS = ["not_hateful", "hateful"]
ValSplit = Literal["dev", "dev_seen", "dev_unseen"]
TestSplit = Literal["test_seen", "test_unseen"]


class HatefulMemesDataModule(BenchmarkDataModule):
    """Hateful Memes: binary (``num_classes=2``, logits [B, 2], cross-entropy), metric AUROC.

    Args:
        root: The unpacked Hateful Memes folder (holding ``img/`` and the ``.jsonl`` files); with
            ``format: arrow``, the folder of MAP's ``hatememes_*.arrow`` tables.
        format: ``raw`` (img/ + jsonl) or ``arrow`` (MAP's tables).
        val_split: Name of the validation file without ``.jsonl`` (``dev``, ``dev_seen``, ``dev_unseen``).
        test_split: ``test_seen`` (what peers report) or ``test_unseen``.
        max_text_len: Maximum tokens per caption (MAP: 128).
        **kwargs: Everything else of :class:`MissingModalityDataModule`.
    """

    dataset_name = "hateful_memes"
    task = "binary"
    root_contents = "the folder holding img/ and the .jsonl files (or the arrow tables)"
    arrow_prefix = "hatememes"

    def __init__(
        self,
        root: str | None = None,
        format: DataFormat = "raw",
        val_split: ValSplit = "dev",
        test_split: TestSplit = "test_seen",
        max_text_len: int = 128,
        **kwargs,
    ) -> None:
        check_choice("test_split", test_split, TestSplit)
        check_choice("val_split", val_split, ValSplit)
        super().__init__(root=root, format=format, max_text_len=max_text_len, **kwargs)
        self.val_split = val_split
        self.test_split = test_split
        self.num_classes = 2
        self.label_names = list(HATEFUL_MEMES_LABELS)

    def _split_file_name(self, split: str) -> str:
        return {"train": "train", "val": self.val_split, "test": self.test_split}[split]

    def _labels_required(self, split: str) -> bool:
        return split != "test"

    def _read_raw(self, split: str) -> tuple[list[SampleRecord], ImageReader]:
        root = Path(self.root)
        path = root / f"{self._split_file_name(split)}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"Hateful Memes: {path} not found; root must hold the .jsonl files and img/"
            )
        records = []
        for line_no, line in enumerate(read_text_file(path).split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"Hateful Memes {where}: not valid JSON: {exc}") from exc
            if not isinstance(entry, dict) or "id" not in entry:
                raise ValueError(
                    f"Hateful Memes {where}: expected an object with an 'id' field, got {line.strip()[:80]!r}"
                )
            text = entry.get("text")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"Hateful Memes {where}: field 'text' is {text!r}; expected a string")
            image = entry.get("img")
            if image is not None and not isinstance(image, str):
                raise ValueError(
                    f"Hateful Memes {where}: field 'img' is {image!r}; expected a path string such as "
                    "'img/42953.png'"
                )
            records.append(
                SampleRecord(
                    id=str(entry["id"]),
                    key=str(entry["id"]),
                    image=image or None,
                    text=text,
                    label=entry.get("label"),
                    text_source=f"{where} field 'text'",
                )
            )
        return records, FileImageReader(root)

    def _arrow_names(self, split: str) -> list[str]:
        return {"train": ["train"], "val": [self.val_split, "dev", "val"], "test": [self.test_split, "test"]}[
            split
        ]

    def _read_arrow(self, path: Path, table) -> tuple[list[SampleRecord], ImageReader]:
        require_columns(table, path, ["image", "text"])
        labels = (
            table.column("label").to_pylist() if "label" in table.column_names else [None] * table.num_rows
        )
        ids = None
        for column in ("id", "image_id"):
            if column in table.column_names:
                ids = table.column(column).to_pylist()
                break
        return arrow_text_records(path, table, labels, ids), ArrowImageReader(path, "image")

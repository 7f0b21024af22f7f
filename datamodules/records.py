"""What a dataset reader produces: sample records, image readers, and the bad-input error.

A reader lists the samples of a split as :class:`SampleRecord` (nothing decoded) plus the
:class:`ImageReader` that opens their images; :class:`datamodules.datamodule.MissingModalityDataModule`
does everything else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.transforms import decode_image


class BadSampleError(ValueError):
    """An input sample is unusable (message names file, sample id, field and what was expected)."""


def read_text_file(path: str | os.PathLike) -> str:
    """A whole index/annotation file as UTF-8 text (a leading UTF-8 byte-order mark is dropped).

    Bytes that are not UTF-8 are an error naming the file, the line and the byte, instead of a bare
    ``UnicodeDecodeError`` from somewhere inside a reader (nothing is guessed or replaced).
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(
            f"{path} line {line}, byte {column}: not valid UTF-8 ({exc.reason}, "
            f"byte {data[exc.start : exc.start + 1]!r}); "
            "expected UTF-8 text. Re-encode the file (e.g. `iconv -f latin1 -t utf-8`)."
        ) from exc


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One row of a split as a reader lists it (nothing decoded yet).

    Attributes:
        id: Unique row id, emitted as ``batch["id"]``.
        key: Missing-table key: the id of the underlying item. Equal to ``id`` except for
            MM-IMDb's per-plot rows, which share their movie's key (and so its missing code).
        image: What the image reader needs to open the image (a path, an arrow row), or ``None``
            when the source names no image.
        text: The raw text, or ``None`` when the source has no text field for this sample.
        label: Class index (multiclass/binary), tuple of positive class indices (multilabel), or
            ``None`` when the source has no label.
        text_source: Where the text comes from, for messages (``"<file> field 'title'"``).
    """

    id: str
    key: str
    image: Any
    text: str | None
    label: int | tuple[int, ...] | None
    text_source: str


class ImageReader:
    """Opens the images of a dataset; subclasses are picklable (workers receive copies)."""

    def exists(self, ref: Any) -> bool:
        raise NotImplementedError

    def load(self, ref: Any):
        """Decoded 8-bit RGB ``PIL.Image``; raises on unreadable data."""
        raise NotImplementedError

    def describe(self, ref: Any) -> str:
        """Human-readable location of the image (a file path, an arrow file and row)."""
        raise NotImplementedError


class FileImageReader(ImageReader):
    """Images stored as files; references are paths (relative ones resolved against ``root``)."""

    def __init__(self, root: str | os.PathLike = ".") -> None:
        self.root = Path(root)

    def path(self, ref: str) -> Path:
        return self.root / ref

    def exists(self, ref: str) -> bool:
        return self.path(ref).is_file()

    def load(self, ref: str):
        return decode_image(str(self.path(ref)))

    def describe(self, ref: str) -> str:
        return f"file {self.path(ref)}"

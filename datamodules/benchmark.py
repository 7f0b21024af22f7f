"""The shared base of the benchmark DataModules: a ``root`` read as downloaded or as MAP's tables.

``format: raw`` reads the dataset as distributed (each subclass's ``_read_raw``); ``format: arrow``
reads MAP's ``<arrow_prefix>_<split>.arrow`` tables from ``root`` (``_read_arrow`` on the opened
table; see :mod:`datamodules.arrow`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from datamodules.arrow import find_arrow_file, open_arrow_table
from datamodules.checks import check_choice
from datamodules.datamodule import MissingModalityDataModule
from datamodules.records import ImageReader, SampleRecord

DataFormat = Literal["raw", "arrow"]


class BenchmarkDataModule(MissingModalityDataModule):
    """A benchmark DataModule over ``root`` in its raw layout or as MAP's arrow tables.

    Subclasses set ``root_contents`` (what ``root`` must hold, for the error when it is not given)
    and ``arrow_prefix``, and implement ``_read_raw(split)``, ``_arrow_names(split)`` (the split
    names to try, in order) and ``_read_arrow(path, table)``.

    Args:
        root: The dataset folder (required).
        format: ``raw`` (the dataset as downloaded) or ``arrow`` (MAP's tables in ``root``).
        **kwargs: Everything else of :class:`MissingModalityDataModule`.
    """

    root_contents: str = "the dataset folder"
    arrow_prefix: str = ""

    def __init__(self, root: str | None = None, format: DataFormat = "raw", **kwargs) -> None:
        if root is None:
            raise ValueError(f"{type(self).__name__} needs root: {self.root_contents}")
        check_choice("format", format, DataFormat)
        super().__init__(root=root, **kwargs)
        self.format = format

    def _read_split(self, split: str) -> tuple[list[SampleRecord], ImageReader]:
        if self.format == "arrow":
            path = find_arrow_file(self.root, self.arrow_prefix, self._arrow_names(split))
            return self._read_arrow(path, open_arrow_table(path))
        return self._read_raw(split)

    def _read_raw(self, split: str) -> tuple[list[SampleRecord], ImageReader]:
        raise NotImplementedError

    def _arrow_names(self, split: str) -> list[str]:
        raise NotImplementedError

    def _read_arrow(self, path: Path, table) -> tuple[list[SampleRecord], ImageReader]:
        raise NotImplementedError

"""MAP's ``.arrow`` tables (``format: arrow`` on the benchmark DataModules).

MAP (missing-aware prompts, CVPR 2023) and ViLT before it store each split as an Arrow IPC *file*
(``pyarrow.ipc.new_file``) with one row per image:

- ``mmimdb_{train,dev,test}.arrow``: ``image`` (encoded bytes), ``plots`` (list of strings),
  ``label`` (23 ints, multi-hot in the genre order of :data:`datamodules.mmimdb.MMIMDB_GENRES`),
  ``genres`` (list of strings), ``image_id``, ``split``;
- ``food101_{train,val,test}.arrow``: ``image``, ``text`` (list of strings, or a string),
  ``label`` (class index, alphabetical class order), ``image_id``, ``split``;
- ``hatememes_{train,dev,test}.arrow``: ``image``, ``text``, ``label`` (0/1), ``split``.

Like MAP, every (row, text) pair is a sample when a row holds several texts; all texts of a row
share the row's missing code. Tables are memory-mapped, so opening one is cheap; each DataLoader
worker maps the file itself (the table is not pickled to workers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.records import ImageReader, SampleRecord
from datamodules.transforms import decode_image


def open_arrow_table(path: str | os.PathLike):
    """Memory-map an Arrow IPC file (MAP's format) or, failing that, an Arrow IPC stream."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path), "r")
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{path} is not an Arrow IPC file or stream: {exc}") from exc


def find_arrow_file(root: str | os.PathLike, prefix: str, names: list[str]) -> Path:
    """The first ``<root>/<prefix>_<name>.arrow`` that exists; the error lists what was tried."""
    tried = [Path(root) / f"{prefix}_{name}.arrow" for name in names]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no MAP arrow table found; tried {[str(t) for t in tried]}")


def require_columns(table, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"arrow table {path} lacks column(s) {missing}; it has {table.column_names}")


class ArrowImageReader(ImageReader):
    """Images stored as encoded bytes in a column of an Arrow table; references are row numbers."""

    def __init__(self, path: str | os.PathLike, column: str = "image") -> None:
        import pyarrow.compute as pc

        self.path = str(path)
        self.column = column
        table = open_arrow_table(self.path)
        require_columns(table, Path(self.path), [column])
        lengths = pc.binary_length(table.column(column)).to_numpy(zero_copy_only=False)
        # Null bytes become NaN (float) or a masked value: both mean "no image".
        self._has_bytes = np.nan_to_num(np.asarray(lengths, dtype=np.float64), nan=0.0) > 0
        self._table = table

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_table"] = None  # each process maps the file itself
        return state

    def _column(self):
        if self._table is None:
            self._table = open_arrow_table(self.path)
        return self._table.column(self.column)

    def exists(self, ref: int) -> bool:
        return bool(self._has_bytes[ref])

    def load(self, ref: int) -> Any:
        value = self._column()[ref].as_py()
        if not value:
            raise OSError("no image bytes in this row")
        return decode_image(value)

    def describe(self, ref: int) -> str:
        return f"arrow file {self.path} row {ref} column '{self.column}'"


def texts_of(value: Any, where: str = "") -> list[str | None]:
    """A row's texts as a list: MAP stores lists of strings; a plain string or null is accepted.

    ``where`` (file, row, column) goes into the error for any other value.
    """
    if value is None:
        return [None]
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value) if value else [None]
    raise TypeError(
        f"{where + ': ' if where else ''}expected a string or a list of strings, got {type(value).__name__}"
    )


def arrow_text_records(path: Path, table, labels: list[Any], ids: list[Any] | None) -> list[SampleRecord]:
    """One record per (row, text) of a MAP arrow table whose ``text`` column holds one or several texts.

    A row with several texts gives ids ``<key>#<k>`` that share the row's key (and so its missing code);
    ``key`` is the row's id column value, else ``row<N>``.
    """
    records = []
    for row, (texts, label) in enumerate(zip(table.column("text").to_pylist(), labels, strict=True)):
        key = str(ids[row]) if ids is not None else f"row{row}"
        where = f"arrow file {path} row {row} column 'text'"
        texts = texts_of(texts, where)
        for k, text in enumerate(texts):
            records.append(
                SampleRecord(
                    id=key if len(texts) == 1 else f"{key}#{k}",
                    key=key,
                    image=row,
                    text=text,
                    label=label,
                    text_source=where,
                )
            )
    return records

"""Your own data: ``ManifestDataModule`` over a CSV (with header), JSONL or Parquet manifest.

One row per sample; columns are chosen by name:

- ``id_column``: the sample id (default: the row number in its file);
- ``image_column``: a path, relative to ``image_root`` (default: the manifest's folder) or absolute,
  or, in Parquet, an image struct ``{bytes, path}`` as Hugging Face ``datasets`` writes it;
- ``text_column``: one column, or a list of columns joined with ``text_separator``;
- ``label_column``: class names or integers; multilabel as a list column, or as a string split at
  ``label_delimiter``.

Splits: ``train_file`` / ``val_file`` / ``test_file``, or one ``file`` with a ``split_column``
(values ``train``, ``val`` (or ``valid``, ``validation``, ``dev``), ``test``). Without a validation
split, ``val_fraction`` of the train rows is carved out with a fixed seed, stratified by class for
single-label tasks (every class keeps at least one train row).

Natural missingness: an empty or null image or text cell is a modality the sample does not have. It
is kept as missing, counted per split (``natural_missing_counts``) and logged, never an error and
never dropped (``natural_missing: error`` makes it an error for users who require complete rows). A
path that is given but absent or unreadable is a bad input (``on_bad_sample``). The simulated
missing tables of the protocol apply on top; a row with neither an image nor a text is an error,
and no sample ever ends with neither (the base class restores the dropped modality and counts it).

The class list comes from the train labels (sorted; integers numerically), unless ``classes`` is
given; it is stored in the checkpoint (the DataModule's hyperparameters and state) and gives
``predict`` its label names. ``task`` is inferred unless given: ``multilabel`` for list labels or
with ``label_delimiter``, ``binary`` for two classes, else ``multiclass``.

Indexing is vectorised with pyarrow compute (types, missing cells, labels, splits, paths); errors
name the file, the row (line number for CSV and JSONL, row index for Parquet), the column and what
was expected.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datamodules.batch import Task
from datamodules.checks import check_choice
from datamodules.datamodule import MissingModalityDataModule
from datamodules.records import ImageReader, SampleRecord
from datamodules.transforms import decode_image

ManifestFormat = Literal["auto", "csv", "jsonl", "parquet"]
NaturalMissing = Literal["keep", "error"]
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
SPLIT_VALUES = {"train": ("train",), "val": ("val", "valid", "validation", "dev"), "test": ("test",)}


class ManifestError(ValueError):
    """A manifest is unusable; the message names the file, the row, the column and what was expected."""


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class ManifestFile:
    """A manifest file and its format, with row descriptions for messages."""

    path: Path
    format: str

    def row(self, index: int) -> str:
        """``"<file> line N"`` (CSV, JSONL: the line of data row ``index``), ``"<file> row N"`` (Parquet)."""
        if self.format == "parquet":
            return f"{self.path} row {index}"
        # Only on error: find the line of the index-th non-blank data line (blank lines are skipped).
        seen = -1 if self.format == "jsonl" else -2  # CSV: the header is the first non-blank line
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    seen += 1
                    if seen == index:
                        return f"{self.path} line {number}"
        return f"{self.path} data row {index}"


def manifest_file(path: str | os.PathLike, format: str = "auto") -> ManifestFile:
    """Check that ``path`` exists and resolve its format (from the suffix when ``auto``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (expected a CSV, JSONL or Parquet file)")
    if format == "auto":
        format = SUFFIX_FORMATS.get(path.suffix.lower(), "")
        if not format:
            raise ManifestError(
                f"manifest {path}: cannot tell the format from the suffix {path.suffix!r}; expected one of "
                f"{sorted(SUFFIX_FORMATS)} or set format: csv | jsonl | parquet"
            )
    return ManifestFile(path, format)


def read_manifest(source: ManifestFile, string_columns: Sequence[str] = ()) -> pa.Table:
    """The whole manifest as a pyarrow table (``string_columns`` read as text in CSV files)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        if source.format == "csv":
            # Ids, paths, texts and labels stay text: "007" is an id, not 7; labels are typed below.
            options = pacsv.ConvertOptions(
                column_types={name: pa.string() for name in string_columns},
                strings_can_be_null=False,
            )
            return pacsv.read_csv(source.path, convert_options=options)
        if source.format == "jsonl":
            return pajson.read_json(source.path)
        return pq.read_table(source.path)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
        raise ManifestError(
            f"manifest {source.path}: cannot be read as {source.format.upper()} ({error}); expected "
            + {
                "csv": "a UTF-8 CSV file with a header line",
                "jsonl": "one JSON object per line, each field of one type throughout the file",
                "parquet": "a Parquet file",
            }[source.format]
        ) from error


def _blank(array: pa.Array) -> np.ndarray:
    """Per row, whether a string cell is null or only whitespace."""
    if pa.types.is_null(array.type):
        return np.ones(len(array), dtype=bool)
    empty = pc.equal(pc.utf8_trim_whitespace(array), "")
    return pc.fill_null(empty, True).to_numpy(zero_copy_only=False)


def _is_text(array_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(array_type) or pa.types.is_large_string(array_type) or pa.types.is_null(array_type)
    )


def _objects(values: pa.Array | Sequence) -> np.ndarray:
    """A 1-D object array of Python values (numpy would turn a list of strings into a str array)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_numpy(zero_copy_only=False).astype(object, copy=False)
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


@contextlib.contextmanager
def _without_gc() -> Iterator[None]:
    """Build millions of small objects without the cyclic collector rescanning them again and again
    (records hold no reference cycles); it runs as usual afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _relist(lists: pa.Array, values: pa.Array) -> pa.Array:
    """A list array shaped like ``lists`` (same rows, lengths and nulls) holding ``values`` (flattened)."""
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=lists.is_null())


# ------------------------------------------------------------------------------------------ images


class ManifestImageReader(ImageReader):
    """Images of a manifest: file paths (``str`` refs) or bytes in a Parquet struct column (``int`` refs).

    Existence checks are cached per path (a manifest may name the same file many times). The bytes
    column is not pickled to DataLoader workers: each process reads it from the file itself.
    """

    def __init__(self, parquet_path: str | None = None, column: str | None = None) -> None:
        self.parquet_path = parquet_path
        self.column = column
        self._exists: dict[str, bool] = {}
        self._bytes = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_bytes"] = None
        state["_exists"] = {}
        return state

    def _bytes_column(self):
        if self._bytes is None:
            import pyarrow.parquet as pq

            column = pq.read_table(self.parquet_path, columns=[self.column]).column(self.column)
            self._bytes = pc.struct_field(column, "bytes")
        return self._bytes

    def exists(self, ref: str | int) -> bool:
        if isinstance(ref, int):
            return True  # the bytes are in the table; decoding is checked at load time
        if ref not in self._exists:
            self._exists[ref] = os.path.isfile(ref)
        return self._exists[ref]

    def load(self, ref: str | int):
        if isinstance(ref, int):
            return decode_image(self._bytes_column()[ref].as_py())
        return decode_image(ref)

    def describe(self, ref: str | int) -> str:
        if isinstance(ref, int):
            return f"parquet file {self.parquet_path} row {ref} column '{self.column}' (bytes)"
        return f"file {ref}"


# ----------------------------------------------------------------------------------- parsed splits


@dataclass
class ParsedSplit:
    """One split of a manifest, parsed column-wise (rows are indices into ``source``'s table)."""

    source: ManifestFile
    rows: np.ndarray
    ids: list[str]
    images: np.ndarray  # object: a path, a Parquet row (bytes), or None (no image)
    texts: np.ndarray  # object: the text, or None (no text)
    labels: pa.Array | None  # one value (or one list) per row, nulls where unlabelled
    image_absent: np.ndarray
    text_absent: np.ndarray
    reader: ManifestImageReader


class ManifestDataModule(MissingModalityDataModule):
    """Your own image + text records from a CSV, JSONL or Parquet manifest (see the module docstring).

    Args:
        train_file: Manifest of the train split.
        val_file: Manifest of the validation split; ``null``: carved from train (``val_fraction``).
        test_file: Manifest of the test split (needed for ``test``; ``predict`` without a
            ``--predict_file`` uses it too).
        file: One manifest holding every split, told apart by ``split_column`` (instead of the
            three files above).
        split_column: With ``file``: the column naming each row's split (``train``, ``val`` /
            ``valid`` / ``validation`` / ``dev``, ``test``).
        format: ``auto`` (from the suffix: ``.csv``, ``.jsonl`` / ``.ndjson`` / ``.json``,
            ``.parquet`` / ``.pq``), ``csv`` (with a header line), ``jsonl`` or ``parquet``.
        id_column: Column of the sample ids (unique per file); ``null``: the row number.
        image_column: Column of the image: a path (relative to ``image_root``, else to the
            manifest's folder, or absolute) or a Parquet struct ``{bytes, path}``. Empty or null:
            the sample has no image. ``null``: no images at all.
        text_column: Column of the text, or a list of columns joined with ``text_separator`` (empty
            cells skipped). Empty or null: the sample has no text. ``null``: no texts at all.
        text_separator: Joins the texts of several ``text_column`` columns.
        label_column: Column of the labels: class names or integers; a list per row, or a string
            split at ``label_delimiter``, for multilabel.
        label_delimiter: Splits a string label into several (multilabel), e.g. ``"|"``.
        task: ``multiclass``, ``multilabel`` or ``binary``; ``null``: inferred from the train labels.
        classes: The class names, in logit order; ``null``: the sorted train labels. A val/test
            label outside them is an error.
        image_root: Folder that relative image paths are resolved against; ``null``: each
            manifest's folder.
        val_fraction: Share of the train rows carved out as validation when no val split is given.
        val_seed: Seed of that carve-out.
        natural_missing: ``keep`` empty/null image or text cells as missing modalities (counted), or
            raise an ``error`` naming the first such row.
        name: Dataset name in missing-table file names and seeds (change it per manifest when
            several share one ``missing_table_dir``).
        max_text_len: Maximum tokens per text.
        **kwargs: Everything else of :class:`MissingModalityDataModule` (missing settings, loader,
            encoders, bad-input policy). Missing tables go to ``<manifest folder>/missing_tables``
            unless ``missing_table_dir`` says otherwise.
    """

    classes_mismatch_hint = " Pass the checkpoint's list as data.init_args.classes (and task)."

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        file: str | None = None,
        split_column: str = "split",
        format: ManifestFormat = "auto",
        id_column: str | None = None,
        image_column: str | None = "image",
        text_column: str | list[str] | None = "text",
        text_separator: str = " ",
        label_column: str = "label",
        label_delimiter: str | None = None,
        task: Task | None = None,
        classes: list[str] | None = None,
        image_root: str | None = None,
        val_fraction: float = 0.1,
        val_seed: int = 0,
        natural_missing: NaturalMissing = "keep",
        name: str = "manifest",
        max_text_len: int = 128,
        **kwargs: Any,
    ) -> None:
        check_choice("format", format, ManifestFormat)
        check_choice("natural_missing", natural_missing, NaturalMissing)
        if task is not None:
            check_choice("task", task, Task)
        if (file is None) == (train_file is None):
            raise ValueError(
                "ManifestDataModule needs either train_file (with optional val_file / test_file) or one file "
                f"with a split_column; got train_file={train_file!r}, file={file!r}"
            )
        if file is not None and (val_file or test_file):
            raise ValueError("ManifestDataModule: give val_file / test_file with train_file, not with file")
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not 0 < val_fraction < 1
        ):
            raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        if image_column is None and text_column is None:
            raise ValueError("ManifestDataModule: image_column and text_column cannot both be null")
        first = manifest_file(file if file is not None else train_file, format)
        super().__init__(root=str(first.path.parent), max_text_len=max_text_len, **kwargs)
        self.dataset_name = name
        self.format = format
        self.split_column = split_column
        self.id_column = id_column
        self.image_column = image_column
        self.text_columns = [text_column] if isinstance(text_column, str) else list(text_column or [])
        self.text_separator = text_separator
        self.label_column = label_column
        self.label_delimiter = label_delimiter
        self.image_root = image_root
        self.val_fraction = float(val_fraction)
        self.val_seed = int(val_seed)
        self.natural_missing = natural_missing
        self._files = {"train": train_file, "val": val_file, "test": test_file}
        self._single = first if file is not None else None
        self._parsed: dict[str, ParsedSplit] = {}
        self._parse_fit_splits(first)
        self._set_classes(self._parsed["train"], task, classes)
        # The resolved classes and task become the hyperparameters (initial ones too: the logger
        # compares them with the model's task), so the checkpoint holds the class list. ``root`` is
        # derived, not an argument: without it the hyperparameters rebuild this DataModule.
        self.save_hyperparameters({"classes": list(self.label_names), "task": self.task}, ignore=["root"])

    # --------------------------------------------------------------------------- parsing a file

    def _string_columns(self) -> list[str]:
        names = [self.id_column, self.image_column, self.label_column, self.split_column, *self.text_columns]
        return [n for n in names if n]

    def _parse_file(self, source: ManifestFile) -> tuple[pa.Table, dict]:
        """Read ``source`` and parse its columns for every row (shared by all splits of the file)."""
        table = read_manifest(source, self._string_columns())
        wanted = [c for c in (self.id_column, self.image_column, self.label_column, *self.text_columns) if c]
        if self._single is not None:
            wanted.append(self.split_column)
        labels_optional = self._single is None and source.path != Path(self._files["train"]).expanduser()
        absent = [c for c in wanted if c not in table.column_names]
        if labels_optional and absent == [self.label_column]:
            absent = []  # an unlabelled val/test file: predict only (checked per split)
        if absent:
            raise ManifestError(
                f"manifest {source.path}: no column(s) {absent}; the columns found are {table.column_names}. "
                "Set id_column / image_column / text_column / label_column (and split_column) to these names."
            )
        n = table.num_rows
        if n == 0:
            raise ManifestError(f"manifest {source.path}: no rows")
        ids = self._ids(source, table)
        images, image_absent, reader = self._images(source, table)
        texts, text_absent = self._texts(source, table)
        neither = np.flatnonzero(image_absent & text_absent)
        if len(neither):
            raise ManifestError(
                f"{source.row(int(neither[0]))}: both the image ({self.image_column!r}) and the text "
                f"({', '.join(map(repr, self.text_columns))}) are empty; a row needs at least one modality "
                f"({len(neither)} such row(s))"
            )
        if self.natural_missing == "error":
            for absent_rows, what in (
                (image_absent, f"image column {self.image_column!r}"),
                (text_absent, f"text column(s) {self.text_columns}"),
            ):
                if absent_rows.any():
                    raise ManifestError(
                        f"{source.row(int(np.flatnonzero(absent_rows)[0]))}: {what} is empty "
                        f"({int(absent_rows.sum())} row(s)); natural_missing: error requires complete rows. "
                        "Set natural_missing: keep to train with naturally missing modalities."
                    )
        labels = self._labels(source, table) if self.label_column in table.column_names else None
        columns = {
            "ids": ids,
            "images": images,
            "image_absent": image_absent,
            "texts": texts,
            "text_absent": text_absent,
            "labels": labels,
            "reader": reader,
        }
        return table, columns

    def _ids(self, source: ManifestFile, table: pa.Table) -> pa.Array:
        if self.id_column is None:
            return pa.array(np.arange(table.num_rows).astype(str))
        column = table.column(self.id_column).combine_chunks()
        if not (_is_text(column.type) or pa.types.is_integer(column.type)):
            raise ManifestError(
                f"manifest {source.path}: column {self.id_column!r} holds {column.type} values; "
                "expected string or integer ids"
            )
        ids = pc.cast(column, pa.string())
        blank = _blank(ids)
        if blank.any():
            raise ManifestError(
                f"{source.row(int(np.flatnonzero(blank)[0]))}: column {self.id_column!r} is empty; "
                "expected a unique id in every row"
            )
        counts = pc.value_counts(ids)
        duplicated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(duplicated):
            value = duplicated[0].as_py()
            rows = np.flatnonzero(pc.equal(ids, value).to_numpy(zero_copy_only=False))
            raise ManifestError(
                f"{source.row(int(rows[1]))}: column {self.id_column!r}: id {value!r} already used in "
                f"{source.row(int(rows[0]))}; expected unique ids ({len(duplicated)} duplicated id(s))"
            )
        return ids

    def _image_base(self, source: ManifestFile) -> str:
        return str(Path(self.image_root).expanduser() if self.image_root else source.path.parent)

    def _resolve_paths(self, source: ManifestFile, paths: pa.Array) -> pa.Array:
        """Absolute paths stay; relative ones are joined to ``image_root`` or the manifest's folder."""
        trimmed = pc.utf8_trim_whitespace(paths)
        absolute = pc.starts_with(trimmed, "/")
        joined = pc.binary_join_element_wise(self._image_base(source), trimmed, "/")
        return pc.if_else(absolute, trimmed, joined)

    def _images(
        self, source: ManifestFile, table: pa.Table
    ) -> tuple[np.ndarray, np.ndarray, ManifestImageReader]:
        n = table.num_rows
        if self.image_column is None:
            return _objects([None] * n), np.ones(n, dtype=bool), ManifestImageReader()
        column = table.column(self.image_column).combine_chunks()
        if pa.types.is_struct(column.type) and {"bytes", "path"} <= {f.name for f in column.type}:
            data = pc.struct_field(column, "bytes")
            has_bytes = pc.fill_null(pc.greater(pc.binary_length(data), 0), False).to_numpy(
                zero_copy_only=False
            )
            path = pc.struct_field(column, "path")
            absent = ~has_bytes & _blank(path)
            # A row's bytes win over its path; a row with neither has no image.
            images = _objects(
                pc.if_else(pa.array(absent), pa.scalar(None, pa.string()), self._resolve_paths(source, path))
            )
            images[has_bytes] = np.flatnonzero(has_bytes).tolist()
            return images, absent, ManifestImageReader(str(source.path), self.image_column)
        if not _is_text(column.type):
            raise ManifestError(
                f"manifest {source.path}: column {self.image_column!r} holds {column.type} values; expected "
                "image paths (strings), or in Parquet an image struct {bytes, path}"
            )
        absent = _blank(column)
        paths = pc.if_else(
            pa.array(absent), pa.scalar(None, pa.string()), self._resolve_paths(source, column)
        )
        return _objects(paths), absent, ManifestImageReader()

    def _texts(self, source: ManifestFile, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        n = table.num_rows
        if not self.text_columns:
            return _objects([None] * n), np.ones(n, dtype=bool)
        parts, blanks = [], []
        for name in self.text_columns:
            column = table.column(name).combine_chunks()
            if not _is_text(column.type):
                raise ManifestError(
                    f"manifest {source.path}: column {name!r} holds {column.type} values; "
                    "expected text (strings)"
                )
            parts.append(pc.cast(column, pa.string()))
            blanks.append(_blank(column))
        if len(parts) == 1:
            text = parts[0]
        else:
            # Join the non-empty cells of each row: flatten them row-major and rebuild one list per row.
            keep = ~np.stack(blanks, axis=1)  # [n, k]
            values = pa.concat_arrays(
                [pc.take(p, pa.array(np.flatnonzero(keep[:, j]))) for j, p in enumerate(parts)]
            )
            row_of = np.concatenate([np.flatnonzero(keep[:, j]) for j in range(len(parts))])
            order = np.argsort(row_of, kind="stable")  # row-major, columns in the given order
            offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
            lists = pa.ListArray.from_arrays(pa.array(offsets), pc.take(values, pa.array(order)))
            text = pc.binary_join(lists, self.text_separator)
        absent = np.logical_and.reduce(blanks)
        return _objects(pc.if_else(pa.array(absent), pa.scalar(None, pa.string()), text)), absent

    def _labels(self, source: ManifestFile, table: pa.Table) -> pa.Array:
        """Labels as strings (names, or integers written in decimal), or lists of them (multilabel)."""
        column = table.column(self.label_column).combine_chunks()
        kind = column.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            inner = kind.value_type
            if not (_is_text(inner) or pa.types.is_integer(inner)):
                raise ManifestError(
                    f"manifest {source.path}: column {self.label_column!r} holds lists of {inner}; expected "
                    "lists of class names or integers"
                )
            return _relist(column, pc.cast(column.flatten(), pa.string()))
        if not (_is_text(kind) or pa.types.is_integer(kind)):
            raise ManifestError(
                f"manifest {source.path}: column {self.label_column!r} holds {kind} values; expected class "
                "names or integers (a list, or a string with label_delimiter, for multilabel)"
            )
        labels = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
        labels = pc.if_else(pc.equal(labels, ""), pa.scalar(None, pa.string()), labels)
        if self.label_delimiter:
            parts = pc.split_pattern(labels, self.label_delimiter)
            return _relist(parts, pc.utf8_trim_whitespace(parts.flatten()))
        return labels

    # ------------------------------------------------------------------------------------ splits

    @staticmethod
    def _split_of(parsed: tuple[pa.Table, dict], source: ManifestFile, rows: np.ndarray) -> ParsedSplit:
        _, columns = parsed
        return ParsedSplit(
            source=source,
            rows=rows,
            ids=_objects(pc.take(columns["ids"], pa.array(rows))).tolist(),
            images=columns["images"][rows],
            texts=columns["texts"][rows],
            labels=None if columns["labels"] is None else pc.take(columns["labels"], pa.array(rows)),
            image_absent=columns["image_absent"][rows],
            text_absent=columns["text_absent"][rows],
            reader=columns["reader"],
        )

    def _split_rows(self, source: ManifestFile, table: pa.Table) -> dict[str, np.ndarray]:
        values = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(table.column(self.split_column), pa.string())))
        names = {value: split for split, aliases in SPLIT_VALUES.items() for value in aliases}
        known = pc.is_in(values, value_set=pa.array(list(names)))
        bad = np.flatnonzero(~pc.fill_null(known, False).to_numpy(zero_copy_only=False))
        if len(bad):
            raise ManifestError(
                f"{source.row(int(bad[0]))}: column {self.split_column!r} is "
                f"{values[int(bad[0])].as_py()!r}; "
                f"expected one of {list(names)} ({len(bad)} such row(s))"
            )
        split_of = values.to_numpy(zero_copy_only=False)
        return {split: np.flatnonzero(np.isin(split_of, aliases)) for split, aliases in SPLIT_VALUES.items()}

    def _parse_fit_splits(self, first: ManifestFile) -> None:
        """Parse train (and val when given; carve it from train otherwise) now: the classes are needed
        before the model is built. Test is parsed at setup."""
        parsed = self._parse_file(first)
        if self._single is not None:
            rows = self._split_rows(first, parsed[0])
            self._single_parsed, self._single_rows = parsed, rows
            if not len(rows["train"]):
                raise ManifestError(f"manifest {first.path}: no row has {self.split_column} = train")
            train = self._split_of(parsed, first, rows["train"])
            val = self._split_of(parsed, first, rows["val"]) if len(rows["val"]) else None
        else:
            train = self._split_of(parsed, first, np.arange(parsed[0].num_rows))
            val = self._parse_split_file("val") if self._files["val"] else None
        if val is None:
            train, val = self._carve_val(train)
        self._parsed["train"], self._parsed["val"] = train, val

    def _parse_split_file(self, split: str) -> ParsedSplit:
        source = manifest_file(self._files[split], self.format)
        parsed = self._parse_file(source)
        return self._split_of(parsed, source, np.arange(parsed[0].num_rows))

    def _carve_val(self, train: ParsedSplit) -> tuple[ParsedSplit, ParsedSplit]:
        """Split ``val_fraction`` of the train rows off with ``val_seed``, stratified by class when the
        labels are single (every class keeps at least one train row)."""
        n = len(train.ids)
        if n < 2:
            raise ManifestError(
                f"manifest {train.source.path}: {n} train row(s); cannot carve a validation split"
            )
        keys = np.random.default_rng(self.val_seed).random(n)
        labels = train.labels
        if labels is not None and not pa.types.is_list(labels.type):
            group = pc.dictionary_encode(pc.fill_null(labels, "")).indices.to_numpy(zero_copy_only=False)
        else:
            group = np.zeros(n, dtype=np.int64)
        order = np.lexsort((keys, group))
        sizes = np.bincount(group)
        take = np.minimum(np.rint(sizes * self.val_fraction).astype(np.int64), sizes - 1)
        if take.sum() == 0:
            take[np.argmax(sizes)] = 1
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rank_in_group = np.arange(n) - starts[group[order]]
        is_val = np.zeros(n, dtype=bool)
        is_val[order[rank_in_group < take[group[order]]]] = True
        return self._subset(train, ~is_val), self._subset(train, is_val)

    @staticmethod
    def _subset(split: ParsedSplit, mask: np.ndarray) -> ParsedSplit:
        index = np.flatnonzero(mask)
        return ParsedSplit(
            source=split.source,
            rows=split.rows[index],
            ids=_objects(split.ids)[index].tolist(),
            images=split.images[index],
            texts=split.texts[index],
            labels=None if split.labels is None else pc.take(split.labels, pa.array(index)),
            image_absent=split.image_absent[index],
            text_absent=split.text_absent[index],
            reader=split.reader,
        )

    # ------------------------------------------------------------------------------------ labels

    def _set_classes(self, train: ParsedSplit, task: str | None, classes: list[str] | None) -> None:
        if train.labels is None:
            raise ManifestError(
                f"manifest {train.source.path}: no column {self.label_column!r} (train needs labels)"
            )
        multi = pa.types.is_list(train.labels.type)
        if task is None:
            task = "multilabel" if multi else None
        elif multi and task != "multilabel":
            raise ManifestError(
                f"manifest {train.source.path}: column {self.label_column!r} holds several labels per row, "
                f"but task is {task!r}; set task: multilabel (or leave it null)"
            )
        values = train.labels.flatten() if multi else train.labels
        if classes is None:
            found = pc.unique(pc.drop_null(values)).to_pylist()
            is_int = bool(found) and all(v.lstrip("-").isdigit() for v in found)
            classes = sorted(found, key=int) if is_int else sorted(found)
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes has duplicates: {classes}")
        if task is None:
            task = "binary" if len(classes) == 2 else "multiclass"
        if task == "binary" and len(classes) != 2:
            raise ManifestError(
                f"task binary needs 2 classes; the train labels have {len(classes)}: {classes[:10]}"
            )
        if task != "multilabel" and len(classes) < 2:
            raise ManifestError(
                f"manifest {train.source.path}: column {self.label_column!r} has {len(classes)} class(es) "
                f"{classes}; classification needs at least 2"
            )
        self.task = task
        self.label_names = classes
        self.num_classes = len(classes)

    def _label_indices(self, split: str, parsed: ParsedSplit) -> list:
        """Class indices per row (tuples for multilabel, ``None`` where unlabelled); unknown labels raise."""
        labels = parsed.labels
        n = len(parsed.ids)
        if labels is None:
            if self._labels_required(split):
                raise ManifestError(
                    f"manifest {parsed.source.path}: no column {self.label_column!r} ({split} needs labels)"
                )
            return [None] * n
        multi = pa.types.is_list(labels.type)
        if multi != (self.task == "multilabel"):
            raise ManifestError(
                f"manifest {parsed.source.path}: column {self.label_column!r} holds "
                f"{'lists of labels' if multi else 'one label per row'}, but the task is {self.task!r}"
            )
        values = labels.flatten() if multi else labels
        index = pc.index_in(values, value_set=pa.array(self.label_names))
        unknown = np.flatnonzero(
            index.is_null().to_numpy(zero_copy_only=False) & values.is_valid().to_numpy(zero_copy_only=False)
        )
        if len(unknown):
            position = int(unknown[0])
            row = int(pc.list_parent_indices(labels)[position].as_py()) if multi else position
            raise ManifestError(
                f"{parsed.source.row(int(parsed.rows[row]))}: column {self.label_column!r}: label "
                f"{values[position].as_py()!r} is not one of the {self.num_classes} classes of the train "
                f"split {self.label_names[:20]}{' ...' if self.num_classes > 20 else ''} "
                f"({len(unknown)} unknown label(s))"
            )
        missing = labels.is_null().to_numpy(zero_copy_only=False)
        if missing.any() and (self._labels_required(split) or not missing.all()):
            row = int(np.flatnonzero(missing)[0])
            raise ManifestError(
                f"{parsed.source.row(int(parsed.rows[row]))}: column {self.label_column!r} is empty "
                f"({int(missing.sum())} of {n} rows); {split} rows need a label"
                + (
                    ""
                    if self._labels_required(split)
                    else " (or a test file with no labels at all, to predict)"
                )
            )
        if missing.all():
            return [None] * n
        if not multi:
            return index.to_pylist()
        return [tuple(sorted(set(v))) for v in _relist(labels, index).to_pylist()]

    def _labels_required(self, split: str) -> bool:
        return split != "test"

    # ------------------------------------------------------------------------- the base's hooks

    def _split_parsed(self, split: str) -> ParsedSplit:
        if split not in self._parsed:
            if self._single is not None:
                rows = self._single_rows["test"]
                if not len(rows):
                    raise ManifestError(
                        f"manifest {self._single.path}: no row has {self.split_column} = test"
                    )
                self._parsed[split] = self._split_of(self._single_parsed, self._single, rows)
            elif self._files[split] is None:
                raise ValueError(
                    f"ManifestDataModule: no {split}_file given; the {split} split is needed here"
                )
            else:
                self._parsed[split] = self._parse_split_file(split)
        return self._parsed[split]

    def _read_split(self, split: str) -> tuple[list[SampleRecord], ImageReader]:
        parsed = self._split_parsed(split)
        labels = self._label_indices(split, parsed)
        source = f"{parsed.source.path} column(s) {self.text_columns}"
        with _without_gc():
            records = list(
                map(SampleRecord, parsed.ids, parsed.ids, parsed.images, parsed.texts, labels, repeat(source))
            )
        return records, parsed.reader

    def _natural_absence(self, split: str, records: list[SampleRecord]) -> tuple[np.ndarray, np.ndarray]:
        parsed = self._parsed[split]
        return parsed.image_absent, parsed.text_absent

    def _build_dataset(self, split: str, records: list[SampleRecord], image_reader: ImageReader):
        dataset = super()._build_dataset(split, records, image_reader)
        self._parsed.pop(split, None)  # the dataset holds what is needed now
        return dataset

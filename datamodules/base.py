"""``MissingModalityDataModule``: the shared machinery of every unipair DataModule.

A dataset subclass only says how to list its samples and open their images (``_read_split``) and
what its labels are. This base class turns those lists into the batches of
the project (the contract is :mod:`datamodules.batch`), applying the missing-modality protocol
(:mod:`datamodules.missing`) and the bad-input policy.

Where bad inputs are checked:

- **At setup (index time)**, for everything that is cheap: an image reference that is absent
  (no file name in the source, or the file does not exist), a text that is absent (no field) or
  empty (only whitespace), a label outside the label set, duplicate sample ids. Label problems are
  always errors. Image/text problems follow ``on_bad_sample``.
- **At load time (in the DataLoader worker)**, for what needs decoding: an image that exists but
  cannot be decoded (corrupt, truncated, not an image, a decompression bomb).

``on_bad_sample="error"`` raises :class:`BadSampleError` naming the file, the sample id, the field
and what was expected. ``"missing"`` treats the modality as missing (the filler goes in, the
presence flag is False), counts it per split and reason (``datamodule.bad_sample_counts``), logs a
warning per sample when found and a summary at setup and teardown. Nothing is dropped.

A sample never loses both modalities. If a bad input hits the modality the missing table keeps
while the table drops the other one, the table's drop is *not* applied for that sample (its other
modality is restored) and the event is counted as ``table_overridden``; the protocol counts of that
split are then off by that many samples, which the summary says. A sample whose image *and* text
are both bad is always an error.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from datamodules.batch import (
    ATTENTION_MASK,
    ID,
    IMAGE,
    IMAGE_FILLER_VALUE,
    IMAGE_MISSING,
    IMAGE_PRESENT,
    INPUT_IDS,
    LABEL,
    NO_LABEL,
    SPLITS,
    TASKS,  # noqa: F401  (importable from here, as before)
    TEXT_MISSING,
    TEXT_PRESENT,
    case_counts,
    empty_text_ids,
    presence_from_codes,
)
from datamodules.collate import MissingModalityCollate
from datamodules.missing import (
    MissingSetting,
    load_or_create_missing_table,
    sample_missing_table,
    table_file_stem,
)
from datamodules.preprocessing import cached_image_data_config, cached_tokenizer
from datamodules.sampling import (
    EpochShuffleSampler,
    EvenShardBatchSampler,
    ResumableDataLoader,
    default_shuffle_seed,
)
from datamodules.transforms import build_image_transform, decode_image

log = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "missing")

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
            f"{path} line {line}, byte {column}: not valid UTF-8 ({exc.reason}, byte {data[exc.start:exc.start + 1]!r}); "
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


class MissingModalityDataset(Dataset):
    """Samples of one split with their presence flags decided; yields per-sample dicts for collation.

    Built by :meth:`MissingModalityDataModule._build_dataset`; not meant to be built by hand.
    """

    def __init__(
        self,
        *,
        split: str,
        records: Sequence[SampleRecord],
        image_present: np.ndarray,
        text_present: np.ndarray,
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
                    f"({type(exc).__name__}: {exc}); expected a readable image. Fix or remove the file, or set "
                    "on_bad_sample: missing to treat it as a missing image."
                ) from exc
            if not int(self.flags[index]) & FLAG_IMAGE_UNREADABLE:
                log.warning(
                    "%s sample %r: image (%s) unreadable (%s: %s); treated as missing (on_bad_sample=missing)",
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
                            f"({self.image_reader.describe(self.images[index])}) is unreadable and the text is "
                            "absent or empty; a sample needs at least one modality."
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


class MissingModalityDataModule(L.LightningDataModule):
    """Base DataModule: missing-modality simulation, bad-input policy, transforms and collation.

    Subclasses set ``dataset_name``, ``task``, ``num_classes``, ``label_names`` and implement
    ``_read_split(split)``.

    Args:
        root: Folder of the dataset as downloaded and unpacked (layouts in the README).
        train_missing: Missing setting of the train split, a mapping with keys ``missing_rate``
            (eta in [0, 1], default 0), ``missing_type`` (``text`` | ``image`` | ``both``, default
            ``both``), ``both_ratio`` (share of image-missing among the missing for ``both``,
            default 0.5) and ``dynamic`` (re-draw the train table each epoch from
            ``(missing_seed, epoch)``: dynamic modality dropout; default false). ``null``: eta = 0.
        val_missing: Missing setting of the validation split (same keys; no ``dynamic``).
            ``null``: the same as ``test_missing``, so model selection sees the test condition.
        test_missing: Missing setting of the test (and predict) split (same keys). ``null``: eta = 0.
        missing_seed: Seed of the missing tables (with dataset, split, type and rate).
        missing_table_dir: Folder of the persisted tables (``<dataset>_<split>_<type>_<rate>...csv``
            and ``.json``). ``null``: ``<root>/missing_tables``, or ``./runs/missing_tables/<dataset>``
            when ``root`` is not writable; an existing table in either place is reused.
        batch_size: Samples per batch (all splits).
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin batches in page-locked memory; ``null``: when CUDA is available.
        persistent_workers: Keep workers alive between epochs (only when ``num_workers > 0``).
        image_encoder: Image encoder name; its data config (size, mean/std, interpolation, crop)
            defines the image transforms.
        text_encoder: Text encoder name; its tokenizer tokenises the texts.
        image_size: Square input resolution; ``null``: the encoder's native size.
        max_text_len: Maximum tokens per text, special tokens included (longer texts are truncated
            to their first tokens; the count per split is logged and kept in ``truncated_text_counts``).
        train_augment: Random resized crop (scale 0.6-1) and horizontal flip on the train split.
        on_bad_sample: ``error`` (raise naming file, sample and field) or ``missing`` (count it and
            treat that modality as missing). Bad labels and samples with neither modality always raise.
        shuffle_seed: Seed of the train order: epoch ``e`` is a permutation drawn from
            ``(shuffle_seed, e)``, the same on any number of processes and after a resume.
            ``null``: the seed of ``seed_everything`` (``PL_GLOBAL_SEED``), else 0.
    """

    dataset_name: str = "dataset"
    task: str = "multiclass"
    num_classes: int = 0
    label_names: list[str] = []

    def __init__(
        self,
        root: str | None = None,
        train_missing: dict | None = None,
        val_missing: dict | None = None,
        test_missing: dict | None = None,
        missing_seed: int = 0,
        missing_table_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        image_encoder: str = "dinov2-s14",
        text_encoder: str = "minilm-l6",
        image_size: int | None = None,
        max_text_len: int = 128,
        train_augment: bool = False,
        on_bad_sample: str = "error",
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.missing = {
            "train": MissingSetting.from_config(train_missing, "train_missing"),
            "test": MissingSetting.from_config(test_missing, "test_missing"),
        }
        self.missing["val"] = (
            MissingSetting.from_config(val_missing, "val_missing")
            if val_missing is not None
            else self.missing["test"]
        )
        for split in ("val", "test"):
            if self.missing[split].dynamic:
                raise ValueError(
                    f"{split}_missing.dynamic: dynamic modality dropout is for the train split only"
                )
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"on_bad_sample must be one of {list(BAD_SAMPLE_POLICIES)}, got {on_bad_sample!r}"
            )
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("max_text_len", max_text_len, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
        ):
            raise ValueError(f"image_size must be a positive integer or null, got {image_size!r}")
        self.root = None if root is None else str(root)
        self.missing_seed = int(missing_seed)
        self.missing_table_dir = missing_table_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and num_workers > 0
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.train_augment = train_augment
        self.on_bad_sample = on_bad_sample
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.datasets: dict[str, MissingModalityDataset] = {}
        self.labels_available: dict[str, bool] = {}
        self.index_time_counts: dict[str, Counter] = {}
        self.truncated_text_counts: dict[str, int] = {}
        self.missing_table_paths: dict[str, Path | None] = {}
        self.dynamic_skipped = 0
        self._dynamic_cache: tuple[int, dict[str, int]] | None = None
        self._key_of_cache: tuple[MissingModalityDataset, dict[str, str]] | None = None

    # ------------------------------------------------------------------ what subclasses provide

    def _read_split(self, split: str) -> tuple[list[SampleRecord], ImageReader]:
        """All records of ``split`` (``train`` | ``val`` | ``test``) in a deterministic order, and
        the reader that opens their images."""
        raise NotImplementedError

    def _split_file_name(self, split: str) -> str:
        """Name of ``split`` in the dataset's own terms (used in table names and seeds)."""
        return split

    def _labels_required(self, split: str) -> bool:
        """Whether unlabeled samples are an error in ``split`` (only test files may lack labels)."""
        return True

    # ------------------------------------------------------------------------------ encoder side

    @property
    def tokenizer(self):
        return cached_tokenizer(self.text_encoder)

    @property
    def data_config(self) -> dict:
        return cached_image_data_config(self.image_encoder, self.image_size)

    # ---------------------------------------------------------------------------- missing tables

    def _table_dirs(self) -> list[Path]:
        if self.missing_table_dir is not None:
            return [Path(self.missing_table_dir)]
        dirs = []
        if self.root is not None:
            dirs.append(Path(self.root) / "missing_tables")
        dirs.append(Path.cwd() / "runs" / "missing_tables" / self.dataset_name)
        return dirs

    def _table_path(self, split: str, setting: MissingSetting) -> Path:
        """Existing table in any candidate folder, else the first writable candidate."""
        name = (
            table_file_stem(self.dataset_name, self._split_file_name(split), setting, self.missing_seed)
            + ".csv"
        )
        candidates = self._table_dirs()
        for folder in candidates:
            if (folder / name).exists():
                return folder / name
        for folder in candidates:
            probe = folder
            while not probe.exists() and probe.parent != probe:
                probe = probe.parent
            if os.access(probe, os.W_OK):
                return folder / name
        raise PermissionError(
            f"no writable folder for missing tables among {[str(c) for c in candidates]}; set missing_table_dir"
        )

    # ------------------------------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        if self.root is not None and not Path(self.root).exists():
            raise FileNotFoundError(f"{type(self).__name__}: root {self.root} does not exist")

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(
            stage, SPLITS
        )
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self._build_dataset(split, *self._read_split(split))
        if stage == "test" and not self.labels_available.get("test", True):
            raise ValueError(self._no_test_labels_message())

    def _no_test_labels_message(self) -> str:
        return (
            f"{type(self).__name__}: the {self._split_file_name('test')} split has no labels, so test metrics "
            "cannot be computed. Use `predict` for predictions on it, or point the test split at a labelled file."
        )

    def _build_dataset(
        self, split: str, records: list[SampleRecord], image_reader: ImageReader
    ) -> MissingModalityDataset:
        if not records:
            raise ValueError(
                f"{type(self).__name__}: the {self._split_file_name(split)} split of {self.root} is empty"
            )
        self._check_ids_and_labels(split, records)
        n = len(records)
        flags = torch.zeros(n, dtype=torch.uint8)
        problems: list[str] = []
        image_ok = np.ones(n, dtype=bool)
        text_ok = np.ones(n, dtype=bool)
        for i, rec in enumerate(records):
            if rec.text is not None and not isinstance(rec.text, str):
                # A malformed source (a number or an object where a text belongs), not a missing text.
                raise BadSampleError(
                    f"{split} sample {rec.id!r}: field 'text' ({rec.text_source}) is a {type(rec.text).__name__} "
                    f"({str(rec.text)[:60]!r}); expected a string"
                )
            if rec.image is None or not image_reader.exists(rec.image):
                image_ok[i] = False
                flags[i] |= FLAG_IMAGE_ABSENT
                where = (
                    "no image named in the source"
                    if rec.image is None
                    else f"{image_reader.describe(rec.image)} does not exist"
                )
                problems.append(f"{split} sample {rec.id!r}: field 'image': {where}; expected an image file")
            if rec.text is None:
                text_ok[i] = False
                flags[i] |= FLAG_TEXT_ABSENT
                problems.append(
                    f"{split} sample {rec.id!r}: field 'text' absent ({rec.text_source}); expected a non-empty string"
                )
            elif not rec.text.strip():
                text_ok[i] = False
                flags[i] |= FLAG_TEXT_EMPTY
                problems.append(
                    f"{split} sample {rec.id!r}: field 'text' is empty ({rec.text_source}); expected a non-empty string"
                )
        neither = np.flatnonzero(~image_ok & ~text_ok)
        if len(neither):
            rec = records[neither[0]]
            raise BadSampleError(
                f"{len(neither)} {split} sample(s) have neither a usable image nor a usable text, e.g. {rec.id!r} "
                f"(image {image_reader.describe(rec.image) if rec.image is not None else 'not named'}, "
                f"text from {rec.text_source}); a sample needs at least one modality."
            )
        if problems and self.on_bad_sample == "error":
            shown = "\n  ".join(problems[:5])
            more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise BadSampleError(
                f"{type(self).__name__}: {len(problems)} bad input(s) in the {split} split of {self.root}:\n  {shown}{more}\n"
                "Fix the data, or set on_bad_sample: missing to count them and treat them as missing modalities."
            )

        codes = self._codes_for(split, records)
        # Never both missing: a bad input on the modality the table keeps restores the dropped one.
        image_present, text_present, overridden = presence_from_codes(codes, image_ok, text_ok)
        flags[torch.from_numpy(overridden)] |= FLAG_TABLE_OVERRIDDEN

        tokenizer = self.tokenizer
        if self.max_text_len > tokenizer.model_max_length:
            raise ValueError(
                f"max_text_len={self.max_text_len} exceeds the maximum length {tokenizer.model_max_length} of the "
                f"{self.text_encoder!r} tokenizer"
            )
        usable = np.flatnonzero(text_ok)
        encoded, truncated = self._tokenize([records[i].text for i in usable])
        self.truncated_text_counts[split] = len(truncated)
        if truncated:
            log.info(
                "%s %s split: %d text(s) longer than max_text_len=%d tokens were truncated to it, e.g. sample %r",
                type(self).__name__,
                split,
                len(truncated),
                self.max_text_len,
                records[usable[truncated[0]]].id,
            )
        lengths = np.zeros(n, dtype=np.int64)
        lengths[usable] = [len(t) for t in encoded]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = (
            np.concatenate([np.asarray(t, dtype=np.int32) for t in encoded])
            if encoded
            else np.zeros(0, np.int32)
        )
        empty_ids = empty_text_ids(tokenizer, self.max_text_len)

        data_config = self.data_config
        transform = build_image_transform(data_config, train=(split == "train"), augment=self.train_augment)
        counts = Counter()
        for bit, name in FLAG_NAMES.items():
            counts[name] = int(((flags & bit) != 0).sum())
        self.index_time_counts[split] = counts
        bad = {k: v for k, v in counts.items() if v}
        if bad:
            log.warning(
                "%s %s split: bad inputs treated as missing (on_bad_sample=missing): %s; first: %s",
                type(self).__name__,
                split,
                bad,
                problems[:3],
            )
        summary = case_counts(image_present, text_present)
        log.info(
            "%s %s split: %d samples, %s (setting %s)",
            type(self).__name__,
            split,
            n,
            summary,
            self.missing[split],
        )
        flags.share_memory_()
        return MissingModalityDataset(
            split=split,
            records=records,
            image_present=image_present,
            text_present=text_present,
            text_usable=text_ok,
            token_flat=flat,
            token_offsets=offsets,
            empty_text_ids=empty_ids,
            image_reader=image_reader,
            transform=transform,
            task=self.task,
            num_classes=self.num_classes,
            on_bad_sample=self.on_bad_sample,
            flags=flags,
        )

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of ``texts`` truncated to ``max_text_len``, and the positions of the truncated ones.

        The tokenizer reports overflow (fast tokenizers: extra rows per text, mapped back by
        ``overflow_to_sample_mapping``; slow ones: ``overflowing_tokens``); the first row of a text
        is exactly what plain truncation gives.
        """
        if not texts:
            return [], []
        out = self.tokenizer(
            texts, truncation=True, max_length=self.max_text_len, return_attention_mask=False,
            return_overflowing_tokens=True,
        )
        if "overflow_to_sample_mapping" in out:
            encoded: list = [None] * len(texts)
            truncated: set[int] = set()
            for row, index in enumerate(out["overflow_to_sample_mapping"]):
                if encoded[index] is None:
                    encoded[index] = out["input_ids"][row]
                else:
                    truncated.add(index)
            return encoded, sorted(truncated)
        overflow = out.get("overflowing_tokens") or [[] for _ in texts]
        return list(out["input_ids"]), [i for i, extra in enumerate(overflow) if len(extra)]

    def _check_ids_and_labels(self, split: str, records: list[SampleRecord]) -> None:
        seen: set[str] = set()
        for rec in records:
            if rec.id in seen:
                raise ValueError(
                    f"{type(self).__name__}: {split} sample id {rec.id!r} appears more than once ({rec.text_source})"
                )
            seen.add(rec.id)
        unlabeled = [rec for rec in records if rec.label is None]
        if unlabeled:
            if self._labels_required(split) or len(unlabeled) != len(records):
                raise ValueError(
                    f"{type(self).__name__}: {split} sample {unlabeled[0].id!r} has no label ({unlabeled[0].text_source}); "
                    f"{len(unlabeled)} of {len(records)} samples are unlabeled. Labels are required here."
                )
            self.labels_available[split] = False
            log.warning(self._no_test_labels_message())
        else:
            self.labels_available[split] = True
        for rec in records:
            if rec.label is None:
                continue
            values = rec.label if self.task == "multilabel" else (rec.label,)
            if self.task == "multilabel" and not isinstance(rec.label, tuple):
                raise TypeError(
                    f"{type(self).__name__}: multilabel record {rec.id!r} needs a tuple of class indices"
                )
            for v in values:
                if (
                    isinstance(v, bool)
                    or not isinstance(v, (int, np.integer))
                    or not 0 <= v < self.num_classes
                ):
                    raise BadSampleError(
                        f"{type(self).__name__}: {split} sample {rec.id!r} ({rec.text_source}): field 'label' is {v!r}; "
                        f"expected a class index in [0, {self.num_classes}) ({self.num_classes} classes)"
                    )

    def _unique_keys(self, records: list[SampleRecord]) -> list[str]:
        return list(dict.fromkeys(rec.key for rec in records))

    def _codes_for(self, split: str, records: list[SampleRecord]) -> np.ndarray:
        """Missing codes per record, from the persisted table of its key (all 0 for dynamic train)."""
        setting = self.missing[split]
        keys = self._unique_keys(records)
        if setting.dynamic or setting.missing_rate == 0:
            # Nothing to persist: eta = 0 is all-complete, and dynamic tables are re-drawn each epoch.
            self.missing_table_paths[split] = None
            key_codes = np.zeros(len(keys), dtype=np.int8)
        else:
            path = self._table_path(split, setting)
            self.missing_table_paths[split] = path
            key_codes = load_or_create_missing_table(
                path,
                keys,
                dataset=self.dataset_name,
                split=self._split_file_name(split),
                setting=setting,
                seed=self.missing_seed,
            )
        by_key = dict(zip(keys, key_codes.tolist(), strict=True))
        return np.array([by_key[rec.key] for rec in records], dtype=np.int8)

    # -------------------------------------------------------------------------- dynamic dropout

    def dynamic_codes(self, epoch: int) -> dict[str, int]:
        """Train codes of ``epoch`` by key: exact protocol counts, drawn from ``(missing_seed, epoch)``."""
        if self._dynamic_cache is not None and self._dynamic_cache[0] == epoch:
            return self._dynamic_cache[1]
        setting = self.missing["train"]
        keys = self.datasets["train"].keys
        keys = list(dict.fromkeys(keys))
        codes = sample_missing_table(
            keys,
            setting.missing_rate,
            setting.missing_type,
            setting.both_ratio,
            seed=self.missing_seed,
            dataset=self.dataset_name,
            split=self._split_file_name("train"),
            epoch=epoch,
        )
        table = dict(zip(keys, codes.tolist(), strict=True))
        self._dynamic_cache = (epoch, table)
        return table

    def apply_dynamic_missing(self, batch: dict, epoch: int) -> dict:
        """Drop modalities of a train batch by the table of ``epoch`` (in place; returns the batch).

        A drop is applied only where both modalities are present; a sample already missing one
        (a bad input) keeps the other, and the skipped drop is counted in ``dynamic_skipped``.
        """
        table = self.dynamic_codes(epoch)
        key_of = self._train_key_of()
        empty = self.datasets["train"].empty_text_ids
        for row, sample_id in enumerate(batch[ID]):
            code = table[key_of[sample_id]]
            if code == 0:
                continue
            if not (batch[IMAGE_PRESENT][row] and batch[TEXT_PRESENT][row]):
                self.dynamic_skipped += 1
                continue
            if code == IMAGE_MISSING:
                batch[IMAGE][row] = IMAGE_FILLER_VALUE
                batch[IMAGE_PRESENT][row] = False
            elif code == TEXT_MISSING:
                batch[INPUT_IDS][row] = self.tokenizer.pad_token_id
                batch[INPUT_IDS][row, : len(empty)] = empty.to(batch[INPUT_IDS].device)
                batch[ATTENTION_MASK][row] = 0
                batch[ATTENTION_MASK][row, : len(empty)] = 1
                batch[TEXT_PRESENT][row] = False
        return batch

    def _train_key_of(self) -> dict[str, str]:
        ds = self.datasets["train"]
        if self._key_of_cache is None or self._key_of_cache[0] is not ds:
            self._key_of_cache = (ds, dict(zip(ds.ids, ds.keys, strict=True)))
        return self._key_of_cache[1]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if (
            trainer is not None
            and trainer.training
            and self.missing["train"].dynamic
            and self.missing["train"].missing_rate > 0
        ):
            return self.apply_dynamic_missing(batch, trainer.current_epoch)
        return batch

    # ----------------------------------------------------------------------------- dataloaders

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """The loader of ``split``: resumable (seeded per-epoch order, position checkpointed) for
        train, every sample exactly once with equal batch counts per process for evaluation (see
        :mod:`datamodules.sampling`). ``shuffle`` applies to train only."""
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        dataset = self.datasets[split]
        seed = self.shuffle_seed if self.shuffle_seed is not None else default_shuffle_seed()
        common = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=self.collate_fn(),
            # Own generator for worker seeds: iterating never advances the global random state.
            generator=torch.Generator().manual_seed(seed),
        )
        if split == "train":
            world, rank = self._train_shards()
            sampler = EpochShuffleSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
            return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **common)
        batches = EvenShardBatchSampler(SequentialSampler(dataset), self.batch_size)
        return DataLoader(dataset, batch_sampler=batches, **common)

    def _train_shards(self) -> tuple[int, int]:
        """(processes, rank) to shard the train split over: the Trainer's when it distributes the
        data (``use_distributed_sampler``, Lightning's default), else (1, 0)."""
        trainer = self.trainer
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        if world <= 1:
            return 1, 0
        connector = getattr(trainer, "_accelerator_connector", None)
        if not getattr(connector, "use_distributed_sampler", True):
            return 1, 0
        return world, trainer.global_rank

    def collate_fn(self) -> MissingModalityCollate:
        """The collate function of every loader (padding, batched normalisation, fillers)."""
        config = self.data_config
        return MissingModalityCollate(
            self.tokenizer.pad_token_id, self.task, config["mean"], config["std"], config["input_size"][1:]
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not self.labels_available.get("test", True):
            raise ValueError(self._no_test_labels_message())
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            self.setup("predict")
        return self._loader("test", shuffle=False)

    # --------------------------------------------------------------------------------- reporting

    @property
    def bad_sample_counts(self) -> dict[str, dict[str, int]]:
        """Per split, samples per bad-input reason (index-time and load-time ones found so far).

        Reasons: ``image_absent``, ``image_unreadable``, ``text_absent``, ``text_empty`` and
        ``table_overridden`` (the table's drop was undone to keep one modality). Load-time finds in
        worker processes are visible here (the flags live in shared memory). Each sample counts
        once per reason, however many epochs revisit it.
        """
        out = {}
        for split, ds in self.datasets.items():
            out[split] = {name: int(((ds.flags & bit) != 0).sum()) for bit, name in FLAG_NAMES.items()}
        return out

    def bad_sample_ids(self, split: str, reason: str) -> list[str]:
        """Ids of the ``split`` samples flagged with ``reason`` (a key of ``bad_sample_counts``)."""
        bit = {v: k for k, v in FLAG_NAMES.items()}[reason]
        ds = self.datasets[split]
        return [ds.ids[i] for i in torch.nonzero((ds.flags & bit) != 0).flatten().tolist()]

    def missing_summary(self, split: str) -> dict[str, int]:
        """Samples of ``split`` per code as set up (before load-time findings): complete/text/image missing."""
        ds = self.datasets[split]
        return case_counts(ds.image_present, ds.text_present)

    def teardown(self, stage: str) -> None:
        counts = {s: {k: v for k, v in c.items() if v} for s, c in self.bad_sample_counts.items()}
        counts = {s: c for s, c in counts.items() if c}
        if counts or self.dynamic_skipped:
            log.warning(
                "%s bad inputs treated as missing so far: %s; dynamic drops skipped (sample already missing one "
                "modality): %d",
                type(self).__name__,
                counts,
                self.dynamic_skipped,
            )

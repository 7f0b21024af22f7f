"""``MissingModalityDataModule``: the shared machinery of every unipair DataModule.

A dataset subclass only says how to list its samples and open their images (``_read_split``) and
what its labels are. This base class turns those lists into the batches of the project (the
contract is :mod:`datamodules.batch`), applying the missing-modality protocol
(:mod:`datamodules.missing`) and the bad-input policy (:mod:`datamodules.checks`).

``on_bad_sample="error"`` raises :class:`BadSampleError` naming the file, the sample id, the field
and what was expected. ``"missing"`` treats the modality as missing (the filler goes in, the
presence flag is False), counts it per split and reason (``datamodule.bad_sample_counts``), logs a
warning per sample when found and a summary at setup and teardown. Nothing is dropped.

A sample never loses both modalities. If a bad input hits the modality the missing table keeps
while the table drops the other one, the table's drop is *not* applied for that sample (its other
modality is restored) and the event is counted as ``table_overridden``; the protocol counts of that
split are then off by that many samples, which the summary says. A sample whose image *and* text
are both bad is always an error.

A subclass may also declare modalities that are absent *by nature* (``_natural_absence``: a
manifest row without a photo): those are missing, never bad inputs, and counted per split in
``natural_missing_counts``.
"""

from __future__ import annotations

import itertools
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
from torch.utils.data import DataLoader, SequentialSampler

from datamodules.batch import SPLITS, Split, case_counts, empty_text_ids, presence_from_codes
from datamodules.checks import (
    FLAG_IMAGE_UNREADABLE,
    FLAG_NAMES,
    FLAG_TABLE_OVERRIDDEN,
    BadSamplePolicy,
    check_choice,
    check_labels,
    check_modalities,
    check_unique_ids,
    flag_counts,
)
from datamodules.collate import MissingModalityCollate
from datamodules.dataset import MissingModalityDataset
from datamodules.dynamic import drop_modalities, epoch_codes
from datamodules.logs import log_rank_zero
from datamodules.missing import (
    MissingConfig,
    MissingSetting,
    load_or_create_missing_table,
    table_file_stem,
)
from datamodules.preprocessing import cached_image_data_config, cached_tokenizer
from datamodules.records import ImageReader, SampleRecord
from datamodules.sampling import (
    EpochShuffleSampler,
    EvenShardBatchSampler,
    ResumableDataLoader,
    default_shuffle_seed,
)
from datamodules.transforms import build_image_transform

log = logging.getLogger(__name__)

# Texts per tokenizer call: the tokenizer's per-text objects of one call stay small in memory.
TOKENIZE_CHUNK = 8192
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


@dataclass(frozen=True)
class SplitPresence:
    """Presence of every sample of a split under one missing setting (arrays in dataset order).

    Attributes:
        ids: Sample ids (``batch["id"]`` values).
        keys: Missing-table keys (equal to ``ids`` except for rows that share an item's code).
        codes: int8 code per sample from the setting's table (0 complete, 1 text, 2 image missing).
        image_present: bool, the image is used under the setting.
        text_present: bool, the text is used under the setting.
        overridden: bool, the table's drop was undone so that the sample keeps one modality.
    """

    ids: list[str]
    keys: list[str]
    codes: np.ndarray
    image_present: np.ndarray
    text_present: np.ndarray
    overridden: np.ndarray


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
    # Appended to the error of a checkpoint trained with other classes: how a reader's user fixes it.
    classes_mismatch_hint: str = ""

    def __init__(
        self,
        root: str | None = None,
        train_missing: MissingConfig | None = None,
        val_missing: MissingConfig | None = None,
        test_missing: MissingConfig | None = None,
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
        on_bad_sample: BadSamplePolicy = "error",
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
        check_choice("on_bad_sample", on_bad_sample, BadSamplePolicy)
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
        self.natural_missing_counts: dict[str, dict[str, int]] = {}
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

    def _natural_absence(
        self, split: str, records: list[SampleRecord]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Per record, whether its image / text is absent by nature (not a bad input); ``None``: never.

        Such a modality is missing without being counted as a bad input and whatever
        ``on_bad_sample`` says; it is counted in ``natural_missing_counts``.
        """
        return None

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
            f"no writable folder for missing tables among {[str(c) for c in candidates]}; "
            "set missing_table_dir"
        )

    def _table_codes(
        self, split: str, keys: Sequence[str], setting: MissingSetting
    ) -> tuple[np.ndarray, Path | None]:
        """Codes per record key under ``setting`` (from its persisted table), and the table's path.

        All zeros and no table for eta = 0 and for dynamic settings (re-drawn each epoch).
        """
        unique = list(dict.fromkeys(keys))
        if setting.dynamic or setting.missing_rate == 0:
            return np.zeros(len(keys), dtype=np.int8), None
        path = self._table_path(split, setting)
        key_codes = load_or_create_missing_table(
            path,
            unique,
            dataset=self.dataset_name,
            split=self._split_file_name(split),
            setting=setting,
            seed=self.missing_seed,
        )
        by_key = dict(zip(unique, key_codes.tolist(), strict=True))
        return np.array([by_key[k] for k in keys], dtype=np.int8), path

    def _codes_for(self, split: str, records: list[SampleRecord]) -> np.ndarray:
        """Missing codes per record under the split's own setting (all 0 for dynamic train)."""
        codes, path = self._table_codes(split, [rec.key for rec in records], self.missing[split])
        self.missing_table_paths[split] = path
        return codes

    def presence_masks(
        self,
        split: Split = "test",
        setting: MissingConfig | MissingSetting | None = None,
        image_usable: np.ndarray | torch.Tensor | None = None,
        text_usable: np.ndarray | torch.Tensor | None = None,
    ) -> SplitPresence:
        """Which modality every sample of ``split`` has under a missing ``setting``: for evaluation.

        The codes come from the table ``unipair test`` would use with ``test_missing: setting``
        (same folder, name, seed, dataset and split name; reloaded, or drawn and saved), and the
        masks follow the DataModule's rule: a modality the data do not provide stays missing, and a
        drop that would leave neither modality is undone. The split is set up if it is not yet;
        its own missing setting does not matter (use a copy with eta = 0 to load complete inputs).

        Args:
            split: ``train``, ``val`` or ``test``.
            setting: The missing setting (keys as ``test_missing``); ``None``: the split's own.
                Dynamic settings have no fixed table (see :meth:`dynamic_codes`) and are an error.
            image_usable: Per sample (dataset order), whether the image can be used; ``None``: the
                index-time checks minus the images found unreadable while loading so far. Pass what
                an evaluation loop saw (``image_present`` of complete batches) to include later finds.
            text_usable: Per sample, whether the text can be used; ``None``: the index-time checks.

        Returns:
            :class:`SplitPresence` (NumPy arrays in dataset order, i.e. the order of the
            split's evaluation loader).
        """
        check_choice("split", split, Split)
        given = setting if isinstance(setting, MissingSetting) else None
        if given is None:
            given = self.missing[split] if setting is None else MissingSetting.from_config(setting, "setting")
        if given.dynamic:
            raise ValueError("presence_masks: a dynamic setting has no fixed table; use dynamic_codes(epoch)")
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        ds = self.datasets[split]
        codes, _ = self._table_codes(split, ds.keys, given)
        if image_usable is None:
            image_usable = ds.image_usable & ~((ds.flags & FLAG_IMAGE_UNREADABLE) != 0).numpy()
        image_usable = np.asarray(image_usable, dtype=bool)
        text_usable = np.asarray(ds.text_usable if text_usable is None else text_usable, dtype=bool)
        if image_usable.shape != codes.shape or text_usable.shape != codes.shape:
            raise ValueError(
                f"presence_masks: image_usable / text_usable need one value per {split} sample "
                f"({len(codes)}), "
                f"got shapes {image_usable.shape} / {text_usable.shape}"
            )
        image_present, text_present, overridden = presence_from_codes(codes, image_usable, text_usable)
        return SplitPresence(list(ds.ids), list(ds.keys), codes, image_present, text_present, overridden)

    # ------------------------------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        if self.root is not None and not Path(self.root).exists():
            raise FileNotFoundError(f"{type(self).__name__}: root {self.root} does not exist")

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split not in self.datasets:
                self.datasets[split] = self._build_dataset(split, *self._read_split(split))
        if stage == "test" and not self.labels_available.get("test", True):
            raise ValueError(self._no_test_labels_message())

    def _no_test_labels_message(self) -> str:
        return (
            f"{type(self).__name__}: the {self._split_file_name('test')} split has no labels, so test "
            "metrics cannot be computed. Use `predict` for predictions on it, or point the test split at a "
            "labelled file."
        )

    def _build_dataset(
        self, split: str, records: list[SampleRecord], image_reader: ImageReader
    ) -> MissingModalityDataset:
        owner = type(self).__name__
        if not records:
            raise ValueError(f"{owner}: the {self._split_file_name(split)} split of {self.root} is empty")
        self._check_ids_and_labels(split, records)
        natural = self._natural_absence(split, records)
        found = check_modalities(split, records, image_reader, self.on_bad_sample, owner, self.root, natural)
        image_ok, text_ok, flags = found.image_ok, found.text_ok, found.flags
        if natural is not None:
            self.natural_missing_counts[split] = {
                "image": int(natural[0].sum()),
                "text": int(natural[1].sum()),
            }

        codes = self._codes_for(split, records)
        # Never both missing: a bad input on the modality the table keeps restores the dropped one.
        image_present, text_present, overridden = presence_from_codes(codes, image_ok, text_ok)
        flags[torch.from_numpy(overridden)] |= FLAG_TABLE_OVERRIDDEN

        flat, offsets = self._tokenize_split(split, records, text_ok)
        transform = build_image_transform(
            self.data_config, train=(split == "train"), augment=self.train_augment
        )
        counts = Counter(flag_counts(flags))
        self.index_time_counts[split] = counts
        bad = {k: v for k, v in counts.items() if v}
        if bad:
            log_rank_zero(
                log,
                logging.WARNING,
                "%s %s split: bad inputs treated as missing (on_bad_sample=missing): %s; first: %s",
                owner,
                split,
                bad,
                found.problems[:3],
            )
        natural_text = ""
        if natural is not None:
            natural_text = f", absent by nature {self.natural_missing_counts[split]}"
        log_rank_zero(
            log,
            logging.INFO,
            "%s %s split: %d samples, %s (setting %s)%s",
            owner,
            split,
            len(records),
            case_counts(image_present, text_present),
            self.missing[split],
            natural_text,
        )
        flags.share_memory_()
        return MissingModalityDataset(
            split=split,
            records=records,
            image_present=image_present,
            text_present=text_present,
            image_usable=image_ok,
            text_usable=text_ok,
            token_flat=flat,
            token_offsets=offsets,
            empty_text_ids=empty_text_ids(self.tokenizer, self.max_text_len),
            image_reader=image_reader,
            transform=transform,
            task=self.task,
            num_classes=self.num_classes,
            on_bad_sample=self.on_bad_sample,
            flags=flags,
        )

    def _tokenize_split(
        self, split: str, records: list[SampleRecord], text_ok: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of the usable texts as one flat int32 array and per-record offsets into it
        (tokenised in chunks of :data:`TOKENIZE_CHUNK` texts)."""
        tokenizer = self.tokenizer
        if self.max_text_len > tokenizer.model_max_length:
            raise ValueError(
                f"max_text_len={self.max_text_len} exceeds the maximum length {tokenizer.model_max_length} "
                f"of the {self.text_encoder!r} tokenizer"
            )
        usable = np.flatnonzero(text_ok)
        lengths = np.zeros(len(records), dtype=np.int64)
        chunks, truncated = [np.zeros(0, np.int32)], []
        for start in range(0, len(usable), TOKENIZE_CHUNK):
            rows = usable[start : start + TOKENIZE_CHUNK]
            encoded, cut = self._tokenize([records[i].text for i in rows])
            lengths[rows] = [len(t) for t in encoded]
            chunks.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32))
            truncated += [start + i for i in cut]
        self.truncated_text_counts[split] = len(truncated)
        if truncated:
            log_rank_zero(
                log,
                logging.INFO,
                "%s %s split: %d text(s) longer than max_text_len=%d tokens were truncated to it, "
                "e.g. sample %r",
                type(self).__name__,
                split,
                len(truncated),
                self.max_text_len,
                records[usable[truncated[0]]].id,
            )
        return np.concatenate(chunks), np.concatenate([[0], np.cumsum(lengths)])

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of ``texts`` truncated to ``max_text_len``, and the positions of the truncated ones.

        The tokenizer reports overflow (fast tokenizers: extra rows per text, mapped back by
        ``overflow_to_sample_mapping``; slow ones: ``overflowing_tokens``); the first row of a text
        is exactly what plain truncation gives.
        """
        if not texts:
            return [], []
        out = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_text_len,
            return_attention_mask=False,
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
        owner = type(self).__name__
        check_unique_ids(split, records, owner)
        unlabeled = [rec for rec in records if rec.label is None]
        if unlabeled:
            if self._labels_required(split) or len(unlabeled) != len(records):
                raise ValueError(
                    f"{owner}: {split} sample {unlabeled[0].id!r} has no label ({unlabeled[0].text_source}); "
                    f"{len(unlabeled)} of {len(records)} samples are unlabeled. Labels are required here."
                )
            self.labels_available[split] = False
            log_rank_zero(log, logging.WARNING, self._no_test_labels_message())
        else:
            self.labels_available[split] = True
        check_labels(split, records, self.task, self.num_classes, owner)

    # -------------------------------------------------------------------------- dynamic dropout

    def dynamic_codes(self, epoch: int) -> dict[str, int]:
        """Train codes of ``epoch`` by key: exact protocol counts, drawn from ``(missing_seed, epoch)``."""
        if self._dynamic_cache is None or self._dynamic_cache[0] != epoch:
            table = epoch_codes(
                self.datasets["train"].keys,
                self.missing["train"],
                seed=self.missing_seed,
                dataset=self.dataset_name,
                split=self._split_file_name("train"),
                epoch=epoch,
            )
            self._dynamic_cache = (epoch, table)
        return self._dynamic_cache[1]

    def apply_dynamic_missing(self, batch: dict, epoch: int) -> dict:
        """Drop modalities of a train batch by the table of ``epoch`` (in place; returns the batch).

        A drop is applied only where both modalities are present; a sample already missing one
        (a bad input) keeps the other, and the skipped drop is counted in ``dynamic_skipped``.
        """
        table = self.dynamic_codes(epoch)
        key_of = self._train_key_of()
        codes = [table[key_of[sample_id]] for sample_id in batch["id"]]
        empty = self.datasets["train"].empty_text_ids
        self.dynamic_skipped += drop_modalities(batch, codes, empty, self.tokenizer.pad_token_id)
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

    # ------------------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records of the data: the task and the class names, in logit order."""
        return {"classes": list(self.label_names), "task": self.task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint restores only into the same task and class names: the logits' meaning."""
        saved = {"classes": list(state_dict.get("classes", [])), "task": state_dict.get("task")}
        if saved != self.state_dict():
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was trained with task {saved['task']!r} and classes "
                f"{saved['classes'][:20]}, but this data gives task {self.task!r} and classes "
                f"{self.label_names[:20]}.{self.classes_mismatch_hint}"
            )

    # --------------------------------------------------------------------------------- reporting

    @property
    def bad_sample_counts(self) -> dict[str, dict[str, int]]:
        """Per split, samples per bad-input reason (index-time and load-time ones found so far).

        Reasons: ``image_absent``, ``image_unreadable``, ``text_absent``, ``text_empty`` and
        ``table_overridden`` (the table's drop was undone to keep one modality). Load-time finds in
        worker processes are visible here (the flags live in shared memory). Each sample counts
        once per reason, however many epochs revisit it.
        """
        return {split: flag_counts(ds.flags) for split, ds in self.datasets.items()}

    def bad_sample_ids(self, split: str, reason: str) -> list[str]:
        """Ids of the ``split`` samples flagged with ``reason`` (a key of ``bad_sample_counts``)."""
        bit = {v: k for k, v in FLAG_NAMES.items()}[reason]
        ds = self.datasets[split]
        return [ds.ids[i] for i in torch.nonzero((ds.flags & bit) != 0).flatten().tolist()]

    def missing_summary(self, split: str) -> dict[str, int]:
        """Samples of ``split`` per case as set up (before load-time findings)."""
        ds = self.datasets[split]
        return case_counts(ds.image_present, ds.text_present)

    def teardown(self, stage: str) -> None:
        counts = {s: {k: v for k, v in c.items() if v} for s, c in self.bad_sample_counts.items()}
        counts = {s: c for s, c in counts.items() if c}
        if counts or self.dynamic_skipped:
            log_rank_zero(
                log,
                logging.WARNING,
                "%s bad inputs treated as missing so far: %s; dynamic drops skipped (sample already "
                "missing one modality): %d",
                type(self).__name__,
                counts,
                self.dynamic_skipped,
            )

"""LightningDataModules: datasets, missing-modality simulation, collation.

Public classes: :class:`MissingModalityDataModule` (the base), :class:`MMIMDbDataModule`,
:class:`Food101DataModule`, :class:`HatefulMemesDataModule`, :class:`EmojiDataModule`,
:class:`ManifestDataModule` (your own CSV / JSONL / Parquet records); the batch
contract is :mod:`datamodules.batch`, the pure protocol functions live in :mod:`datamodules.missing`.
"""

from datamodules.base import BadSampleError, MissingModalityDataModule, SplitPresence
from datamodules.emoji import EmojiDataModule
from datamodules.food101 import Food101DataModule
from datamodules.hateful_memes import HatefulMemesDataModule
from datamodules.manifest import ManifestDataModule
from datamodules.missing import MissingConfig, MissingSetting, MissingTableError, sample_missing_table
from datamodules.mmimdb import MMIMDbDataModule

__all__ = [
    "BadSampleError",
    "EmojiDataModule",
    "Food101DataModule",
    "HatefulMemesDataModule",
    "MMIMDbDataModule",
    "ManifestDataModule",
    "MissingConfig",
    "MissingModalityDataModule",
    "MissingSetting",
    "MissingTableError",
    "SplitPresence",
    "sample_missing_table",
]

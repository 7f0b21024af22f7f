"""The shared DataModule machinery, re-exported from where each concern lives.

- :mod:`datamodules.records`: :class:`SampleRecord`, image readers, :class:`BadSampleError`,
  :func:`read_text_file`;
- :mod:`datamodules.checks`: index-time bad-input checks and their per-sample flags;
- :mod:`datamodules.dataset`: :class:`MissingModalityDataset` (load-time checks);
- :mod:`datamodules.dynamic`: dynamic modality dropout;
- :mod:`datamodules.datamodule`: :class:`MissingModalityDataModule`;
- :mod:`datamodules.batch`: the batch contract (fields, codes, fillers, ``SPLITS``, ``TASKS``).

Everything that was importable from ``datamodules.base`` still is.
"""

from __future__ import annotations

from typing import get_args

from datamodules.batch import NO_LABEL, SPLITS, TASKS
from datamodules.checks import (
    FLAG_IMAGE_ABSENT,
    FLAG_IMAGE_UNREADABLE,
    FLAG_NAMES,
    FLAG_TABLE_OVERRIDDEN,
    FLAG_TEXT_ABSENT,
    FLAG_TEXT_EMPTY,
    BadSamplePolicy,
)
from datamodules.datamodule import MissingModalityDataModule, SplitPresence
from datamodules.dataset import MissingModalityDataset
from datamodules.records import BadSampleError, FileImageReader, ImageReader, SampleRecord, read_text_file

BAD_SAMPLE_POLICIES = get_args(BadSamplePolicy)

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "FLAG_IMAGE_ABSENT",
    "FLAG_IMAGE_UNREADABLE",
    "FLAG_NAMES",
    "FLAG_TABLE_OVERRIDDEN",
    "FLAG_TEXT_ABSENT",
    "FLAG_TEXT_EMPTY",
    "NO_LABEL",
    "SPLITS",
    "TASKS",
    "BadSampleError",
    "FileImageReader",
    "ImageReader",
    "MissingModalityDataModule",
    "MissingModalityDataset",
    "SampleRecord",
    "SplitPresence",
    "read_text_file",
]

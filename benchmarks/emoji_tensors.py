"""The emoji splits decoded once into tensors: what every ablation cell trains and evaluates on.

Shared by ``benchmarks.ablation`` (which builds it from the asset cache) and
``benchmarks.device_pack`` (which checks a pack against it).
"""

from __future__ import annotations

from typing import Any

import torch


def build_tensors_from_datamodule(settings: dict[str, Any], root: str | None) -> dict[str, Any]:
    """Decode the emoji splits through ``EmojiDataModule`` into tensors, with the protocol's presence masks.

    Images and tokens are exactly what the DataModule's loaders yield: its dataset items (per-sample
    transform, tokens) through its own collate function (batched normalisation, padding); the
    presence masks come from its missing tables (persisted next to the data, seed ``missing_seed``).
    """
    from datamodules.emoji import EmojiDataModule

    common = {
        "root": root,
        "image_size": settings["image_size"],
        "max_text_len": settings["max_text_len"],
        "label": settings["label"],
        "missing_seed": settings["missing_seed"],
        "num_workers": 0,
    }
    complete = EmojiDataModule(**common)
    complete.setup()
    collate = complete.collate_fn()
    splits = {}
    for split in ("train", "val", "test"):
        ds = complete.datasets[split]
        items = [ds[i] for i in range(len(ds))]
        if not all(item["image_present"] and item["text_present"] for item in items):
            raise RuntimeError(f"emoji {split}: expected every sample complete at eta = 0")
        batch = collate(items)
        if batch["id"] != list(ds.ids):
            raise RuntimeError(f"emoji {split}: collated ids differ from the dataset's order")
        splits[split] = {
            "ids": list(ds.ids),
            "keys": list(ds.keys),
            "labels": batch["label"],
            "images": batch["image"],
            "input_ids": batch["input_ids"],
            "lengths": batch["attention_mask"].sum(dim=1),
        }
    presence = {}
    for missing_type in ("text", "image", "both"):
        setting = {"missing_rate": 0.7, "missing_type": missing_type}
        dm = EmojiDataModule(**common, train_missing=setting, val_missing=setting, test_missing=setting)
        dm.setup()
        for split in ("train", "val", "test"):
            ds = dm.datasets[split]
            if list(ds.ids) != splits[split]["ids"]:
                raise RuntimeError(f"emoji {split}: sample order differs between DataModule constructions")
            presence[f"{split}/{missing_type}/0.7"] = (
                torch.from_numpy(ds.image_present.copy()),
                torch.from_numpy(ds.text_present.copy()),
            )
    empty = complete.datasets["train"].empty_text_ids
    return {
        "settings": settings,
        "source": "EmojiDataModule",
        "label_names": list(complete.label_names),
        "num_classes": int(complete.num_classes),
        "pad_id": int(complete.tokenizer.pad_token_id),
        "empty_ids": [int(t) for t in empty.tolist()],
        "transform": repr(complete.datasets["train"].transform),
        "splits": splits,
        "presence": presence,
    }

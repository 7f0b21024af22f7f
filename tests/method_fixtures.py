"""Tiny models and a learnable synthetic image+text task for the method's tests (no network, no files).

The synthetic task: class c has a fixed random image template and a fixed set of word ids; an
image is its template plus noise, a text is words drawn from its set. Either modality alone is
enough to learn the class. Missing inputs carry the fillers of the batch format (all-ones image,
tokenised empty string).
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_modules import UnipairSystem

IMG_SIZE = 32
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0  # MiniLM's tokenizer (tiny-bert shares it)
# Missing-pattern codes: 0 complete, 1 text missing, 2 image missing.
COMPLETE, TEXT_MISSING, IMAGE_MISSING = 0, 1, 2


def quiet_trainer(tmp_path, **overrides) -> Trainer:
    """A one-device CPU Trainer that writes nothing but under ``tmp_path`` (no logger, bars, checkpoints)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    return Trainer(**{**options, **overrides})


def tiny_system(**overrides) -> UnipairSystem:
    """A UnipairSystem on timm ``test_vit`` (32 px) and ``tiny-bert``, random-initialised."""
    kwargs = dict(
        task="multiclass",
        num_classes=3,
        image_backbone="test_vit",
        text_backbone="tiny-bert",
        pretrained=False,
        img_size=IMG_SIZE,
        prompt_length=2,
        prompt_depth=2,
        predictor_length=2,
        predictor_hidden_dim=16,
        head_hidden_dim=16,
        lr=1e-2,
        warmup_fraction=0.0,
    )
    kwargs.update(overrides)
    return UnipairSystem(**kwargs)


class SyntheticPairs(Dataset):
    """``num_samples`` samples of the synthetic task with the given missing codes (cycled)."""

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 3,
        task: str = "multiclass",
        missing_codes: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        templates = torch.randn(
            num_classes, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(1234)
        )
        words = torch.arange(2000, 2000 + 5 * num_classes).view(num_classes, 5)
        self.task, self.num_classes = task, num_classes
        self.classes = torch.randint(0, num_classes, (num_samples,), generator=generator)
        self.images = templates[self.classes] + 0.5 * torch.randn(
            num_samples, 3, IMG_SIZE, IMG_SIZE, generator=generator
        )
        lengths = torch.randint(2, 7, (num_samples,), generator=generator)
        self.texts = [
            words[c][torch.randint(0, 5, (int(n),), generator=generator)]
            for c, n in zip(self.classes, lengths, strict=True)
        ]
        codes = missing_codes or [COMPLETE]
        self.codes = [codes[i % len(codes)] for i in range(num_samples)]

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> dict:
        code = self.codes[index]
        image_present, text_present = code != IMAGE_MISSING, code != TEXT_MISSING
        image = self.images[index] if image_present else torch.ones(3, IMG_SIZE, IMG_SIZE)
        words = self.texts[index] if text_present else torch.zeros(0, dtype=torch.long)
        c = int(self.classes[index])
        if self.task == "multilabel":
            label = torch.zeros(self.num_classes)
            label[c] = 1.0
            label[(c + 1) % self.num_classes] = 1.0
        else:
            label = torch.tensor(c)
        return {
            "image": image,
            "input_ids": torch.cat([torch.tensor([CLS_ID]), words, torch.tensor([SEP_ID])]),
            "image_present": image_present,
            "text_present": text_present,
            "label": label,
            "id": f"synthetic-{index}",
        }


def collate(samples: list[dict]) -> dict:
    """The project's batch format: padded token ids with attention mask, presence masks, labels, ids."""
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        attention_mask[row, :n] = 1
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_present": torch.tensor([s["image_present"] for s in samples]),
        "text_present": torch.tensor([s["text_present"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "id": [s["id"] for s in samples],
    }


class SyntheticDataModule(LightningDataModule):
    """Train / val / test on the synthetic task (val and test: a mix of all three missing cases)."""

    def __init__(
        self,
        num_train: int = 48,
        num_eval: int = 24,
        batch_size: int = 8,
        task: str = "multiclass",
        num_classes: int = 3,
        train_missing: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.task, self.num_classes, self.batch_size = task, num_classes, batch_size
        mixed = [COMPLETE, TEXT_MISSING, COMPLETE, IMAGE_MISSING]
        self.train_set = SyntheticPairs(num_train, num_classes, task, train_missing, seed=0)
        self.val_set = SyntheticPairs(num_eval, num_classes, task, mixed, seed=1)
        self.test_set = SyntheticPairs(num_eval, num_classes, task, mixed, seed=2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, collate_fn=collate)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

"""Throughput of the emoji DataLoader alone, optionally next to one training step of the default system.

    python -m benchmarks.loader_speed                       # workers 0 and 2, batch 32, 112 px
    python -m benchmarks.loader_speed --train-step          # also time a forward+backward+step

What is measured, per ``num_workers``: batches per second over full passes of the emoji train split
(1,335 items, shuffled), first pass (worker start-up included) and later passes (persistent workers),
with the MiniLM-L6 tokenizer and the DINOv2-S/14 image config at ``--image-size``. Also: the cost of
tokenising a batch of texts in the collate function versus padding token ids cached at setup (what
the DataModules do). ``--train-step`` times ``UnipairSystem.training_step`` + backward + AdamW step
on one batch (random-initialised encoders of the same architecture: the compute is the same).
Prints one JSON object (and a human-readable summary on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks import benchutil
from datamodules.emoji import EmojiDataModule

ROOT = Path(__file__).resolve().parents[1]


def loader_rates(workers: int, args: argparse.Namespace) -> dict:
    dm = EmojiDataModule(
        image_encoder=args.image_encoder,
        text_encoder=args.text_encoder,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=workers,
        pin_memory=False,
        missing_table_dir=args.table_dir,
        train_missing={"missing_rate": args.missing_rate, "missing_type": "both"},
    )
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    passes = []
    for _ in range(args.passes):
        start = time.perf_counter()
        n = sum(1 for _ in loader)
        passes.append(n / (time.perf_counter() - start))
    return {
        "num_workers": workers,
        "batches_per_pass": len(loader),
        "first_pass_batches_per_s": round(passes[0], 2),
        "later_passes_batches_per_s": [round(p, 2) for p in passes[1:]],
    }


def tokenise_cost(args: argparse.Namespace) -> dict:
    """Seconds per batch: tokenising in collate vs padding cached ids (the DataModules' way)."""
    dm = EmojiDataModule(
        image_encoder=args.image_encoder,
        text_encoder=args.text_encoder,
        image_size=args.image_size,
        batch_size=args.batch_size,
        missing_table_dir=args.table_dir,
    )
    dm.setup("fit")
    ds = dm.datasets["train"]
    from datamodules.emoji_source import load_emoji_items

    texts = {x.id: x.text for x in load_emoji_items()}
    batch_texts = [texts[i] for i in ds.ids[: args.batch_size]]
    items = [{"input_ids": ds.token_ids(i)} for i in range(args.batch_size)]
    collate = dm.collate_fn()
    repeats = 200

    start = time.perf_counter()
    for _ in range(repeats):
        dm.tokenizer(
            batch_texts, padding=True, truncation=True, max_length=dm.max_text_len, return_tensors="pt"
        )
    per_batch_tokenise = (time.perf_counter() - start) / repeats

    from torch.nn.utils.rnn import pad_sequence

    start = time.perf_counter()
    for _ in range(repeats):
        ids = pad_sequence(
            [it["input_ids"] for it in items], batch_first=True, padding_value=collate.pad_token_id
        )
        (ids != collate.pad_token_id).long()
    per_batch_cached = (time.perf_counter() - start) / repeats
    return {
        "tokenise_in_collate_ms": round(1000 * per_batch_tokenise, 3),
        "pad_cached_ids_ms": round(1000 * per_batch_cached, 3),
    }


def train_step_time(args: argparse.Namespace) -> dict:
    from lightning_modules.system import UnipairSystem

    dm = EmojiDataModule(
        image_encoder=args.image_encoder,
        text_encoder=args.text_encoder,
        image_size=args.image_size,
        batch_size=args.batch_size,
        missing_table_dir=args.table_dir,
        train_missing={"missing_rate": args.missing_rate, "missing_type": "both"},
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    system = UnipairSystem(
        task="multiclass",
        num_classes=dm.num_classes,
        image_backbone=args.image_encoder,
        text_backbone=args.text_encoder,
        pretrained=False,
        img_size=args.image_size,
    )
    system.train()
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-4)
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        for _ in range(args.step_repeats + 1):
            start = time.perf_counter()
            loss = system.training_step(batch, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    steady = sorted(times[1:])[len(times[1:]) // 2]
    return {
        "train_step_s_median": round(steady, 3),
        "train_steps_per_s": round(1 / steady, 3),
        "first_step_s": round(times[0], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--image-encoder", default="dinov2-s14")
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument(
        "--missing-rate", type=float, default=0.7, help="train missing rate (both); fillers skip image I/O"
    )
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument(
        "--train-step", action="store_true", help="also time one training step of UnipairSystem"
    )
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--table-dir", default=str(ROOT / "runs" / "missing_tables" / "benchmark"))
    args = parser.parse_args(argv)

    result = {
        "command": benchutil.command_line(),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("table_dir",)},
        "loader": [loader_rates(w, args) for w in args.workers],
        "tokenisation": tokenise_cost(args),
    }
    if args.train_step:
        result["train_step"] = train_step_time(args)
    print(json.dumps(result, indent=2))
    for entry in result["loader"]:
        print(
            f"num_workers={entry['num_workers']}: {entry['first_pass_batches_per_s']} batches/s first pass, "
            f"{entry['later_passes_batches_per_s']} later passes ({entry['batches_per_pass']} batches/pass)",
            file=sys.stderr,
        )
    if args.train_step:
        print(f"training step: {result['train_step']['train_step_s_median']} s/step", file=sys.stderr)


if __name__ == "__main__":
    main()

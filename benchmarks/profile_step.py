"""Where the CPU training step's time goes.

The profile (the demo configuration: emoji DataModule, dinov2-s14 + minilm-l6, prompt mode,
``predict``): per step, the seconds spent in

- data: producing one batch in the main process (decode, transform, collate; ``num_workers=0``,
  i.e. the work a loader worker does per batch);
- image encoder / text encoder / predictor heads / fusion head: their forward passes (timed by
  forward hooks inside the real ``UnipairSystem.compute_losses``); loss = the rest of the forward
  (missing-strategy selection, task loss, VICReg);
- backward (whole), and, measured in isolated passes, the backward of each encoder alone;
- optimizer step (AdamW).

A ``torch.profiler`` table of the operators with the most self CPU time is written next to the JSON.

Usage::

    python -m benchmarks.profile_step                  # batch 8, 112 px, 6 timed steps
    python -m benchmarks.profile_step --batch-size 32  # the demo's batch
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import benchutil


def build(args: argparse.Namespace, seed: int = 0):
    from lightning_modules.system import UnipairSystem

    torch.manual_seed(seed)
    with benchutil.quiet_warnings():
        system = UnipairSystem(
            task="multiclass",
            num_classes=9,
            image_backbone=args.image_backbone,
            text_backbone=args.text_backbone,
            pretrained=not args.random_init,
            img_size=args.image_size,
            image_peft=args.peft,
            text_peft=args.peft,
            missing_strategy="predict",
            lr=1e-3,
        )
    optimizer = torch.optim.AdamW(system._parameter_groups(), lr=1e-3)
    return system.train(), optimizer


def data_loader(args: argparse.Namespace):
    if args.synthetic_data:
        from benchmarks import bench

        batch = bench.synthetic_batch(args.batch_size, args.image_size, 12, torch.device("cpu"))
        return None, lambda: batch
    from datamodules.emoji import EmojiDataModule

    dm = EmojiDataModule(
        root=args.root,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=0,
        image_encoder=args.image_backbone,
        text_encoder=args.text_backbone,
        train_missing={"missing_rate": 0.7, "missing_type": "both"},
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    state: dict[str, Any] = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    return dm, next_batch


class ForwardTimer:
    """Seconds spent in the forward of named submodules (pre/post forward hooks)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._starts: dict[str, float] = {}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, inputs):
            self._starts[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, inputs, output):
            self.totals[name] += time.perf_counter() - self._starts.pop(name)

        return hook

    def reset(self) -> None:
        self.totals.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def profile_sections(args: argparse.Namespace, next_batch) -> dict[str, Any]:
    system, optimizer = build(args)
    parts = {
        "image_encoder": system.image_encoder,
        "text_encoder": system.text_encoder,
        "fusion_head": system.head,
    }
    if system.has_predictor:
        parts["predictor_image_to_text"] = system.image_to_text
        parts["predictor_text_to_image"] = system.text_to_image
    timer = ForwardTimer(parts)
    sections: dict[str, list[float]] = defaultdict(list)
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        timer.reset()
        losses, _ = system.compute_losses(batch)
        t2 = time.perf_counter()
        losses["loss"].backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step < args.warmup:
            continue
        forward = t2 - t1
        module_total = sum(timer.totals.values())
        sections["data"].append(t1 - t0)
        for name in parts:
            sections[f"forward: {name}"].append(timer.totals.get(name, 0.0))
        sections["forward: fill-in + task loss + VICReg (rest)"].append(forward - module_total)
        sections["backward (whole)"].append(t3 - t2)
        sections["optimizer step"].append(t4 - t3)
        sections["step total"].append(t4 - t0)
    timer.remove()

    # Backward of each encoder alone (isolated passes on the same batch).
    batch = next_batch()
    iso: dict[str, list[float]] = defaultdict(list)
    for _ in range(max(2, args.steps // 2)):
        out = system.image_encoder(batch["image"])
        target = sum(t.sum() for t in out if t is not None)
        start = time.perf_counter()
        target.backward()
        iso["backward: image encoder alone"].append(time.perf_counter() - start)
        out = system.text_encoder(batch["input_ids"], batch["attention_mask"])
        target = sum(t.sum() for t in out if t is not None)
        start = time.perf_counter()
        target.backward()
        iso["backward: text encoder alone"].append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)

    table = ""
    if args.operators:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                _train_step(system, optimizer, batch)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.operators)
    result = {name: benchutil.median(values) for name, values in {**sections, **iso}.items()}
    return {"median_s": result, "all_s": {**sections, **iso}, "operator_table": table}


def _train_step(system, optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    losses, _ = system.compute_losses(batch)
    losses["loss"].backward()
    optimizer.step()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peft", default="prompt", choices=("prompt", "bitfit", "lora", "full", "frozen"))
    parser.add_argument("--image-backbone", default="dinov2-s14")
    parser.add_argument("--text-backbone", default="minilm-l6")
    parser.add_argument("--random-init", action="store_true", help="build the backbones without weights")
    parser.add_argument(
        "--synthetic-data", action="store_true", help="a fixed synthetic batch instead of emoji"
    )
    parser.add_argument("--root", default=None, help="unipair cache folder (default $UNIPAIR_CACHE)")
    parser.add_argument(
        "--operators", type=int, default=25, help="rows of the torch.profiler operator table (0: no table)"
    )
    parser.add_argument("--out", default=str(benchutil.ROOT / "runs" / "bench" / "profile_step.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu")
    header = benchutil.run_header(device)
    started = time.perf_counter()
    _, next_batch = data_loader(args)
    document: dict[str, Any] = {"format_version": 1, "header": header, "settings": vars(args)}
    out = Path(args.out)
    lines = [
        f"Training step on CPU ({header['machine']['cpu']}, {header['machine']['torch_threads']} threads), "
        f"{args.image_backbone} + {args.text_backbone}, {args.peft}, batch {args.batch_size}, "
        f"{args.image_size} px, "
        f"{'synthetic batch' if args.synthetic_data else 'emoji train batches (num_workers=0)'}; "
        f"{header['date']}.",
        "",
    ]
    profile = profile_sections(args, next_batch)
    document["profile"] = {k: v for k, v in profile.items() if k != "operator_table"}
    out.parent.mkdir(parents=True, exist_ok=True)
    if profile["operator_table"]:
        out.with_name(out.stem + "_operators.txt").write_text(profile["operator_table"], encoding="utf-8")
    total = profile["median_s"]["step total"]
    lines += ["| section | median s | % of step |", "|---|---:|---:|"]
    for name, value in profile["median_s"].items():
        share = f"{100 * value / total:.1f}" if "alone" not in name else "(isolated)"
        lines.append(f"| {name} | {value:.3f} | {share} |")
    lines.append("")
    document["wall_s"] = time.perf_counter() - started
    document["markdown"] = "\n".join(lines) + "\n"
    benchutil.write_json(out, document)
    out.with_suffix(".md").write_text(document["markdown"], encoding="utf-8")
    print(document["markdown"])
    print(f"profile_step: wrote {out} ({document['wall_s']:.0f} s)", file=sys.stderr)
    return document


if __name__ == "__main__":
    main()

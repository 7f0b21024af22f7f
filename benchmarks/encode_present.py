"""Training-step cost of encoding only the samples that have a modality, against encoding every sample.

``UnipairSystem.encode`` runs each encoder on the samples that have its modality (the stand-in
replaces a missing modality's z, so its encoding is never read). This benchmark measures what that
saves, side by side in one process: the same model (the demo's encoders and image size, one PEFT
mode, ``predict`` or ``zero``) with the system's encode and with a subclass that encodes every sample
(the filler inputs included, as before), one training step of each per round (forward, backward,
AdamW), on synthetic batches of two missing patterns:

- ``demo``: the demo's training pattern (missing training, eta = 70 % both: 30 % complete, 35 % text
  missing, 35 % image missing; ``bench.synthetic_batch``);
- ``text_only``: every image missing (the demo's text-only model of the ceiling).

Both variants compute the same losses (checked: equal within float rounding in eval mode, where
dropout does not draw). Writes ``<out>.json`` (header, per-step times) and ``<out>.md``.

Usage::

    python -m benchmarks.encode_present --out runs/bench/encode_present
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench, benchutil
from lightning_modules.prompts import EncoderOutput
from lightning_modules.system import UnipairSystem


class EveryRowSystem(UnipairSystem):
    """The system with each encoder run on every sample, present or not."""

    def _encode_present(self, encoder: torch.nn.Module, present: torch.Tensor, *inputs) -> EncoderOutput:
        return encoder(*inputs)


def build(cls: type[UnipairSystem], args: argparse.Namespace, strategy: str) -> UnipairSystem:
    torch.manual_seed(0)
    preset = benchutil.encoder_preset(args.encoders)
    extra = {"predictor_length": 0} if strategy == "zero" else {"readonly_grad": args.readonly_grad}
    with benchutil.quiet_warnings():
        return cls(
            **{**preset, **extra},
            task="multiclass",
            num_classes=9,
            img_size=args.image_size,
            image_peft=args.peft,
            text_peft=args.peft,
            missing_strategy=strategy,
        )


def pattern_batch(pattern: str, args: argparse.Namespace) -> dict[str, Any]:
    batch = bench.synthetic_batch(args.batch_size, args.image_size, args.text_len, torch.device("cpu"))
    if pattern == "text_only":
        batch["image"][:] = 1.0
        batch["image_present"][:] = False
        batch["text_present"][:] = True
    return batch


def step(
    system: UnipairSystem, optimizer: torch.optim.Optimizer, batch: dict[str, Any]
) -> tuple[float, float]:
    """Wall and process CPU seconds of one training step."""
    wall, cpu = time.perf_counter(), time.process_time()
    losses, _ = system.compute_losses(batch)
    losses["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_steps(
    systems: dict[str, UnipairSystem],
    optimizers: dict[str, torch.optim.Optimizer],
    batch: dict[str, Any],
    rounds: int,
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, dict[str, float]]]:
    """One training step of each system per round, ``rounds`` timed rounds after a warm-up one.

    Returns the (wall, CPU) seconds of every timed step per system, and their medians.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    for round_index in range(rounds + 1):
        for name, system in systems.items():
            measured = step(system, optimizers[name], batch)
            if round_index:  # the first round warms up
                times[name].append(measured)
    medians = {
        name: {
            "wall_s": benchutil.median([w for w, _ in values]),
            "cpu_s": benchutil.median([c for _, c in values]),
        }
        for name, values in times.items()
    }
    return times, medians


def same_losses(present: UnipairSystem, every: UnipairSystem, batch: dict[str, Any]) -> float:
    """Largest difference of the loss terms in eval mode (no dropout), ``every`` given ``present``'s
    weights: 0 up to rounding when the two compute the same model."""
    every.load_state_dict(present.state_dict())
    with torch.no_grad():
        a, _ = present.eval().compute_losses(batch)
        b, _ = every.eval().compute_losses(batch)
    present.train(), every.train()
    return max(abs(float(a[k]) - float(b[k])) for k in a)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="demo", choices=sorted(benchutil.ENCODER_PRESET_FILES))
    parser.add_argument("--peft", default="bitfit", help="PEFT mode of both encoders (the demo's: bitfit)")
    parser.add_argument("--readonly-grad", default="detach", choices=["through", "detach"])
    parser.add_argument("--strategies", nargs="+", default=["predict", "zero"], choices=["predict", "zero"])
    parser.add_argument("--patterns", nargs="+", default=["demo", "text_only"], choices=["demo", "text_only"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=42)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/encode_present"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for strategy in args.strategies:
        systems = {
            "present": build(UnipairSystem, args, strategy),
            "every": build(EveryRowSystem, args, strategy),
        }
        optimizers = {name: torch.optim.AdamW(s._parameter_groups(), lr=1e-3) for name, s in systems.items()}
        for pattern in args.patterns:
            batch = pattern_batch(pattern, args)
            difference = same_losses(systems["present"], systems["every"], batch)
            times, medians = interleaved_steps(systems, optimizers, batch, args.rounds)
            rows.append(
                {
                    "strategy": strategy,
                    "pattern": pattern,
                    "max_loss_difference_eval": difference,
                    "steps": times,
                    "median": medians,
                    "ratio_wall": medians["present"]["wall_s"] / medians["every"]["wall_s"],
                    "ratio_cpu": medians["present"]["cpu_s"] / medians["every"]["cpu_s"],
                }
            )
            print(
                f"{strategy:8s} {pattern:10s} present/every: wall x{rows[-1]['ratio_wall']:.2f}, "
                f"CPU x{rows[-1]['ratio_cpu']:.2f} (loss difference in eval {difference:.1e})"
            )

    document = {**benchutil.run_header(torch.device("cpu")), "settings": vars(args) | {"out": str(args.out)}}
    document["rows"] = rows
    benchutil.write_json(args.out.with_suffix(".json"), document)
    lines = [
        f"# Encoding only the present samples vs every sample ({document['date']})",
        "",
        f"Command: `{document['command']}` at {document['git_commit']}; {document['machine']['cpu']}, "
        f"{args.threads} torch thread(s), load average at the end {document['machine'].get('load_average')}.",
        f"Encoders {args.encoders}, PEFT {args.peft}, batch {args.batch_size}, {args.image_size} px, "
        f"{args.text_len} tokens; median of {args.rounds} interleaved training steps after one warm-up.",
        "",
        "| strategy | pattern | present: step s (CPU s) | every: step s (CPU s) | ratio wall | ratio CPU | "
        "loss difference (eval) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        present, every = row["median"]["present"], row["median"]["every"]
        lines.append(
            f"| {row['strategy']} | {row['pattern']} | {present['wall_s']:.3f} ({present['cpu_s']:.3f}) | "
            f"{every['wall_s']:.3f} ({every['cpu_s']:.3f}) | x{row['ratio_wall']:.2f} | "
            f"x{row['ratio_cpu']:.2f} | {row['max_loss_difference_eval']:.1e} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return document


if __name__ == "__main__":
    main()

"""Training-step cost of ``readonly_grad: detach`` against ``through``, per PEFT mode.

Under ``detach`` a layer with trainable parameters (BitFit, LoRA, full fine-tuning) runs its original
and read-only rows apart, the read-only ones with detached parameters; with task prompts only
(``prompt``) the layers have nothing trainable and both settings run the same computation. This
benchmark measures what ``detach`` costs, side by side in one process: the same model (the demo's
encoders by default, the method) with each setting, one training step of each per round
(forward, backward, AdamW) on the demo's missing pattern (``encode_present.pattern_batch``). Both
settings compute the same losses (they change gradients only; checked in eval mode). Writes
``<out>.json`` (header, per-step times) and ``<out>.md``.

Usage::

    python -m benchmarks.readonly_grad --out runs/bench/readonly_grad
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks import benchutil
from benchmarks.encode_present import build, interleaved_steps, pattern_batch, same_losses
from lightning_modules.system import UnipairSystem

SETTINGS = ("through", "detach")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="demo", choices=sorted(benchutil.ENCODER_PRESET_FILES))
    parser.add_argument("--pefts", nargs="+", default=["bitfit", "lora", "prompt"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=42)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/readonly_grad"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = pattern_batch("demo", args)

    rows = []
    for peft in args.pefts:
        systems = {
            setting: build(
                UnipairSystem, argparse.Namespace(**vars(args), peft=peft, readonly_grad=setting), "predict"
            )
            for setting in SETTINGS
        }
        difference = same_losses(
            systems["through"], systems["detach"], batch
        )  # detach changes gradients only
        optimizers = {name: torch.optim.AdamW(s._parameter_groups(), lr=1e-3) for name, s in systems.items()}
        times, medians = interleaved_steps(systems, optimizers, batch, args.rounds)
        rows.append(
            {
                "peft": peft,
                "max_loss_difference_eval": difference,
                "steps": times,
                "median": medians,
                "ratio_wall": medians["detach"]["wall_s"] / medians["through"]["wall_s"],
                "ratio_cpu": medians["detach"]["cpu_s"] / medians["through"]["cpu_s"],
            }
        )
        print(
            f"{peft:8s} detach/through: wall x{rows[-1]['ratio_wall']:.2f}, CPU x{rows[-1]['ratio_cpu']:.2f} "
            f"(loss difference in eval {difference:.1e})"
        )

    document = {**benchutil.run_header(torch.device("cpu")), "settings": vars(args) | {"out": str(args.out)}}
    document["rows"] = rows
    benchutil.write_json(args.out.with_suffix(".json"), document)
    lines = [
        f"# readonly_grad: detach vs through, training step ({document['date']})",
        "",
        f"Command: `{document['command']}` at {document['git_commit']}; {document['machine']['cpu']}, "
        f"{args.threads} torch thread(s), load average at the end {document['machine'].get('load_average')}.",
        f"Encoders {args.encoders}, the method, batch {args.batch_size}, {args.image_size} px, "
        f"{args.text_len} tokens, the demo's missing pattern; median of {args.rounds} interleaved training "
        "steps after one warm-up.",
        "",
        "| PEFT | through: step s (CPU s) | detach: step s (CPU s) | ratio wall | ratio CPU | "
        "loss difference (eval) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        through, detach = row["median"]["through"], row["median"]["detach"]
        lines.append(
            f"| {row['peft']} | {through['wall_s']:.3f} ({through['cpu_s']:.3f}) | "
            f"{detach['wall_s']:.3f} ({detach['cpu_s']:.3f}) | x{row['ratio_wall']:.2f} | "
            f"x{row['ratio_cpu']:.2f} | {row['max_loss_difference_eval']:.1e} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return document


if __name__ == "__main__":
    main()

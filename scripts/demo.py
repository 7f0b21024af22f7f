"""The demo (``make demo``): train the method and the ``zero`` baseline on emoji on CPU, compare robustness.

Both models use the offline encoders (DINOv2 ViT-S/14 + MiniLM-L6, deep prompts), the same seed and
the same settings, trained with "missing training" (eta = 70%, type both: 35% text missing, 35%
image missing, 30% complete). Each is evaluated over eta in {0, 0.1, ..., 1} x {text, image, both}
on the test split, and the two are compared. Everything goes under ``runs/demo/``::

    runs/demo/<strategy>/version_<N>/   config.yaml, TensorBoard events, checkpoints/, robustness/
    runs/demo/comparison.md             the comparison table printed at the end

Run ``make assets`` first (fetches the emoji data and converts the encoders). Every setting is a
command-line option, so the same driver serves quick checks (``--epochs 1 --limit-train-batches 5``)::

    python scripts/demo.py [--out runs/demo] [--epochs 2] [--image-size 70] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python scripts/demo.py` from anywhere: import cli, datamodules, ...

CONFIGS = REPO / "configs"
STRATEGIES = (("predict", "method.yaml"), ("zero", "zero.yaml"))  # in configs/model/strategy/


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: configs/experiment/emoji_demo.yaml)")
    parser.add_argument("--image-size", type=int, default=None, help="image encoder resolution in px (default: the experiment config)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the experiment config)")
    parser.add_argument("--limit-train-batches", type=float, default=None, help="Lightning's limit_train_batches (quick checks)")
    parser.add_argument("--model-config", default=str(CONFIGS / "model" / "encoders" / "offline.yaml"), help="encoder config (default: offline)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `unipair fit` options for both runs")
    return parser.parse_args(argv)


def fit_arguments(args: argparse.Namespace, strategy: str, strategy_config: str) -> list[str]:
    fit = [
        "fit",
        "--config", str(CONFIGS / "data" / "emoji.yaml"),
        "--config", args.model_config,
        "--config", str(CONFIGS / "model" / "strategy" / strategy_config),
        "--config", str(CONFIGS / "missing" / "missing_training_both.yaml"),
        "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(CONFIGS / "experiment" / "emoji_demo.yaml"),
        "--trainer.logger.init_args.save_dir", args.out,
        "--trainer.logger.init_args.name", strategy,
    ]
    if args.epochs is not None:
        fit += ["--trainer.max_epochs", str(args.epochs)]
    if args.image_size is not None:
        fit += ["--model.init_args.img_size", str(args.image_size)]
    if args.batch_size is not None:
        fit += ["--data.init_args.batch_size", str(args.batch_size)]
    if args.limit_train_batches is not None:
        fit += ["--trainer.limit_train_batches", str(args.limit_train_batches)]
    return fit + list(args.extra)


def comparison_table(results: dict[str, list[dict]], metric: str) -> str:
    """Markdown: one line per (missing type, rate), the metric of each strategy and the difference."""
    strategies = list(results)
    value = {
        (s, r["missing_type"], r["missing_rate"]): r["value"] for s, rows in results.items() for r in rows if r["metric"] == metric
    }
    keys = sorted({(t, rate) for (_, t, rate) in value}, key=lambda k: (("text", "image", "both").index(k[0]), k[1]))
    head = f"| missing type | missing rate | {' | '.join(strategies)} | {strategies[0]} − {strategies[1]} |"
    lines = [head, "|---|---:|" + "---:|" * (len(strategies) + 1)]
    for missing_type, rate in keys:
        values = [value[(s, missing_type, rate)] for s in strategies]
        cells = " | ".join(f"{v:.4f}" for v in values)
        lines.append(f"| {missing_type} | {100 * rate:g}% | {cells} | {values[0] - values[1]:+.4f} |")
    return "\n".join(lines) + "\n"


def summary_lines(results: dict[str, list[dict]], metric: str) -> list[str]:
    """Mean metric over the missing settings (eta > 0) per type, per strategy."""
    lines = []
    method, baseline = list(results)
    for missing_type in ("text", "image", "both"):
        means = {}
        for strategy, rows in results.items():
            values = [
                r["value"] for r in rows if r["metric"] == metric and r["missing_type"] == missing_type and r["missing_rate"] > 0
            ]
            means[strategy] = sum(values) / len(values)
        verdict = "better" if means[method] > means[baseline] else "NOT better"
        lines.append(
            f"{missing_type} missing, mean {metric} over eta 10-100%: {method} {means[method]:.4f} vs {baseline} "
            f"{means[baseline]:.4f} ({means[method] - means[baseline]:+.4f}: {method} is {verdict})"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from cli import make_cli

    start = time.perf_counter()
    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    metric = "accuracy"
    timings = {}
    for strategy, strategy_config in STRATEGIES:
        began = time.perf_counter()
        print(f"\n=== [{time.perf_counter() - start:6.0f} s] training {strategy!r} ===", flush=True)
        fitted = make_cli(fit_arguments(args, strategy, strategy_config))
        log_dir = Path(fitted.trainer.log_dir)
        checkpoint = fitted.trainer.checkpoint_callback.best_model_path
        print(f"=== [{time.perf_counter() - start:6.0f} s] robustness of {strategy!r} ({checkpoint}) ===", flush=True)
        make_cli(
            ["robustness", "--config", str(log_dir / "config.yaml"), "--ckpt_path", checkpoint,
             "--out_dir", str(log_dir / "robustness")]
        )
        document = json.loads((log_dir / "robustness" / "robustness.json").read_text())
        results[strategy] = document["rows"]
        metric = document["primary_metric"]
        timings[strategy] = time.perf_counter() - began
        del fitted

    table = comparison_table(results, metric)
    summary = summary_lines(results, metric)
    elapsed = time.perf_counter() - start
    report = (
        "# unipair demo: the method (predict) vs the zero baseline on emoji, test " + metric + "\n\n"
        "Both trained with missing training (eta = 70%, both), same seed and settings; evaluated over the grid.\n\n"
        + table + "\n" + "\n".join(f"- {line}" for line in summary) + "\n\n"
        + "".join(f"- {s}: train + robustness {t:.0f} s\n" for s, t in timings.items())
        + f"- total {elapsed:.0f} s ({elapsed / 60:.1f} min)\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    print(f"Run folders, checkpoints, TensorBoard logs and robustness files are under {out}/ "
          f"(tensorboard --logdir {out}); this table is in {out / 'comparison.md'}.")


if __name__ == "__main__":
    main()

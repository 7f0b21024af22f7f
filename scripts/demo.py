"""The demo (``make demo``): the method, the plain baseline and the oracle's ceiling on emoji, in one picture.

Four models, each with the offline encoders (DINOv2 ViT-S/14 + MiniLM-L6) adapted with BitFit
(``configs/model/peft/bitfit.yaml``: on emoji at the demo's size it beat prompt tuning on validation
in the CPU ablation, at about 0.6x the training time), the same seed and
``configs/experiment/emoji_demo.yaml``:

- ``method``: the project's defaults (``configs/model/strategy/method.yaml``);
- ``zero_plain``: the plain baseline (``strategy/zero.yaml``: zero stand-in, no predictor, no VICReg);
  both trained with missing training (eta = 70 %, both: 35 % text missing, 35 % image missing);
- ``oracle_image`` / ``oracle_text``: dedicated unimodal models (every training sample without the
  other modality, whose encoder is frozen) for the ceiling.

Training runs two models at a time, one torch thread each (two processes use the two cores better
than one process with two threads). Then the method and the baseline are evaluated over
eta in {0, 0.1, ..., 1} x {text, image, both} on the test split (``unipair robustness``, which
encodes the split once per model), and the ceiling is computed from the same tables: a sample with
one modality by the dedicated model of that modality (the best any stand-in could do: a prediction
is a function of the present modality), a complete sample by whichever of the baseline and the two
unimodal models is the most accurate on the complete validation samples (where a modality only
hurts the fused head, ignoring it is the better model). Everything goes under ``--out``::

    <out>/<model>/version_<N>/   config.yaml, TensorBoard events, checkpoints/, robustness/
    <out>/<model>.log            the training / evaluation output of that model
    <out>/comparison.png         one panel per missing type: accuracy vs eta, a line per model
    <out>/comparison.md          the table, the numbers at 70 %, convergence and timings

Run ``make assets`` first. Every setting is an option, so the same driver serves quick checks::

    python scripts/demo.py [--out runs/demo] [--epochs 4] [--jobs 2] [--limit-train-batches 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python scripts/demo.py` from anywhere: import cli, datamodules, ...

CONFIGS = REPO / "configs"
MISSING_TYPES = ("text", "image", "both")
# name -> (strategy config, extra `unipair fit` options)
MODELS: dict[str, tuple[str, list[str]]] = {
    "method": ("method.yaml", []),
    "zero_plain": ("zero.yaml", []),
    "oracle_image": (
        "zero.yaml",
        [
            "--data.init_args.train_missing",
            '{"missing_rate": 1.0, "missing_type": "text"}',
            "--data.init_args.val_missing",
            '{"missing_rate": 1.0, "missing_type": "text"}',
            "--model.init_args.text_peft",
            "frozen",
        ],
    ),
    "oracle_text": (
        "zero.yaml",
        [
            "--data.init_args.train_missing",
            '{"missing_rate": 1.0, "missing_type": "image"}',
            "--data.init_args.val_missing",
            '{"missing_rate": 1.0, "missing_type": "image"}',
            "--model.init_args.image_peft",
            "frozen",
        ],
    ),
}
EVALUATED = ("method", "zero_plain")  # the models with a robustness sweep; the oracle is combined
BASELINE = "zero_plain"
PROGRESS = re.compile(r"Epoch (\d+):\s+(\d+)%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the experiment config)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image encoder resolution (default: the experiment config)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the data config)")
    parser.add_argument(
        "--limit-train-batches",
        type=float,
        default=None,
        help="Lightning's limit_train_batches (quick checks)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="models trained at the same time (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to train"
    )
    parser.add_argument(
        "--encoders-config",
        default=str(CONFIGS / "model" / "encoders" / "offline.yaml"),
        help="encoder config (default: offline)",
    )
    parser.add_argument(
        "--peft-config",
        default=str(CONFIGS / "model" / "peft" / "bitfit.yaml"),
        help="PEFT config of both encoders (default: bitfit)",
    )
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="train nothing: tabulate the latest run folders under --out (e.g. after changing the report)",
    )
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="further `unipair fit` options for every model"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    return args


def fit_arguments(args: argparse.Namespace, name: str) -> list[str]:
    strategy_config, extra = MODELS[name]
    fit = [
        "fit",
        "--config",
        str(CONFIGS / "data" / "emoji.yaml"),
        "--config",
        args.encoders_config,
        "--config",
        args.peft_config,
        "--config",
        str(CONFIGS / "model" / "strategy" / strategy_config),
        "--config",
        str(CONFIGS / "missing" / "missing_training_both.yaml"),
        "--config",
        str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config",
        str(CONFIGS / "experiment" / "emoji_demo.yaml"),
        "--trainer.logger.init_args.save_dir",
        args.out,
        "--trainer.logger.init_args.name",
        name,
        # tqdm writes its updates to the log file (the rich bar draws only on a terminal): the driver's
        # bars read them.
        "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",
        *extra,
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


def _latest_run(out: Path, name: str) -> Path:
    runs = sorted((out / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not runs:
        raise RuntimeError(f"no run folder under {out / name}: see {out / (name + '.log')}")
    return runs[-1]


def _best_checkpoint(run: Path) -> Path:
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    if not best:
        raise RuntimeError(f"no best checkpoint in {run / 'checkpoints'}")
    return best[-1]


def run_jobs(args: argparse.Namespace, out: Path, names: list[str], started: float) -> dict[str, dict]:
    """Train (and, for the evaluated models, sweep) every model, ``--jobs`` at a time; a progress bar each."""
    from tqdm import tqdm

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "PYTHONUNBUFFERED": "1",
    }
    queue, running, done = list(names), {}, {}
    bars = {
        name: tqdm(
            total=100, desc=f"{name:>12}", position=i, leave=True, bar_format="{desc} {bar} {n}% {postfix}"
        )
        for i, name in enumerate(names)
    }
    while queue or running:
        while queue and len(running) < args.jobs:
            name = queue.pop(0)
            log = open(out / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed when the job ends)
            command = [sys.executable, str(REPO / "cli.py"), *fit_arguments(args, name)]
            running[name] = {
                "process": subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO),
                "log": log,
                "began": time.perf_counter(),
                "phase": "fit",
            }
            bars[name].set_postfix_str("training")
        time.sleep(2)
        for name, job in list(running.items()):
            text = (out / f"{name}.log").read_text(encoding="utf-8", errors="replace")
            found = PROGRESS.findall(text)
            if found and job["phase"] == "fit":
                epoch, percent = int(found[-1][0]), int(found[-1][1])
                total_epochs = configured_epochs(args)
                bars[name].n = min(99, int((epoch + percent / 100) / max(total_epochs, 1) * 100))
                bars[name].set_postfix_str(f"epoch {epoch + 1}/{total_epochs}")
                bars[name].refresh()
            code = job["process"].poll()
            if code is None:
                continue
            if code != 0:
                job["log"].close()
                for other in running.values():
                    other["process"].terminate()
                raise SystemExit(
                    f"demo: {name} {job['phase']} failed (exit {code}); see {out / (name + '.log')}"
                )
            if job["phase"] == "fit" and name in EVALUATED:
                job["train_s"] = time.perf_counter() - job["began"]
                run = _latest_run(out, name)
                job.update(phase="robustness", began_eval=time.perf_counter(), run=run)
                command = [
                    sys.executable,
                    str(REPO / "cli.py"),
                    "robustness",
                    "--config",
                    str(run / "config.yaml"),
                    "--ckpt_path",
                    str(_best_checkpoint(run)),
                    "--out_dir",
                    str(run / "robustness"),
                ]
                job["process"] = subprocess.Popen(
                    command, stdout=job["log"], stderr=subprocess.STDOUT, env=env, cwd=REPO
                )
                bars[name].set_postfix_str("robustness sweep")
                continue
            job["log"].close()
            now = time.perf_counter()
            if job["phase"] == "fit":
                job["train_s"], job["run"] = now - job["began"], _latest_run(out, name)
            else:
                job["eval_s"] = now - job["began_eval"]
            bars[name].n = 100
            bars[name].set_postfix_str(f"done at {now - started:.0f} s")
            bars[name].refresh()
            done[name] = {k: v for k, v in job.items() if k not in ("process", "log")}
            del running[name]
    for bar in bars.values():
        bar.close()
    return done


def configured_epochs(args: argparse.Namespace) -> int:
    if args.epochs is not None:
        return args.epochs
    import yaml

    experiment = yaml.safe_load((CONFIGS / "experiment" / "emoji_demo.yaml").read_text(encoding="utf-8"))
    return int(experiment["trainer"]["max_epochs"])


def validation_curve(run: Path, metric: str) -> list[float]:
    """The per-epoch validation ``metric`` of a run, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tag = f"val/{metric}"
    if tag not in events.Tags().get("scalars", []):
        return []
    return [event.value for event in events.Scalars(tag)]


def model_config(run: Path) -> str:
    """The run's saved config without the ``fit`` subcommand's own keys, as a YAML string."""
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    for key in ("ckpt_path", "weights_only"):
        config.pop(key, None)
    return yaml.safe_dump(config)


CEILING_MODELS = (BASELINE, "oracle_image", "oracle_text")


def oracle_rows(runs: dict[str, Path], rates: list[float]) -> tuple[list[dict], str, dict[str, float]]:
    """The ceiling over the grid: a sample with one modality by the unimodal model of that modality, a
    complete sample by whichever of the baseline and the two unimodal models is the most accurate on
    the complete validation samples (a ceiling no trained model beats where a modality only hurts).

    Returns the rows, the model chosen for complete samples and the validation accuracies it was
    chosen by.
    """
    from unittest.mock import patch

    import torch

    from cli import load_weights, make_cli
    from lightning_modules.metrics import build_metric_collection, metric_inputs
    from lightning_modules.robustness import complete_copy, encode_split, fuse_setting

    logits: dict[str, dict[str, torch.Tensor]] = {"val": {}, "test": {}}
    labels: dict[str, torch.Tensor] = {}
    complete, both_ratio = None, 0.5
    for name in CEILING_MODELS:
        run = runs[name]
        with patch.object(sys, "argv", sys.argv[:1]):  # the driver's own options are not the model's
            parsed = make_cli(["--config", model_config(run)], run=False)
        model = parsed.model
        if name == BASELINE:  # its splits and missing tables are the ones the sweeps used
            both_ratio = parsed.datamodule.missing["test"].both_ratio
            complete = complete_copy(parsed.datamodule, splits=("val", "test"))
            complete.setup("validate")
            complete.setup("test")
        load_weights(model, _best_checkpoint(run))
        model.eval()
        for split, loader in (("val", complete.val_dataloader()), ("test", complete.test_dataloader())):
            dataset = complete.datasets[split]
            keys_by_id = dict(zip(dataset.ids, dataset.keys, strict=True))
            encoded = encode_split(model, loader, keys_by_id, torch.device("cpu"), progress=False)
            everything = torch.ones(len(encoded.labels), dtype=torch.bool)
            image_on = ~everything if name == "oracle_text" else everything
            text_on = ~everything if name == "oracle_image" else everything
            logits[split][name] = fuse_setting(model, encoded, image_on, text_on, torch.device("cpu"))
            labels[split] = encoded.labels
            if split == "test":
                usable = {
                    "image_usable": encoded.image_usable.numpy(),
                    "text_usable": encoded.text_usable.numpy(),
                }
    val_accuracy = {
        name: float((logits["val"][name].argmax(dim=1) == labels["val"]).float().mean())
        for name in CEILING_MODELS
    }
    complete_model = max(val_accuracy, key=val_accuracy.get)
    test = logits["test"]
    rows = []
    for missing_type in MISSING_TYPES:
        for rate in rates:
            presence = complete.presence_masks(
                "test",
                {"missing_rate": rate, "missing_type": missing_type, "both_ratio": both_ratio},
                **usable,
            )
            image = torch.as_tensor(presence.image_present).bool()
            text = torch.as_tensor(presence.text_present).bool()
            combined = torch.where(
                (image & text)[:, None],
                test[complete_model],
                torch.where(image[:, None], test["oracle_image"], test["oracle_text"]),
            )
            metrics = build_metric_collection("multiclass", combined.shape[1])
            metrics.update(*metric_inputs(combined, labels["test"], "multiclass"))
            for metric, value in metrics.compute().items():
                rows.append(
                    {
                        "strategy": "oracle",
                        "missing_type": missing_type,
                        "missing_rate": rate,
                        "metric": metric,
                        "value": float(value),
                    }
                )
    return rows, complete_model, val_accuracy


def comparison_table(results: dict[str, list[dict]], metric: str) -> str:
    """Markdown: one line per (missing type, rate), the metric of each model and method − baseline."""
    names = list(results)
    value = {
        (s, r["missing_type"], r["missing_rate"]): r["value"]
        for s, rows in results.items()
        for r in rows
        if r["metric"] == metric
    }
    keys = sorted({(t, rate) for (_, t, rate) in value}, key=lambda k: (MISSING_TYPES.index(k[0]), k[1]))
    lines = [
        f"| missing type | missing rate | {' | '.join(names)} | method − {BASELINE} |",
        "|---|---:|" + "---:|" * (len(names) + 1),
    ]
    for missing_type, rate in keys:
        cells = " | ".join(
            f"{value[(s, missing_type, rate)]:.3f}" if (s, missing_type, rate) in value else "" for s in names
        )
        difference = value[("method", missing_type, rate)] - value[(BASELINE, missing_type, rate)]
        lines.append(f"| {missing_type} | {100 * rate:g}% | {cells} | {difference:+.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(MISSING_TYPES), figsize=(13, 4), sharey=True)
    for axis, missing_type in zip(axes, MISSING_TYPES, strict=True):
        for name, rows in results.items():
            points = sorted(
                (r["missing_rate"], r["value"])
                for r in rows
                if r["metric"] == metric and r["missing_type"] == missing_type
            )
            style = (
                {"linestyle": "--", "color": "black"}
                if name == "oracle"
                else {"marker": "o", "markersize": 3}
            )
            axis.plot([100 * p[0] for p in points], [p[1] for p in points], label=name, **style)
        axis.set_title(f"{missing_type} missing at test")
        axis.set_xlabel("test missing rate η (%)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"test {metric}")
    axes[-1].legend(loc="lower left")
    figure.suptitle("emoji, missing training (η = 70 %, both): the method, the plain baseline, the ceiling")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(args.models)
    if args.reuse_runs:
        done = {name: {"run": _latest_run(out, name), "reused": True} for name in names}
    else:
        done = run_jobs(args, out, names, started)
    training_wall = time.perf_counter() - started
    results: dict[str, list[dict]] = {}
    metric = "accuracy"
    for name in EVALUATED:
        if name in done:
            document = json.loads((done[name]["run"] / "robustness" / "robustness.json").read_text())
            results[name] = document["rows"]
            metric = document["primary_metric"]
    began = time.perf_counter()
    oracle_s, ceiling_note, ceiling = 0.0, "", {}
    if set(CEILING_MODELS) <= set(done):
        print("demo: combining the oracle's ceiling ...", flush=True)
        rates = sorted({r["missing_rate"] for r in results[BASELINE]})
        results["oracle"], complete_model, val_accuracy = oracle_rows(
            {n: done[n]["run"] for n in done}, rates
        )
        oracle_s = time.perf_counter() - began
        ceiling = {"complete_model": complete_model, "val_accuracy": val_accuracy}
        ceiling_note = (
            f" Complete samples by `{complete_model}`, the most accurate on the complete validation "
            "samples (" + ", ".join(f"`{name}` {value:.3f}" for name, value in val_accuracy.items()) + ")."
        )

    lines = [
        "# unipair demo: the method vs the plain baseline on emoji, with the ceiling",
        "",
        f"Test {metric} over the test missing rate, missing training (η = 70 %, both) for `method` and "
        f"`{BASELINE}` (zero stand-in, no predictor, no VICReg); `oracle` = a sample with one modality by "
        "the dedicated image-only / text-only model, a complete sample by whichever of "
        f"`{BASELINE}` and the two unimodal models is the most accurate on complete validation samples."
        + ceiling_note,
        "",
    ]
    if "method" in results and BASELINE in results:
        lines += [comparison_table(results, metric)]
        at70 = {
            (s, r["missing_type"]): r["value"]
            for s, rows in results.items()
            for r in rows
            if r["metric"] == metric and abs(r["missing_rate"] - 0.7) < 1e-9
        }
        lines += [
            "At 70 %: "
            + "; ".join(
                f"{t}: method {at70[('method', t)]:.3f}, {BASELINE} {at70[(BASELINE, t)]:.3f}"
                + (f", oracle {at70[('oracle', t)]:.3f}" if ("oracle", t) in at70 else "")
                for t in MISSING_TYPES
            ),
            "",
        ]
        plot(results, metric, out / "comparison.png")
    lines += ["Convergence (validation accuracy per epoch; the last epoch's gain):", ""]
    for name, job in done.items():
        curve = validation_curve(job["run"], metric)
        gain = f"{curve[-1] - curve[-2]:+.3f}" if len(curve) > 1 else "n/a"
        lines.append(f"- {name}: {' → '.join(f'{v:.3f}' for v in curve)} (last-epoch gain {gain})")
    lines += ["", "Time:", ""]
    for name, job in done.items():
        if job.get("reused"):
            lines.append(f"- {name}: reused {job['run']} (not trained in this run)")
            continue
        lines.append(
            f"- {name}: training {job['train_s']:.0f} s"
            + (f", robustness sweep {job['eval_s']:.0f} s" if "eval_s" in job else "")
        )
    total = time.perf_counter() - started
    lines += [
        f"- training and sweeps ({args.jobs} at a time, {args.threads} thread(s) each): "
        f"{training_wall:.0f} s wall",
        f"- the ceiling: {oracle_s:.0f} s",
        f"- total {total:.0f} s ({total / 60:.1f} min)",
        "",
    ]
    report = "\n".join(lines)
    (out / "comparison.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    print(
        f"Figure {out / 'comparison.png'}; run folders, checkpoints, TensorBoard logs and robustness "
        "files under "
        f"{out}/ (tensorboard --logdir {out})."
    )
    return {"results": results, "ceiling": ceiling, "jobs": done, "total_s": total}


if __name__ == "__main__":
    main()

"""Robustness evaluation: one checkpoint over a grid of test-time missing settings.

The grid is ``missing_rate`` (eta) x ``missing_type`` (default eta in {0, 0.1, ..., 1.0} x
{text, image, both}). Evaluating it naively would run the encoders once per setting (33 passes over
the test set). Instead the encoders run **once**, on complete inputs, and only the late fusion is
re-run per setting:

- ``predict`` / ``zero`` / ``learned``: a present modality's embedding z_m does not depend on
  whether the other modality is present (the encoders are unimodal), and the missing one is
  replaced by ẑ_m, 0 or the learned vector, all of which the complete pass already yields. So
  ``fuse(encode(complete batch), presence of the setting)`` equals what ``unipair test`` computes
  with that setting, up to float rounding.
- ``dummy_input``: the missing modality's embedding is the encoder's output on the filler input
  (all-ones image, empty text), a constant per modality (``system.filler_embeddings()``, which
  ``system.fuse_with_missing`` substitutes).

The per-setting presence comes from the DataModule's ``presence_masks``: the same missing tables
``unipair test`` uses (table folder, seed, dataset and split names) and the same bad-input rule: a
modality that is unusable in the data stays missing whatever the table says, and a table drop that
would leave a sample with neither modality is not applied.

Outputs (``write_robustness_files``) in ``out_dir``: ``robustness.json`` (metadata + ``rows``, each
row with the fields of :data:`ROW_FIELDS`), ``robustness.csv`` (the rows), ``robustness.md`` (a
table of the primary metric, eta down, missing type across) and ``robustness.png`` (primary metric
vs eta, one line per missing type).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROW_FIELDS: tuple[str, ...] = ("dataset", "strategy", "missing_type", "missing_rate", "metric", "value", "n")
DEFAULT_MISSING_RATES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
DEFAULT_MISSING_TYPES: tuple[str, ...] = ("text", "image", "both")
OUTPUT_NAMES: tuple[str, ...] = ("robustness.json", "robustness.csv", "robustness.md", "robustness.png")
JSON_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ writers


def _check_rows(rows: Sequence[dict]) -> None:
    if not rows:
        raise ValueError("no robustness rows to write")
    for index, row in enumerate(rows):
        missing = [field for field in ROW_FIELDS if field not in row]
        if missing:
            raise ValueError(f"robustness row {index} lacks field(s) {missing}; expected {list(ROW_FIELDS)}")


def primary_rows(rows: Sequence[dict], metric: str) -> list[dict]:
    """The rows of ``metric`` only."""
    selected = [row for row in rows if row["metric"] == metric]
    if not selected:
        raise ValueError(
            f"no robustness rows for metric {metric!r}; rows have {sorted({r['metric'] for r in rows})}"
        )
    return selected


def _format_rate(rate: float) -> str:
    return f"{100 * rate:g}%"


def markdown_table(rows: Sequence[dict], metric: str, title: str | None = None) -> str:
    """A Markdown table of ``metric``: one line per missing rate, one column per missing type."""
    selected = primary_rows(rows, metric)
    types = list(dict.fromkeys(row["missing_type"] for row in selected))
    rates = sorted({float(row["missing_rate"]) for row in selected})
    value = {(row["missing_type"], float(row["missing_rate"])): row["value"] for row in selected}
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| missing rate | " + " | ".join(f"{t} missing" for t in types) + " |")
    lines.append("|---:|" + "---:|" * len(types))
    for rate in rates:
        cells = [f"{value[(t, rate)]:.4f}" if (t, rate) in value else "" for t in types]
        lines.append(f"| {_format_rate(rate)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_robustness(
    rows: Sequence[dict], metric: str, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Save a PNG of ``metric`` vs missing rate, one line per missing type."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed (servers, CI)
    import matplotlib.pyplot as plt

    selected = primary_rows(rows, metric)
    figure, axes = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    for missing_type in dict.fromkeys(row["missing_type"] for row in selected):
        points = sorted(
            (float(r["missing_rate"]), float(r["value"]))
            for r in selected
            if r["missing_type"] == missing_type
        )
        axes.plot(
            [100 * p[0] for p in points], [p[1] for p in points], marker="o", label=f"{missing_type} missing"
        )
    axes.set_xlabel("test missing rate η (%)")
    axes.set_ylabel(metric)
    axes.grid(True, alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_robustness_files(
    rows: Sequence[dict],
    out_dir: str | os.PathLike,
    metric: str,
    meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``robustness.{json,csv,md,png}`` to ``out_dir`` (created); return their paths by extension.

    Args:
        rows: dicts with at least the fields of :data:`ROW_FIELDS` (extra fields go to the JSON only).
        out_dir: output folder.
        metric: the primary metric, shown in the Markdown table and the plot.
        meta: extra top-level JSON fields (checkpoint, settings, ...).
    """
    _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    title = f"{first['dataset']} — {first['strategy']} — {metric}"
    paths = {name.split(".")[1]: out_dir / name for name in OUTPUT_NAMES}
    document = {
        "format_version": JSON_FORMAT_VERSION,
        "primary_metric": metric,
        "row_fields": list(ROW_FIELDS),
        **(meta or {}),
        "rows": [dict(row) for row in rows],
    }
    paths["json"].write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    with open(paths["csv"], "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(ROW_FIELDS), extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(markdown_table(rows, metric, title=title), encoding="utf-8")
    plot_robustness(rows, metric, paths["png"], title=title)
    return paths


def read_robustness_json(path: str | os.PathLike) -> dict:
    """Read a ``robustness.json`` back (checks the row fields)."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(document, dict) or "rows" not in document:
        raise ValueError(f"{path}: expected a JSON object with a 'rows' list")
    _check_rows(document["rows"])
    return document


# --------------------------------------------------------------------------------------------- grid


def parse_grid(missing_rates: Iterable[float], missing_types: Iterable[str]) -> list[tuple[str, float]]:
    """Validate the grid; return ``[(missing_type, missing_rate), ...]`` type-major, rates ascending."""
    from datamodules.missing import MISSING_TYPES

    rates = [float(rate) for rate in missing_rates]
    types = list(missing_types)
    if not rates:
        raise ValueError("missing_rates: give at least one rate")
    if not types:
        raise ValueError("missing_types: give at least one type")
    for rate in rates:
        if not 0.0 <= rate <= 1.0 or math.isnan(rate):
            raise ValueError(f"missing_rates: every rate must be in [0, 1], got {rate!r}")
    for missing_type in types:
        if missing_type not in MISSING_TYPES:
            raise ValueError(
                f"missing_types: unknown type {missing_type!r}; expected some of {list(MISSING_TYPES)}"
            )
    return [(t, r) for t in dict.fromkeys(types) for r in sorted(set(rates))]


# ---------------------------------------------------------------------------------------- encoding


@dataclass
class EncodedSplit:
    """The encoders' outputs on one split with complete inputs (all tensors on CPU, float32).

    ``image_usable`` / ``text_usable`` say which modality the data actually provides (False for a
    bad input the DataModule treats as missing); ``keys`` are the missing-table keys of the rows.
    """

    ids: list[str]
    keys: list[str]
    embeddings: dict[str, torch.Tensor | None]
    labels: torch.Tensor
    image_usable: torch.Tensor
    text_usable: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def encode_split(
    system: Any,
    loader: Iterable[dict],
    keys_by_id: dict[str, str],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = True,
) -> EncodedSplit:
    """Run ``system.encode`` over ``loader`` once and gather embeddings, labels and usable masks."""
    from tqdm.auto import tqdm

    parts: dict[str, list[torch.Tensor]] = {}
    absent: set[str] = set()
    ids: list[str] = []
    labels, image_usable, text_usable = [], [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    with torch.inference_mode():
        for batch in tqdm(
            loader, total=total, desc="robustness: encoding the test split", disable=not progress
        ):
            batch = _to_device(batch, device)
            with autocast():
                encoded = system.encode(batch)
            for name, value in encoded.items():
                if value is None:
                    absent.add(name)
                    continue
                parts.setdefault(name, []).append(value.detach().float().cpu())
            ids.extend(batch["id"])
            labels.append(batch["label"].cpu())
            image_usable.append(batch["image_present"].bool().cpu())
            text_usable.append(batch["text_present"].bool().cpu())
    embeddings: dict[str, torch.Tensor | None] = {name: torch.cat(chunks) for name, chunks in parts.items()}
    embeddings.update({name: None for name in absent - set(parts)})
    missing_keys = [i for i in ids if i not in keys_by_id]
    if missing_keys:
        raise KeyError(
            f"robustness: sample ids {missing_keys[:3]} of the loader are not in the dataset's key table"
        )
    return EncodedSplit(
        ids=ids,
        keys=[keys_by_id[i] for i in ids],
        embeddings=embeddings,
        labels=torch.cat(labels),
        image_usable=torch.cat(image_usable),
        text_usable=torch.cat(text_usable),
    )


def fuse_setting(
    system: Any,
    encoded: EncodedSplit,
    image_present: torch.Tensor,
    text_present: torch.Tensor,
    device: torch.device,
    batch_size: int = 1024,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Logits of the whole split for one presence pattern (float32, CPU), in chunks of ``batch_size``.

    Uses ``system.fuse_with_missing``: the fusion as if the modalities marked absent were missing,
    from embeddings of complete inputs (it substitutes the filler embeddings for ``dummy_input``).
    """
    logits = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            stop = min(start + batch_size, len(encoded))
            emb = {
                name: None if value is None else value[start:stop].to(device)
                for name, value in encoded.embeddings.items()
            }
            with autocast():
                out = system.fuse_with_missing(
                    emb, image_present[start:stop].to(device), text_present[start:stop].to(device)
                )
            logits.append(out.detach().float().cpu())
    return torch.cat(logits)


def _metric_values(
    logits: torch.Tensor, labels: torch.Tensor, task: str, num_classes: int, threshold: float = 0.5
) -> dict[str, float]:
    from lightning_modules.metrics import build_metric_collection, metric_inputs

    collection = build_metric_collection(task, num_classes, threshold)
    preds, target = metric_inputs(logits, labels, task)
    collection.update(preds, target)
    return {name: float(value) for name, value in collection.compute().items()}


# -------------------------------------------------------------------------------------- evaluation


def complete_copy(datamodule: Any, splits: Sequence[str] = ("test",)) -> Any:
    """A copy of ``datamodule`` (same class and arguments) whose ``splits`` are complete (eta = 0)."""
    # hparams hold the __init__ arguments of the whole class chain; LightningCLI adds private
    # bookkeeping keys ("_class_path", "_instantiator") that are not arguments.
    arguments = {key: value for key, value in datamodule.hparams.items() if not key.startswith("_")}
    for split in splits:
        arguments[f"{split}_missing"] = {"missing_rate": 0.0}
    return type(datamodule)(**arguments)


def evaluate_robustness(
    system: Any,
    datamodule: Any,
    missing_rates: Sequence[float] = DEFAULT_MISSING_RATES,
    missing_types: Sequence[str] = DEFAULT_MISSING_TYPES,
    both_ratio: float | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = True,
) -> tuple[list[dict], str]:
    """Evaluate ``system`` (weights already loaded) on the test split of ``datamodule`` over the grid.

    Args:
        system: a ``UnipairSystem`` (``encode``, ``fuse_with_missing``, ``hparams.missing_strategy``,
            ``hparams.multilabel_threshold``: the metrics use the model's settings, as ``unipair test``).
        datamodule: the DataModule of the run (its class and arguments; its own test setting is
            ignored: a complete copy is encoded, and each setting's table is applied afterwards).
        missing_rates, missing_types: the grid.
        both_ratio: share of image-missing among the missing for type ``both``; None = the
            DataModule's ``test_missing.both_ratio``.
        device: where the encoders and the fusion run.
        autocast: context manager factory for mixed precision (the Trainer's precision plugin).
        progress: show progress bars.

    Returns:
        (rows, primary metric name). One row per (setting, metric of the task's collection).
    """
    from tqdm.auto import tqdm

    from lightning_modules.metrics import MONITOR_METRIC

    grid = parse_grid(missing_rates, missing_types)
    if both_ratio is None:
        both_ratio = datamodule.missing["test"].both_ratio
    device = torch.device(device)
    complete = complete_copy(datamodule)
    complete.setup("test")
    dataset = complete.datasets["test"]
    keys_by_id = dict(zip(dataset.ids, dataset.keys, strict=True))
    system = system.to(device).eval()
    encoded = encode_split(system, complete.test_dataloader(), keys_by_id, device, autocast, progress)
    strategy = str(system.hparams.missing_strategy)
    task, num_classes = datamodule.task, int(datamodule.num_classes)
    # The model's metric settings, as ``unipair test`` uses them.
    threshold = float(system.hparams.get("multilabel_threshold", 0.5))
    primary = MONITOR_METRIC[task]
    batch_size = max(int(getattr(datamodule, "batch_size", 256)), 256)
    rows: list[dict] = []
    for missing_type, missing_rate in tqdm(grid, desc="robustness: settings", disable=not progress):
        # The table and presence rule of ``unipair test`` with this setting as ``test_missing``, applied to
        # what the complete pass found usable (images unreadable while loading stay missing).
        presence = complete.presence_masks(
            "test",
            {"missing_rate": missing_rate, "missing_type": missing_type, "both_ratio": both_ratio},
            image_usable=encoded.image_usable.numpy(),
            text_usable=encoded.text_usable.numpy(),
        )
        if presence.ids != encoded.ids:
            raise RuntimeError("robustness: the test loader's sample order differs from the dataset's")
        image_present = torch.from_numpy(presence.image_present)
        text_present = torch.from_numpy(presence.text_present)
        logits = fuse_setting(system, encoded, image_present, text_present, device, batch_size, autocast)
        values = _metric_values(logits, encoded.labels, task, num_classes, threshold)
        counts = {
            "n_complete": int((image_present & text_present).sum()),
            "n_text_missing": int((image_present & ~text_present).sum()),
            "n_image_missing": int((~image_present & text_present).sum()),
        }
        ordered = [primary] + sorted(name for name in values if name != primary)
        for metric in ordered:
            rows.append(
                {
                    "dataset": datamodule.dataset_name,
                    "strategy": strategy,
                    "missing_type": missing_type,
                    "missing_rate": float(missing_rate),
                    "metric": metric,
                    "value": values[metric],
                    "n": len(encoded),
                    **counts,
                }
            )
    return rows, primary

"""Quality ablation on emoji, v2: the method's switches against the plain baselines and the oracle.

Run by ``make ablation`` (``python -m benchmarks.ablation``).

Cells (one trained model each, written as one JSON under ``<out>/cells/``; finished cells are
skipped on re-run, so the run is resumable):

- training settings: ``complete`` (train eta = 0) and ``missing`` (train eta = 70 %, type both);
- the *baselines*: plain late fusion with a fixed stand-in and nothing else of the method (no
  predictor tokens, no VICReg): ``zero_plain``, ``learned_plain``, ``dummy_input_plain``;
- the *method* (``predict``) with its switches, named by the switches that differ from the
  reference (``method``: stop-gradient on the target, read-only gradient ``through``, raw VICReg,
  lambda 1, no substitution). Atomic switches combine with ``+``: ``detach`` (read-only tokens read
  detached keys / values), ``target_matched`` (VICReg in the target's standardised space),
  ``substitution``, ``no_stop_grad``, ``lambda_<x>`` (VICReg weight). ``lambda_0`` is the
  *task-trained predictor* baseline (the predictor learns from the task loss alone);
- ``system_<stand-in>``: the method's system (predictor tokens + VICReg) with only the stand-in
  changed, labelled as such (they differ from the method in one thing, from the baselines in two);
- the oracle's three models: ``oracle_fused`` (both modalities, no predictor), ``oracle_image`` and
  ``oracle_text`` (dedicated unimodal models, see below);
- seeds (model initialisation and data order; the missing tables are the protocol's, seed 0), paired
  across variants: seed s of every variant sees the same initial head and the same batch order.

Every cell is evaluated on the val and test splits at eta = 70 % for missing type text / image /
both and at eta = 0, with the robustness module's separable evaluation (the encoders run once per
split on complete inputs, ``fuse_with_missing`` once per missing setting); cells with a predictor
also record the prediction diagnostics (cosine, std ratio, substitution accuracy) and every row
the expected calibration error.

The oracle. A predicted embedding is a function of the modality that is present, so it can add no
information beyond it: the best any stand-in can do on a text-missing sample is what a dedicated
image-only model does. The unimodal models are built with the same system, encoders, PEFT mode and
head: ``oracle_image`` is trained with the text missing on *every* sample and the ``zero`` strategy,
so the head sees [z_v; 0] and learns from the image alone; no predictor (nothing to pair with); the
unused text encoder is ``frozen`` (identical function, no wasted backward). ``oracle_text`` mirrors
it. They are trained on the whole training set, complete, in both settings (a ceiling). The fused
one is the same training as ``zero_plain`` under complete training (no predictor, zero stand-in
never used), so when that cell is in the run it is not trained twice: its eta = 0 logits stand in
for ``oracle_fused``. The oracle's prediction for a test sample comes from the fused model when it
is complete and from the
unimodal model of its present modality otherwise.

Comparisons (test split; the best baseline is chosen on val): per-seed paired differences
method − best baseline with a 95 % t-interval, and ``gap closed`` =
(method − best baseline) / (oracle − best baseline) of the seed means. Defaults: the method
configuration with the best mean val accuracy over both settings and the three 70 % test types.

Outputs: ``<out>/ablation.json`` (header + rows with setting, variant, options, seed, split,
test type, rate, metric, value; paired differences, gap closed, diagnostics, defaults) and
``<out>/ablation.md``.

Data: the emoji DataModule's splits, tokens, transforms and missing tables (label set ``--label``:
``group``, 9 classes, or ``subgroup``, 58), decoded once into tensors (``<out>/data-*.pt``) that
every cell reuses (on the training device); or ``--pack`` (see ``benchmarks.device_pack``) on a
machine without the asset cache.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import hashlib
import json
import math
import multiprocessing
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks import benchutil
from benchmarks.emoji_tensors import build_tensors_from_datamodule

SETTINGS: dict[str, dict[str, Any]] = {
    "complete": {"train_missing": {"missing_rate": 0.0, "missing_type": "both"}},
    "missing": {"train_missing": {"missing_rate": 0.7, "missing_type": "both"}},
}
TEST_SETTINGS: tuple[tuple[str, float], ...] = (("text", 0.7), ("image", 0.7), ("both", 0.7), ("none", 0.0))
# The method's reference configuration: every variant spells its switches out, so a cell means the
# same thing whatever the system's defaults are later.
REFERENCE: dict[str, Any] = {
    "substitution": False,
    "stop_grad_target": True,
    "pred_loss_weight": 1.0,
    "readonly_grad": "through",
    "vicreg_space": "raw",
}
ATOMIC_SWITCHES: dict[str, dict[str, Any]] = {
    "detach": {"readonly_grad": "detach"},
    "target_matched": {"vicreg_space": "target_matched"},
    "substitution": {"substitution": True},
    "no_stop_grad": {"stop_grad_target": False},
}
LAMBDA_PREFIX = "lambda_"
# The method variants of the default grid (``--variants`` replaces it); ``lambda_0`` is the
# task-trained predictor baseline.
DEFAULT_VARIANTS: tuple[str, ...] = (
    "method",
    "detach",
    "target_matched",
    "detach+target_matched",
    "lambda_0",
)
NAMED_VARIANTS: dict[str, str] = {"lambda_0": "task-trained predictor (λ = 0)"}
# The baselines as the project's strategy configs define them: no predictor, no VICReg.
PLAIN: dict[str, dict[str, Any]] = {
    "zero_plain": {"missing_strategy": "zero", "predictor_length": 0},
    "learned_plain": {"missing_strategy": "learned", "predictor_length": 0},
    "dummy_input_plain": {"missing_strategy": "dummy_input", "predictor_length": 0},
}
# The method's system with only the stand-in changed (not baselines: they keep predictor and VICReg).
SYSTEM_STANDINS: dict[str, dict[str, Any]] = {
    "system_zero": {"missing_strategy": "zero"},
    "system_learned": {"missing_strategy": "learned"},
    "system_dummy_input": {"missing_strategy": "dummy_input"},
}
ORACLE: dict[str, dict[str, Any]] = {
    "oracle_fused": {"missing_strategy": "zero", "predictor_length": 0},
    "oracle_image": {"missing_strategy": "zero", "predictor_length": 0, "text_peft": "frozen"},
    "oracle_text": {"missing_strategy": "zero", "predictor_length": 0, "image_peft": "frozen"},
}
GROUPS = ("method", "plain", "oracle", "system")
# Trains exactly what oracle_fused trains when the setting is complete (same options, all samples complete).
FUSED_TWIN = "zero_plain"


def method_options(variant: str) -> dict[str, Any]:
    """The system options of a method variant name (``method`` or atomic switches joined by ``+``)."""
    options = dict(REFERENCE)
    if variant == "method":
        return options
    for part in variant.split("+"):
        if part in ATOMIC_SWITCHES:
            options.update(ATOMIC_SWITCHES[part])
        elif part.startswith(LAMBDA_PREFIX):
            try:
                options["pred_loss_weight"] = float(part[len(LAMBDA_PREFIX) :])
            except ValueError:
                raise ValueError(f"variant {variant!r}: {part!r} is not lambda_<number>") from None
        else:
            raise ValueError(
                f"variant {variant!r}: unknown switch {part!r}; expected method, "
                f"{sorted(ATOMIC_SWITCHES)} or {LAMBDA_PREFIX}<x>, joined by '+'"
            )
    return options


def variant_group(variant: str) -> str:
    if variant in PLAIN:
        return "plain"
    if variant in ORACLE or variant == "oracle":  # its models, and the ceiling combined from them
        return "oracle"
    if variant in SYSTEM_STANDINS:
        return "system"
    return "method"


PRIMARY_METRIC = "accuracy"
# Encoders of the run (``benchutil.encoder_preset``): the demo's (pretrained, offline cache or device
# pack), or tiny random ones for the smoke tests.
ENCODER_PRESETS = ("demo", "tiny")
JSON_FORMAT_VERSION = 2


# ------------------------------------------------------------------------------------------- data


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "image_size": args.image_size,
        "max_text_len": args.max_text_len,
        "label": args.label,
        "missing_seed": 0,
    }


def load_data(args: argparse.Namespace) -> Path:
    """Build (once) and return the tensor file every cell reads (``--data``: a prepared one)."""
    if args.data:
        if not Path(args.data).is_file():
            raise SystemExit(f"--data {args.data}: no such file")
        return Path(args.data)
    settings = data_settings(args)
    tag = hashlib.sha256(
        json.dumps({**settings, "pack": bool(args.pack)}, sort_keys=True).encode()
    ).hexdigest()[:10]
    path = Path(args.out) / f"data-{tag}.pt"
    if path.is_file():
        return path
    started = time.perf_counter()
    if args.pack:
        from benchmarks.device_pack import tensors_from_pack

        data = tensors_from_pack(Path(args.pack), settings)
    else:
        data = build_tensors_from_datamodule(settings, args.root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    print(
        f"ablation: decoded the emoji splits into {path} ({time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
    )
    return path


# ------------------------------------------------------------------------------------------ cells


def variant_list(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, strategy, options) of every variant of the run, in table order."""
    variants = [(name, "predict", method_options(name)) for name in args.variants]
    variants += [
        (name, str(o["missing_strategy"]), dict(o)) for name, o in PLAIN.items() if name in args.baselines
    ]
    variants += [
        (name, str(o["missing_strategy"]), {**REFERENCE, **o})
        for name, o in SYSTEM_STANDINS.items()
        if name in args.system_standins
    ]
    if args.oracle:
        variants += [(name, str(o["missing_strategy"]), dict(o)) for name, o in ORACLE.items()]
    return variants


def cell_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All cells of the run, seed-major (a run cut short still has whole seeds), filtered by ``--only``.

    Within a seed: the oracle and the baselines first (every comparison needs them), then the method
    variants, then the stand-in-only variants.
    """
    variants = variant_list(args)
    order = {"oracle": 0, "plain": 1, "method": 2, "system": 3}
    variants.sort(key=lambda v: order[variant_group(v[0])])
    only = set(args.only) if args.only else set()
    known = set(SETTINGS) | {v[0] for v in variants} | set(GROUPS)
    if only - known:
        raise SystemExit(f"--only: unknown names {sorted(only - known)}; expected some of {sorted(known)}")
    wanted_settings = only & set(SETTINGS)
    wanted_variants = only - set(SETTINGS)
    cells = []
    for seed in args.seeds:
        for name, strategy, options in variants:
            if wanted_variants and not wanted_variants & {name, variant_group(name)}:
                continue
            # The oracle's models train on the complete training set whatever the setting: once per seed.
            for setting in ("complete",) if variant_group(name) == "oracle" else SETTINGS:
                if wanted_settings and setting not in wanted_settings and variant_group(name) != "oracle":
                    continue
                cells.append(
                    {
                        "setting": setting,
                        "variant": name,
                        "strategy": strategy,
                        "options": options,
                        "seed": seed,
                    }
                )
    return cells


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Everything besides the cell that decides its result (part of the cell file name)."""
    encoders = benchutil.encoder_preset(args.encoders)
    return {
        "image_backbone": encoders["image_backbone"],
        "text_backbone": encoders["text_backbone"],
        "peft": args.peft,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "prompt_length": args.prompt_length or encoders["prompt_length"],
        "weights": "pack" if args.pack else ("cache" if encoders["pretrained"] else "random"),
        "data_file": Path(args.data).name if args.data else None,
        **data_settings(args),
        "limit_train_samples": args.limit_train_samples,
    }


def same_training(stored: dict, cell: dict) -> bool:
    """Whether a stored cell trained what ``cell`` describes (options compared, the reference filled in)."""
    return (
        stored["strategy"] == cell["strategy"]
        and stored["seed"] == cell["seed"]
        and {**REFERENCE, **stored["options"]} == {**REFERENCE, **cell["options"]}
    )


def load_done(
    cells: list[dict], out: Path, config: dict, verbose: bool = False
) -> tuple[list[dict], list[tuple[dict, Path]]]:
    """Split ``cells`` into finished ones (their documents, from disk) and pending ones (with their paths)."""
    done: list[dict] = []
    pending: list[tuple[dict, Path]] = []
    for cell in cells:
        path = cell_path(out, cell, config)
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if stored is None and cell["variant"] == "oracle_fused":
            stored = _fused_twin(out, cell, config)
        if stored is not None and same_training(stored["cell"], cell):
            stored["cell"] = cell  # the current (explicit) spelling of the same options
            done.append(stored)
            continue
        if stored is not None and verbose:
            print(
                f"ablation: {path.name} was trained with other options {stored['cell']['options']}; "
                "training it again",
                file=sys.stderr,
            )
        pending.append((cell, path))
    return done, pending


def _fused_twin(out: Path, cell: dict, config: dict) -> dict | None:
    """The complete ``zero_plain`` cell of this seed if it holds the eta = 0 logits of oracle_fused."""
    path = cell_path(out, {**cell, "variant": FUSED_TWIN}, config)
    stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return stored if stored is not None and stored.get("component_logits") else None


def without_twin_duplicates(pending: list[tuple[dict, Path]]) -> list[tuple[dict, Path]]:
    """Pending cells less each oracle_fused whose twin is pending too (the twin's logits will serve)."""
    twins = {c["seed"] for c, _ in pending if c["variant"] == FUSED_TWIN and c["setting"] == "complete"}
    return [(c, p) for c, p in pending if not (c["variant"] == "oracle_fused" and c["seed"] in twins)]


def cell_path(out: Path, cell: dict, config: dict) -> Path:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    return out / "cells" / f"{cell['setting']}__{cell['variant']}__seed{cell['seed']}__{digest}.json"


def train_presence(data: dict, cell: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, image_present, text_present) of the training samples of ``cell``."""
    n = len(data["splits"]["train"]["ids"])
    if cell["setting"] == "complete":
        image = text = torch.ones(n, dtype=torch.bool)
    else:
        image, text = data["presence"]["train/both/0.7"]
    rows = torch.arange(n)
    # The oracle is a ceiling: its models train on the whole, complete training set in both settings.
    everything, nothing = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    if cell["variant"] == "oracle_fused":
        return rows, everything, everything
    if cell["variant"] == "oracle_image":
        return rows, everything, nothing
    if cell["variant"] == "oracle_text":
        return rows, nothing, everything
    return rows, image, text


class BatchGather:
    """Collate for index batches over tensors held on the training device (no per-sample work).

    Yields the project's batch format: the filler (all-ones image, tokenised empty text) where a
    modality is missing, tokens padded to the batch's longest text.
    """

    def __init__(
        self,
        split: dict,
        rows: torch.Tensor,
        image_present: torch.Tensor,
        text_present: torch.Tensor,
        empty_ids: list[int],
        pad_id: int,
        device: torch.device,
    ) -> None:
        self.images = split["images"]
        rows_dev = rows.to(self.images.device)
        self.rows = rows_dev
        self.labels = split["labels"][rows_dev]
        self.ids = [split["ids"][i] for i in rows.tolist()]
        self.image_present = image_present.to(self.images.device)
        self.text_present = text_present.to(self.images.device)
        input_ids = split["input_ids"][rows_dev].clone()
        lengths = split["lengths"][rows_dev].clone()
        empty = torch.tensor(empty_ids, dtype=torch.long, device=input_ids.device)
        missing_text = ~self.text_present
        input_ids[missing_text] = pad_id
        input_ids[missing_text, : len(empty)] = empty
        lengths[missing_text] = len(empty)
        self.input_ids, self.lengths = input_ids, lengths
        self.lengths_cpu = lengths.cpu()

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        index = torch.as_tensor(indices, dtype=torch.long)
        longest = int(self.lengths_cpu[index].max())
        index_dev = index.to(self.images.device)
        image_present = self.image_present[index_dev]
        images = self.images[self.rows[index_dev]]
        images = torch.where(image_present[:, None, None, None], images, torch.ones((), device=images.device))
        lengths = self.lengths[index_dev]
        positions = torch.arange(longest, device=lengths.device)
        return {
            "image": images,
            "input_ids": self.input_ids[index_dev, :longest],
            "attention_mask": (positions[None, :] < lengths[:, None]).long(),
            "image_present": image_present,
            "text_present": self.text_present[index_dev],
            "label": self.labels[index_dev],
            "id": [self.ids[i] for i in indices],
        }


def build_system(cell: dict, args: argparse.Namespace, data: dict):
    from lightning_modules.system import UnipairSystem

    options = {k: v for k, v in cell["options"].items()}
    peft = {"image_peft": args.peft, "text_peft": args.peft}
    peft.update({k: options.pop(k) for k in ("image_peft", "text_peft") if k in options})
    options.pop("missing_strategy", None)
    kwargs = benchutil.encoder_preset(args.encoders)
    if args.prompt_length:
        kwargs["prompt_length"] = args.prompt_length
    kwargs.update(
        task="multiclass",
        num_classes=data["num_classes"],
        img_size=args.image_size,
        missing_strategy=cell["strategy"],
        lr=args.lr,
        head_lr=args.lr,
        **peft,
        **options,
    )
    if args.pack:
        from benchmarks.device_pack import system_from_pack

        return system_from_pack(Path(args.pack), kwargs)
    with benchutil.quiet_warnings():
        return UnipairSystem(**kwargs)


_DATA_CACHE: dict[str, Any] = {}


def _device_data(path: Path, device: torch.device) -> dict:
    key = f"{path}:{device}"
    if key not in _DATA_CACHE:
        data = torch.load(path, weights_only=False)
        for split in data["splits"].values():
            for name in ("images", "input_ids", "lengths", "labels"):
                split[name] = split[name].to(device)
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = data
    return _DATA_CACHE[key]


def run_cell(cell: dict, args_dict: dict, data_path: str) -> dict:
    """Train and evaluate one cell; returns the cell document (also what is written to its JSON)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_modules.metrics import build_metric_collection, metric_inputs
    from lightning_modules.robustness import encode_split, fuse_setting

    args = argparse.Namespace(**args_dict)
    device = benchutil.resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    data = _device_data(Path(data_path), device)
    autocast = benchutil.autocast_for(device)
    started = time.perf_counter()
    L.seed_everything(cell["seed"], verbose=False)
    system = build_system(cell, args, data)
    rows, image_present, text_present = train_presence(data, cell)
    if args.limit_train_samples:
        rows, image_present, text_present = (
            t[: args.limit_train_samples] for t in (rows, image_present, text_present)
        )
    gather = BatchGather(
        data["splits"]["train"], rows, image_present, text_present, data["empty_ids"], data["pad_id"], device
    )
    loader = DataLoader(
        range(len(rows)),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=gather,
        generator=torch.Generator().manual_seed(cell["seed"]),
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=max(1, len(loader)),
    )
    with benchutil.quiet_warnings():
        trainer.fit(system, train_dataloaders=loader)
    train_s = time.perf_counter() - started
    final_losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}

    system = system.to(device).eval()
    results: list[dict] = []
    diagnostics: dict[str, dict[str, float]] = {}
    component_logits: dict[str, list] = {}
    for split_name in ("val", "test"):
        split = data["splits"][split_name]
        n = len(split["ids"])
        everything = torch.arange(n)
        all_true = torch.ones(n, dtype=torch.bool)
        eval_gather = BatchGather(
            split, everything, all_true, all_true, data["empty_ids"], data["pad_id"], device
        )
        eval_loader = DataLoader(
            range(n), batch_size=args.eval_batch_size, shuffle=False, collate_fn=eval_gather
        )
        encoded = encode_split(
            system,
            eval_loader,
            dict(zip(split["ids"], split["keys"], strict=True)),
            device,
            autocast,
            progress=False,
        )
        labels = encoded.labels
        if system.has_predictor:
            diagnostics[split_name] = prediction_diagnostics(system, encoded, device)
        if cell["variant"] in ORACLE:
            # Oracle parts: predictions from the modalities this model uses (combined at aggregation).
            image_on = cell["variant"] != "oracle_text"
            text_on = cell["variant"] != "oracle_image"
            logits = fuse_setting(
                system, encoded, all_true & image_on, all_true & text_on, device, autocast=autocast
            )
            component_logits[split_name] = logits.tolist()
            continue
        for test_type, rate in TEST_SETTINGS:
            if rate == 0.0:
                image_on, text_on = all_true, all_true
            else:
                image_on, text_on = data["presence"][f"{split_name}/{test_type}/{rate}"]
            logits = fuse_setting(system, encoded, image_on, text_on, device, autocast=autocast)
            if rate == 0.0 and cell["variant"] == FUSED_TWIN and cell["setting"] == "complete":
                component_logits[split_name] = logits.tolist()  # the oracle's fused part
            for metric, value in _metrics(
                logits, labels, data["num_classes"], build_metric_collection, metric_inputs
            ).items():
                results.append(
                    {
                        "split": split_name,
                        "test_type": test_type,
                        "rate": rate,
                        "metric": metric,
                        "value": value,
                    }
                )
    return {
        "cell": cell,
        "train_samples": len(rows),
        "train_steps": int(trainer.global_step),
        "train_s": train_s,
        "total_s": time.perf_counter() - started,
        "device": str(device),
        "machine": benchutil.machine_info(device).get("gpu") or benchutil.machine_info(device)["cpu"],
        "config": run_config(args),
        "final_train_metrics": final_losses,
        "results": results,
        "diagnostics": diagnostics,
        "component_logits": component_logits,
        "labels": {s: data["splits"][s]["labels"].tolist() for s in ("val", "test")}
        if component_logits
        else {},
    }


@torch.no_grad()
def prediction_diagnostics(system, encoded, device: torch.device) -> dict[str, float]:
    """Cosine, std ratio and substitution accuracy of the predictions over a split's complete inputs."""
    from lightning_modules.diagnostics import PredictionDiagnostics

    emb = {key: value.to(device).float() for key, value in encoded.embeddings.items() if value is not None}
    labels = encoded.labels.to(device)
    head = system.head
    logits = {"image": head(emb["zhat_v"], emb["z_t"]), "text": head(emb["z_v"], emb["zhat_t"])}
    metric = PredictionDiagnostics(emb["z_v"].shape[1], emb["z_t"].shape[1], system.hparams.task).to(device)
    metric.update(emb, logits, labels, torch.ones(len(labels), dtype=torch.bool, device=device))
    return {name: float(value) for name, value in metric.compute().items()}


def _metrics(logits, labels, num_classes, build_metric_collection, metric_inputs) -> dict[str, float]:
    collection = build_metric_collection("multiclass", num_classes)
    preds, target = metric_inputs(logits, labels, "multiclass")
    collection.update(preds, target)
    return {name: float(value) for name, value in collection.compute().items()}


def _cell_worker(cell: dict, args_dict: dict, data_path: str, path: str) -> dict:
    try:
        document = run_cell(cell, args_dict, data_path)
    except Exception:
        return {"cell": cell, "error": traceback.format_exc()}
    benchutil.write_json(Path(path), document)
    return document


# ------------------------------------------------------------------------------------ aggregation


def _oracle_setting_rows(
    models: dict[str, dict], setting: str, seed: int, variant: str, data: dict | None
) -> list[dict]:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    rows = []
    for split in ("val", "test"):
        labels = torch.tensor(models["oracle_fused"]["labels"][split])
        logits = {name: torch.tensor(doc["component_logits"][split]) for name, doc in models.items()}
        num_classes = logits["oracle_fused"].shape[1]
        for test_type, rate in TEST_SETTINGS:
            if rate == 0.0:
                combined = logits["oracle_fused"]
            else:
                if data is None:
                    raise ValueError("oracle rows at eta > 0 need the presence masks of the data")
                image, text = data["presence"][f"{split}/{test_type}/{rate}"]
                combined = torch.where(
                    (image & text)[:, None],
                    logits["oracle_fused"],
                    torch.where(image[:, None], logits["oracle_image"], logits["oracle_text"]),
                )
            preds = combined.argmax(dim=1)
            values = {
                "accuracy": float(MulticlassAccuracy(num_classes, average="micro")(preds, labels)),
                "f1_macro": float(MulticlassF1Score(num_classes, average="macro")(preds, labels)),
            }
            for metric, value in values.items():
                rows.append(
                    {
                        "setting": setting,
                        "strategy": "oracle",
                        "variant": variant,
                        "options": {},
                        "seed": seed,
                        "split": split,
                        "test_type": test_type,
                        "rate": rate,
                        "metric": metric,
                        "value": value,
                    }
                )
    return rows


def oracle_rows(cells: list[dict], data: dict | None = None) -> list[dict]:
    """Oracle rows per (training setting, seed, split, test setting): the fused model on complete
    samples, the image-only / text-only model on the others, all three trained on the whole, complete
    training set (the ceiling for both training settings)."""
    parts: dict[tuple, dict[str, dict]] = {}
    for doc in cells:
        cell = doc["cell"]
        if cell["variant"] in ORACLE:
            parts.setdefault((cell["setting"], cell["seed"]), {})[cell["variant"]] = doc
    rows = []
    for seed in sorted({seed for _, seed in parts}):
        ceiling = parts.get(("complete", seed), {})
        if set(ceiling) == set(ORACLE):
            for setting in SETTINGS:
                rows += _oracle_setting_rows(ceiling, setting, seed, "oracle", data)
    return rows


def collect_rows(cells: list[dict], data: dict | None) -> list[dict]:
    rows = []
    for doc in cells:
        cell = doc["cell"]
        if cell["variant"] in ORACLE:
            continue
        for result in doc["results"]:
            rows.append(
                {
                    "setting": cell["setting"],
                    "strategy": cell["strategy"],
                    "variant": cell["variant"],
                    "options": cell["options"],
                    "seed": cell["seed"],
                    **result,
                }
            )
    return rows + oracle_rows(cells, data)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(rows: list[dict], split: str, metric: str = PRIMARY_METRIC) -> dict[tuple, list[float]]:
    table: dict[tuple, list[float]] = {}
    for row in rows:
        if row["split"] == split and row["metric"] == metric:
            table.setdefault((row["setting"], row["variant"], row["test_type"], row["rate"]), []).append(
                row["value"]
            )
    return table


ETA_TESTS: tuple[tuple[str, float], ...] = tuple((t, r) for t, r in TEST_SETTINGS if r > 0)
# Two-sided 95 % Student t quantiles by degrees of freedom (normal beyond the table).
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t95(df: int) -> float:
    if df < 1:
        return math.nan
    return _T95.get(df) or next((v for k, v in sorted(_T95.items()) if k >= df), 1.96)


def _per_seed(rows: list[dict], split: str, metric: str = PRIMARY_METRIC) -> dict[tuple, dict[int, float]]:
    table: dict[tuple, dict[int, float]] = {}
    for row in rows:
        if row["split"] == split and row["metric"] == metric:
            table.setdefault((row["setting"], row["variant"], row["test_type"], row["rate"]), {})[
                row["seed"]
            ] = row["value"]
    return table


def best_baselines(rows: list[dict]) -> dict[str, str]:
    """Per training setting, the plain baseline with the best mean val accuracy over the 70 % test types."""
    table = summary_table(rows, "val")
    best = {}
    for setting in SETTINGS:
        scores = {}
        for name in PLAIN:
            values = [table.get((setting, name, t, r)) for t, r in ETA_TESTS]
            if all(values):
                scores[name] = statistics.fmean(statistics.fmean(v) for v in values)
        if scores:
            best[setting] = max(scores, key=scores.get)
    return best


def paired_differences(rows: list[dict], split: str = "test") -> list[dict]:
    """Per setting, test setting and non-baseline variant: variant − best baseline, paired by seed.

    With a 95 % t-interval over the seeds.
    """
    table = _per_seed(rows, split)
    best = best_baselines(rows)
    out = []
    for (setting, variant, test_type, rate), values in sorted(table.items(), key=str):
        if setting not in best or variant_group(variant) == "plain" or variant.startswith("oracle"):
            continue
        baseline = table.get((setting, best[setting], test_type, rate), {})
        seeds = sorted(set(values) & set(baseline))
        if not seeds:
            continue
        diffs = [values[seed] - baseline[seed] for seed in seeds]
        mean = statistics.fmean(diffs)
        half = (
            t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            if len(diffs) > 1
            else math.nan
        )
        out.append(
            {
                "setting": setting,
                "variant": variant,
                "baseline": best[setting],
                "test_type": test_type,
                "rate": rate,
                "split": split,
                "seeds": seeds,
                "mean_difference": mean,
                "ci95_low": mean - half,
                "ci95_high": mean + half,
            }
        )
    return out


def gap_closed(rows: list[dict], split: str = "test") -> list[dict]:
    """(variant − best baseline) / (oracle − best baseline) of the seed means, per setting and 70 % test.

    The means are over the seeds all three have, so a variant run on fewer seeds is compared with
    the baseline and the oracle of the same seeds.
    """
    table = _per_seed(rows, split)
    best = best_baselines(rows)
    out = []
    for setting, baseline_name in best.items():
        variants = sorted(
            {k[1] for k in table if k[0] == setting and variant_group(k[1]) in ("method", "system")}
        )
        for test_type, rate in ETA_TESTS:
            baseline = table.get((setting, baseline_name, test_type, rate), {})
            oracle = table.get((setting, "oracle", test_type, rate), {})
            for variant in variants:
                values = table.get((setting, variant, test_type, rate), {})
                seeds = sorted(set(values) & set(baseline) & set(oracle))
                if not seeds:
                    continue
                v, b, o = (statistics.fmean(d[seed] for seed in seeds) for d in (values, baseline, oracle))
                out.append(
                    {
                        "setting": setting,
                        "variant": variant,
                        "baseline": baseline_name,
                        "test_type": test_type,
                        "rate": rate,
                        "split": split,
                        "seeds": seeds,
                        "variant_mean": v,
                        "baseline_mean": b,
                        "oracle_mean": o,
                        "gap_closed": (v - b) / (o - b) if abs(o - b) > 1e-12 else None,
                    }
                )
    return out


def diagnostics_summary(cells: list[dict], split: str = "val") -> dict[tuple, dict[str, tuple[float, float]]]:
    """(setting, variant) -> diagnostic -> (mean, std) over seeds."""
    values: dict[tuple, dict[str, list[float]]] = {}
    for doc in cells:
        found = doc.get("diagnostics", {}).get(split)
        if not found:
            continue
        key = (doc["cell"]["setting"], doc["cell"]["variant"])
        for name, value in found.items():
            if name != "num_samples":
                values.setdefault(key, {}).setdefault(name, []).append(value)
    return {key: {name: mean_std(v) for name, v in found.items()} for key, found in values.items()}


SWITCH_NAMES: tuple[str, ...] = tuple(REFERENCE)


def decide_defaults(rows: list[dict]) -> dict[str, Any]:
    """The method's defaults: the best measured configuration **on val**.

    Candidates: every method variant of the run (``lambda_0`` included: if the task-trained
    predictor wins, the VICReg term does not pay), with their switch values spelled out. Score =
    mean over both training settings and the three eta = 70 % test types (text, image, both) of the
    seed-mean val accuracy; the test score (same average) is reported next to it, not used. Paired:
    the choice is among the candidates that have every seed of the run; one with fewer seeds is
    scored on its own seeds and ranked after them (``eligible`` false). Only configurations with
    every (setting, test type) take part. Deciding on the best configuration, not switch by switch,
    respects interactions and only ever picks a setting that was trained.
    """
    tables = {split: _per_seed(rows, split) for split in ("val", "test")}
    keys = [(setting, test_type, rate) for setting in SETTINGS for test_type, rate in ETA_TESTS]

    def seeds_of(variant: str) -> set[int] | None:
        found = [tables["val"].get((setting, variant, t, r)) for setting, t, r in keys]
        return set.intersection(*(set(f) for f in found)) if all(found) else None

    def score(split: str, variant: str, seeds: list[int]) -> float:
        cells = [tables[split][(setting, variant, t, r)] for setting, t, r in keys]
        return statistics.fmean(statistics.fmean(cell[seed] for seed in seeds) for cell in cells)

    candidates = sorted({row["variant"] for row in rows if variant_group(row["variant"]) == "method"})
    seeds = {variant: seeds_of(variant) for variant in candidates}
    measured = [variant for variant in candidates if seeds[variant]]
    if not measured:
        return {}
    # Paired: the decision is among the candidates with every seed any candidate has; one run on
    # fewer seeds is scored on its own seeds and shown, but not chosen.
    all_seeds = set().union(*(seeds[variant] for variant in measured))
    ranking = [
        {
            "variant": variant,
            "switches": method_options(variant),
            "seeds": sorted(seeds[variant]),
            "eligible": seeds[variant] == all_seeds,
            "val_score": score("val", variant, sorted(seeds[variant])),
            "test_score": score("test", variant, sorted(seeds[variant])),
        }
        for variant in measured
    ]
    ranking.sort(key=lambda r: (r["eligible"], r["val_score"]), reverse=True)
    chosen = ranking[0]
    return {
        "chosen_variant": chosen["variant"],
        "defaults": chosen["switches"],
        "seeds": chosen["seeds"],
        "candidates_missing": [v for v in candidates if v not in measured],
        "ranking": ranking,
    }


def _label(variant: str) -> str:
    group = variant_group(variant)
    if group == "plain":
        return f"{variant} (baseline)"
    if group == "system":
        return f"{variant} (method's system, stand-in changed)"
    return f"{variant} — {NAMED_VARIANTS[variant]}" if variant in NAMED_VARIANTS else variant


def markdown(document: dict) -> str:
    rows = document["rows"]
    header, cfg = document["header"], document["config"]
    machine = header["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} cores)"
    order = (
        [v for v in PLAIN]
        + sorted(
            {r["variant"] for r in rows if variant_group(r["variant"]) == "method"},
            key=lambda v: (v != "method", v),
        )
        + list(SYSTEM_STANDINS)
        + ["oracle"]
    )
    col_names = [f"{t} {int(100 * r)}%" if r else "complete (η=0)" for t, r in TEST_SETTINGS]
    lines = [
        f"Ablation v2 on emoji (`{cfg['label']}` labels), {cfg['image_backbone']} + {cfg['text_backbone']}, "
        f"PEFT {cfg['peft']}, prompt length {cfg['prompt_length']}, {cfg['epochs']} epochs, "
        f"batch {cfg['batch_size']}, "
        f"lr {cfg['lr']}, {cfg['image_size']} px; seeds {document['seeds_done']}; tabulated on {where}, "
        f"{header['date']}: `{header['command']}`."
        + (
            f" Cells trained on: {', '.join(document['cells_machines'])}."
            if document.get("cells_machines")
            else ""
        )
        + (f" {document['cells_note']}" if document.get("cells_note") else ""),
        "",
        "Baselines (`*_plain`): plain late fusion with a fixed stand-in, no predictor tokens, no VICReg — "
        "they differ from `method` in the stand-in *and* in having no predictor. Method variants differ from "
        "`method` in the switches in their name: `detach` = read-only tokens read detached keys/values "
        "(`readonly_grad: detach`), `target_matched` = VICReg in the target's standardised space "
        "(`vicreg_space: target_matched`), `lambda_x` = VICReg weight x; `method` = stop-gradient on the "
        "target, `readonly_grad: through`, raw VICReg, λ = 1. `lambda_0` is the task-trained predictor (no "
        "VICReg). `oracle`: fused model on complete samples, dedicated image-only / text-only models on the "
        "others, all trained on the whole complete training set.",
        "",
    ]
    for split in ("test", "val"):
        table = summary_table(rows, split)
        for setting in SETTINGS:
            present = [v for v in order if any(k[0] == setting and k[1] == v for k in table)]
            if not present:
                continue
            train_eta = SETTINGS[setting]["train_missing"]["missing_rate"]
            lines += [
                f"**{split} {PRIMARY_METRIC}, {setting} training (train η = {int(100 * train_eta)}% both), "
                "mean ± std over seeds**",
                "",
                "| variant | " + " | ".join(col_names) + " |",
                "|---|" + "---:|" * len(TEST_SETTINGS),
            ]
            for variant in present:
                cells = []
                for test_type, rate in TEST_SETTINGS:
                    values = table.get((setting, variant, test_type, rate))
                    if values:
                        m, sd = mean_std(values)
                        n_note = f" (n={len(values)})" if len(values) != len(document["seeds_done"]) else ""
                        cells.append(f"{m:.3f} ± {sd:.3f}{n_note}")
                    else:
                        cells.append("")
                lines.append(f"| {_label(variant)} | " + " | ".join(cells) + " |")
            lines.append("")
    eta_names = [f"{t} {int(100 * r)}%" for t, r in ETA_TESTS]
    diffs = document.get("paired_differences", [])
    if diffs:
        lines += [
            "**Test: variant − best baseline (chosen on val), paired by seed: mean [95 % t-interval]**",
            "",
            "| setting | variant | baseline | " + " | ".join(eta_names + ["complete (η=0)"]) + " |",
            "|---|---|---|" + "---:|" * len(TEST_SETTINGS),
        ]
        keys = sorted(
            {(d["setting"], d["variant"]) for d in diffs},
            key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99),
        )
        for setting, variant in keys:
            found = {
                (d["test_type"], d["rate"]): d
                for d in diffs
                if (d["setting"], d["variant"]) == (setting, variant)
            }
            cells = []
            for key in [*ETA_TESTS, ("none", 0.0)]:
                d = found.get(key)
                cells.append(
                    ""
                    if d is None
                    else f"{d['mean_difference']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]"
                )
            baseline = next(iter(found.values()))["baseline"]
            lines.append(f"| {setting} | {variant} | {baseline} | " + " | ".join(cells) + " |")
        lines.append("")
    gaps = document.get("gap_closed", [])
    if gaps:
        lines += [
            "**Gap closed on test = (variant − best baseline) / (oracle − best baseline), means over "
            "the seeds the three share**",
            "",
            "| setting | variant | " + " | ".join(eta_names) + " |",
            "|---|---|" + "---:|" * len(ETA_TESTS),
        ]
        keys = sorted(
            {(g["setting"], g["variant"]) for g in gaps},
            key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99),
        )
        for setting, variant in keys:
            cells = []
            for test_type, rate in ETA_TESTS:
                g = next(
                    (
                        g
                        for g in gaps
                        if (g["setting"], g["variant"], g["test_type"], g["rate"])
                        == (setting, variant, test_type, rate)
                    ),
                    None,
                )
                cells.append("" if g is None or g["gap_closed"] is None else f"{g['gap_closed']:.2f}")
            lines.append(f"| {setting} | {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    diag = document.get("diagnostics", {})
    if diag:
        names = [
            "cos_image",
            "cos_text",
            "std_ratio_image",
            "std_ratio_text",
            "substitution_accuracy_image",
            "substitution_accuracy_text",
        ]
        lines += [
            "**Val diagnostics of the predictions (complete inputs; `image` = ẑ_v from the text, "
            "`text` = ẑ_t from the image; substitution accuracy = the head on one predicted embedding), "
            "mean ± std**",
            "",
            "| setting | variant | " + " | ".join(names) + " |",
            "|---|---|" + "---:|" * len(names),
        ]
        keys = sorted(
            (tuple(k.split("/", 1)) for k in diag),
            key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99),
        )
        for key in keys:
            found = diag["/".join(key)]
            lines.append(
                f"| {key[0]} | {key[1]} | "
                + " | ".join(f"{found[n][0]:.3f} ± {found[n][1]:.3f}" if n in found else "" for n in names)
                + " |"
            )
        lines.append("")
    ece = summary_table(rows, "test", "ece")
    if ece:
        lines += [
            "**Test expected calibration error (15 bins), mean over seeds**",
            "",
            "| setting | variant | " + " | ".join(col_names) + " |",
            "|---|---|" + "---:|" * len(TEST_SETTINGS),
        ]
        for setting in SETTINGS:
            for variant in order:
                values = [ece.get((setting, variant, t, r)) for t, r in TEST_SETTINGS]
                if any(values):
                    lines.append(
                        f"| {setting} | {variant} | "
                        + " | ".join(f"{statistics.fmean(v):.3f}" if v else "" for v in values)
                        + " |"
                    )
        lines.append("")
    decisions = document.get("defaults", {})
    if decisions:
        lines += [
            "**Defaults decided on val**: the best method configuration by mean val accuracy over both "
            "training settings and text / image / both at 70 %, among the candidates with every seed "
            f"({decisions.get('seeds')}); the others are scored on their own seeds and ranked after them "
            "(test: the same average, for reference)",
            "",
            "| rank | variant | " + " | ".join(SWITCH_NAMES) + " | seeds | val score | test score |",
            "|---:|---|" + "---|" * len(SWITCH_NAMES) + "---|---:|---:|",
        ]
        for rank, r in enumerate(decisions["ranking"], 1):
            sw = r["switches"]
            lines.append(
                f"| {rank} | {r['variant']} | "
                + " | ".join(str(sw[n]) for n in SWITCH_NAMES)
                + f" | {r['seeds']}{'' if r['eligible'] else ' (fewer: not chosen)'}"
                + f" | {r['val_score']:.3f} | {r['test_score']:.3f} |"
            )
        missing = decisions.get("candidates_missing")
        lines += [
            "",
            f"Chosen: `{decisions['chosen_variant']}` → {decisions['defaults']}"
            + (f" (not all candidates measured: {missing})" if missing else "")
            + ".",
            "",
        ]
    times = document.get("timing", {})
    if times:
        lines.append(
            f"Cells: {times['cells_done']} done ({times['cells_run_now']} trained in this run, "
            f"median {times['median_cell_s']:.0f} s per cell); wall {times['wall_s']:.0f} s; "
            f"{len(document.get('cells_missing', []))} cells of the grid not done yet."
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="learning rate of prompts and heads (the demo's)"
    )
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--max-text-len", type=int, default=32)
    parser.add_argument("--peft", default="prompt", choices=("prompt", "bitfit", "lora", "full", "frozen"))
    parser.add_argument(
        "--label",
        default="group",
        choices=("group", "subgroup"),
        help="emoji label set: group (9 classes) or subgroup (58 classes)",
    )
    parser.add_argument(
        "--prompt-length", type=int, default=0, help="task prompt tokens per layer (0 = the encoders' preset)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help="method variants: method, or switches joined by '+' ("
        + ", ".join(sorted(ATOMIC_SWITCHES))
        + f", {LAMBDA_PREFIX}<x>), e.g. detach+lambda_0.1",
    )
    parser.add_argument(
        "--baselines", nargs="*", default=list(PLAIN), choices=list(PLAIN), help="plain baselines"
    )
    parser.add_argument(
        "--system-standins",
        nargs="*",
        default=[],
        choices=list(SYSTEM_STANDINS),
        help="the method's system with only the stand-in changed (not baselines)",
    )
    parser.add_argument(
        "--no-oracle", dest="oracle", action="store_false", help="skip the oracle's three models"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="subset of the grid: settings (complete, missing), variant names or groups "
        "(method, plain, oracle, system)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells trained at the same time (processes)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (0 = torch's default)"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="minutes after which no new cell starts (0 = none); the rest stays for a re-run",
    )
    parser.add_argument(
        "--aggregate-only", action="store_true", help="train nothing; tabulate the finished cells"
    )
    parser.add_argument(
        "--cells-note",
        default=None,
        help="recorded in ablation.json, e.g. where cells trained elsewhere come from",
    )
    parser.add_argument(
        "--limit-train-samples", type=int, default=0, help="train on the first N samples only (tests)"
    )
    parser.add_argument(
        "--root", default=None, help="unipair cache folder holding emoji/ (default $UNIPAIR_CACHE)"
    )
    parser.add_argument(
        "--pack", default=None, help="device pack folder (benchmarks.device_pack) instead of the cache"
    )
    parser.add_argument(
        "--encoders",
        choices=ENCODER_PRESETS,
        default="demo",
        help="encoder preset: demo = configs/model/encoders/offline.yaml (pretrained), "
        "tiny = configs/model/encoders/tiny.yaml (random; smoke tests)",
    )
    parser.add_argument(
        "--data", default=None, help="a prepared data tensor file (as written to <out>/data-*.pt)"
    )
    parser.add_argument("--out", default=str(benchutil.ROOT / "runs" / "ablation"))
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_batch_size", "image_size", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for variant in args.variants:
        try:
            method_options(variant)
        except ValueError as error:
            parser.error(f"--variants: {error}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    device = benchutil.resolve_device(args.device)
    args.device = str(device)
    header = benchutil.run_header(device)
    data_path = load_data(args)
    config = run_config(args)
    cells = cell_list(args)
    done, pending = load_done(cells, out, config, verbose=True)
    pending = without_twin_duplicates(pending)
    print(
        f"ablation: {len(cells)} cells, {len(done)} already done, {len(pending)} to train on {device} "
        f"with {args.jobs} job(s)",
        file=sys.stderr,
        flush=True,
    )
    args_dict = vars(args)
    deadline = started + 60 * args.time_budget if args.time_budget else math.inf
    if args.aggregate_only:
        deadline = -math.inf
    failures: list[dict] = []
    ran: list[dict] = []
    if args.jobs == 1:
        for cell, path in pending:
            if time.perf_counter() > deadline:
                break
            ran.append(_report(_cell_worker(cell, args_dict, str(data_path), str(path)), failures))
    else:
        context = multiprocessing.get_context("spawn")
        pool = futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            queue = list(pending)
            running: set[futures.Future] = set()
            while queue or running:
                while queue and len(running) < args.jobs and time.perf_counter() < deadline:
                    cell, path = queue.pop(0)
                    running.add(pool.submit(_cell_worker, cell, args_dict, str(data_path), str(path)))
                if not running:
                    break
                finished, running = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    ran.append(_report(future.result(), failures))
        except KeyboardInterrupt:
            # Stopped (Ctrl-C, or SIGTERM from a time limit): end the workers, tabulate what finished.
            print(
                "ablation: interrupted; stopping the workers and tabulating the finished cells",
                file=sys.stderr,
            )
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
        finally:
            signal.signal(signal.SIGTERM, previous)
            pool.shutdown(wait=False, cancel_futures=True)
    done, _ = load_done(cells, out, config)  # everything on disk now, also cells a stopped run finished
    data = torch.load(data_path, weights_only=False)
    rows = collect_rows(done, data)
    cell_times = [doc["total_s"] for doc in ran if "error" not in doc]
    document = {
        "format_version": JSON_FORMAT_VERSION,
        "header": header,
        "config": config,
        "data": {"source": data["source"], "transform_check": data.get("transform_check", "identical")},
        "cells_machines": sorted({doc.get("machine", "not recorded in the cell") for doc in done}),
        "cells_note": args.cells_note,
        "row_fields": [
            "setting",
            "strategy",
            "variant",
            "options",
            "seed",
            "split",
            "test_type",
            "rate",
            "metric",
            "value",
        ],
        "seeds_done": sorted({doc["cell"]["seed"] for doc in done}),
        "cells_expected": len(cells),
        "cells_missing": [
            f"{c['setting']}/{c['variant']}/seed{c['seed']}"
            for c, _ in pending
            if not any(d["cell"] == c for d in done)
        ],
        "rows": rows,
        "best_baselines": best_baselines(rows),
        "paired_differences": paired_differences(rows),
        "gap_closed": gap_closed(rows),
        "diagnostics": {f"{k[0]}/{k[1]}": v for k, v in diagnostics_summary(done).items()},
        "defaults": decide_defaults(rows),
        "timing": {
            "cells_done": len(done),
            "cells_run_now": len(cell_times),
            "median_cell_s": statistics.median(cell_times) if cell_times else 0.0,
            "cell_s": cell_times,
            "wall_s": time.perf_counter() - started,
        },
        "failures": failures,
    }
    benchutil.write_json(out / "ablation.json", document)
    table = markdown(document)
    (out / "ablation.md").write_text(table, encoding="utf-8")
    print(table)
    print(
        f"ablation: wrote {out / 'ablation.json'} ({len(rows)} rows; "
        f"{len(document['cells_missing'])} cells left)",
        file=sys.stderr,
    )
    if failures:
        raise SystemExit(1)
    return document


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _report(doc: dict, failures: list[dict]) -> dict:
    cell = doc["cell"]
    label = f"{cell['setting']}/{cell['variant']}/seed{cell['seed']}"
    if "error" in doc:
        failures.append(doc)
        print(f"ablation: {label} FAILED:\n{doc['error']}", file=sys.stderr, flush=True)
    else:
        acc = [
            r["value"]
            for r in doc["results"]
            if r["split"] == "test" and r["metric"] == PRIMARY_METRIC and r["test_type"] == "both"
        ]
        note = f", test acc (both 70%) {acc[0]:.3f}" if acc else ""
        print(
            f"ablation: {label}: {doc['train_s']:.0f} s training, {doc['total_s']:.0f} s total{note}",
            file=sys.stderr,
            flush=True,
        )
    return doc


if __name__ == "__main__":
    main()

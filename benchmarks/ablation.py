"""Quality ablation on emoji: missing strategies, the method's switches and the oracle (``make ablation``).

Cells (one trained model each, written as one JSON under ``<out>/cells/``; finished cells are
skipped on re-run, so the run is resumable):

- training settings: ``complete`` (train eta = 0) and ``missing`` (train eta = 70 %, type both);
- strategies ``predict`` (the method), ``zero``, ``learned``, ``dummy_input`` with the defaults;
- the method's switches (``predict``): ``stop_grad`` (stop-gradient on the VICReg target),
  ``substitution`` (head also trained on [z_v; ẑ_t] and [ẑ_v; z_t]), ``lambda_<x>`` (VICReg weight);
- the oracle's three models: ``oracle_fused`` (both modalities, no predictor), ``oracle_image`` and
  ``oracle_text`` (dedicated unimodal models, see below);
- seeds (model initialisation and data order; the missing tables are the protocol's, seed 0).

Every cell is evaluated on the val and test splits at eta = 70 % for missing type text / image /
both and at eta = 0, with the robustness module's separable evaluation (the encoders run once per
split on complete inputs, ``fuse_with_missing`` once per missing setting).

The oracle. A predicted embedding is a function of the modality that is present, so it can add no
information beyond it: the best any stand-in can do on a text-missing sample is what a dedicated
image-only model does. The unimodal models are built with the same system, encoders, PEFT mode and
head: ``oracle_image`` is trained with the text missing on *every* sample and the ``zero`` strategy,
so the head sees [z_v; 0] and learns from the image alone; no predictor (nothing to pair with); the
unused text encoder is ``frozen`` (identical function, no wasted backward). ``oracle_text`` mirrors
it. Under the ``missing`` setting each oracle model is trained on the samples it could use there
(the fused one on the complete samples, the image-only one on every sample with an image, ...).
The oracle's prediction for a test sample comes from the fused model when it is complete and from
the unimodal model of its present modality otherwise. ``gap closed`` =
(strategy − zero) / (oracle − zero), from the means over seeds.

Outputs: ``<out>/ablation.json`` (header + rows with setting, strategy, options, seed, split,
test type, rate, metric, value; plus ``gap_closed``) and ``<out>/ablation.md`` (mean ± std).

Data: the emoji DataModule's splits, tokens, transforms and missing tables, decoded once into
tensors (``<out>/data-*.pt``) that every cell reuses (on the training device); or ``--pack`` (see
``benchmarks/device_pack.py``) on a machine without the asset cache.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402  (puts the project root on sys.path)
import torch  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "complete": {"train_missing": {"missing_rate": 0.0, "missing_type": "both"}},
    "missing": {"train_missing": {"missing_rate": 0.7, "missing_type": "both"}},
}
TEST_SETTINGS: tuple[tuple[str, float], ...] = (("text", 0.7), ("image", 0.7), ("both", 0.7), ("none", 0.0))
STRATEGIES: tuple[str, ...] = ("predict", "zero", "learned", "dummy_input")
# The method's switches at the values the ablation starts from (DESIGN.md's first reading: no
# substitution, no stop-gradient, lambda 1). Every variant passes its switches explicitly, so the
# cells mean the same thing whatever the system's defaults are later.
REFERENCE: dict[str, Any] = {"substitution": False, "stop_grad_target": False, "pred_loss_weight": 1.0}
SWITCHES: dict[str, dict[str, Any]] = {
    "stop_grad": {"stop_grad_target": True},
    "substitution": {"substitution": True},
    "lambda_0": {"pred_loss_weight": 0.0},
    "lambda_0.1": {"pred_loss_weight": 0.1},
    "lambda_10": {"pred_loss_weight": 10.0},
}
# Switches together (the single-switch cells cannot tell how they interact).
COMBOS: dict[str, dict[str, Any]] = {
    "stop_grad+substitution": {"stop_grad_target": True, "substitution": True},
    "stop_grad+lambda_0.1": {"stop_grad_target": True, "pred_loss_weight": 0.1},
    "stop_grad+lambda_10": {"stop_grad_target": True, "pred_loss_weight": 10.0},
    "stop_grad+substitution+lambda_0.1": {"stop_grad_target": True, "substitution": True, "pred_loss_weight": 0.1},
    "lambda_0+substitution": {"pred_loss_weight": 0.0, "substitution": True},
}
# The baselines as the project's configs define them (configs/model/zero.yaml, ...): no predictor,
# no VICReg. (``zero`` / ``learned`` / ``dummy_input`` above are the method's system, trained the
# same way as ``predict``, with only the stand-in changed.)
PLAIN: dict[str, dict[str, Any]] = {
    "zero_plain": {"missing_strategy": "zero", "predictor_length": 0},
    "learned_plain": {"missing_strategy": "learned", "predictor_length": 0},
    "dummy_input_plain": {"missing_strategy": "dummy_input", "predictor_length": 0},
}
ORACLE: dict[str, dict[str, Any]] = {
    "oracle_fused": {"missing_strategy": "zero", "predictor_length": 0},
    "oracle_image": {"missing_strategy": "zero", "predictor_length": 0, "text_peft": "frozen"},
    "oracle_text": {"missing_strategy": "zero", "predictor_length": 0, "image_peft": "frozen"},
}
VARIANT_GROUPS = {"strategies": STRATEGIES, "oracle": tuple(ORACLE), "switches": tuple(SWITCHES),
                  "combos": tuple(COMBOS), "plain": tuple(PLAIN)}
PRIMARY_METRIC = "accuracy"
# Encoders of the run: the demo's (pretrained, offline cache or device pack), or tiny random ones
# for the smoke tests (timm test_vit + tiny-bert, with small prompt/head sizes).
ENCODERS: dict[str, dict[str, Any]] = {
    # Sizes pinned (the system's defaults when the ablation was first run) so cells stay comparable.
    "demo": {"image_backbone": "dinov2-s14", "text_backbone": "minilm-l6", "pretrained": True, "prompt_length": 16,
             "prompt_depth": 6, "predictor_length": 8, "predictor_hidden_dim": 256, "head_hidden_dim": 256},
    "tiny": {"image_backbone": "test_vit", "text_backbone": "tiny-bert", "pretrained": False, "prompt_length": 2,
             "prompt_depth": 2, "predictor_length": 2, "predictor_hidden_dim": 16, "head_hidden_dim": 16},
}
JSON_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------- data


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"image_size": args.image_size, "max_text_len": args.max_text_len, "label": "group", "missing_seed": 0}


def build_tensors_from_datamodule(settings: dict[str, Any], root: str | None) -> dict[str, Any]:
    """Decode the emoji splits through ``EmojiDataModule`` into tensors, with the protocol's presence masks.

    Images and tokens are exactly what the DataModule's loaders yield: its dataset items (per-sample
    transform, tokens) through its own collate function (batched normalisation, padding); the
    presence masks come from its missing tables (persisted next to the data, seed ``missing_seed``).
    """
    from datamodules.emoji import EmojiDataModule

    common = {"root": root, "image_size": settings["image_size"], "max_text_len": settings["max_text_len"],
              "label": settings["label"], "missing_seed": settings["missing_seed"], "num_workers": 0}
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
            "ids": list(ds.ids), "keys": list(ds.keys), "labels": batch["label"], "images": batch["image"],
            "input_ids": batch["input_ids"], "lengths": batch["attention_mask"].sum(dim=1),
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
                torch.from_numpy(ds.image_present.copy()), torch.from_numpy(ds.text_present.copy())
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


def load_data(args: argparse.Namespace) -> Path:
    """Build (once) and return the tensor file every cell reads (``--data``: a prepared one)."""
    if args.data:
        if not Path(args.data).is_file():
            raise SystemExit(f"--data {args.data}: no such file")
        return Path(args.data)
    settings = data_settings(args)
    tag = hashlib.sha256(json.dumps({**settings, "pack": bool(args.pack)}, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(args.out) / f"data-{tag}.pt"
    if path.is_file():
        return path
    started = time.perf_counter()
    if args.pack:
        from device_pack import tensors_from_pack

        data = tensors_from_pack(Path(args.pack), settings)
    else:
        data = build_tensors_from_datamodule(settings, args.root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    print(f"ablation: decoded the emoji splits into {path} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return path


# ------------------------------------------------------------------------------------------ cells


def cell_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All cells of the run, seed-major (a run cut short still has whole seeds), filtered by ``--only``."""
    variants: list[tuple[str, str, dict[str, Any]]] = [(name, name, dict(REFERENCE)) for name in STRATEGIES]
    variants += [(name, "predict", {**REFERENCE, **options}) for name, options in {**SWITCHES, **COMBOS}.items()]
    variants += [(name, str(options["missing_strategy"]), dict(options)) for name, options in {**PLAIN, **ORACLE}.items()]
    only = set(args.only) if args.only else None
    if only:
        known = set(SETTINGS) | {v[0] for v in variants} | set(VARIANT_GROUPS)
        unknown = only - known
        if unknown:
            raise SystemExit(f"--only: unknown names {sorted(unknown)}; expected some of {sorted(known)}")
    # Within a seed: the strategies, the oracle, the switches, their combinations, the plain
    # baselines (a run cut short keeps the comparisons that matter most).
    groups = {name: g for g, members in VARIANT_GROUPS.items() for name in members}
    variants.sort(key=lambda v: list(VARIANT_GROUPS).index(groups[v[0]]))
    cells = []
    for seed in args.seeds:
        for name, strategy, options in variants:
            for setting in SETTINGS:
                if only:
                    groups = {g for g, members in VARIANT_GROUPS.items() if name in members}
                    wanted_variants = only - set(SETTINGS)
                    wanted_settings = only & set(SETTINGS)
                    if wanted_settings and setting not in wanted_settings:
                        continue
                    if wanted_variants and not (wanted_variants & ({name} | groups)):
                        continue
                cells.append({"setting": setting, "variant": name, "strategy": strategy, "options": options, "seed": seed})
    return cells


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Everything besides the cell that decides its result (part of the cell file name)."""
    encoders = ENCODERS[args.encoders]
    return {
        "image_backbone": encoders["image_backbone"], "text_backbone": encoders["text_backbone"], "peft": args.peft,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weights": "pack" if args.pack else ("cache" if encoders["pretrained"] else "random"),
        "data_file": Path(args.data).name if args.data else None,
        **data_settings(args), "limit_train_samples": args.limit_train_samples,
    }


def same_training(stored: dict, cell: dict) -> bool:
    """Whether a stored cell trained what ``cell`` describes (options compared with the reference filled in)."""
    return (stored["strategy"] == cell["strategy"] and stored["seed"] == cell["seed"]
            and {**REFERENCE, **stored["options"]} == {**REFERENCE, **cell["options"]})


def load_done(cells: list[dict], out: Path, config: dict, verbose: bool = False) -> tuple[list[dict], list[tuple[dict, Path]]]:
    """Split ``cells`` into finished ones (their documents, from disk) and pending ones (with their paths)."""
    done: list[dict] = []
    pending: list[tuple[dict, Path]] = []
    for cell in cells:
        path = cell_path(out, cell, config)
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if stored is not None and same_training(stored["cell"], cell):
            stored["cell"] = cell  # the current (explicit) spelling of the same options
            done.append(stored)
            continue
        if stored is not None and verbose:
            print(f"ablation: {path.name} was trained with other options {stored['cell']['options']}; training it again",
                  file=sys.stderr)
        pending.append((cell, path))
    return done, pending


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
    if cell["variant"] == "oracle_fused":
        rows = rows[image & text]
    elif cell["variant"] == "oracle_image":
        rows = rows[image]
        return rows, torch.ones(len(rows), dtype=torch.bool), torch.zeros(len(rows), dtype=torch.bool)
    elif cell["variant"] == "oracle_text":
        rows = rows[text]
        return rows, torch.zeros(len(rows), dtype=torch.bool), torch.ones(len(rows), dtype=torch.bool)
    return rows, image[rows], text[rows]


class BatchGather:
    """Collate for index batches over tensors held on the training device (no per-sample work).

    Yields the project's batch format: the filler (all-ones image, tokenised empty text) where a
    modality is missing, tokens padded to the batch's longest text.
    """

    def __init__(self, split: dict, rows: torch.Tensor, image_present: torch.Tensor, text_present: torch.Tensor,
                 empty_ids: list[int], pad_id: int, device: torch.device) -> None:
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
    kwargs = dict(ENCODERS[args.encoders])
    kwargs.update(
        task="multiclass", num_classes=data["num_classes"], img_size=args.image_size,
        missing_strategy=cell["strategy"], lr=args.lr, head_lr=args.lr, **peft, **options,
    )
    if args.pack:
        from device_pack import system_from_pack

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
        rows, image_present, text_present = (t[: args.limit_train_samples] for t in (rows, image_present, text_present))
    gather = BatchGather(data["splits"]["train"], rows, image_present, text_present, data["empty_ids"], data["pad_id"], device)
    loader = DataLoader(
        range(len(rows)), batch_size=args.batch_size, shuffle=True, collate_fn=gather,
        generator=torch.Generator().manual_seed(cell["seed"]),
    )
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=max(1, len(loader)),
    )
    with benchutil.quiet_warnings():
        trainer.fit(system, train_dataloaders=loader)
    train_s = time.perf_counter() - started
    final_losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}

    system = system.to(device).eval()
    results: list[dict] = []
    component_logits: dict[str, list] = {}
    for split_name in ("val", "test"):
        split = data["splits"][split_name]
        n = len(split["ids"])
        everything = torch.arange(n)
        all_true = torch.ones(n, dtype=torch.bool)
        eval_gather = BatchGather(split, everything, all_true, all_true, data["empty_ids"], data["pad_id"], device)
        eval_loader = DataLoader(range(n), batch_size=args.eval_batch_size, shuffle=False, collate_fn=eval_gather)
        encoded = encode_split(system, eval_loader, dict(zip(split["ids"], split["keys"], strict=True)), device, autocast, progress=False)
        labels = encoded.labels
        if cell["variant"] in ORACLE:
            # Oracle parts: predictions from the modalities this model uses (combined at aggregation).
            image_on = cell["variant"] != "oracle_text"
            text_on = cell["variant"] != "oracle_image"
            logits = fuse_setting(system, encoded, all_true & image_on, all_true & text_on, device, autocast=autocast)
            component_logits[split_name] = logits.tolist()
            continue
        for test_type, rate in TEST_SETTINGS:
            if rate == 0.0:
                image_on, text_on = all_true, all_true
            else:
                image_on, text_on = data["presence"][f"{split_name}/{test_type}/{rate}"]
            logits = fuse_setting(system, encoded, image_on, text_on, device, autocast=autocast)
            for metric, value in _metrics(logits, labels, data["num_classes"], build_metric_collection, metric_inputs).items():
                results.append({"split": split_name, "test_type": test_type, "rate": rate, "metric": metric, "value": value})
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
        "component_logits": component_logits,
        "labels": {s: data["splits"][s]["labels"].tolist() for s in ("val", "test")} if component_logits else {},
    }


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


def _oracle_setting_rows(models: dict[str, dict], setting: str, seed: int, variant: str, data: dict | None) -> list[dict]:
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
                combined = torch.where((image & text)[:, None], logits["oracle_fused"],
                                       torch.where(image[:, None], logits["oracle_image"], logits["oracle_text"]))
            preds = combined.argmax(dim=1)
            values = {
                "accuracy": float(MulticlassAccuracy(num_classes, average="micro")(preds, labels)),
                "f1_macro": float(MulticlassF1Score(num_classes, average="macro")(preds, labels)),
            }
            for metric, value in values.items():
                rows.append({"setting": setting, "strategy": "oracle", "variant": variant, "options": {},
                             "seed": seed, "split": split, "test_type": test_type, "rate": rate,
                             "metric": metric, "value": value})
    return rows


def oracle_rows(cells: list[dict], data: dict | None = None) -> list[dict]:
    """Oracle rows per (training setting, seed, split, test setting).

    ``oracle`` (the ceiling, for both training settings): the fused model on complete samples, the
    image-only / text-only model on the others, all three trained on the whole training set (the
    ``complete`` setting's oracle models). ``oracle_same_data`` (``missing`` setting only): the
    same, with each model trained on the samples it could use under missing training (the fused
    one on the complete 30 %, ...): less data than the strategies' models saw, so not a ceiling.
    """
    parts: dict[tuple, dict[str, dict]] = {}
    for doc in cells:
        if doc["cell"]["variant"] in ORACLE:
            parts.setdefault((doc["cell"]["setting"], doc["cell"]["seed"]), {})[doc["cell"]["variant"]] = doc
    rows = []
    for seed in sorted({seed for _, seed in parts}):
        ceiling = parts.get(("complete", seed), {})
        if set(ceiling) == set(ORACLE):
            for setting in SETTINGS:
                rows += _oracle_setting_rows(ceiling, setting, seed, "oracle", data)
        same_data = parts.get(("missing", seed), {})
        if set(same_data) == set(ORACLE):
            rows += _oracle_setting_rows(same_data, "missing", seed, "oracle_same_data", data)
    return rows


def collect_rows(cells: list[dict], data: dict | None) -> list[dict]:
    rows = []
    for doc in cells:
        cell = doc["cell"]
        if cell["variant"] in ORACLE:
            continue
        for result in doc["results"]:
            rows.append({"setting": cell["setting"], "strategy": cell["strategy"], "variant": cell["variant"],
                         "options": cell["options"], "seed": cell["seed"], **result})
    return rows + oracle_rows(cells, data)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(rows: list[dict], split: str, metric: str = PRIMARY_METRIC) -> dict[tuple, list[float]]:
    table: dict[tuple, list[float]] = {}
    for row in rows:
        if row["split"] == split and row["metric"] == metric:
            table.setdefault((row["setting"], row["variant"], row["test_type"], row["rate"]), []).append(row["value"])
    return table


def gap_closed(rows: list[dict], split: str = "test") -> list[dict]:
    """(strategy − zero) / (oracle − zero) of the seed means, per training setting and eta > 0 test setting."""
    table = summary_table(rows, split)
    out = []
    variants = sorted({key[1] for key in table} - {"zero", "oracle", "oracle_same_data"})
    for setting in SETTINGS:
        for test_type, rate in TEST_SETTINGS:
            if rate == 0.0:
                continue
            zero = table.get((setting, "zero", test_type, rate))
            oracle = table.get((setting, "oracle", test_type, rate))
            if not zero or not oracle:
                continue
            z, o = statistics.fmean(zero), statistics.fmean(oracle)
            for variant in variants:
                values = table.get((setting, variant, test_type, rate))
                if not values:
                    continue
                s = statistics.fmean(values)
                out.append({"setting": setting, "variant": variant, "test_type": test_type, "rate": rate, "split": split,
                            "strategy_mean": s, "zero_mean": z, "oracle_mean": o,
                            "gap_closed": (s - z) / (o - z) if abs(o - z) > 1e-12 else None})
    return out


SWITCH_NAMES: tuple[str, ...] = ("substitution", "stop_grad_target", "pred_loss_weight")


def decide_defaults(rows: list[dict]) -> dict[str, Any]:
    """The method's switch values of the best ``predict`` configuration on **val**.

    Candidates: ``predict`` (the reference), each single switch and each combination, with their
    switch values spelled out. Score = mean over both training settings and the three eta = 70 %
    test types (text, image, both) of the seed-mean val accuracy; the test score (same average) is
    reported next to it, not used. Only configurations with every (setting, test type) take part.
    Deciding on the best configuration, not switch by switch, respects interactions (stop-gradient
    changes what lambda does) and only ever picks a setting that was actually trained.
    """
    tables = {split: summary_table(rows, split) for split in ("val", "test")}

    def score(split: str, variant: str) -> float | None:
        values = []
        for setting in SETTINGS:
            for test_type, rate in TEST_SETTINGS:
                if rate == 0.0:
                    continue
                cell = tables[split].get((setting, variant, test_type, rate))
                if not cell:
                    return None
                values.append(statistics.fmean(cell))
        return statistics.fmean(values)

    candidates = {"predict": {}, **SWITCHES, **COMBOS}
    ranking = []
    for variant, options in candidates.items():
        val = score("val", variant)
        if val is None:
            continue
        switches = {name: {**REFERENCE, **options}[name] for name in SWITCH_NAMES}
        ranking.append({"variant": variant, "switches": switches, "val_score": val, "test_score": score("test", variant)})
    ranking.sort(key=lambda r: r["val_score"], reverse=True)
    if not ranking:
        return {}
    return {
        "chosen_variant": ranking[0]["variant"],
        "defaults": ranking[0]["switches"],
        "candidates_missing": [v for v in candidates if v not in {r["variant"] for r in ranking}],
        "ranking": ranking,
    }


def markdown(document: dict) -> str:
    rows = document["rows"]
    header = document["header"]
    cfg = document["config"]
    machine = header["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} cores)"
    order = list(STRATEGIES) + list(PLAIN) + list(SWITCHES) + list(COMBOS) + ["oracle", "oracle_same_data"]
    columns = [(t, r) for t, r in TEST_SETTINGS]
    col_names = [f"{t} {int(100 * r)}%" if r else "complete (η=0)" for t, r in columns]
    lines = [
        f"Ablation on emoji (9 groups), {cfg['image_backbone']} + {cfg['text_backbone']}, PEFT {cfg['peft']}, "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, lr {cfg['lr']}, {cfg['image_size']} px; "
        f"seeds {document['seeds_done']}; tabulated on {where}, {header['date']}: `{header['command']}`."
        + (f" Cells trained on: {', '.join(document['cells_machines'])}." if document.get("cells_machines") else "")
        + (f" {document['cells_note']}" if document.get("cells_note") else ""),
        "",
        "`zero` / `learned` / `dummy_input`: the method's system (predictor + VICReg, reference switches) with only the "
        "stand-in changed; `*_plain`: the project's baseline configs (no predictor, no VICReg); `oracle`: fused model "
        "on complete samples, dedicated image-only / text-only models on the others, all trained on the whole "
        "training set (a ceiling for both settings); `oracle_same_data`: the same trained on what missing training "
        "leaves each of them (not a ceiling).",
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
                f"**{split} {PRIMARY_METRIC}, {setting} training (train η = {int(100 * train_eta)}% both), mean ± std over seeds**",
                "",
                "| variant | " + " | ".join(col_names) + " |",
                "|---|" + "---:|" * len(columns),
            ]
            for variant in present:
                cells = []
                for test_type, rate in columns:
                    values = table.get((setting, variant, test_type, rate))
                    if values:
                        m, s = mean_std(values)
                        cells.append(f"{m:.3f} ± {s:.3f}" + (f" (n={len(values)})" if len(values) != len(document["seeds_done"]) else ""))
                    else:
                        cells.append("")
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
            lines.append("")
        if split == "test" and document.get("gap_closed"):
            gaps = document["gap_closed"]
            lines += ["**Gap closed on test = (variant − zero) / (oracle − zero), seed means**", "",
                      "| setting | variant | " + " | ".join(c for c in col_names if "η=0" not in c) + " |",
                      "|---|---|" + "---:|" * (len(columns) - 1)]
            keys = sorted({(g["setting"], g["variant"]) for g in gaps}, key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99))
            for setting, variant in keys:
                cells = []
                for test_type, rate in columns:
                    if rate == 0.0:
                        continue
                    g = next((g for g in gaps if (g["setting"], g["variant"], g["test_type"], g["rate"]) == (setting, variant, test_type, rate)), None)
                    cells.append("" if g is None or g["gap_closed"] is None else f"{g['gap_closed']:.2f}")
                lines.append(f"| {setting} | {variant} | " + " | ".join(cells) + " |")
            lines.append("")
    decisions = document.get("defaults", {})
    if decisions:
        lines += ["**Defaults decided on val**: the best `predict` configuration by mean val accuracy over both training "
                  "settings and text / image / both at 70 % (test: the same average, for reference)", "",
                  "| rank | variant | substitution | stop_grad_target | pred_loss_weight | val score | test score |",
                  "|---:|---|---|---|---:|---:|---:|"]
        for rank, r in enumerate(decisions["ranking"], 1):
            sw = r["switches"]
            lines.append(f"| {rank} | {r['variant']} | {sw['substitution']} | {sw['stop_grad_target']} | "
                         f"{sw['pred_loss_weight']} | {r['val_score']:.3f} | {r['test_score']:.3f} |")
        missing = decisions.get("candidates_missing")
        lines += ["", f"Chosen: `{decisions['chosen_variant']}` → {decisions['defaults']}"
                  + (f" (not all candidates measured: {missing})" if missing else "") + ".", ""]
    times = document.get("timing", {})
    if times:
        lines.append(
            f"Cells: {times['cells_done']} done ({times['cells_run_now']} trained in this run, "
            f"median {times['median_cell_s']:.0f} s per cell); wall {times['wall_s']:.0f} s."
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of prompts and heads (the demo's)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--max-text-len", type=int, default=32)
    parser.add_argument("--peft", default="prompt", choices=("prompt", "bitfit", "lora", "full", "frozen"))
    parser.add_argument("--only", nargs="+", default=None,
                        help="subset: settings (complete, missing), variants (predict, zero, ..., stop_grad, lambda_0.1, "
                             "oracle_image, ...) or groups (strategies, switches, oracle)")
    parser.add_argument("--jobs", type=int, default=1, help="cells trained at the same time (processes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's default)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="minutes after which no new cell starts (0 = none); the rest stays for a re-run")
    parser.add_argument("--aggregate-only", action="store_true", help="train nothing; tabulate the finished cells")
    parser.add_argument("--cells-note", default=None,
                        help="recorded in ablation.json, e.g. where cells trained elsewhere come from")
    parser.add_argument("--limit-train-samples", type=int, default=0, help="train on the first N samples only (tests)")
    parser.add_argument("--root", default=None, help="unipair cache folder holding emoji/ (default $UNIPAIR_CACHE)")
    parser.add_argument("--pack", default=None, help="device pack folder (benchmarks/device_pack.py) instead of the cache")
    parser.add_argument("--encoders", choices=sorted(ENCODERS), default="demo",
                        help="demo: dinov2-s14 + minilm-l6 (pretrained); tiny: random test_vit + tiny-bert (smoke tests)")
    parser.add_argument("--data", default=None, help="a prepared data tensor file (as written to <out>/data-*.pt)")
    parser.add_argument("--out", default=str(benchutil.ROOT / "runs" / "ablation"))
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_batch_size", "image_size", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
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
    print(f"ablation: {len(cells)} cells, {len(done)} already done, {len(pending)} to train on {device} "
          f"with {args.jobs} job(s)", file=sys.stderr, flush=True)
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
            print("ablation: interrupted; stopping the workers and tabulating the finished cells", file=sys.stderr)
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
        "row_fields": ["setting", "strategy", "variant", "options", "seed", "split", "test_type", "rate", "metric", "value"],
        "seeds_done": sorted({doc["cell"]["seed"] for doc in done}),
        "cells_expected": len(cells),
        "cells_missing": [f"{c['setting']}/{c['variant']}/seed{c['seed']}" for c, _ in pending
                          if not any(d["cell"] == c for d in done)],
        "rows": rows,
        "gap_closed": gap_closed(rows),
        "defaults": decide_defaults(rows),
        "timing": {"cells_done": len(done), "cells_run_now": len(cell_times),
                   "median_cell_s": statistics.median(cell_times) if cell_times else 0.0,
                   "cell_s": cell_times, "wall_s": time.perf_counter() - started},
        "failures": failures,
    }
    benchutil.write_json(out / "ablation.json", document)
    table = markdown(document)
    (out / "ablation.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"ablation: wrote {out / 'ablation.json'} ({len(rows)} rows; {len(document['cells_missing'])} cells left)",
          file=sys.stderr)
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
        acc = [r["value"] for r in doc["results"] if r["split"] == "test" and r["metric"] == PRIMARY_METRIC
               and r["test_type"] == "both"]
        note = f", test acc (both 70%) {acc[0]:.3f}" if acc else ""
        print(f"ablation: {label}: {doc['train_s']:.0f} s training, {doc['total_s']:.0f} s total{note}",
              file=sys.stderr, flush=True)
    return doc


if __name__ == "__main__":
    main()

"""Smoke tests of the benchmark scripts on tiny random models with tiny settings (fields of their JSON).

The scripts are modules of the ``benchmarks`` package (run as ``python -m benchmarks.<name>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import ablation, bench, device_pack, profile_step


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared CPU: one thread avoids waiting on a descheduled second one (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_BENCH = [
    "--encoders",
    "tiny",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--text-len",
    "8",
    "--warmup",
    "0",
    "--steps",
    "2",
    "--infer-steps",
    "1",
    "--isolation",
    "inprocess",
]


# -------------------------------------------------------------------------------------------- bench


def test_synthetic_batch_follows_the_batch_format():
    batch = bench.synthetic_batch(10, 32, 8, torch.device("cpu"))
    complete = batch["image_present"] & batch["text_present"]
    assert int(complete.sum()) >= 2  # VICReg needs statistics
    assert bool((batch["image_present"] | batch["text_present"]).all())
    missing_text = ~batch["text_present"]
    assert missing_text.any() and (~batch["image_present"]).any()
    # Missing text = tokenised empty string: [CLS] [SEP] then padding.
    assert (batch["attention_mask"][missing_text].sum(1) == 2).all()
    assert (batch["input_ids"][missing_text][:, :2] == torch.tensor([bench.CLS_ID, bench.SEP_ID])).all()
    assert (batch["image"][~batch["image_present"]] == 1.0).all()


def test_bench_writes_rows_summary_and_table(tmp_path):
    out = tmp_path / "bench.json"
    bench.main([*TINY_BENCH, "--modes", "prompt", "full", "--out", str(out)])
    document = json.loads(out.read_text())
    assert {"date", "command", "machine"} <= set(document["header"])
    assert document["settings"]["batch_size"] == 4 and document["settings"]["image_size"] == 32
    grad = document["settings"]["readonly_grad"]
    assert grad == bench.default_readonly_grad()
    other = next(g for g in bench.READONLY_GRADS if g != grad)
    rows = {(r["mode"], r["predictor_length"], r["readonly_grad"]): r for r in document["rows"]}
    assert set(rows) == {("prompt", 8, grad), ("full", 8, grad), ("prompt", 8, other), ("prompt", 0, grad)}
    for row in rows.values():
        for field in (
            "trainable_params",
            "total_params",
            "train_step_s",
            "train_samples_per_s",
            "infer_samples_per_s",
            "peak_memory_mb",
            "train_flops_per_sample",
            "infer_flops_per_sample",
            "train_fraction_of_matmul_rate",
            "matmul_flops_per_s",
        ):
            assert row[field] > 0, field
        assert len(row["train_step_s_all"]) == 2
        assert row["train_flops_per_sample"] > row["infer_flops_per_sample"]  # backward counted
    assert rows[("full", 8, grad)]["trainable_fraction"] == 1.0
    assert rows[("prompt", 8, grad)]["trainable_params"] < rows[("full", 8, grad)]["trainable_params"]
    assert rows[("prompt", 8, grad)]["image_tokens"] - rows[("prompt", 0, grad)]["image_tokens"] == 8
    summary = document["summary"]
    ratio = rows[("prompt", 8, grad)]["train_step_s"] / rows[("full", 8, grad)]["train_step_s"]
    assert summary["prompt_vs_full_train_step_time_ratio"] == pytest.approx(ratio)
    assert summary["prompt_vs_full_meets_target"] == (ratio <= bench.PROMPT_FULL_TARGET)
    # The predictor's overhead for both readonly_grad values, each against the run without predictor.
    assert set(summary["predictor_overhead"]) == {"through", "detach"}
    for g in ("through", "detach"):
        overhead = summary["predictor_overhead"][g]
        assert overhead["train_step_time_ratio"] == pytest.approx(
            rows[("prompt", 8, g)]["train_step_s"] / rows[("prompt", 0, grad)]["train_step_s"]
        )
        assert overhead["extra_text_tokens"] == 8
    # AdamW implementations side by side on the two main rows' parameters.
    adamw = {c["mode"]: c for c in document["adamw"]}
    assert set(adamw) == {"prompt", "full"}
    assert adamw["full"]["trainable_params"] == rows[("full", 8, grad)]["trainable_params"]
    for comparison in adamw.values():
        assert set(comparison["step_s"]) | set(comparison["unsupported"]) == {"forloop", "foreach", "fused"}
        assert comparison["fastest"] in comparison["step_s"]
    table = out.with_suffix(".md").read_text()
    assert "| prompt, " + grad + " | 8 |" in table and "prompt / full training-step time" in table
    assert f"readonly_grad={other}" in table and "Profile split" in table and "| full | " in table
    assert document["header"]["command"] in table


def test_bench_profile_split_adds_up_to_the_step(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(
        [*TINY_BENCH, "--modes", "prompt", "--no-predictor-overhead", "--adamw-compare", "--out", str(out)]
    )
    (row,) = json.loads(out.read_text())["rows"]
    split = row["profile"]
    assert split["clock"] == "cpu_self_time"
    assert set(split["seconds"]) == {*bench.PROFILE_CATEGORIES, "outside_operators"}
    # Self times partition the step: nothing counted twice (total times would), nothing left out.
    assert split["total_s"] == pytest.approx(split["step_wall_s"], rel=0.1)
    assert sum(split["seconds"].values()) == pytest.approx(split["total_s"])
    for category in ("attention", "matmul", "elementwise_norm", "optimizer", "other"):
        assert split["seconds"][category] > 0, category
    assert sum(split["fractions"].values()) == pytest.approx(1.0)


def _event(name, parent=None, cpu_us=0.0, device_us=0.0, device_type=None):
    from torch.autograd import DeviceType

    return SimpleNamespace(
        name=name,
        cpu_parent=parent,
        self_cpu_time_total=cpu_us,
        self_device_time_total=device_us,
        device_type=DeviceType.CPU if device_type is None else device_type,
    )


def test_operator_categories_follow_the_enclosing_operator():
    linear = _event("aten::linear")
    layer_norm = _event("aten::layer_norm")
    addmm_backward = _event("AddmmBackward0", _event("autograd::engine::evaluate_function: AddmmBackward0"))
    sdpa = _event("aten::scaled_dot_product_attention")
    optimizer = _event(bench.OPTIMIZER_SCOPE)
    cases = [
        ("aten::t", linear, "matmul"),
        ("aten::addmm", linear, "matmul"),
        ("aten::empty", layer_norm, "elementwise_norm"),  # allocation inside a norm is the norm's
        ("aten::sum", addmm_backward, "elementwise_norm"),  # the bias gradient: innermost name decides
        ("aten::mm", addmm_backward, "matmul"),
        ("aten::bmm", sdpa, "attention"),  # the math fallback of attention is still attention
        ("ScaledDotProductFlashAttentionForCpuBackward0", None, "attention"),
        ("aten::_foreach_mul_", optimizer, "optimizer"),
        ("Optimizer.step#AdamW.step", None, "optimizer"),
        ("autograd::engine::evaluate_function: NativeLayerNormBackward0", None, "elementwise_norm"),
        ("aten::gelu_backward", None, "elementwise_norm"),
        ("aten::_softmax_backward_data", None, "elementwise_norm"),
        ("aten::nonzero", None, "other"),
        ("aten::cat", None, "other"),
    ]
    for name, parent, expected in cases:
        assert bench.op_category(_event(name, parent)) == expected, name


def test_profile_split_on_cuda_uses_kernel_time_and_reports_idle():
    from torch.autograd import DeviceType

    step = _event(bench.STEP_SCOPE, cpu_us=900.0)
    linear = _event("aten::linear", step)
    sdpa = _event("aten::scaled_dot_product_attention", step)
    optimizer = _event(bench.OPTIMIZER_SCOPE, step)
    events = [
        step,
        linear,
        sdpa,
        optimizer,
        _event("aten::addmm", linear, cpu_us=30.0, device_us=400.0),
        _event("aten::_flash_attention_forward", sdpa, device_us=200.0),
        _event("aten::add", step, device_us=100.0),
        _event("aten::_fused_adamw_", optimizer, device_us=50.0),
        _event("aten::cat", step, device_us=50.0),
        # The kernel's own device-side record: already counted through aten::addmm.
        _event("ampere_bf16_gemm", device_us=400.0, device_type=DeviceType.CUDA),
    ]
    split = bench.split_events(events, step_wall_s=0.001, device_time=True)
    assert split["clock"] == "cuda_kernel_time"
    seconds = {k: round(v * 1e6, 6) for k, v in split["seconds"].items()}
    assert seconds == {
        "attention": 200.0,
        "matmul": 400.0,
        "elementwise_norm": 100.0,
        "optimizer": 50.0,
        "other": 50.0,
        "idle_launch": 200.0,
    }
    cpu = bench.split_events(events, step_wall_s=0.001, device_time=False)
    assert cpu["seconds"]["outside_operators"] == pytest.approx(900e-6)
    assert cpu["seconds"]["matmul"] == pytest.approx(30e-6)


@pytest.mark.slow
def test_compile_check_reports_graph_breaks_and_the_amortised_cost(tmp_path):
    cfg = {**bench.configurations(bench.parse_args(TINY_BENCH + ["--modes", "prompt", "--device", "cpu"]))[0]}
    result = bench.measure_compile(cfg, tmp_path, steps=2, epoch_steps=42, backend="eager")
    image, text = result["explain"]["image_encoder"], result["explain"]["text_encoder"]
    assert image["graph_breaks"] == 0 and image["graphs"] == 1  # timm blocks through run_layer trace whole
    assert len(text["break_reasons"]) == text["graph_breaks"]
    assert len(result["compiled_step_s_all"]) == len(result["eager_step_s_all"]) == 2
    assert result["compile_s"] == pytest.approx(result["first_compiled_step_s"] - result["compiled_step_s"])
    assert result["epoch_ratio_with_compile"] == pytest.approx(
        (result["compile_s"] + 42 * result["compiled_step_s"]) / (42 * result["eager_step_s"])
    )


def test_fused_adamw_steps_like_the_default_implementation():
    """The implementation the bench times as fastest is the one configure_adamw builds on request."""
    import copy

    from lightning_modules.optim import configure_adamw
    from tests.method_fixtures import tiny_system

    model = tiny_system(image_peft="bitfit", text_peft="bitfit")
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    optimizers = [
        configure_adamw(m, 1e-2, 1e-1, 0.05, 0.0, "constant", 10, fused=fused)["optimizer"]
        for m, fused in ((model, False), (twin, True))
    ]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in model.parameters() if p.requires_grad]
        for m, optimizer in zip((model, twin), optimizers, strict=True):
            for p, g in zip((p for p in m.parameters() if p.requires_grad), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters(), strict=True))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adamw_only_where_lightning_can_clip_with_it():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_modules.optim import can_fuse_adamw
    from tests.method_fixtures import tiny_system

    model = tiny_system()
    assert can_fuse_adamw(model) and can_fuse_adamw(model, "bf16-mixed")
    assert can_fuse_adamw(model, "32-true", gradient_clip_val=1.0)
    assert not can_fuse_adamw(model, "bf16-mixed", gradient_clip_val=1.0)
    assert not can_fuse_adamw(torch.nn.Linear(2, 2, device="meta"))

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_index):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), fused=True)

    def fit(precision: str) -> None:
        trainer = pl.Trainer(
            accelerator="cpu",
            precision=precision,
            gradient_clip_val=1.0,
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Regression(), DataLoader(torch.randn(8, 4), batch_size=4))

    fit("32-true")
    with pytest.raises(RuntimeError, match="fused"):  # why can_fuse_adamw says no to mixed + clipping
        fit("bf16-mixed")


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "adapters"])


@pytest.mark.slow
def test_bench_measures_memory_in_fresh_processes(tmp_path):
    out = tmp_path / "bench.json"
    args = [a for a in TINY_BENCH if a not in ("--isolation", "inprocess")]
    bench.main(
        [
            *args,
            "--modes",
            "frozen",
            "--no-predictor-overhead",
            "--isolation",
            "subprocess",
            "--out",
            str(out),
        ]
    )
    row = json.loads(out.read_text())["rows"][0]
    assert row["memory_kind"] == "process_peak_rss"
    assert row["peak_memory_mb"] >= row["rss_after_build_mb"] > 0


# ----------------------------------------------------------------------------------- profile step


TINY_PROFILE = [
    "--image-backbone",
    "test_vit",
    "--text-backbone",
    "tiny-bert",
    "--random-init",
    "--synthetic-data",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--warmup",
    "0",
]


def test_profile_step_reports_sections(tmp_path):
    out = tmp_path / "profile.json"
    profile_step.main([*TINY_PROFILE, "--operators", "0", "--out", str(out)])
    sections = json.loads(out.read_text())["profile"]["median_s"]
    for name in (
        "data",
        "forward: image_encoder",
        "forward: text_encoder",
        "forward: predictor_image_to_text",
        "backward (whole)",
        "optimizer step",
        "step total",
        "backward: image encoder alone",
    ):
        assert sections[name] >= 0, name
    assert sections["step total"] > sections["forward: image_encoder"] > 0
    assert not (out.parent / "profile_operators.txt").exists()


@pytest.mark.slow
def test_profile_step_writes_the_operator_table(tmp_path):
    out = tmp_path / "profile.json"
    profile_step.main([*TINY_PROFILE, "--operators", "10", "--out", str(out)])
    assert (out.parent / "profile_operators.txt").read_text().count("aten::") >= 5


# --------------------------------------------------------------------------------------- ablation


def _synthetic_data(path: Path, n_train: int = 12, n_eval: int = 9, size: int = 32) -> Path:
    """A data file in the ablation's format: 3 classes learnable from either modality."""
    generator = torch.Generator().manual_seed(0)
    templates = torch.randn(3, 3, size, size, generator=generator)
    splits, presence = {}, {}
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        labels = torch.arange(n) % 3
        lengths = torch.full((n,), 4)
        input_ids = torch.stack([torch.tensor([101, 2000 + int(c), 2010 + int(c), 102]) for c in labels])
        splits[split] = {
            "ids": [f"{split}-{i}" for i in range(n)],
            "keys": [f"{split}-{i}" for i in range(n)],
            "labels": labels,
            "images": templates[labels] + 0.1 * torch.randn(n, 3, size, size, generator=generator),
            "input_ids": input_ids,
            "lengths": lengths,
        }
        codes = torch.arange(n) % 3  # 0 complete, 1 text missing, 2 image missing
        for missing_type in ("text", "image", "both"):
            image = codes != 2 if missing_type != "text" else torch.ones(n, dtype=torch.bool)
            text = codes != 1 if missing_type != "image" else torch.ones(n, dtype=torch.bool)
            presence[f"{split}/{missing_type}/0.7"] = (image, text)
    data = {
        "settings": {},
        "source": "test",
        "label_names": ["a", "b", "c"],
        "num_classes": 3,
        "pad_id": 0,
        "empty_ids": [101, 102],
        "transform": "",
        "splits": splits,
        "presence": presence,
    }
    torch.save(data, path)
    return path


def _tiny_ablation_args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--encoders",
        "tiny",
        "--data",
        str(data),
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--eval-batch-size",
        "8",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


def test_ablation_rows_baselines_oracle_paired_differences_and_resume(tmp_path):
    data = _synthetic_data(tmp_path / "data.pt")
    args = _tiny_ablation_args(
        tmp_path,
        data,
        "--variants",
        "method",
        "detach+target_matched",
        "--baselines",
        "zero_plain",
        "learned_plain",
    )
    document = ablation.main(args)
    rows = document["rows"]
    assert set(document["row_fields"]) <= set(rows[0])
    for setting in ("complete", "missing"):
        for variant in ("method", "detach+target_matched", "zero_plain", "learned_plain", "oracle"):
            for split in ("val", "test"):
                for test_type, rate in ablation.TEST_SETTINGS:
                    matching = [
                        r
                        for r in rows
                        if r["setting"] == setting
                        and r["variant"] == variant
                        and r["split"] == split
                        and r["test_type"] == test_type
                        and r["rate"] == rate
                        and r["metric"] == "accuracy"
                        and r["seed"] == 0
                    ]
                    assert len(matching) == 1, (setting, variant, split, test_type, rate)
                    assert 0.0 <= matching[0]["value"] <= 1.0
    # Every model row also has its calibration error.
    assert any(r["metric"] == "ece" and r["variant"] == "zero_plain" for r in rows)
    # The ceiling: the same three models (trained once per seed) for both settings.
    ceiling = {
        (r["setting"], r["seed"], r["split"], r["test_type"]): r["value"]
        for r in rows
        if r["variant"] == "oracle" and r["metric"] == "accuracy"
    }
    assert ceiling[("complete", 0, "test", "both")] == ceiling[("missing", 0, "test", "both")]
    # Its fused part is the complete zero_plain model (the same training, not repeated).
    twin = {
        r["seed"]: r["value"]
        for r in rows
        if r["variant"] == "zero_plain"
        and r["setting"] == "complete"
        and r["split"] == "test"
        and r["test_type"] == "none"
        and r["metric"] == "accuracy"
    }
    assert (
        ceiling[("complete", 0, "test", "none")] == twin[0]
        and ceiling[("complete", 1, "test", "none")] == twin[1]
    )
    # Options are spelled out, whatever the system's defaults.
    options = {r["variant"]: r["options"] for r in rows}
    assert options["method"] == ablation.REFERENCE
    assert options["detach+target_matched"] == {
        **ablation.REFERENCE,
        "readonly_grad": "detach",
        "vicreg_space": "target_matched",
    }
    assert options["zero_plain"]["predictor_length"] == 0
    # Paired differences against the best baseline on val, with their interval.
    best = document["best_baselines"]
    assert set(best) == {"complete", "missing"} and set(best.values()) <= {"zero_plain", "learned_plain"}
    diffs = [
        d for d in document["paired_differences"] if d["variant"] == "method" and d["setting"] == "missing"
    ]
    assert {d["test_type"] for d in diffs} == {"text", "image", "both", "none"}
    value = {
        (r["variant"], r["seed"]): r["value"]
        for r in rows
        if r["setting"] == "missing"
        and r["split"] == "test"
        and r["test_type"] == "both"
        and r["metric"] == "accuracy"
    }
    both = next(d for d in diffs if d["test_type"] == "both")
    expected = [value[("method", s)] - value[(best["missing"], s)] for s in (0, 1)]
    assert both["mean_difference"] == pytest.approx(sum(expected) / 2)
    assert both["ci95_low"] <= both["mean_difference"] <= both["ci95_high"]
    gaps = [g for g in document["gap_closed"] if g["variant"] == "method"]
    for g in gaps:
        if g["gap_closed"] is not None:
            assert g["gap_closed"] == pytest.approx(
                (g["variant_mean"] - g["baseline_mean"]) / (g["oracle_mean"] - g["baseline_mean"])
            )
    # Diagnostics of the predictions for the method's cells only.
    assert "missing/method" in document["diagnostics"] and "missing/zero_plain" not in document["diagnostics"]
    cells = sorted((tmp_path / "out" / "cells").glob("*.json"))
    # seeds x (four variants x two settings + the oracle's unimodal models; its fused one is zero_plain's)
    assert len(cells) == 2 * (4 * 2 + 2)
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| zero_plain (baseline) |" in table and "paired by seed" in table

    # Re-run: every cell is found and skipped; same rows.
    mtimes = [c.stat().st_mtime_ns for c in cells]
    again = ablation.main(args)
    assert again["timing"]["cells_run_now"] == 0
    assert [c.stat().st_mtime_ns for c in cells] == mtimes
    assert again["rows"] == rows


def _accuracy_row(setting, variant, test_type, rate, split, seed, value) -> dict:
    """One accuracy row of an ablation document."""
    return {
        "setting": setting,
        "variant": variant,
        "test_type": test_type,
        "rate": rate,
        "split": split,
        "metric": "accuracy",
        "seed": seed,
        "value": value,
    }


def test_gap_closed_compares_a_variant_with_the_baseline_and_oracle_of_its_own_seeds():
    values = {"zero_plain": {0: 0.5, 1: 0.7}, "oracle": {0: 0.9, 1: 0.9}, "detach": {0: 0.7}}
    rows = [
        _accuracy_row("complete", variant, test_type, rate, split, seed, value)
        for variant, by_seed in values.items()
        for seed, value in by_seed.items()
        for test_type, rate in ablation.ETA_TESTS
        for split in ("val", "test")
    ]
    (gap,) = [g for g in ablation.gap_closed(rows) if g["test_type"] == "both"]
    # Seed 0 only: (0.7 - 0.5) / (0.9 - 0.5); the means over all seeds would give (0.7 - 0.6) / 0.3.
    assert gap["seeds"] == [0] and gap["gap_closed"] == pytest.approx(0.5)


def test_oracle_combines_the_unimodal_models_per_missing_case():
    labels = [0, 1, 2]
    # The fused model is right only on sample 0, the image-only one only on 1, the text-only one only on 2.
    cells = []
    for variant, right in (("oracle_fused", 0), ("oracle_image", 1), ("oracle_text", 2)):
        logits = [[0.0] * 3 for _ in range(3)]
        for i in range(3):
            logits[i][labels[i] if i == right else (labels[i] + 1) % 3] = 1.0
        cells.append(
            {
                "cell": {"setting": "complete", "variant": variant, "seed": 0},
                "component_logits": {"val": logits, "test": logits},
                "labels": {"val": labels, "test": labels},
            }
        )
    # Sample 0 complete, 1 text missing (image only), 2 image missing (text only).
    image = torch.tensor([True, True, False])
    text = torch.tensor([True, False, True])
    presence = {f"{s}/{t}/0.7": (image, text) for s in ("val", "test") for t in ("text", "image", "both")}
    rows = ablation.oracle_rows(cells, {"presence": presence})
    accuracy = {
        (r["setting"], r["split"], r["test_type"], r["rate"]): r["value"]
        for r in rows
        if r["metric"] == "accuracy"
    }
    for setting in ("complete", "missing"):  # the complete-data models are the ceiling of both settings
        assert accuracy[(setting, "test", "both", 0.7)] == pytest.approx(1.0)
        assert accuracy[(setting, "test", "none", 0.0)] == pytest.approx(1 / 3)  # the fused model alone
    assert {r["variant"] for r in rows} == {"oracle"}


def test_cell_list_filters_and_orders_seed_major():
    args = ablation.parse_args(["--seeds", "0", "1", "--only", "complete", "method"])
    cells = ablation.cell_list(args)
    assert [c["seed"] for c in cells] == sorted(c["seed"] for c in cells)
    assert {c["variant"] for c in cells} == set(ablation.DEFAULT_VARIANTS)
    assert {c["setting"] for c in cells} == {"complete"}
    assert all(c["strategy"] == "predict" for c in cells)
    # The oracle's models are trained once per seed, and first.
    cells = ablation.cell_list(ablation.parse_args(["--seeds", "0", "--only", "missing"]))
    assert [c["variant"] for c in cells[:3]] == list(ablation.ORACLE)
    assert {c["setting"] for c in cells[:3]} == {"complete"}
    # ... the fused one only where its twin (complete zero_plain, the same training) is not trained too.
    pending = [(c, None) for c in ablation.cell_list(ablation.parse_args(["--seeds", "0", "1"]))]
    pending = [(c, p) for c, p in pending if not (c["variant"] == "zero_plain" and c["seed"] == 1)]
    kept = {(c["variant"], c["seed"]) for c, _ in ablation.without_twin_duplicates(pending)}
    assert ("oracle_fused", 0) not in kept and ("oracle_fused", 1) in kept and ("zero_plain", 0) in kept
    with pytest.raises(SystemExit):
        ablation.cell_list(ablation.parse_args(["--only", "nonsense"]))
    with pytest.raises(SystemExit):
        ablation.parse_args(["--variants", "detach+sometimes"])


def test_variant_names_compose_switches():
    assert ablation.method_options("detach+lambda_0.1") == {
        **ablation.REFERENCE,
        "readonly_grad": "detach",
        "pred_loss_weight": 0.1,
    }
    assert ablation.method_options("lambda_0")["pred_loss_weight"] == 0.0
    assert ablation.variant_group("zero_plain") == "plain" and ablation.variant_group("detach") == "method"


def test_batch_gather_fills_missing_modalities():
    split = {
        "ids": ["a", "b", "c"],
        "keys": ["a", "b", "c"],
        "labels": torch.tensor([0, 1, 2]),
        "images": torch.zeros(3, 3, 4, 4),
        "input_ids": torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0], [101, 5, 102, 0]]),
        "lengths": torch.tensor([4, 3, 3]),
    }
    gather = ablation.BatchGather(
        split,
        torch.tensor([0, 1, 2]),
        torch.tensor([True, False, True]),
        torch.tensor([False, True, True]),
        [101, 102],
        0,
        torch.device("cpu"),
    )
    batch = gather([1, 2])
    assert batch["id"] == ["b", "c"]
    assert (batch["image"][0] == 1.0).all() and (
        batch["image"][1] == 0.0
    ).all()  # filler for the missing image
    assert batch["input_ids"].shape == (2, 3)  # padded to the batch's longest
    full = gather([0])
    assert full["input_ids"].tolist() == [[101, 102]]  # missing text = tokenised empty string
    assert full["attention_mask"].tolist() == [[1, 1]]


# ----------------------------------------------------------------------------------- device pack


def test_pack_store_roundtrip_bf16_and_checksum(tmp_path):
    values = torch.randn(5, 7)
    arrays = {"w": (values.numpy(), "bf16"), "ids": (np.arange(6, dtype=np.int64), "raw")}
    device_pack.write_store(tmp_path / "s", arrays, {"note": 1})
    loaded, document = device_pack.read_store(tmp_path / "s")
    assert document["note"] == 1
    assert torch.equal(
        torch.from_numpy(loaded["w"]), values.to(torch.bfloat16).float()
    )  # exactly bf16 rounding
    assert loaded["ids"].tolist() == list(range(6))
    payload = bytearray((tmp_path / "s.bin").read_bytes())
    payload[3] ^= 0xFF
    (tmp_path / "s.bin").write_bytes(bytes(payload))
    with pytest.raises(ValueError, match="checksum"):
        device_pack.read_store(tmp_path / "s")


def test_pack_matmul_parameters_are_linear_and_conv_only():
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    assert device_pack._matmul_parameter_names(module) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_system_from_pack_refuses_other_encoders(tmp_path):
    with pytest.raises(ValueError, match="dinov2-s14"):
        device_pack.system_from_pack(tmp_path, {"image_backbone": "test_vit", "text_backbone": "minilm-l6"})


@pytest.mark.slow
def test_exported_pack_equals_the_cache_under_bf16_autocast(
    tmp_path, prepared_emoji_cache, prepared_dinov2_cache
):
    """The pack's data are the DataModule's, and its encoders compute like the cached ones under bf16
    autocast.
    """
    pack = tmp_path / "pack"
    device_pack.export_pack(pack, image_size=56, max_text_len=32, root=None)
    settings = {"image_size": 56, "max_text_len": 32, "label": "group", "missing_seed": 0}
    from_pack = device_pack.tensors_from_pack(pack, settings)
    from_dm = ablation.build_tensors_from_datamodule(settings, None)
    for split in ("train", "val", "test"):
        for key in ("images", "input_ids", "lengths", "labels"):
            assert torch.equal(from_pack["splits"][split][key], from_dm["splits"][split][key]), (split, key)
    from lightning_modules.system import UnipairSystem

    kwargs = {
        "task": "multiclass",
        "num_classes": 9,
        "image_backbone": "dinov2-s14",
        "text_backbone": "minilm-l6",
        "img_size": 56,
    }
    reference = UnipairSystem(**kwargs).eval()
    packed = device_pack.system_from_pack(pack, kwargs).eval()
    packed.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if ".backbone." not in k}, strict=False
    )
    split = from_dm["splits"]["val"]
    batch = {
        "image": split["images"][:2],
        "input_ids": split["input_ids"][:2, : int(split["lengths"][:2].max())],
    }
    batch["attention_mask"] = (
        torch.arange(batch["input_ids"].shape[1])[None] < split["lengths"][:2, None]
    ).long()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference.encode(batch), packed.encode(batch)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_defaults_are_the_best_configuration_on_val():
    rows = []
    val_scores = {
        "method": 0.6,
        "detach": 0.7,
        "target_matched": 0.5,
        "detach+target_matched": 0.72,
        "lambda_0.1": 0.9,
        "zero_plain": 0.95,
    }
    for variant, value in val_scores.items():
        for setting in ablation.SETTINGS:
            for test_type, rate in ablation.TEST_SETTINGS:
                for seed in (0, 1):
                    for split, v in (("val", value + 0.01 * seed), ("test", 1.0 - value)):
                        rows.append(_accuracy_row(setting, variant, test_type, rate, split, seed, v))
    # lambda_0.1 lacks a setting: not a candidate; zero_plain is not a configuration of the method.
    rows = [r for r in rows if not (r["variant"] == "lambda_0.1" and r["setting"] == "complete")]
    decision = ablation.decide_defaults(rows)
    assert decision["chosen_variant"] == "detach+target_matched"
    assert decision["defaults"] == {
        **ablation.REFERENCE,
        "readonly_grad": "detach",
        "vicreg_space": "target_matched",
    }
    ranking = {r["variant"]: r for r in decision["ranking"]}
    assert set(ranking) == {"method", "detach", "target_matched", "detach+target_matched"}
    assert ranking["detach"]["val_score"] == pytest.approx(0.705)
    assert ranking["method"]["test_score"] == pytest.approx(0.4)
    assert "lambda_0.1" in decision["candidates_missing"]
    assert decision["seeds"] == [0, 1]

    # The other candidates lack seed 2 of `method`: they are scored on their seeds and not chosen,
    # however high they score; `method` is chosen on its three seeds.
    extra = [r | {"seed": 2} for r in rows if r["variant"] == "method" and r["seed"] == 0]
    again = ablation.decide_defaults(rows + extra)
    assert again["chosen_variant"] == "method" and again["seeds"] == [0, 1, 2]
    ranked = {r["variant"]: r for r in again["ranking"]}
    assert ranked["method"]["val_score"] == pytest.approx((0.6 + 0.61 + 0.6) / 3)
    assert not ranked["detach+target_matched"]["eligible"] and ranked["detach"]["seeds"] == [0, 1]
    assert [r["variant"] for r in again["ranking"]][0] == "method"


def test_stored_cells_are_reused_only_for_the_same_training():
    cell = {
        "setting": "missing",
        "variant": "detach",
        "strategy": "predict",
        "seed": 0,
        "options": ablation.method_options("detach"),
    }
    assert ablation.same_training({**cell, "options": {"readonly_grad": "detach"}}, cell)
    assert not ablation.same_training({**cell, "options": {}}, cell)
    assert not ablation.same_training({**cell, "strategy": "zero"}, cell)


# ----------------------------------------------------------------------- encode_present, readonly_grad


def test_readonly_grad_benchmark_times_both_settings_with_equal_losses(tmp_path):
    from benchmarks import readonly_grad

    out = tmp_path / "readonly_grad"
    document = readonly_grad.main(
        ["--encoders", "tiny", "--image-size", "32", "--batch-size", "4", "--text-len", "8", "--rounds", "1"]
        + ["--pefts", "bitfit", "prompt", "--out", str(out)]
    )
    assert [row["peft"] for row in document["rows"]] == ["bitfit", "prompt"]
    for row in document["rows"]:
        assert set(row["steps"]) == {"through", "detach"} and all(len(t) == 1 for t in row["steps"].values())
        assert row["max_loss_difference_eval"] < 1e-5  # detach changes gradients only
        assert row["ratio_wall"] > 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["peft"] == "bitfit"
    assert "| bitfit |" in out.with_suffix(".md").read_text()


def test_encode_present_benchmark_runs_on_tiny_encoders(tmp_path):
    from benchmarks import encode_present

    out = tmp_path / "encode_present"
    document = encode_present.main(
        ["--encoders", "tiny", "--image-size", "32", "--batch-size", "4", "--text-len", "8", "--rounds", "1"]
        + ["--strategies", "predict", "--out", str(out)]
    )
    assert [row["pattern"] for row in document["rows"]] == ["demo", "text_only"]
    assert all(row["max_loss_difference_eval"] < 1e-5 for row in document["rows"])

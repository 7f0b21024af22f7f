"""Robustness evaluation: the writers, the grid, the presence rule, and end to end through the CLI.

The key property: the value the robustness sweep reports for a setting equals the metric
``unipair test`` reports with that setting as ``test_missing`` (same tables, same presence), although
the sweep encodes the test split only once.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
from PIL import Image

import cli
from datamodules.missing import missing_counts
from lightning_modules.robustness import (
    OUTPUT_NAMES,
    ROW_FIELDS,
    markdown_table,
    parse_grid,
    read_robustness_json,
    write_robustness_files,
)
from tests.fixtures_data import make_food101, make_mmimdb

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_cli(args: list[str]) -> cli.UnipairCLI:
    """Run the CLI in-process with ``args`` (sys.argv set to match, as if typed on the command line)."""
    with patch.object(sys, "argv", ["unipair", *args]):
        return cli.make_cli(args)


def _rows() -> list[dict]:
    rows = []
    for missing_type, base in (("text", 0.9), ("image", 0.8)):
        for rate in (0.0, 0.5, 1.0):
            for metric, offset in (("accuracy", 0.0), ("f1_macro", -0.1)):
                rows.append(
                    {
                        "dataset": "toy",
                        "strategy": "predict",
                        "missing_type": missing_type,
                        "missing_rate": rate,
                        "metric": metric,
                        "value": base - 0.2 * rate + offset,
                        "n": 10,
                    }
                )
    return rows


# ------------------------------------------------------------------------------------------ writers


def test_writers_produce_four_files_with_documented_fields(tmp_path):
    rows = _rows()
    paths = write_robustness_files(rows, tmp_path / "out", "accuracy", meta={"checkpoint": "x.ckpt"})
    assert sorted(p.name for p in paths.values()) == sorted(OUTPUT_NAMES)

    document = read_robustness_json(paths["json"])
    assert document["primary_metric"] == "accuracy" and document["checkpoint"] == "x.ckpt"
    assert len(document["rows"]) == len(rows)
    for row in document["rows"]:
        assert set(ROW_FIELDS) <= set(row)

    with open(paths["csv"], newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert list(csv_rows[0]) == list(ROW_FIELDS)
    assert [float(r["value"]) for r in csv_rows] == pytest.approx([r["value"] for r in rows])

    table = paths["md"].read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| missing rate | text missing | image missing |"
    assert lines[2] == "| 0% | 0.9000 | 0.8000 |"  # accuracy only (the primary metric)
    assert lines[-1] == "| 100% | 0.7000 | 0.6000 |"

    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_markdown_rejects_unknown_metric():
    with pytest.raises(ValueError, match="no robustness rows for metric 'auroc'"):
        markdown_table(_rows(), "auroc")


def test_writer_rejects_rows_without_fields(tmp_path):
    rows = _rows()
    del rows[3]["n"]
    with pytest.raises(ValueError, match=r"row 3 lacks field\(s\) \['n'\]"):
        write_robustness_files(rows, tmp_path, "accuracy")


def test_grid_validation():
    assert parse_grid([0.5, 0.0, 0.5], ["both", "text"]) == [
        ("both", 0.0),
        ("both", 0.5),
        ("text", 0.0),
        ("text", 0.5),
    ]
    with pytest.raises(ValueError, match="missing_rates: every rate must be in"):
        parse_grid([0.0, 1.2], ["text"])
    with pytest.raises(ValueError, match="missing_types: unknown type 'audio'"):
        parse_grid([0.0], ["audio"])


# ------------------------------------------------------------------------------------- end to end


def _common_args(root: Path, tmp: Path, data_config: str = "food101.yaml") -> list[str]:
    return [
        "--config",
        str(CONFIGS / "data" / data_config),
        "--config",
        str(CONFIGS / "debug" / "tiny.yaml"),
        "--data.root",
        str(root),
        "--data.batch_size",
        "8",
        "--data.missing_table_dir",
        str(tmp / "tables"),
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Tiny models (the method and the dummy_input baseline) trained 2 epochs on a Food-101 fixture."""
    tmp = tmp_path_factory.mktemp("robustness")
    root = make_food101(tmp, n_train=30, n_test=30)
    common = _common_args(root, tmp)
    out = {"common": common, "tmp": tmp}
    for strategy, config in (("predict", "method.yaml"), ("dummy_input", "dummy_input.yaml")):
        cli = make_cli(
            [
                "fit",
                *common,
                "--config",
                str(CONFIGS / "model" / "strategy" / config),
                "--config",
                str(CONFIGS / "missing" / "missing_training_both.yaml"),
                "--trainer.max_epochs",
                "2",
                "--trainer.logger.init_args.name",
                strategy,
            ]
        )
        out[strategy] = {
            "ckpt": cli.trainer.checkpoint_callback.last_model_path,
            "log_dir": Path(cli.trainer.log_dir),
        }
    return out


def _test_metrics(trained: dict, ckpt: str, missing_type: str, rate: float) -> dict[str, float]:
    cli = make_cli(
        [
            "test",
            *trained["common"],
            "--ckpt_path",
            ckpt,
            "--data.init_args.test_missing",
            json.dumps({"missing_rate": rate, "missing_type": missing_type}),
        ]
    )
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["predict", "dummy_input"])
def test_robustness_equals_test_metric_at_each_setting(trained, strategy):
    ckpt = trained[strategy]["ckpt"]
    out_dir = trained["tmp"] / f"robustness-{strategy}"
    make_cli(
        [
            "robustness",
            *trained["common"],
            "--ckpt_path",
            ckpt,
            "--out_dir",
            str(out_dir),
            "--missing_rates",
            "[0.0, 0.5, 1.0]",
            "--missing_types",
            "[text, image, both]",
            "--progress",
            "false",
        ]
    )
    document = read_robustness_json(out_dir / "robustness.json")
    rows = document["rows"]
    assert document["primary_metric"] == "accuracy"
    assert {(r["missing_type"], r["missing_rate"]) for r in rows} == {
        (t, r) for t in ("text", "image", "both") for r in (0.0, 0.5, 1.0)
    }
    assert all(r["strategy"] == strategy and r["dataset"] == "food101" and r["n"] == 30 for r in rows)
    for missing_type, rate in (("image", 0.5), ("both", 0.5), ("text", 1.0)):
        expected = _test_metrics(trained, ckpt, missing_type, rate)
        for metric in ("accuracy", "f1_macro"):
            (row,) = [
                r
                for r in rows
                if r["missing_type"] == missing_type and r["missing_rate"] == rate and r["metric"] == metric
            ]
            assert row["value"] == pytest.approx(expected[f"test/{metric}"], abs=1e-6), (
                missing_type,
                rate,
                metric,
            )
            counts = missing_counts(30, rate, missing_type)
            assert row["n_text_missing"] == counts["text_missing"]
            assert row["n_image_missing"] == counts["image_missing"]
            if counts["text_missing"]:
                assert expected["test/text_missing/num_samples"] == counts["text_missing"]


@pytest.mark.slow
def test_robustness_default_output_folder_and_saved_config(trained):
    ckpt = Path(trained["predict"]["ckpt"])
    make_cli(
        [
            "robustness",
            *trained["common"],
            "--ckpt_path",
            str(ckpt),
            "--missing_rates",
            "[0.0, 1.0]",
            "--progress",
            "false",
        ]
    )
    out_dir = (
        trained["predict"]["log_dir"] / "robustness"
    )  # <run folder>/robustness for <run folder>/checkpoints/x.ckpt
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*OUTPUT_NAMES, "config.yaml"])
    rows = read_robustness_json(out_dir / "robustness.json")["rows"]
    complete = {r["value"] for r in rows if r["missing_rate"] == 0.0 and r["metric"] == "accuracy"}
    assert len(complete) == 1  # eta = 0 is the same setting whatever the type
    assert "missing_rates" in (out_dir / "config.yaml").read_text()


def test_robustness_requires_checkpoint(tmp_path):
    root = make_food101(tmp_path)
    with pytest.raises(ValueError, match="robustness needs --ckpt_path"):
        make_cli(["robustness", *_common_args(root, tmp_path)])


@pytest.mark.slow
def test_robustness_uses_the_model_multilabel_threshold(tmp_path):
    """MM-IMDb rows equal ``unipair test`` with the model's (non-default) threshold, not with 0.5."""
    from lightning_modules.robustness import evaluate_robustness

    root = make_mmimdb(tmp_path, n_train=8, n_dev=4, n_test=6)
    common = [*_common_args(root, tmp_path, "mmimdb.yaml"), "--model.init_args.multilabel_threshold", "0.1"]
    fitted = make_cli(["fit", *common, "--trainer.max_epochs", "1"])
    ckpt = fitted.trainer.checkpoint_callback.last_model_path
    out_dir = tmp_path / "sweep"
    make_cli(
        [
            "robustness",
            *common,
            "--ckpt_path",
            ckpt,
            "--out_dir",
            str(out_dir),
            "--missing_rates",
            "[0.5]",
            "--missing_types",
            "[image]",
            "--progress",
            "false",
        ]
    )
    rows = {r["metric"]: r["value"] for r in read_robustness_json(out_dir / "robustness.json")["rows"]}
    expected = _test_metrics({"common": common}, ckpt, "image", 0.5)
    for metric in ("f1_macro", "f1_micro", "f1_weighted", "f1_samples"):
        assert rows[metric] == pytest.approx(expected[f"test/{metric}"], abs=1e-6), metric
    # The same weights scored at 0.5 differ: the threshold is what the comparison above checks.
    fitted.model.hparams.multilabel_threshold = 0.5
    at_half, _ = evaluate_robustness(fitted.model, fitted.datamodule, [0.5], ["image"], progress=False)
    assert any(abs(r["value"] - rows[r["metric"]]) > 1e-3 for r in at_half)

"""The command line: help, every shipped config, fit per dataset, fit -> validate/test, misconfiguration.

Configs that name a real dataset root (``data/mmimdb`` ...) or a hub model
(``configs/model/encoders/paper.yaml``) are checked at parse level with ``--print_config`` (which does
not build anything); the fit tests run every dataset config with its ``root`` pointed at the fixture data
of ``tests/fixtures_data.py`` and the tiny setup of ``configs/debug/tiny.yaml`` (random tiny encoders,
CPU, small batches).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml

import cli
from tests.fixtures_data import make_food101, make_hateful_memes, make_mmimdb

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
# A data and a model config with class paths, so overlay configs (missing/, model/<strategy>, peft_*)
# have something to compose with, as on the command line.
BASE = [
    "--config",
    str(CONFIGS / "data" / "emoji.yaml"),
    "--config",
    str(CONFIGS / "model" / "encoders" / "tiny.yaml"),
]


def make_cli(args: list[str]) -> cli.UnipairCLI:
    """Run ``cli.cli_main(args)`` in-process (sys.argv set to match) and return the CLI object it built."""
    built: list[cli.UnipairCLI] = []
    real_make_cli = cli.make_cli

    def keep(cli_args):
        built.append(real_make_cli(cli_args))
        return built[-1]

    with patch.object(sys, "argv", ["unipair", *args]), patch.object(cli, "make_cli", keep):
        assert cli.cli_main(args) is None  # the console script's exit status is 0
    return built[-1]


def _exit_output(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        make_cli(args)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def _contains(printed, expected, path="") -> None:
    """Every leaf of ``expected`` (a config file) appears with the same value in ``printed``."""
    if isinstance(expected, dict):
        assert isinstance(printed, dict), f"{path}: expected a mapping, printed {printed!r}"
        for key, value in expected.items():
            assert key in printed, f"{path}.{key} missing from the printed config"
            _contains(printed[key], value, f"{path}.{key}")
    else:
        assert printed == expected, f"{path}: config file has {expected!r}, printed config has {printed!r}"


def test_every_shipped_config_is_covered():
    assert len(ALL_CONFIGS) >= 25
    for folder in ("data", "missing", "model", "trainer", "experiment"):
        assert any(c.startswith(folder + "/") for c in ALL_CONFIGS), folder


def test_help_lists_subcommands(capsys):
    out = _exit_output(["--help"], capsys)
    for subcommand in ("fit", "validate", "test", "predict", "robustness"):
        assert subcommand in out
    assert "--predict_file" in _exit_output(["predict", "--help"], capsys)
    robustness_help = _exit_output(["robustness", "--help"], capsys)
    assert "--missing_rates" in robustness_help and "--out_dir" in robustness_help


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_help_and_print_config_for_every_config(config, capsys):
    args = ["fit", *BASE, "--config", str(CONFIGS / config)]
    assert "--trainer.max_epochs" in _exit_output([*args, "--help"], capsys)
    printed = yaml.safe_load(_exit_output([*args, "--print_config"], capsys))
    expected = yaml.safe_load((CONFIGS / config).read_text())
    expected.pop("config", None)  # a nested config file (debug/tiny.yaml): itself one of ALL_CONFIGS
    _contains(printed, expected)


def test_configs_compose_in_order(capsys):
    """A later --config overrides only what it sets; init_args of an earlier one survive."""
    args = [
        "fit",
        "--config",
        str(CONFIGS / "data" / "hateful_memes.yaml"),
        "--config",
        str(CONFIGS / "model" / "encoders" / "offline.yaml"),
        "--config",
        str(CONFIGS / "model" / "strategy" / "zero.yaml"),
        "--config",
        str(CONFIGS / "model" / "peft" / "lora.yaml"),
        "--config",
        str(CONFIGS / "missing" / "complete_training_text.yaml"),
        "--print_config",
    ]
    printed = yaml.safe_load(_exit_output(args, capsys))
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert (model["image_backbone"], model["missing_strategy"], model["predictor_length"]) == (
        "dinov2-s14",
        "zero",
        0,
    )
    assert (model["image_peft"], model["text_peft"], model["img_size"]) == ("lora", "lora", 112)
    assert data["test_split"] == "test_seen"
    assert data["train_missing"]["missing_rate"] == 0.0
    assert data["test_missing"] == {"missing_rate": 0.7, "missing_type": "text"}


# --------------------------------------------------------------------------------------- fit / test


def _tiny_args(data_config: str, root: Path | None, tmp: Path, *extra: str) -> list[str]:
    args = [
        "--config",
        str(CONFIGS / "data" / data_config),
        "--config",
        str(CONFIGS / "debug" / "tiny.yaml"),
        "--data.missing_table_dir",
        str(tmp / "tables"),
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
        # fast_dev_run swaps the logger out, and checkpoints then go under default_root_dir (the cwd).
        "--trainer.default_root_dir",
        str(tmp / "root"),
        *extra,
    ]
    if root is not None:
        args += ["--data.root", str(root)]
    return args


DATASETS = {
    # config: (fixture builder or None for the prepared emoji cache, classes, task, monitored metric)
    "mmimdb.yaml": (make_mmimdb, 23, "multilabel", "val/f1_macro"),
    "food101.yaml": (make_food101, 101, "multiclass", "val/accuracy"),
    "hateful_memes.yaml": (make_hateful_memes, 2, "binary", "val/auroc"),
    "emoji.yaml": (None, 9, "multiclass", "val/accuracy"),
}


@pytest.mark.parametrize("data_config", sorted(DATASETS))
def test_fit_fast_dev_run_for_each_dataset_config(data_config, tmp_path, request):
    builder, num_classes, task, monitor = DATASETS[data_config]
    if builder is None:
        root = request.getfixturevalue("prepared_emoji_cache")  # skips when `make assets` has not run
    else:
        root = builder(tmp_path)
    run = make_cli(
        [
            "fit",
            *_tiny_args(
                data_config,
                root,
                tmp_path,
                "--config",
                str(CONFIGS / "missing" / "missing_training_both.yaml"),
                "--config",
                str(CONFIGS / "debug" / "fast_dev_run.yaml"),
            ),
        ]
    )
    assert run.trainer.state.finished
    # Linked both ways: label count and task from the data; encoders and image size from the model.
    assert (run.model.hparams.num_classes, run.model.hparams.task) == (num_classes, task)
    assert (run.datamodule.image_encoder, run.datamodule.text_encoder, run.datamodule.image_size) == (
        "test_vit",
        "tiny-bert",
        32,
    )
    assert run.datamodule.data_config["input_size"] == (3, 32, 32)
    assert run.trainer.checkpoint_callback.monitor == monitor
    metrics = run.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and monitor in metrics


@pytest.mark.slow
def test_fit_then_validate_and_test_reproduce_the_validation_metric(tmp_path):
    root = make_hateful_memes(tmp_path, n_train=12, n_dev=8)
    # The test split is made a copy of the validation split, so "test on the same split" is defined.
    shutil.copy(root / "dev.jsonl", root / "test_seen.jsonl")
    args = _tiny_args(
        "hateful_memes.yaml",
        root,
        tmp_path,
        "--data.init_args.train_missing",
        "{missing_rate: 0.5, missing_type: both}",
        "--data.init_args.val_missing",
        "{missing_rate: 0.0}",
        "--data.init_args.test_missing",
        "{missing_rate: 0.0}",
    )
    fitted = make_cli(["fit", *args, "--trainer.max_epochs", "2"])
    callback = fitted.trainer.checkpoint_callback
    best_score, best_path = float(callback.best_model_score), callback.best_model_path
    assert Path(best_path).is_file() and Path(callback.last_model_path).name == "last.ckpt"
    log_dir = Path(fitted.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file() and list(log_dir.glob("events.out.tfevents.*"))

    validated = make_cli(["validate", *args, "--ckpt_path", best_path])
    assert float(validated.trainer.callback_metrics["val/auroc"]) == pytest.approx(best_score, abs=1e-6)
    tested = make_cli(["test", *args, "--ckpt_path", best_path])
    assert float(tested.trainer.callback_metrics["test/auroc"]) == pytest.approx(best_score, abs=1e-6)
    assert float(tested.trainer.callback_metrics["test/accuracy"]) == pytest.approx(
        float(validated.trainer.callback_metrics["val/accuracy"]), abs=1e-6
    )


def test_config_is_saved_and_a_requeued_run_may_rewrite_it(tmp_path):
    root = make_hateful_memes(tmp_path)
    args = _tiny_args(
        "hateful_memes.yaml",
        root,
        tmp_path,
        "--trainer.logger.init_args.name",
        "job",
        "--trainer.logger.init_args.version",
        "slurm-123",  # as the SLURM script sets it
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "1",
    )
    for _ in range(2):  # the second run (a requeue) must not abort on the existing config.yaml
        make_cli(["fit", *args])
    saved = yaml.safe_load((tmp_path / "runs" / "job" / "slurm-123" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["image_backbone"] == "test_vit"
    assert saved["data"]["init_args"]["root"] == str(root)


# ---------------------------------------------------------------------------------- misconfiguration


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (
            ["--model.init_args.image_backbone", "vit_does_not_exist"],
            ValueError,
            r"model.image_backbone: unknown image encoder 'vit_does_not_exist'",
        ),
        (
            ["--model.init_args.text_backbone", "./no/such/folder"],
            ValueError,
            r"model.text_backbone: local folder ./no/such/folder does not exist",
        ),
        (
            ["--data.root", "/no/such/dataset/root"],
            FileNotFoundError,
            r"data.root: folder /no/such/dataset/root does not exist",
        ),
        (
            ["--data.init_args.train_missing", "{missing_rate: 1.5}"],
            ValueError,
            r"data.train_missing.missing_rate must be a number in \[0, 1\], got 1.5",
        ),
        (
            ["--data.init_args.test_missing", "{missing_rate: -0.1}"],
            ValueError,
            r"data.test_missing.missing_rate must be a number in \[0, 1\]",
        ),
        # (An unknown missing_type is a jsonargparse parse error now: the type is a Literal.)
        (
            ["--data.init_args.val_missing", "{missing_rate: 0.5, both_ratio: 1.5}"],
            ValueError,
            r"data.val_missing.both_ratio must be a number in \[0, 1\], got 1.5",
        ),
    ],
)
def test_misconfiguration_fails_before_anything_is_built(
    extra, error, message, tmp_path, capsys, monkeypatch
):
    root = make_hateful_memes(tmp_path)
    args = ["fit", *_tiny_args("hateful_memes.yaml", root, tmp_path), *extra]
    with patch("lightning_modules.encoders.sources.create_image_backbone") as build:
        with pytest.raises(SystemExit) as exit_info:  # a user error: one message, exit status 2
            make_cli(args)
        assert exit_info.value.code == 2
        assert re.search(f"unipair fit: error: {message}", capsys.readouterr().err)
        monkeypatch.setenv(cli.DEBUG_ENV, "1")  # the debug switch re-raises the error itself
        with pytest.raises(error, match=message):
            make_cli(args)
    build.assert_not_called()
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_python_cli_py_and_console_script(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0 and "robustness" in result.stdout
    script = Path(sys.executable).with_name("unipair")
    if not script.exists():
        pytest.skip("the unipair console script is not installed in this environment (pip install -e .)")
    result = subprocess.run(
        [str(script), "fit", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0 and "--trainer.max_epochs" in result.stdout


def test_demo_driver_leaves_the_run_folders_the_figure_and_the_comparison(
    tmp_path, prepared_emoji_cache, capsys
):
    """scripts/demo.py end to end on the real emoji data with the tiny encoders and 2 training batches."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("unipair_demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo"
    with patch.object(sys, "argv", ["demo.py"]):
        result = demo.main(
            [
                "--out",
                str(out),
                "--encoders-config",
                str(CONFIGS / "model" / "encoders" / "tiny.yaml"),
                "--image-size",
                "32",
                "--epochs",
                "2",
                "--limit-train-batches",
                "2",
                "--extra",
                "--trainer.limit_val_batches",
                "1",
                "--model.init_args.prompt_length",
                "2",
                "--data.init_args.missing_table_dir",
                str(tmp_path / "tables"),
            ]
        )
    for name in ("method", "zero_plain", "oracle_image", "oracle_text"):
        (run_dir,) = (out / name).iterdir()
        assert (run_dir / "config.yaml").is_file() and list(run_dir.glob("events.out.tfevents.*"))
        assert (
            list((run_dir / "checkpoints").glob("best-*.ckpt"))
            and (run_dir / "checkpoints" / "last.ckpt").is_file()
        )
    for name in ("method", "zero_plain"):
        (run_dir,) = (out / name).iterdir()
        for file in ("robustness.json", "robustness.csv", "robustness.md", "robustness.png", "config.yaml"):
            assert (run_dir / "robustness" / file).is_file(), file
        rows = json.loads((run_dir / "robustness" / "robustness.json").read_text())["rows"]
        assert len({(r["missing_type"], r["missing_rate"]) for r in rows}) == 33
    # The ceiling: with every text (image) missing it is the image-only (text-only) model alone; at
    # eta = 0 it is the model chosen for complete samples, the best of the three on validation.
    oracle = {
        (r["missing_type"], r["missing_rate"]): r["value"]
        for r in result["results"]["oracle"]
        if r["metric"] == "accuracy"
    }
    baseline = {
        (r["missing_type"], r["missing_rate"]): r["value"]
        for r in result["results"]["zero_plain"]
        if r["metric"] == "accuracy"
    }
    ceiling = result["ceiling"]
    assert set(ceiling["val_accuracy"]) == {"zero_plain", "oracle_image", "oracle_text"}
    assert ceiling["complete_model"] == max(ceiling["val_accuracy"], key=ceiling["val_accuracy"].get)
    alone = {
        "zero_plain": baseline[("both", 0.0)],
        "oracle_image": oracle[("text", 1.0)],
        "oracle_text": oracle[("image", 1.0)],
    }
    assert oracle[("both", 0.0)] == pytest.approx(alone[ceiling["complete_model"]])
    assert len(oracle) == 33
    comparison = (out / "comparison.md").read_text()
    assert f"Complete samples by `{ceiling['complete_model']}`" in comparison
    assert (
        "| missing type | missing rate | method | zero_plain | oracle | method − zero_plain |" in comparison
    )
    assert "last-epoch gain" in comparison and (out / "comparison.png").stat().st_size > 1000
    assert comparison.count("| both |") == 11
    assert "At 70 %: text: method" in capsys.readouterr().out

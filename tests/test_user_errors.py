"""User errors through ``cli.cli_main``: one message naming file / row / field / option, exit status 2.

One test per class of error (option out of range, missing dataset, bad row, bad image in a loader
worker, missing column, foreign or mismatched checkpoint, bad prediction input checked before the
model is built), plus the other side of the rule: programming errors and errors raised inside
libraries keep their traceback, and ``UNIPAIR_DEBUG=1`` shows it for a user error too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from PIL import Image

import cli
from tests.fixtures_data import make_arrow_tables, make_food101, make_hateful_memes

TINY_MODEL = [
    "--model",
    "lightning_modules.system.UnipairSystem",
    "--model.init_args.image_backbone",
    "test_vit",
    "--model.init_args.text_backbone",
    "tiny-bert",
    "--model.init_args.pretrained",
    "false",
    "--model.init_args.img_size",
    "32",
    "--model.init_args.prompt_length",
    "2",
    "--model.init_args.prompt_depth",
    "2",
    "--model.init_args.predictor_length",
    "2",
    "--model.init_args.predictor_hidden_dim",
    "16",
    "--model.init_args.head_hidden_dim",
    "16",
]


def _args(
    tmp: Path, root: Path, *extra: str, data: str = "datamodules.hateful_memes.HatefulMemesDataModule"
) -> list[str]:
    return [
        *TINY_MODEL,
        "--data",
        data,
        "--data.root",
        str(root),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "4",
        "--data.missing_table_dir",
        str(tmp / "tables"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
        "--trainer.default_root_dir",
        str(tmp / "root"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


def _exit(args: list[str], capsys) -> str:
    """Run ``cli_main(args)``; assert it exits with status 2 and one message; return that message."""
    capsys.readouterr()
    with patch.object(sys, "argv", ["unipair", *args]), pytest.raises(SystemExit) as exit_info:
        cli.cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("unipair")]
    assert len(lines) == 1 and lines[0].startswith(f"unipair {args[0]}: error: "), err
    assert lines[0].endswith(f"(set {cli.DEBUG_ENV}=1 for the traceback)")
    return lines[0]


@pytest.fixture
def memes(tmp_path) -> Path:
    return make_hateful_memes(tmp_path)


# ------------------------------------------------------------------------------ options and files


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--model.init_args.warmup_fraction", "1.5"], "warmup_fraction must be in [0, 1), got 1.5"),
        (
            ["--data.init_args.train_missing", "{missing_rate: 1.5}"],
            "data.train_missing.missing_rate must be a number in [0, 1]",
        ),
        (["--data.init_args.batch_size", "0"], "batch_size must be an integer >= 1, got 0"),
        (["--data.root", "/no/such/root"], "data.root: folder /no/such/root does not exist"),
    ],
)
def test_option_errors_name_the_option(tmp_path, memes, capsys, extra, named):
    assert named in _exit(["fit", *_args(tmp_path, memes), *extra], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_trainer_option_that_cannot_work_here_is_one_message(tmp_path, memes, capsys):
    message = _exit(["fit", *_args(tmp_path, memes, "--trainer.accelerator", "gpu")], capsys)
    assert "gpu" in message.lower()


def test_bad_row_in_a_dataset_file_names_file_line_and_field(tmp_path, memes, capsys):
    lines = (memes / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["text"] = 3
    lines[1] = json.dumps(row)
    (memes / "train.jsonl").write_text("\n".join(lines) + "\n")
    message = _exit(["fit", *_args(tmp_path, memes, "--trainer.fast_dev_run", "true")], capsys)
    assert "train.jsonl line 2" in message and "field 'text' is 3; expected a string" in message


def test_unreadable_image_in_a_loader_worker_is_one_message(tmp_path, memes, capsys):
    for image in (memes / "img").iterdir():
        image.write_bytes(b"not an image")
    message = _exit(
        ["fit", *_args(tmp_path, memes, "--trainer.fast_dev_run", "true", "--data.num_workers", "1")], capsys
    )
    assert (
        "DataLoader worker" not in message
        and "field 'image'" in message
        and "could not be decoded" in message
    )


def test_missing_column_names_the_table_and_column(tmp_path, capsys):
    import pyarrow as pa

    root = make_arrow_tables(tmp_path)
    path = root / "hatememes_train.arrow"
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all().drop_columns(["text"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    message = _exit(
        ["fit", *_args(tmp_path, root, "--data.init_args.format", "arrow", "--trainer.fast_dev_run", "true")],
        capsys,
    )
    assert "hatememes_train.arrow lacks column(s) ['text']" in message


# ---------------------------------------------------------------------------------- checkpoints


def test_missing_and_foreign_checkpoints_are_named(tmp_path, memes, capsys):
    absent = tmp_path / "absent.ckpt"
    assert f"--ckpt_path {absent}: file does not exist" in _exit(
        ["test", *_args(tmp_path, memes), "--ckpt_path", str(absent)], capsys
    )
    foreign = tmp_path / "weights.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    message = _exit(["test", *_args(tmp_path, memes), "--ckpt_path", str(foreign)], capsys)
    assert f"--ckpt_path {foreign}: not a Lightning checkpoint" in message


@pytest.mark.slow
def test_checkpoint_of_another_dataset_is_one_message(tmp_path, memes, capsys):
    with patch.object(sys, "argv", ["unipair"]):
        cli.cli_main(
            ["fit", *_args(tmp_path, memes, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1")]
        )
    (ckpt,) = (tmp_path / "runs").rglob("last.ckpt")
    food = make_food101(tmp_path)
    message = _exit(
        [
            "test",
            *_args(tmp_path, food, data="datamodules.food101.Food101DataModule"),
            "--ckpt_path",
            str(ckpt),
        ],
        capsys,
    )
    assert (
        "checkpoint does not match this UnipairSystem configuration" in message
        and "'num_classes': (2, 101)" in message
    )


# ---------------------------------------------------------------------------------- predict input


@pytest.mark.parametrize(
    "rows, named",
    [
        (
            [{"text": "fine"}, {"image": "absent.png"}],
            r"rows.jsonl line 2: field 'image': file {folder}/absent.png does not exist",
        ),
        (
            [{"text": "fine"}, {"text": "x"}, {"image": "broken.png"}],
            r"rows.jsonl line 3 (id '3'): field 'image': ",
        ),
        (['{"text": "unterminated'], "rows.jsonl line 1: not valid JSON"),
        ([{"text": "fine"}, {"img": "red.png"}], "rows.jsonl line 2: unknown field(s) ['img']"),
    ],
)
def test_prediction_input_is_validated_before_the_model_is_built(tmp_path, memes, capsys, rows, named):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (8, 8)).save(tmp_path / "red.png")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    with patch("lightning_modules.encoders.sources.create_image_backbone") as build:
        message = _exit(["predict", *_args(tmp_path, memes), "--predict_file", str(path)], capsys)
    build.assert_not_called()
    assert named.format(folder=tmp_path) in message
    assert not list(tmp_path.glob("*.predictions.jsonl*"))


# ------------------------------------------------------------------------------ not user errors


def test_programming_errors_and_library_errors_keep_their_traceback(tmp_path, memes):
    args = ["fit", *_args(tmp_path, memes, "--trainer.fast_dev_run", "true")]
    with patch.object(sys, "argv", ["unipair", *args]):
        with patch("lightning_modules.system.UnipairSystem.encode", side_effect=TypeError("a bug")):
            with pytest.raises(TypeError, match="a bug"):
                cli.cli_main(args)
        # A ValueError raised inside a library (here: mock's frame) is not unipair's validation.
        with patch("timm.create_model", side_effect=ValueError("inside timm")):
            with pytest.raises(ValueError, match="inside timm"):
                cli.cli_main(args)


def test_debug_switch_shows_the_traceback_of_a_user_error(tmp_path, memes, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    args = ["fit", *_args(tmp_path, memes), "--model.init_args.warmup_fraction", "1.5"]
    with patch.object(sys, "argv", ["unipair", *args]), pytest.raises(ValueError, match="warmup_fraction"):
        cli.cli_main(args)


def test_worker_messages_are_unwrapped():
    wrapped = (
        "Caught BadSampleError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "/x/torch/utils/data/_utils/worker.py", line 1, in _worker_loop\n'
        "    data = fetcher.fetch(index)\n"
        f'  File "{cli.SOURCE_ROOT}/datamodules/base.py", line 9, in __getitem__\n    raise BadSampleError(\n'
        "datamodules.base.BadSampleError: train sample '7': field 'image' could not be decoded\n"
    )
    assert (
        cli.user_error_message(ValueError(wrapped)) == "train sample '7': field 'image' could not be decoded"
    )
    library = wrapped.replace(f"{cli.SOURCE_ROOT}/datamodules", "/x/site-packages/pil")
    assert cli.user_error_message(ValueError(library)) is None

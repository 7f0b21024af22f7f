"""Hostile and broken inputs: each one is a clear error naming what and where, or a documented conversion.

Complements ``tests/test_bad_inputs_data.py`` (absent/garbage/half-PNG images, empty texts, labels
outside the label set, malformed JSON/CSV lines, the ``on_bad_sample`` policy, mode conversions at the
decoder level) with: bytes that are not UTF-8, a byte-order mark, zero-byte and truncated JPEG files,
an image header declaring 10 gigapixels, every image mode through the whole loader, wrongly typed
fields, missing and extra fields, an extremely long text, checkpoints from another configuration or
not checkpoints at all (``unipair test --ckpt_path``), and configuration typos.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import zlib
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from datamodules import BadSampleError, Food101DataModule, HatefulMemesDataModule, MMIMDbDataModule
from datamodules.predict_jsonl import PredictionInputError, read_prediction_rows
from tests.fixtures_data import make_arrow_tables, make_food101, make_hateful_memes, make_mmimdb
from tests.test_bad_inputs_data import edit_jsonl, train_rows

TINY = {"image_encoder": "test_vit", "text_encoder": "tiny-bert", "image_size": 32, "batch_size": 4}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))


# ------------------------------------------------------------------------------------- encodings


def test_non_utf8_bytes_in_index_files_name_the_file_line_and_byte(tmp_path):
    memes = make_hateful_memes(tmp_path)
    _replace_bytes(memes / "train.jsonl", b"caption of meme 10001", b"caption \xff of meme 10001")
    with pytest.raises(
        ValueError,
        match=r"train\.jsonl line 2, byte \d+: not valid UTF-8 \(invalid start byte, byte b'\\xff'\)",
    ):
        HatefulMemesDataModule(root=str(memes), **TINY).setup("fit")

    food = make_food101(tmp_path)
    _replace_bytes(
        food / "texts" / "train_titles.csv", b"recipe, number 3", b"recipe \xe9, number 3"
    )  # latin-1 e-acute
    with pytest.raises(ValueError, match=r"train_titles\.csv line 4, byte \d+: not valid UTF-8 .*iconv"):
        Food101DataModule(root=str(food), **TINY).setup("fit")

    mmimdb = make_mmimdb(tmp_path)
    (mmimdb / "split.json").write_bytes(b"\xff\xfe" + (mmimdb / "split.json").read_bytes())  # UTF-16 BOM
    with pytest.raises(ValueError, match=r"split\.json line 1, byte 1: not valid UTF-8"):
        MMIMDbDataModule(root=str(mmimdb), **TINY).setup("fit")
    mmimdb = make_mmimdb(tmp_path / "second")
    _replace_bytes(mmimdb / "dataset" / "0000001.json", b"Plot 0", b"Plot \xff 0")
    with pytest.raises(
        ValueError, match=r"train sample '0000001': .*0000001\.json is not valid JSON: 'utf-8' codec"
    ):
        MMIMDbDataModule(root=str(mmimdb), **TINY).setup("fit")

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PredictionInputError, match=r"rows\.jsonl line 2, byte 14: not valid UTF-8"):
        read_prediction_rows(rows)


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    memes = make_hateful_memes(tmp_path)
    (memes / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + (memes / "train.jsonl").read_bytes())
    dm = HatefulMemesDataModule(root=str(memes), **TINY)
    dm.setup("fit")
    assert dm.datasets["train"].ids[0] == "10000"  # the first line parses; nothing lost
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'\xef\xbb\xbf{"text": "with a BOM"}\n')
    assert [r.text for r in read_prediction_rows(rows)] == ["with a BOM"]


# ---------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("policy", ["error", "missing"])
def test_zero_byte_and_truncated_jpeg_files(tmp_path, policy):
    root = make_mmimdb(tmp_path)
    (root / "dataset" / "0000001.jpeg").write_bytes(b"")
    cut = root / "dataset" / "0000002.jpeg"
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    no_end = root / "dataset" / "0000003.jpeg"
    no_end.write_bytes(no_end.read_bytes()[:-2])  # without its end-of-image marker
    dm = MMIMDbDataModule(root=str(root), on_bad_sample=policy, **TINY)
    dm.setup("fit")
    if policy == "error":
        with pytest.raises(
            BadSampleError,
            match=(
                r"train sample '0000001#0': field 'image' \(file .*0000001\.jpeg\) could not be decoded "
                r"\(UnidentifiedImageError"
            ),
        ):
            train_rows(dm)
        return
    rows = train_rows(dm)
    assert len(rows) == 16  # 8 movies x 2 plots: nothing dropped
    for movie in ("0000001", "0000002", "0000003"):
        assert (
            rows[f"{movie}#0"] == rows[f"{movie}#1"] == (False, True, True)
        )  # image missing, filler, text kept
    assert dm.bad_sample_counts["train"]["image_unreadable"] == 6
    assert sorted({i.split("#")[0] for i in dm.bad_sample_ids("train", "image_unreadable")}) == [
        "0000001",
        "0000002",
        "0000003",
    ]


def test_truncated_jpeg_error_says_truncated(tmp_path):
    root = make_mmimdb(tmp_path)
    no_end = root / "dataset" / "0000003.jpeg"
    no_end.write_bytes(no_end.read_bytes()[:-2])
    (root / "split.json").write_text(
        json.dumps({"train": ["0000003"], "dev": ["0000008"], "test": ["0000012"]})
    )
    dm = MMIMDbDataModule(root=str(root), **TINY)
    dm.setup("fit")
    with pytest.raises(
        BadSampleError, match=r"0000003\.jpeg\) could not be decoded \(OSError: image file is truncated"
    ):
        train_rows(dm)


def _png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares ``width x height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_header_declaring_ten_gigapixels_is_refused_before_decoding(tmp_path):
    memes = make_hateful_memes(tmp_path)
    (memes / "img" / "10003.png").write_bytes(_png_declaring(100_000, 100_000))
    dm = HatefulMemesDataModule(root=str(memes), **TINY)
    dm.setup("fit")
    with pytest.raises(
        BadSampleError,
        match=r"'10003': field 'image' .* \(DecompressionBombError: Image size \(10000000000 pixels\)",
    ):
        train_rows(dm)
    lenient = HatefulMemesDataModule(root=str(memes), on_bad_sample="missing", **TINY)
    lenient.setup("fit")
    rows = train_rows(lenient)
    assert rows["10003"] == (False, True, True) and len(rows) == 8


def test_every_image_mode_reaches_the_batch_as_documented_rgb(tmp_path):
    memes = make_hateful_memes(tmp_path)
    Image.new("L", (20, 20), 100).save(memes / "img" / "10000.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(
        memes / "img" / "10001.png", format="JPEG"
    )  # named .png
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(memes / "img" / "10002.png")
    Image.fromarray(np.full((20, 20), 257 * 100, dtype=np.uint16)).save(
        memes / "img" / "10003.png"
    )  # 16-bit grey
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(memes / "img" / "10004.png")  # fully transparent
    Image.new("1", (20, 20), 1).save(memes / "img" / "10005.png")
    dm = HatefulMemesDataModule(root=str(memes), **{**TINY, "batch_size": 8})
    dm.setup("fit")
    batch = next(iter(dm._loader("train", shuffle=False)))
    assert batch["image"].shape == (8, 3, 32, 32) and bool(batch["image_present"].all())
    mean = torch.tensor(dm.data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(dm.data_config["std"]).view(3, 1, 1)
    rgb = (batch["image"] * std + mean) * 255  # back to 0..255
    row = {sample_id: i for i, sample_id in enumerate(batch["id"])}

    def colour(sample_id: str) -> list[int]:
        return rgb[row[sample_id]].round().flatten(1).median(dim=1).values.int().tolist()

    assert colour("10000") == [100, 100, 100]  # grey -> equal channels
    assert colour("10002") == [10, 200, 30]  # palette expanded
    assert colour("10003") == [100, 100, 100]  # 16-bit scaled by 1/257, not clipped to white
    assert colour("10004") == [255, 255, 255]  # transparent -> composited on white
    assert colour("10005") == [255, 255, 255]
    red, green, _ = colour("10001")  # CMYK (0, 255, 255, 0) is red
    assert red > 200 and green < 60


def test_empty_and_truncated_image_bytes_in_arrow_tables(tmp_path):
    import pyarrow as pa

    root = make_arrow_tables(tmp_path)
    path = root / "hatememes_train.arrow"
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    images = table.column("image").to_pylist()
    images[1], images[2] = b"", images[2][: len(images[2]) // 2]
    table = table.set_column(table.column_names.index("image"), "image", pa.array(images, type=pa.binary()))
    with pa.OSFile(str(root / "new.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (root / "new.arrow").replace(path)
    with pytest.raises(
        BadSampleError,
        match=(
            r"train sample 'row1': field 'image': arrow file .*hatememes_train\.arrow row 1 column 'image' "
            r"does not exist"
        ),
    ):
        HatefulMemesDataModule(root=str(root), format="arrow", **TINY).setup("fit")
    dm = HatefulMemesDataModule(root=str(root), format="arrow", on_bad_sample="missing", **TINY)
    dm.setup("fit")
    rows = train_rows(dm)
    assert rows["row1"] == rows["row2"] == (False, True, True) and len(rows) == 6
    assert (
        dm.bad_sample_counts["train"]["image_absent"] == 1
        and dm.bad_sample_counts["train"]["image_unreadable"] == 1
    )
    (root / "hatememes_dev.arrow").write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"hatememes_dev\.arrow is not an Arrow IPC file or stream"):
        HatefulMemesDataModule(root=str(root), format="arrow", **TINY).setup("validate")


# ----------------------------------------------------------------------------------- row fields


def test_wrongly_typed_fields_are_named(tmp_path):
    memes = make_hateful_memes(tmp_path)
    edit_jsonl(memes / "train.jsonl", 2, img=5)
    with pytest.raises(ValueError, match=r"train\.jsonl line 3: field 'img' is 5; expected a path string"):
        HatefulMemesDataModule(root=str(memes), **TINY).setup("fit")
    for label in ("1", 1.0, True):
        memes = make_hateful_memes(tmp_path / f"label-{label!r}")
        edit_jsonl(memes / "train.jsonl", 2, label=label)
        with pytest.raises(
            BadSampleError,
            match=rf"train sample '10002' .*field 'label' is {label!r}; expected a class index in \[0, 2\)",
        ):
            HatefulMemesDataModule(root=str(memes), **TINY).setup("fit")

    mmimdb = make_mmimdb(tmp_path)
    movie = mmimdb / "dataset" / "0000001.json"
    data = json.loads(movie.read_text())
    movie.write_text(json.dumps({**data, "plot": ["a real plot", 123]}))
    with pytest.raises(
        BadSampleError,
        match=(
            r"train sample '0000001#1': field 'text' \(.*0000001\.json field 'plot'\[1\]\) is a int "
            r"\('123'\); expected a string"
        ),
    ):
        MMIMDbDataModule(root=str(mmimdb), **TINY).setup("fit")
    movie.write_text(json.dumps({**data, "plot": {"text": "an object"}}))
    with pytest.raises(BadSampleError, match=r"field 'text' \(.*field 'plot'\[0\]\) is a dict"):
        MMIMDbDataModule(root=str(mmimdb), **TINY).setup("fit")
    movie.write_text("[1, 2]")
    with pytest.raises(
        ValueError, match=r"train sample '0000001': .*0000001\.json holds a list; expected a JSON object"
    ):
        MMIMDbDataModule(root=str(mmimdb), **TINY).setup("fit")


def test_missing_and_extra_fields(tmp_path, caplog):
    memes = make_hateful_memes(tmp_path)
    edit_jsonl(memes / "train.jsonl", 2, id=None)
    with pytest.raises(ValueError, match=r"train\.jsonl line 3: expected an object with an 'id' field"):
        HatefulMemesDataModule(root=str(memes), **TINY).setup("fit")
    memes = make_hateful_memes(tmp_path / "label")
    edit_jsonl(memes / "train.jsonl", 2, label=None)
    with pytest.raises(
        ValueError,
        match=r"train sample '10002' has no label \(.*train\.jsonl line 3.*Labels are required here",
    ):
        HatefulMemesDataModule(root=str(memes), **TINY).setup("fit")

    # Extra fields are ignored (the real files carry many: MM-IMDb has ~50 per movie); a misspelt
    # field is then an absent one, which the bad-input policy reports.
    memes = make_hateful_memes(tmp_path / "extra")
    edit_jsonl(memes / "train.jsonl", 2, source="web", note={"x": 1})
    dm = HatefulMemesDataModule(root=str(memes), **TINY)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and train_rows(dm)["10002"] == (True, True, False)
    edit_jsonl(memes / "train.jsonl", 2, text=None, txt="misspelt field name")
    with pytest.raises(BadSampleError, match=r"train sample '10002': field 'text' absent"):
        HatefulMemesDataModule(root=str(memes), **TINY).setup("fit")

    food = make_food101(tmp_path)
    csv_path = food / "texts" / "train_titles.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] += ",an extra column"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError,
        match=r"train_titles\.csv line 4, sample 'apple_pie_3\.jpg': field 'class' is 'an extra column'",
    ):
        Food101DataModule(root=str(food), **TINY).setup("fit")


def test_an_extremely_long_text_is_truncated_to_max_text_len_and_counted(tmp_path, caplog):
    memes = make_hateful_memes(tmp_path)
    edit_jsonl(memes / "train.jsonl", 2, text="word " * 200_000)
    dm = HatefulMemesDataModule(root=str(memes), **{**TINY, "max_text_len": 16, "batch_size": 8})
    with caplog.at_level(logging.INFO, logger="datamodules"):
        dm.setup("fit")
    assert dm.truncated_text_counts == {"train": 1, "val": 0}
    assert any(
        "1 text(s) longer than max_text_len=16 tokens were truncated" in r.getMessage()
        and "'10002'" in r.getMessage()
        for r in caplog.records
    )
    batch = next(iter(dm._loader("train", shuffle=False)))
    row = batch["id"].index("10002")
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
    tokenizer = dm.tokenizer
    assert len(ids) == 16 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids[1:-1]) == " ".join(["word"] * 14)  # its first 14 words, in order


# ---------------------------------------------------------------- checkpoints and configurations


def _cli(args: list[str]):
    with patch.object(sys, "argv", ["unipair", *args]):
        return cli.make_cli(args)


def _args(tmp: Path, data_config: str, root: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "data" / data_config),
        "--config",
        str(CONFIGS / "model" / "encoders" / "tiny.yaml"),
        "--config",
        str(CONFIGS / "trainer" / "cpu.yaml"),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "4",
        "--data.missing_table_dir",
        str(tmp / "tables"),
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.root",
        str(root),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step Hateful Memes checkpoint of the tiny model."""
    tmp = tmp_path_factory.mktemp("trained")
    memes = make_hateful_memes(tmp)
    run = _cli(
        [
            "fit",
            *_args(
                tmp,
                "hateful_memes.yaml",
                memes,
                "--trainer.max_steps",
                "1",
                "--trainer.limit_val_batches",
                "1",
            ),
        ]
    )
    return tmp, memes, Path(run.trainer.checkpoint_callback.last_model_path)


def test_checkpoint_of_another_dataset_is_a_clear_mismatch(trained, tmp_path):
    tmp, _, ckpt = trained
    food = make_food101(tmp_path)
    with pytest.raises(
        RuntimeError,
        match=(
            r"checkpoint does not match this UnipairSystem configuration: .*2 with other shapes "
            r".*'head\.net\.4\.weight': \(\(2, 16\), \(101, 16\)\).* Hyperparameters that differ "
            r"\(checkpoint, current\): .*'num_classes': \(2, 101\)"
        ),
    ):
        _cli(["test", *_args(tmp_path, "food101.yaml", food), "--ckpt_path", str(ckpt)])


def test_checkpoint_settings_replacing_the_config_are_reported(trained, tmp_path):
    tmp, memes, ckpt = trained
    with pytest.warns(
        UserWarning,
        match=(
            r"--ckpt_path .*last\.ckpt: the model is built with the checkpoint's hyperparameters; .*replaced "
            r"\(given -> checkpoint\): \{'prompt_length': \(3, 2\), 'missing_strategy': \('zero', "
            r"'predict'\)\}"
        ),
    ):
        run = _cli(
            [
                "test",
                *_args(
                    tmp_path,
                    "hateful_memes.yaml",
                    memes,
                    "--model.init_args.prompt_length",
                    "3",
                    "--model.init_args.missing_strategy",
                    "zero",
                ),
                "--ckpt_path",
                str(ckpt),
            ]
        )
    assert run.model.hparams.prompt_length == 2 and run.model.hparams.missing_strategy == "predict"


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "truncated",
            r"cannot be read as a checkpoint \(RuntimeError: PytorchStreamReader failed reading zip archive",
        ),
        (
            "junk",
            r"cannot be read as a checkpoint \(UnpicklingError: Weights only load failed\)\. Is it a "
            r"complete \.ckpt",
        ),
        (
            "weights",
            r"not a Lightning checkpoint \(expected the keys \['state_dict', 'pytorch-lightning_version'\], "
            r"found \['state_dict'\]\)",
        ),
    ],
)
def test_files_that_are_not_checkpoints_are_named(trained, tmp_path, content, message):
    tmp, memes, ckpt = trained
    bad = tmp_path / f"{content}.ckpt"
    if content == "truncated":
        bad.write_bytes(ckpt.read_bytes()[:1000])
    elif content == "junk":
        bad.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"state_dict": {"head.weight": torch.zeros(2)}}, bad)
    with pytest.raises(ValueError, match=rf"--ckpt_path {bad}: {message}"):
        _cli(["test", *_args(tmp_path, "hateful_memes.yaml", memes), "--ckpt_path", str(bad)])


@pytest.mark.parametrize(
    "extra, yaml_text, named",
    [
        (["--model.init_args.lrr", "0.1"], None, "Option 'lrr' is not accepted"),
        ([], "model:\n  init_args:\n    prompt_lenght: 4\n", "Option 'prompt_lenght' is not accepted"),
        ([], "data:\n  init_args:\n    batchsize: 4\n", "Option 'batchsize' is not accepted"),
        ([], "trainer:\n  max_epoch: 4\n", "does not accept option 'trainer.max_epoch'"),
    ],
)
def test_config_typos_are_parse_errors_naming_the_key(trained, tmp_path, capsys, extra, yaml_text, named):
    _, memes, _ = trained
    if yaml_text is not None:
        (tmp_path / "typo.yaml").write_text(yaml_text)
        extra = ["--config", str(tmp_path / "typo.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        _cli(["fit", *_args(tmp_path, "hateful_memes.yaml", memes, *extra)])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was built or written

"""Prediction on a JSONL file of raw inputs: reader validation, and end to end through ``unipair predict``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from PIL import Image

import cli
from datamodules.predict_jsonl import PredictionInputError, prediction_records, read_prediction_rows
from tests.fixtures_data import make_hateful_memes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_cli(args: list[str]) -> cli.UnipairCLI:
    """Run the CLI in-process with ``args`` (sys.argv set to match, as if typed on the command line)."""
    with patch.object(sys, "argv", ["unipair", *args]):
        return cli.make_cli(args)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    Image.new("RGB", (20, 24), (200, 10, 10)).save(tmp_path / "red.png")
    return tmp_path


# ------------------------------------------------------------------------------------------- reader


def test_reader_accepts_image_only_text_only_and_both(image_folder):
    absolute = str(image_folder / "red.png")
    path = _write_jsonl(
        image_folder / "rows.jsonl",
        [
            {"image": "red.png"},
            {"text": "a red square"},
            "",
            {
                "id": "x",
                "image": absolute,
                "text": "both",
            },
        ],
    )
    rows = read_prediction_rows(path)
    assert [(r.line, r.id) for r in rows] == [(1, "1"), (2, "2"), (4, "x")]  # blank line 3 is not a row
    assert rows[0].image == image_folder / "red.png" and rows[0].text is None  # relative to the file's folder
    assert rows[1].image is None and rows[1].text == "a red square"
    assert rows[2].image == Path(absolute) and rows[2].text == "both"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "z"}, r"line 2: the row has neither 'image' nor 'text'"),
        ({"image": None, "text": None}, r"line 2: the row has neither 'image' nor 'text'"),
        ({"img": "red.png"}, r"line 2: unknown field\(s\) \['img'\]"),
        ({"text": "   "}, r"line 2: field 'text' is empty"),
        ({"text": 3}, r"line 2: field 'text' must be a string or null, got int"),
        ({"image": "absent.png"}, r"line 2: field 'image': file .*absent.png does not exist"),
        ({"image": ""}, r"line 2: field 'image' must be a non-empty path string"),
        ('{"text": "unterminated', r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        ({"id": "1", "text": "duplicate"}, r"line 2: id '1' was already used on line 1"),
    ],
)
def test_reader_errors_name_file_line_and_field(image_folder, row, message):
    path = _write_jsonl(image_folder / "rows.jsonl", [{"text": "fine"}, row])
    with pytest.raises(PredictionInputError, match=message) as error:
        read_prediction_rows(path)
    assert str(path) in str(error.value)


def test_reader_rejects_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prediction_rows(tmp_path / "nope.jsonl")
    with pytest.raises(PredictionInputError, match="no rows"):
        read_prediction_rows(_write_jsonl(tmp_path / "empty.jsonl", ["", ""]))


def test_records_multiclass_and_multilabel():
    logits = torch.tensor([[2.0, 0.0, -1.0], [-3.0, 1.0, 2.0]])
    present = torch.tensor([True, False])
    multiclass = prediction_records(
        ["a", "b"], logits, present, ~present, ["x", "y", "z"], "multiclass", {"a": 1, "b": 2}
    )
    assert [r["labels"] for r in multiclass] == [["x"], ["z"]]
    assert sum(multiclass[0]["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert multiclass[1] | {"scores": None} == {
        "id": "b",
        "line": 2,
        "image_present": False,
        "text_present": True,
        "labels": ["z"],
        "scores": None,
    }
    multilabel = prediction_records(["a", "b"], logits, present, present, ["x", "y", "z"], "multilabel")
    assert [r["labels"] for r in multilabel] == [["x", "y"], ["y", "z"]]  # sigmoid >= 0.5 (logit >= 0)
    assert multilabel[0]["scores"]["x"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=1e-6)


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny model trained one epoch on a Hateful Memes fixture (binary: two label names)."""
    tmp = tmp_path_factory.mktemp("predict")
    root = make_hateful_memes(tmp)
    common = [
        "--config",
        str(CONFIGS / "data" / "hateful_memes.yaml"),
        "--config",
        str(CONFIGS / "debug" / "tiny.yaml"),
        "--data.root",
        str(root),
        "--data.missing_table_dir",
        str(tmp / "tables"),
        "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"),
    ]
    fitted = make_cli(["fit", *common, "--trainer.max_epochs", "1"])
    return {
        "common": common,
        "root": root,
        "ckpt": fitted.trainer.checkpoint_callback.last_model_path,
        "tmp": tmp,
    }


def _predict(trained: dict, rows_path: Path, output: Path) -> cli.UnipairCLI:
    return make_cli(
        [
            "predict",
            *trained["common"],
            "--ckpt_path",
            trained["ckpt"],
            "--predict_file",
            str(rows_path),
            "--output_file",
            str(output),
        ]
    )


@pytest.mark.slow
def test_predict_writes_one_record_per_row_matching_the_model(trained):
    root: Path = trained["root"]
    dev = [json.loads(line) for line in (root / "dev.jsonl").read_text().splitlines()]
    sample = dev[0]
    rows_path = _write_jsonl(
        trained["tmp"] / "rows.jsonl",
        [
            {"id": "both", "image": str(root / sample["img"]), "text": sample["text"]},
            {"id": "image-only", "image": str(root / sample["img"])},
            {"id": "text-only", "text": sample["text"]},
        ],
    )
    output = trained["tmp"] / "out" / "predictions.jsonl"
    predicted = _predict(trained, rows_path, output)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ["both", "image-only", "text-only"]
    assert [r["line"] for r in records] == [1, 2, 3]
    assert [(r["image_present"], r["text_present"]) for r in records] == [
        (True, True),
        (True, False),
        (False, True),
    ]
    for record in records:
        assert set(record["scores"]) == {"not_hateful", "hateful"}
        assert sum(record["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert record["labels"] == [max(record["scores"], key=record["scores"].get)]
    assert not output.with_name(output.name + ".partial").exists()

    # The scores are the model's on the DataModule's own preprocessing of the same sample.
    model, datamodule = predicted.model.eval(), predicted.datamodule
    datamodule.setup("validate")
    index = datamodule.datasets["val"].ids.index(str(sample["id"]))
    batch = datamodule.collate_fn()([datamodule.datasets["val"][index]])
    with torch.no_grad():
        probs = model(batch).softmax(-1)[0]
    assert records[0]["scores"]["hateful"] == pytest.approx(float(probs[1]), abs=1e-4)
    assert (
        records[0]["scores"] != records[1]["scores"] != records[2]["scores"]
    )  # missing inputs change the output


@pytest.mark.slow
def test_predict_errors_on_row_with_neither_and_writes_nothing(trained):
    rows_path = _write_jsonl(trained["tmp"] / "bad.jsonl", [{"text": "fine"}, {"id": "empty"}])
    output = trained["tmp"] / "bad-predictions.jsonl"
    with pytest.raises(
        PredictionInputError, match=r"bad.jsonl line 2: the row has neither 'image' nor 'text'"
    ):
        _predict(trained, rows_path, output)
    assert not output.exists()


@pytest.mark.slow
def test_predict_errors_on_unreadable_image_naming_file_and_line(trained):
    broken = trained["tmp"] / "broken.png"
    broken.write_bytes(b"not an image at all")
    rows_path = _write_jsonl(
        trained["tmp"] / "broken.jsonl", [{"text": "fine"}, {"text": "x"}, {"image": "broken.png"}]
    )
    output = trained["tmp"] / "broken-predictions.jsonl"
    with pytest.raises(
        PredictionInputError,
        match=r"broken.jsonl line 3 \(id '3'\): field 'image': .*broken.png could not be read",
    ):
        _predict(trained, rows_path, output)
    assert not output.exists()


@pytest.mark.slow
def test_predict_on_the_datamodule_test_split_with_output_file(trained):
    output = trained["tmp"] / "test-split-predictions.jsonl"
    predicted = make_cli(
        ["predict", *trained["common"], "--ckpt_path", trained["ckpt"], "--output_file", str(output)]
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == predicted.datamodule.datasets["test"].ids
    assert all("line" not in r and set(r["scores"]) == {"not_hateful", "hateful"} for r in records)

"""ManifestDataModule on tiny manifests in the three formats (CSV, JSONL, Parquet) with tiny images.

Encoders are named only for their preprocessing ("test_vit", "tiny-bert"), except in the CLI test
at the end, which trains the tiny random encoders of configs/debug/tiny.yaml.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from unittest.mock import patch

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import cli
from datamodules import ManifestDataModule
from datamodules.manifest import ManifestError

IMAGE_SIZE = 32
TINY = {"image_encoder": "test_vit", "text_encoder": "tiny-bert", "image_size": IMAGE_SIZE, "batch_size": 4}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = ("cat", "dog", "fish")


def write_images(folder: Path, count: int = 3) -> list[str]:
    """``count`` small PNGs in ``folder/img``; returns their paths relative to ``folder``."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        Image.new("RGB", (20, 24), (80 * i, 40, 200 - 50 * i)).save(folder / "img" / f"{i}.png")
        names.append(f"img/{i}.png")
    return names


def rows_for(n: int, images: list[str], start: int = 0) -> list[dict]:
    """Rows whose image is empty when i % 6 == 4 and text when i % 6 == 1, labels cycling over CLASSES."""
    rows = []
    for i in range(start, start + n):
        rows.append(
            {
                "id": f"s{i:03d}",
                "photo": "" if i % 6 == 4 else images[i % len(images)],
                "caption": "" if i % 6 == 1 else f"a {CLASSES[i % 3]} number {i}",
                "tag": CLASSES[i % 3],
            }
        )
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """``rows`` as CSV (header), JSONL (empty cells as null) or Parquet (empty cells as null), by suffix."""
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        nulled = [{k: (None if v == "" else v) for k, v in row.items()} for row in rows]
        path.write_text("".join(json.dumps(r) + "\n" for r in nulled), encoding="utf-8")
    else:
        columns = {k: [None if r[k] == "" else r[k] for r in rows] for k in rows[0]}
        pq.write_table(pa.table(columns), path)
    return path


def manifest(tmp_path: Path, suffix: str = ".csv", n_train: int = 24, n_test: int = 8, **kwargs):
    images = write_images(tmp_path)
    train = write_manifest(tmp_path / f"train{suffix}", rows_for(n_train, images))
    test = write_manifest(tmp_path / f"test{suffix}", rows_for(n_test, images, start=100))
    args = dict(
        train_file=str(train),
        test_file=str(test),
        id_column="id",
        image_column="photo",
        text_column="caption",
        label_column="tag",
        **TINY,
    )
    return ManifestDataModule(**{**args, **kwargs})


# -------------------------------------------------------------------------------- schema, formats


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_format_gives_the_same_samples_and_batches(tmp_path, suffix):
    dm = manifest(tmp_path, suffix)
    dm.setup("fit")
    dm.setup("test")
    assert (dm.task, dm.label_names, dm.num_classes) == ("multiclass", list(CLASSES), 3)
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 24 and len(dm.datasets["test"]) == 8
    # Rows 4, 10, 16, 22 have no image, rows 1, 7, 13, 19 no text (train + carved val together).
    natural = {s: dm.natural_missing_counts[s] for s in ("train", "val")}
    assert sum(c["image"] for c in natural.values()) == 4 and sum(c["text"] for c in natural.values()) == 4
    assert dm.natural_missing_counts["test"] == {"image": 2, "text": 1}
    assert all(v == 0 for counts in dm.bad_sample_counts.values() for v in counts.values())  # not bad inputs
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["label"].dtype == torch.int64
    assert batch["id"] == ["s100", "s101", "s102", "s103"] and batch["label"].tolist() == [1, 2, 0, 1]
    assert batch["image_present"].tolist() == [False, True, True, True]
    assert batch["text_present"].tolist() == [True, True, True, False]
    ds = dm.datasets["test"]
    row = ds.ids.index("s100")  # no image in the manifest: the filler, and the presence flag says so
    item = ds[row]
    assert item["image"] is None and item["image_present"] is False and item["text_present"] is True


def test_several_text_columns_are_joined_skipping_empty_cells(tmp_path):
    images = write_images(tmp_path)
    rows = [
        {"photo": images[0], "title": "red mug", "body": "with a handle", "tag": "a"},
        {"photo": images[1], "title": "", "body": "no title", "tag": "b"},
        {"photo": images[2], "title": "", "body": " ", "tag": "a"},
        {"photo": images[0], "title": "blue", "body": "", "tag": "b"},
    ]
    path = write_manifest(tmp_path / "train.csv", rows * 2)
    dm = ManifestDataModule(
        train_file=str(path),
        image_column="photo",
        text_column=["title", "body"],
        text_separator=". ",
        label_column="tag",
        val_fraction=0.25,
        **TINY,
    )
    dm.setup("fit")
    texts = {}
    tokenizer = dm.tokenizer
    for split in ("train", "val"):
        ds = dm.datasets[split]
        for i, sample_id in enumerate(ds.ids):
            texts[sample_id] = (
                tokenizer.decode(ds.token_ids(i), skip_special_tokens=True) if ds.text_usable[i] else None
            )
    assert texts["0"] == "red mug. with a handle" and texts["1"] == "no title" and texts["3"] == "blue"
    assert texts["2"] is None  # both cells empty: the text is naturally missing
    assert dm.task == "binary"


def test_parquet_image_structs_as_hugging_face_datasets_writes_them(tmp_path):
    images = write_images(tmp_path)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(buffer, format="PNG")
    structs = [
        {"bytes": buffer.getvalue(), "path": None},
        {"bytes": None, "path": images[1]},
        {"bytes": None, "path": None},
        {"bytes": buffer.getvalue(), "path": "ignored.png"},
    ] * 3
    table = pa.table(
        {"image": structs, "text": [f"t{i}" for i in range(12)], "label": [i % 2 for i in range(12)]}
    )
    pq.write_table(table, tmp_path / "train.parquet")
    dm = ManifestDataModule(train_file=str(tmp_path / "train.parquet"), **TINY)
    dm.setup("fit")
    ds = dm.datasets["train"]
    index = {sample_id: i for i, sample_id in enumerate(ds.ids)}
    loaded = {sample_id: ds[index[sample_id]] for sample_id in ("0", "1", "2") if sample_id in index}
    for sample_id, item in loaded.items():
        assert item["image_present"] is (sample_id != "2")
    assert dm.natural_missing_counts["train"]["image"] + dm.natural_missing_counts["val"]["image"] == 3
    assert (dm.task, dm.label_names) == ("binary", ["0", "1"])


# ------------------------------------------------------------------------------ label inference


@pytest.mark.parametrize(
    "labels, kwargs, task, classes",
    [
        (["b", "a", "c"], {}, "multiclass", ["a", "b", "c"]),
        ([10, 2, 2], {}, "binary", ["2", "10"]),  # integers sort numerically
        (["2", "10", "1"], {}, "multiclass", ["1", "2", "10"]),
        (["x|y", "y", "z| x"], {"label_delimiter": "|"}, "multilabel", ["x", "y", "z"]),
        (["a", "b", "a"], {"task": "multiclass"}, "multiclass", ["a", "b"]),
        (["a", "b", "a"], {"classes": ["b", "a", "c"]}, "multiclass", ["b", "a", "c"]),
    ],
)
def test_task_and_classes_are_inferred_from_train(tmp_path, labels, kwargs, task, classes):
    images = write_images(tmp_path)
    rows = [{"image": images[i % 3], "text": f"t{i}", "label": labels[i % 3]} for i in range(9)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dm = ManifestDataModule(train_file=str(path), **kwargs, **TINY)
    assert (dm.task, dm.label_names, dm.num_classes) == (task, classes, len(classes))
    assert (dm.hparams["task"], dm.hparams["classes"]) == (task, classes)  # saved in the checkpoint
    dm.setup("fit")
    sample = dm.datasets["train"][0]
    if task == "multilabel":
        assert sample["label"].shape == (len(classes),) and sample["label"].sum() >= 1


def test_list_label_column_is_multilabel(tmp_path):
    images = write_images(tmp_path)
    table = pa.table(
        {
            "image": [images[i % 3] for i in range(8)],
            "text": [f"t{i}" for i in range(8)],
            "label": [["drama", "comedy"], ["comedy"], [], ["war"]] * 2,
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    dm = ManifestDataModule(train_file=str(tmp_path / "train.parquet"), val_fraction=0.25, **TINY)
    assert (dm.task, dm.label_names) == ("multilabel", ["comedy", "drama", "war"])
    dm.setup("fit")
    both = dm.datasets["train"] if "0" in dm.datasets["train"].ids else dm.datasets["val"]
    assert both[both.ids.index("0")]["label"].tolist() == [1.0, 1.0, 0.0]


# --------------------------------------------------------------------- natural and simulated missing


def test_natural_missing_error_names_the_row(tmp_path):
    with pytest.raises(ManifestError, match=r"train.csv line 6: image column 'photo' is empty \(1 row"):
        manifest(tmp_path, natural_missing="error", n_train=5)


def test_a_row_with_neither_modality_is_an_error_naming_the_line(tmp_path):
    images = write_images(tmp_path)
    rows = rows_for(6, images)
    rows[3]["photo"], rows[3]["caption"] = "", ""
    path = write_manifest(tmp_path / "train.csv", rows)
    with pytest.raises(ManifestError, match=r"train.csv line 5: both the image \('photo'\) and the text"):
        ManifestDataModule(
            train_file=str(path), image_column="photo", text_column="caption", label_column="tag"
        )


def test_simulated_missing_applies_on_top_and_never_leaves_neither(tmp_path):
    dm = manifest(
        tmp_path,
        test_missing={"missing_rate": 1.0, "missing_type": "image"},
        missing_table_dir=str(tmp_path / "t"),
    )
    dm.setup("test")
    ds = dm.datasets["test"]
    assert not ds.image_present[ds.text_usable].any()  # every image the table drops is dropped
    # The row without a text (s103) keeps its image.
    no_text = [i for i, usable in enumerate(ds.text_usable) if not usable]
    assert no_text and all(ds.image_present[i] for i in no_text)
    assert dm.bad_sample_counts["test"]["table_overridden"] == len(no_text)
    assert bool((torch.tensor(ds.image_present) | torch.tensor(ds.text_present)).all())


def test_a_given_but_absent_image_is_a_bad_input(tmp_path):
    images = write_images(tmp_path)
    rows = rows_for(12, images)
    rows[2]["photo"] = "img/nope.png"
    path = write_manifest(tmp_path / "train.csv", rows)
    args = dict(train_file=str(path), image_column="photo", text_column="caption", label_column="tag", **TINY)
    with pytest.raises(ValueError, match=r"img/nope.png does not exist"):
        ManifestDataModule(**args).setup("fit")
    lenient = ManifestDataModule(**args, on_bad_sample="missing")
    lenient.setup("fit")
    counts = [lenient.bad_sample_counts[s]["image_absent"] for s in ("train", "val")]
    assert sum(counts) == 1


def test_an_unreadable_image_fails_at_load_naming_the_file(tmp_path):
    images = write_images(tmp_path)
    (tmp_path / "img" / "0.png").write_bytes(b"not a png")
    path = write_manifest(tmp_path / "train.csv", rows_for(12, images))
    dm = ManifestDataModule(
        train_file=str(path), image_column="photo", text_column="caption", label_column="tag", **TINY
    )
    dm.setup("fit")
    ds = dm.datasets["train"]
    index = next(i for i, ref in enumerate(ds.images) if ref and ref.endswith("img/0.png"))
    with pytest.raises(ValueError, match=r"img/0.png\) could not be decoded"):
        ds[index]


# -------------------------------------------------------------------------------- split carving


def test_val_is_carved_stratified_and_reproducibly(tmp_path):
    first = manifest(tmp_path, n_train=60, val_fraction=0.2)
    first.setup("fit")
    again = manifest(tmp_path, n_train=60, val_fraction=0.2)
    again.setup("fit")
    other_seed = manifest(tmp_path, n_train=60, val_fraction=0.2, val_seed=1)
    other_seed.setup("fit")
    val = first.datasets["val"]
    assert val.ids == again.datasets["val"].ids and val.ids != other_seed.datasets["val"].ids
    assert sorted(val.labels) == [0] * 4 + [1] * 4 + [2] * 4  # 20 % of each class's 20 rows
    assert not set(val.ids) & set(first.datasets["train"].ids)


def test_a_class_with_one_row_stays_in_train(tmp_path):
    images = write_images(tmp_path)
    rows = [{"image": images[0], "text": f"t{i}", "label": "common"} for i in range(9)]
    rows.append({"image": images[1], "text": "rare", "label": "rare"})
    path = write_manifest(tmp_path / "train.csv", rows)
    dm = ManifestDataModule(train_file=str(path), val_fraction=0.5, **TINY)
    dm.setup("fit")
    assert "9" in dm.datasets["train"].ids and len(dm.datasets["val"]) == 4


def test_one_file_with_a_split_column(tmp_path):
    images = write_images(tmp_path)
    rows = rows_for(18, images)
    for i, row in enumerate(rows):
        row["split"] = ["train", "train", "train", "Validation", "test", "dev"][i % 6]
    path = write_manifest(tmp_path / "all.parquet", rows)
    dm = ManifestDataModule(
        file=str(path),
        id_column="id",
        image_column="photo",
        text_column="caption",
        label_column="tag",
        **TINY,
    )
    dm.setup("fit")
    dm.setup("test")
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [9, 6, 3]
    assert dm.datasets["test"].ids == ["s004", "s010", "s016"]
    rows[4]["split"] = "holdout"
    write_manifest(tmp_path / "bad.parquet", rows)
    with pytest.raises(
        ManifestError, match=r"bad.parquet row 4: column 'split' is 'holdout'; expected one of"
    ):
        ManifestDataModule(
            file=str(tmp_path / "bad.parquet"),
            id_column="id",
            image_column="photo",
            text_column="caption",
            label_column="tag",
        )


# ------------------------------------------------------------------------------------------ errors


def test_missing_column_lists_the_columns_found(tmp_path):
    with pytest.raises(
        ManifestError, match=r"no column\(s\) \['picture'\]; the columns found are \['id', 'photo'"
    ):
        manifest(tmp_path, image_column="picture")


def test_wrong_column_type_names_file_column_and_expected(tmp_path):
    images = write_images(tmp_path)
    pq.write_table(
        pa.table({"image": images * 2, "text": [1, 2, 3, 4, 5, 6], "label": ["a", "b"] * 3}),
        tmp_path / "train.parquet",
    )
    with pytest.raises(
        ManifestError, match=r"train.parquet: column 'text' holds int64 values; expected text"
    ):
        ManifestDataModule(train_file=str(tmp_path / "train.parquet"))
    (tmp_path / "mixed.jsonl").write_text(
        '{"image": "img/0.png", "text": "ok", "label": "a"}\n'
        '{"image": "img/1.png", "text": 5, "label": "b"}\n'
    )
    with pytest.raises(ManifestError, match=r"mixed.jsonl: cannot be read as JSONL"):
        ManifestDataModule(train_file=str(tmp_path / "mixed.jsonl"))


def test_unknown_test_label_is_an_error_naming_the_row(tmp_path):
    images = write_images(tmp_path)
    test_rows = rows_for(4, images, start=100)
    test_rows[2]["tag"] = "bird"
    write_manifest(tmp_path / "odd.jsonl", test_rows)
    dm = manifest(tmp_path, test_file=str(tmp_path / "odd.jsonl"))
    with pytest.raises(
        ManifestError, match=r"odd.jsonl line 3: column 'tag': label 'bird' is not one of the 3"
    ):
        dm.setup("test")


def test_duplicate_id_names_both_rows(tmp_path):
    images = write_images(tmp_path)
    rows = rows_for(6, images)
    rows[4]["id"] = rows[1]["id"]
    write_manifest(tmp_path / "train.csv", rows)
    with pytest.raises(
        ManifestError, match=r"train.csv line 6: column 'id': id 's001' already used in .*line 3"
    ):
        ManifestDataModule(
            train_file=str(tmp_path / "train.csv"),
            id_column="id",
            image_column="photo",
            text_column="caption",
            label_column="tag",
        )


def test_unlabelled_test_file_predicts_but_does_not_test(tmp_path):
    images = write_images(tmp_path)
    rows = [{k: v for k, v in row.items() if k != "tag"} for row in rows_for(4, images, start=100)]
    write_manifest(tmp_path / "unlabelled.csv", rows)
    dm = manifest(tmp_path, test_file=str(tmp_path / "unlabelled.csv"))
    dm.setup("predict")
    assert len(next(iter(dm.predict_dataloader()))["id"]) == 4
    with pytest.raises(ValueError, match="has no labels"):
        dm.setup("test")


def test_hyperparameters_rebuild_the_same_datamodule(tmp_path):
    # Evaluation rebuilds the DataModule from its hyperparameters (with another test setting).
    dm = manifest(tmp_path, n_train=30)
    dm.setup("fit")
    arguments = {k: v for k, v in dm.hparams.items() if not k.startswith("_")}
    assert "root" not in arguments and arguments["classes"] == list(CLASSES)
    again = ManifestDataModule(**{**arguments, "test_missing": {"missing_rate": 0.5}})
    again.setup("fit")
    assert (again.task, again.label_names) == (dm.task, dm.label_names)
    assert again.datasets["val"].ids == dm.datasets["val"].ids


def test_checkpoint_state_must_match_the_classes(tmp_path):
    dm = manifest(tmp_path)
    assert dm.state_dict() == {"classes": list(CLASSES), "task": "multiclass"}
    dm.load_state_dict({"classes": list(CLASSES), "task": "multiclass"})
    with pytest.raises(ValueError, match=r"trained with task 'multiclass' and classes \['cat', 'dog'\]"):
        dm.load_state_dict({"classes": ["cat", "dog"], "task": "multiclass"})


# ---------------------------------------------------------------------------- fit -> test -> predict


def run_cli(args: list[str]) -> cli.UnipairCLI:
    built: list[cli.UnipairCLI] = []
    real = cli.make_cli

    def keep(cli_args):
        built.append(real(cli_args))
        return built[-1]

    with patch.object(sys, "argv", ["unipair", *args]), patch.object(cli, "make_cli", keep):
        assert cli.cli_main(args) is None
    return built[-1]


def test_fit_test_predict_through_the_cli(tmp_path, capsys):
    images = write_images(tmp_path)
    write_manifest(tmp_path / "train.csv", rows_for(16, images))
    write_manifest(tmp_path / "test.jsonl", rows_for(4, images, start=100))
    common = [
        "--config",
        str(CONFIGS / "data" / "manifest.yaml"),
        "--config",
        str(CONFIGS / "debug" / "tiny.yaml"),
        "--data.init_args.train_file",
        str(tmp_path / "train.csv"),
        "--data.init_args.test_file",
        str(tmp_path / "test.jsonl"),
        "--data.init_args.id_column",
        "id",
        "--data.init_args.image_column",
        "photo",
        "--data.init_args.text_column",
        "caption",
        "--data.init_args.label_column",
        "tag",
        "--data.init_args.missing_table_dir",
        str(tmp_path / "tables"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    fitted = run_cli(["fit", *common])
    assert (fitted.model.hparams.num_classes, fitted.model.hparams.task) == (3, "multiclass")
    ckpt = fitted.trainer.checkpoint_callback.last_model_path
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["datamodule_hyper_parameters"]["classes"] == list(CLASSES)
    assert saved["ManifestDataModule"] == {"classes": list(CLASSES), "task": "multiclass"}

    tested = run_cli(["test", *common, "--ckpt_path", ckpt])
    assert "test/accuracy" in tested.trainer.callback_metrics

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"id": "q", "image": str(tmp_path / images[0]), "text": "a cat"})
        + "\n"
        + json.dumps({"id": "t", "text": "a fish"})
        + "\n"
    )
    output = tmp_path / "predictions.jsonl"
    run_cli(
        ["predict", *common, "--ckpt_path", ckpt, "--predict_file", str(rows), "--output_file", str(output)]
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ["q", "t"]
    assert all(set(r["scores"]) == set(CLASSES) and r["labels"][0] in CLASSES for r in records)
    assert "wrote 2 predictions" in capsys.readouterr().out

    # The same count of classes in another order: the names written would be wrong, so it is refused.
    reordered = [*common, "--data.init_args.classes", json.dumps(list(reversed(CLASSES)))]
    with patch.object(sys, "argv", ["unipair"]), pytest.raises(SystemExit) as exit_info:
        cli.cli_main(["predict", *reordered, "--ckpt_path", ckpt, "--predict_file", str(rows)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"trained with task 'multiclass' and classes {list(CLASSES)}" in error
    assert "data.init_args.classes" in error and not (tmp_path / "rows.predictions.jsonl").exists()

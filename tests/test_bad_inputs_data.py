"""Bad-input policy (`on_bad_sample: error | missing`) and image decoding rules."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import BadSampleError, Food101DataModule, HatefulMemesDataModule, MMIMDbDataModule
from datamodules.transforms import decode_image, to_rgb
from tests.fixtures_data import make_arrow_tables, make_food101, make_hateful_memes, make_mmimdb

TINY = {"image_encoder": "test_vit", "text_encoder": "tiny-bert", "image_size": 32, "batch_size": 4}


def edit_jsonl(path, line_index, **changes):
    lines = path.read_text().splitlines()
    entry = json.loads(lines[line_index])
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    lines[line_index] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")


def train_rows(dm, num_workers=0) -> dict:
    """{id: (image_present, text_present, image is filler)} over one pass of the train split."""
    loader = dm._loader("train", shuffle=False)
    if num_workers:
        loader = torch.utils.data.DataLoader(
            loader.dataset, batch_size=4, num_workers=num_workers, collate_fn=loader.collate_fn
        )
    out = {}
    for batch in loader:
        for row, sample_id in enumerate(batch["id"]):
            out[sample_id] = (
                bool(batch["image_present"][row]),
                bool(batch["text_present"][row]),
                bool((batch["image"][row] == 1).all()),
            )
    return out


@pytest.fixture
def memes(tmp_path):
    return make_hateful_memes(tmp_path)


# ------------------------------------------------------------------------------- index-time checks

INDEX_TIME_CASES = {
    "image_absent": (
        lambda root: (root / "img" / "10001.png").unlink(),
        r"field 'image': file .*img/10001\.png does not exist",
    ),
    "image_not_named": (
        lambda root: edit_jsonl(root / "train.jsonl", 1, img=None),
        r"field 'image': no image named in the source",
    ),
    "text_empty": (
        lambda root: edit_jsonl(root / "train.jsonl", 1, text="   "),
        r"field 'text' is empty \(.*train\.jsonl line 2 field 'text'\)",
    ),
    "text_absent": (
        lambda root: edit_jsonl(root / "train.jsonl", 1, text=None),
        r"field 'text' absent \(.*train\.jsonl line 2",
    ),
}
COUNTED_AS = {
    "image_absent": "image_absent",
    "image_not_named": "image_absent",
    "text_empty": "text_empty",
    "text_absent": "text_absent",
}


@pytest.mark.parametrize("case", sorted(INDEX_TIME_CASES))
def test_index_time_bad_input_raises_under_error(memes, case):
    break_it, message = INDEX_TIME_CASES[case]
    break_it(memes)
    dm = HatefulMemesDataModule(root=str(memes), **TINY)
    with pytest.raises(BadSampleError, match=r"1 bad input\(s\) in the train split") as info:
        dm.setup("fit")
    text = str(info.value)
    assert "train sample '10001'" in text and "on_bad_sample: missing" in text
    assert __import__("re").search(message, text), text


@pytest.mark.parametrize("case", sorted(INDEX_TIME_CASES))
def test_index_time_bad_input_is_counted_and_missing_under_missing(memes, case, caplog):
    break_it, _ = INDEX_TIME_CASES[case]
    break_it(memes)
    dm = HatefulMemesDataModule(root=str(memes), on_bad_sample="missing", **TINY)
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        dm.setup("fit")
    reason = COUNTED_AS[case]
    assert dm.bad_sample_counts["train"][reason] == 1
    assert sum(dm.bad_sample_counts["train"].values()) == 1
    assert dm.bad_sample_ids("train", reason) == ["10001"]
    assert any(reason in r.getMessage() and "10001" in r.getMessage() for r in caplog.records)
    rows = train_rows(dm)
    assert len(rows) == 8  # nothing dropped
    image_present, text_present, filler = rows["10001"]
    if reason.startswith("image"):
        assert (image_present, text_present, filler) == (False, True, True)
    else:
        assert (image_present, text_present, filler) == (True, False, False)
    assert all(v[:2] == (True, True) for k, v in rows.items() if k != "10001")


def test_mmimdb_and_food101_text_problems(tmp_path):
    root = make_mmimdb(tmp_path)
    movie = root / "dataset" / "0000002.json"
    data = json.loads(movie.read_text())
    data["plot"] = []
    movie.write_text(json.dumps(data))
    with pytest.raises(
        BadSampleError,
        match=(
            r"train sample '0000002#0': field 'text' absent \(.*0000002\.json field 'plot' \(absent or empty "
            r"list\)\)"
        ),
    ):
        MMIMDbDataModule(root=str(root), **TINY).setup("fit")
    dm = MMIMDbDataModule(root=str(root), on_bad_sample="missing", **TINY)
    dm.setup("fit")
    assert dm.bad_sample_counts["train"]["text_absent"] == 1 and len(dm.datasets["train"]) == 15

    food = make_food101(tmp_path, n_train=6)
    csv_path = food / "texts" / "test_titles.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = "pizza_2.jpg,,pizza"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        BadSampleError,
        match=(
            r"test sample 'pizza_2\.jpg': field 'text' is empty \(.*test_titles\.csv line 3 field "
            r"'title'\)"
        ),
    ):
        Food101DataModule(root=str(food), **TINY).setup("test")


# -------------------------------------------------------------------------------- load-time checks


def corrupt(path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"this is not an image at all")
    else:  # truncated: a real PNG cut in half
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["garbage", "truncated"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_raises_under_error(memes, how, num_workers):
    corrupt(memes / "img" / "10002.png", how)
    dm = HatefulMemesDataModule(root=str(memes), **TINY)
    dm.setup("fit")  # existence is fine; decoding happens in the loader
    with pytest.raises(BadSampleError) as info:
        train_rows(dm, num_workers=num_workers)
    text = str(info.value)
    assert "train sample '10002'" in text and "field 'image'" in text and "img/10002.png" in text
    assert "could not be decoded" in text


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_is_counted_once_under_missing(memes, num_workers, caplog):
    corrupt(memes / "img" / "10002.png", "garbage")
    dm = HatefulMemesDataModule(root=str(memes), on_bad_sample="missing", **TINY)
    dm.setup("fit")
    assert dm.bad_sample_counts["train"]["image_unreadable"] == 0  # not known before loading
    for _epoch in range(2):
        rows = train_rows(dm, num_workers=num_workers)
        assert rows["10002"] == (False, True, True) and len(rows) == 8
    # Found in worker processes, visible here through shared memory; counted once over two epochs.
    assert dm.bad_sample_counts["train"]["image_unreadable"] == 1
    assert dm.bad_sample_ids("train", "image_unreadable") == ["10002"]
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        dm.teardown("fit")
    assert any("image_unreadable" in r.getMessage() for r in caplog.records)


def test_decompression_bomb_is_an_unreadable_image(memes, monkeypatch):
    # The fixture images are 24x28 = 672 pixels: above this limit PIL warns (below 2x it would refuse).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    dm = HatefulMemesDataModule(root=str(memes), **TINY)
    dm.setup("fit")
    with pytest.raises(BadSampleError, match="DecompressionBomb"):
        train_rows(dm)
    lenient = HatefulMemesDataModule(root=str(memes), on_bad_sample="missing", **TINY)
    lenient.setup("fit")
    rows = train_rows(lenient)
    assert all(v == (False, True, True) for v in rows.values())
    assert lenient.bad_sample_counts["train"]["image_unreadable"] == 8


# ------------------------------------------------------------------------ never both, always errors


def test_sample_with_neither_modality_is_an_error_under_both_policies(memes):
    (memes / "img" / "10003.png").unlink()
    edit_jsonl(memes / "train.jsonl", 3, text="")
    for policy in ("error", "missing"):
        dm = HatefulMemesDataModule(root=str(memes), on_bad_sample=policy, **TINY)
        with pytest.raises(
            BadSampleError,
            match=r"1 train sample\(s\) have neither a usable image nor a usable text, e\.g\. '10003'",
        ):
            dm.setup("fit")


def test_unreadable_image_and_empty_text_is_an_error_even_under_missing(memes):
    corrupt(memes / "img" / "10003.png", "garbage")
    edit_jsonl(memes / "train.jsonl", 3, text=" ")
    dm = HatefulMemesDataModule(root=str(memes), on_bad_sample="missing", **TINY)
    dm.setup("fit")
    with pytest.raises(
        BadSampleError, match=r"'10003': image .* is unreadable and the text is absent or empty"
    ):
        train_rows(dm)


def test_bad_input_on_the_kept_modality_restores_the_dropped_one(memes):
    # Table drops every image (rate 1, type image); sample 10001's text is empty.
    edit_jsonl(memes / "test_seen.jsonl", 1, text="")
    dm = HatefulMemesDataModule(
        root=str(memes),
        on_bad_sample="missing",
        test_missing={"missing_rate": 1.0, "missing_type": "image"},
        **TINY,
    )
    dm.setup("test")
    ds = dm.datasets["test"]
    assert (
        dm.bad_sample_counts["test"]["table_overridden"] == 1
        and dm.bad_sample_counts["test"]["text_empty"] == 1
    )
    k = ds.ids.index("10013")
    assert (ds.image_present[k], ds.text_present[k]) == (True, False)
    assert dm.missing_summary("test") == {"complete": 0, "text_missing": 1, "image_missing": 3}
    # Load-time variant: the table drops every text; one image turns out unreadable.
    corrupt(memes / "img" / "10014.png", "garbage")
    dm = HatefulMemesDataModule(
        root=str(memes),
        on_bad_sample="missing",
        test_missing={"missing_rate": 1.0, "missing_type": "text"},
        missing_table_dir=str(memes / "other_tables"),
        **TINY,
    )
    edit_jsonl(memes / "test_seen.jsonl", 1, text="restored")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    row = batch["id"].index("10014")
    assert (bool(batch["image_present"][row]), bool(batch["text_present"][row])) == (False, True)
    assert batch["attention_mask"][row].sum() > 2  # the real caption, not the empty filler
    assert (
        dm.bad_sample_counts["test"]["table_overridden"] == 1
        and dm.bad_sample_counts["test"]["image_unreadable"] == 1
    )


@pytest.mark.parametrize("policy", ["error", "missing"])
def test_labels_outside_the_label_set_are_always_errors(tmp_path, policy):
    food = make_food101(tmp_path, n_train=6)
    csv_path = food / "texts" / "train_titles.csv"
    csv_path.write_text(csv_path.read_text().replace(",pizza\n", ",pizza_pie\n", 1))
    with pytest.raises(
        ValueError, match=r"train_titles\.csv line 3, sample 'pizza_2\.jpg': field 'class' is 'pizza_pie'"
    ):
        Food101DataModule(root=str(food), on_bad_sample=policy, **TINY).setup("fit")

    memes = make_hateful_memes(tmp_path)
    edit_jsonl(memes / "dev.jsonl", 0, label=2)
    with pytest.raises(
        BadSampleError,
        match=(
            r"val sample '10008' \(.*dev\.jsonl line 1.*\): field 'label' is 2; expected a class index in "
            r"\[0, 2\)"
        ),
    ):
        HatefulMemesDataModule(root=str(memes), on_bad_sample=policy, **TINY).setup("fit")

    mmimdb = make_mmimdb(tmp_path)
    movie = mmimdb / "dataset" / "0000001.json"
    data = json.loads(movie.read_text())
    data["genres"].append("Talk-Show")
    movie.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"sample '0000001' \(.*0000001\.json\): genre 'Talk-Show' is not one of the 23"
    ):
        MMIMDbDataModule(root=str(mmimdb), extra_genres="error", on_bad_sample=policy, **TINY).setup("fit")
    lenient = MMIMDbDataModule(
        root=str(mmimdb), on_bad_sample=policy, **TINY
    )  # MAP's default: ignore, but count
    lenient.setup("fit")
    assert lenient.ignored_genre_counts == {"Talk-Show": 1}

    arrow = make_arrow_tables(tmp_path)
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(arrow / "food101_test.arrow"))).read_all()
    labels = table.column("label").to_pylist()
    labels[3] = 150
    table = table.set_column(table.column_names.index("label"), "label", pa.array(labels))
    # Write a new file and rename it over the old one: the old one is still memory-mapped.
    with pa.OSFile(str(arrow / "new.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (arrow / "new.arrow").replace(arrow / "food101_test.arrow")
    with pytest.raises(
        BadSampleError, match=r"row 3 .*field 'label' is 150; expected a class index in \[0, 101\)"
    ):
        Food101DataModule(root=str(arrow), format="arrow", on_bad_sample=policy, **TINY).setup("test")


# ---------------------------------------------------------------------------------- malformed files


def test_malformed_files_are_named(tmp_path, memes):
    edit_jsonl(memes / "train.jsonl", 4, id=10001)
    with pytest.raises(ValueError, match=r"train sample id '10001' appears more than once"):
        HatefulMemesDataModule(root=str(memes), **TINY).setup("fit")
    (memes / "dev.jsonl").write_text('{"id": 1, "img": "img/1.png", "label": 0, "text": "x"}\n{not json\n')
    with pytest.raises(ValueError, match=r"dev\.jsonl line 2: not valid JSON"):
        HatefulMemesDataModule(root=str(memes), **TINY).setup("validate")

    mmimdb = make_mmimdb(tmp_path)
    (mmimdb / "dataset" / "0000005.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"sample '0000005': .*0000005\.json is not valid JSON"):
        MMIMDbDataModule(root=str(mmimdb), **TINY).setup("fit")
    (mmimdb / "dataset" / "0000005.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"sample '0000005': .*0000005\.json does not exist"):
        MMIMDbDataModule(root=str(mmimdb), **TINY).setup("fit")
    (mmimdb / "split.json").write_text("[")
    with pytest.raises(ValueError, match=r"split\.json is not valid JSON"):
        MMIMDbDataModule(root=str(mmimdb), **TINY).setup("fit")

    food = make_food101(tmp_path)
    (food / "texts" / "test_titles.csv").write_text("apple_pie_0.jpg,apple_pie\n")
    with pytest.raises(ValueError, match=r"test_titles\.csv line 1: expected '<file name>,<title>,<class>'"):
        Food101DataModule(root=str(food), **TINY).setup("test")
    with pytest.raises(FileNotFoundError, match=r"no MAP arrow table found; tried .*mmimdb_train\.arrow"):
        MMIMDbDataModule(root=str(tmp_path), format="arrow", **TINY).setup("fit")


def test_many_bad_inputs_are_summarised(memes):
    for i in range(7):
        (memes / "img" / f"{10000 + i}.png").unlink()
    with pytest.raises(BadSampleError, match=r"7 bad input\(s\) in the train split(.|\n)*\.\.\. and 2 more"):
        HatefulMemesDataModule(root=str(memes), **TINY).setup("fit")


# ------------------------------------------------------------------------------- mode conversions


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_mode_conversions_to_rgb():
    grey = decode_image(_encode(Image.new("L", (4, 4), 100)))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (100, 100, 100)
    transparent = decode_image(_encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert transparent.getpixel((0, 0)) == (255, 255, 255)  # composited on white
    half = decode_image(_encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128))))
    assert half.getpixel((0, 0)) in {(127, 127, 127), (126, 126, 126)}
    assert decode_image(_encode(Image.new("LA", (4, 4), (0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert decode_image(_encode(palette)).getpixel((0, 0)) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert decode_image(_encode(palette)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = decode_image(_encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 200 and cmyk.getpixel((0, 0))[1] < 60
    sixteen = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 255]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    converted = decode_image(_encode(sixteen))
    assert converted.mode == "RGB"
    assert [converted.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 100, 255, 255]
    as_int = to_rgb(Image.fromarray(np.array([[257 * 40]], dtype=np.int32), mode="I"))
    assert as_int.getpixel((0, 0)) == (40, 40, 40)
    as_float = to_rgb(Image.fromarray(np.array([[12.4, 300.0]], dtype=np.float32), mode="F"))
    assert [as_float.getpixel((x, 0)) for x in (0, 1)] == [(12, 12, 12), (255, 255, 255)]
    bilevel = decode_image(_encode(Image.new("1", (4, 4), 1)))
    assert bilevel.getpixel((0, 0)) == (255, 255, 255)

"""DataModules on tiny fixture folders in the exact raw layouts (and MAP's arrow tables).

Encoders are named only for their preprocessing: "test_vit" (timm data config) and "tiny-bert"
(MiniLM's real tokenizer, offline); no model is built here.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from datamodules import (
    EmojiDataModule,
    Food101DataModule,
    HatefulMemesDataModule,
    MissingModalityDataModule,
    MMIMDbDataModule,
)
from datamodules.emoji_source import EmojiItem
from datamodules.food101 import FOOD101_CLASSES
from datamodules.missing import MissingTableError
from datamodules.mmimdb import MMIMDB_GENRES
from tests.fixtures_data import (
    make_arrow_tables,
    make_food101,
    make_hateful_memes,
    make_mmimdb,
    mmimdb_genres,
)

IMAGE_SIZE = 32
TINY = {"image_encoder": "test_vit", "text_encoder": "tiny-bert", "image_size": IMAGE_SIZE, "batch_size": 4}
BATCH_KEYS = {"image", "input_ids", "attention_mask", "image_present", "text_present", "label", "id"}


def assert_batch_schema(batch: dict, dm: MissingModalityDataModule) -> None:
    assert set(batch) == BATCH_KEYS
    b = len(batch["id"])
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (b, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == b
    assert batch["input_ids"].shape[1] <= dm.max_text_len
    assert batch["image_present"].dtype == torch.bool and batch["text_present"].dtype == torch.bool
    assert bool((batch["image_present"] | batch["text_present"]).all())
    if dm.task == "multilabel":
        assert batch["label"].dtype == torch.float32 and batch["label"].shape == (b, dm.num_classes)
    else:
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (b,)
    assert all(isinstance(i, str) for i in batch["id"])
    # Fillers: missing images are all ones, missing texts are the tokenised empty string.
    for row in range(b):
        if not batch["image_present"][row]:
            assert bool((batch["image"][row] == 1).all())
        if not batch["text_present"][row]:
            assert batch["attention_mask"][row].sum() == 2 and batch["input_ids"][row, :2].tolist() == [
                101,
                102,
            ]


def all_batches(loader) -> list[dict]:
    return list(loader)


def presence_of(batches: list[dict]) -> dict:
    """{id: (image_present, text_present)}"""
    images, texts = by_id(batches, "image_present"), by_id(batches, "text_present")
    return {i: (images[i], texts[i]) for i in images}


def by_id(batches: list[dict], key: str) -> dict:
    out = {}
    for batch in batches:
        for row, sample_id in enumerate(batch["id"]):
            value = batch[key][row]
            out[sample_id] = value.tolist() if isinstance(value, torch.Tensor) else value
    return out


# ------------------------------------------------------------------------------------------ readers


def test_mmimdb_raw_per_plot(tmp_path):
    dm = MMIMDbDataModule(root=str(make_mmimdb(tmp_path)), **TINY)
    assert (dm.task, dm.num_classes, dm.label_names) == ("multilabel", 23, MMIMDB_GENRES)
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 16, "val": 8, "test": 8}
    batches = all_batches(dm.train_dataloader())
    for batch in batches:
        assert_batch_schema(batch, dm)
    labels = by_id(batches, "label")
    assert len(labels) == 16 and "0000003#1" in labels
    for sample_id, multi_hot in labels.items():
        movie = int(sample_id.split("#")[0])
        assert [MMIMDB_GENRES[i] for i, v in enumerate(multi_hot) if v == 1.0] == sorted(
            set(mmimdb_genres(movie)), key=MMIMDB_GENRES.index
        )
    # Plots of one movie share its missing code.
    dm2 = MMIMDbDataModule(root=dm.root, test_missing={"missing_rate": 0.5}, **TINY)
    dm2.setup("test")
    ds = dm2.datasets["test"]
    for k in range(0, len(ds), 2):
        assert ds.keys[k] == ds.keys[k + 1]
        assert (ds.image_present[k], ds.text_present[k]) == (ds.image_present[k + 1], ds.text_present[k + 1])
    assert dm2.missing_summary("test") == {"complete": 4, "text_missing": 2, "image_missing": 2}


def test_mmimdb_per_movie_uses_the_outline(tmp_path):
    root = make_mmimdb(tmp_path)
    dm = MMIMDbDataModule(root=str(root.parent), text_mode="per_movie", **TINY)  # the parent folder works too
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["id"] == ["0000012", "0000013", "0000014", "0000015"]
    assert dm.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "outline of movie 12."


def test_food101_raw_val_carved_from_train(tmp_path):
    root = make_food101(tmp_path, n_train=40, n_test=6)
    dm = Food101DataModule(root=str(root), **TINY)
    assert (dm.task, dm.num_classes, dm.label_names[:2]) == (
        "multiclass",
        101,
        ["apple_pie", "baby_back_ribs"],
    )
    dm.setup()
    train, val = set(dm.datasets["train"].ids), set(dm.datasets["val"].ids)
    assert len(val) == round(40 * 0.1007) == 4 and len(train) == 36 and not train & val
    again = Food101DataModule(root=str(root), **TINY)
    again.setup("fit")
    assert set(again.datasets["val"].ids) == val
    other_seed = Food101DataModule(root=str(root), val_seed=1, **TINY)
    other_seed.setup("fit")
    assert set(other_seed.datasets["val"].ids) != val
    for split in ("train", "val", "test"):
        batches = all_batches(dm._loader(split, shuffle=False))
        for batch in batches:
            assert_batch_schema(batch, dm)
        for sample_id, label in by_id(batches, "label").items():
            assert sample_id.startswith(FOOD101_CLASSES[label] + "_")


def test_hateful_memes_raw_labels_and_test_splits(tmp_path):
    root = make_hateful_memes(tmp_path)
    dm = HatefulMemesDataModule(root=str(root), **TINY)
    assert (dm.task, dm.num_classes, dm.label_names) == ("binary", 2, ["not_hateful", "hateful"])
    dm.setup()
    for split in ("train", "val", "test"):
        batches = all_batches(dm._loader(split, shuffle=False))
        for batch in batches:
            assert_batch_schema(batch, dm)
        expected = {}
        name = {"train": "train", "val": "dev", "test": "test_seen"}[split]
        for line in (root / f"{name}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            expected[str(entry["id"])] = entry["label"]
        assert by_id(batches, "label") == expected
    unseen = HatefulMemesDataModule(root=str(root), test_split="test_unseen", **TINY)
    unseen.setup("test")
    assert unseen.datasets["test"].ids == [str(10016 + i) for i in range(4)]
    assert dm.datasets["test"].ids == [str(10012 + i) for i in range(4)]


def test_hateful_memes_unlabelled_test_refuses_test_but_allows_predict(tmp_path):
    root = make_hateful_memes(tmp_path, test_labels=False)
    dm = HatefulMemesDataModule(root=str(root), **TINY)
    with pytest.raises(ValueError, match="test_seen split has no labels, so test metrics cannot be computed"):
        dm.setup("test")
    with pytest.raises(ValueError, match="no labels"):
        dm.test_dataloader()
    batch = next(iter(dm.predict_dataloader()))
    assert batch["label"].tolist() == [-1, -1, -1, -1]
    # Training files must be labelled throughout: one missing label is an error naming the line.
    lines = (root / "train.jsonl").read_text().splitlines()
    entry = json.loads(lines[2])
    del entry["label"]
    lines[2] = json.dumps(entry)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train sample '10002' has no label \(.*train.jsonl line 3"):
        HatefulMemesDataModule(root=str(root), **TINY).setup("fit")


@pytest.mark.parametrize(
    "cls, sizes",
    [(MMIMDbDataModule, (12, 12, 12)), (Food101DataModule, (6, 6, 6)), (HatefulMemesDataModule, (6, 6, 6))],
)
def test_map_arrow_tables(tmp_path, cls, sizes):
    root = make_arrow_tables(tmp_path)
    dm = cls(root=str(root), format="arrow", test_missing={"missing_rate": 0.5}, **TINY)
    dm.setup()
    assert tuple(len(dm.datasets[s]) for s in ("train", "val", "test")) == sizes
    batches = all_batches(dm._loader("train", shuffle=False))
    for batch in batches:
        assert_batch_schema(batch, dm)
        assert bool(batch["image_present"].all())  # real decoded images, not the filler
        assert not bool((batch["image"] == 1).all())
    labels = by_id(batches, "label")
    if cls is MMIMDbDataModule:
        assert labels["train0002#1"] == [1.0 if g in mmimdb_genres(2) else 0.0 for g in MMIMDB_GENRES]
    elif cls is Food101DataModule:
        assert labels["baklava_train_2.jpg"] == FOOD101_CLASSES.index("baklava")
    else:
        assert [labels[f"row{i}"] for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert sum(dm.missing_summary("test")[k] for k in ("text_missing", "image_missing")) > 0


# ------------------------------------------------------------------------------------------- emoji


def _fake_emoji(monkeypatch, tmp_path) -> list[EmojiItem]:
    folder = tmp_path / "png"
    folder.mkdir()
    items = []
    groups = ["animals-nature", "flags", "food-drink"]
    for i in range(18):
        path = folder / f"{i:04x}.png"
        Image.new("RGBA", (16, 16), (255, 0, 0, 0 if i % 2 else 255)).save(path)
        split = ("train", "train", "train", "val", "test", "test")[i % 6]
        items.append(EmojiItem(f"1F{i:03X}", path, f"emoji number {i}", groups[i % 3], f"sub{i % 2}", split))
    monkeypatch.setattr(
        "datamodules.emoji.emoji_label_names",
        lambda label, cache_dir=None, split_seed=0: sorted({getattr(x, label) for x in items}),
    )
    monkeypatch.setattr(
        "datamodules.emoji.load_emoji_items", lambda cache_dir=None, label="group", split_seed=0: items
    )
    monkeypatch.setattr(
        "datamodules.emoji.prepare_emoji", lambda cache_dir=None, split_seed=0: Path(cache_dir) / "emoji"
    )
    return items


def test_emoji_datamodule_on_fake_items(monkeypatch, tmp_path):
    items = _fake_emoji(monkeypatch, tmp_path)
    dm = EmojiDataModule(root=str(tmp_path), test_missing={"missing_rate": 0.5}, **TINY)
    assert (dm.num_classes, dm.label_names, dm.root) == (
        3,
        ["animals-nature", "flags", "food-drink"],
        str(tmp_path / "emoji"),
    )
    dm.prepare_data()
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 9, "val": 3, "test": 6}
    assert dm.missing_table_paths["test"].parent == tmp_path / "emoji" / "missing_tables"
    batches = all_batches(dm._loader("train", shuffle=False))
    for batch in batches:
        assert_batch_schema(batch, dm)
    expected = {x.id: dm.label_names.index(x.group) for x in items if x.split == "train"}
    assert by_id(batches, "label") == expected
    sub = EmojiDataModule(root=str(tmp_path), label="subgroup", **TINY)
    assert sub.label_names == ["sub0", "sub1"] and sub.num_classes == 2
    with pytest.raises(ValueError, match="label must be 'group' or 'subgroup'"):
        EmojiDataModule(root=str(tmp_path), label="hexcode", **TINY)


def _emoji_cache_ready() -> bool:
    from datamodules.emoji_source import MANIFEST, extracted_dir

    return (extracted_dir() / MANIFEST).is_file()


@pytest.mark.skipif(
    not _emoji_cache_ready(), reason="emoji data not prepared (python -m datamodules.emoji_source)"
)
def test_emoji_real_data_with_minilm_tokenizer_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = EmojiDataModule(
        image_encoder="dinov2-s14",
        text_encoder="minilm-l6",
        batch_size=8,
        missing_table_dir=str(tmp_path),
        test_missing={"missing_rate": 0.7},
    )
    assert dm.num_classes == 9 and len(dm.label_names) == 9
    dm.setup("test")
    assert len(dm.datasets["test"]) == 381
    assert dm.missing_summary("test") == {"complete": 115, "text_missing": 133, "image_missing": 133}
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (8, 3, 112, 112)
    from datamodules.emoji_source import load_emoji_items

    names = {x.id: x.text for x in load_emoji_items()}
    for row in range(8):
        if batch["text_present"][row]:
            length = int(batch["attention_mask"][row].sum())
            expected = dm.tokenizer(names[batch["id"][row]])["input_ids"]
            assert batch["input_ids"][row, :length].tolist() == expected and length > 2


# ---------------------------------------------------------------------------------- protocol via DM


@pytest.mark.parametrize(
    "missing_type, expected", [("both", (14, 14, 12)), ("text", (28, 0, 12)), ("image", (0, 28, 12))]
)
def test_protocol_counts_through_the_datamodule(tmp_path, missing_type, expected):
    root = make_hateful_memes(tmp_path, n_test=40)
    dm = HatefulMemesDataModule(
        root=str(root), test_missing={"missing_rate": 0.7, "missing_type": missing_type}, **TINY
    )
    dm.setup("test")
    s = dm.missing_summary("test")
    assert (s["text_missing"], s["image_missing"], s["complete"]) == expected
    presence = by_id(all_batches(dm.test_dataloader()), "text_present")
    assert sum(not v for v in presence.values()) == expected[0]


def _presence(dm, split="test", num_workers=None) -> dict:
    loader = dm._loader(split, shuffle=False)
    if num_workers is not None:
        loader = DataLoader(
            loader.dataset, batch_size=4, num_workers=num_workers, collate_fn=loader.collate_fn
        )
    return presence_of(all_batches(loader))


def test_table_identical_across_constructions_workers_and_ranks(tmp_path, monkeypatch):
    root = make_hateful_memes(tmp_path, n_test=24)
    setting = {"missing_rate": 0.7, "missing_type": "both"}
    first = HatefulMemesDataModule(root=str(root), test_missing=setting, **TINY)
    first.setup("test")
    reference = _presence(first)
    # A second construction reloads the persisted table; a third draws afresh in another folder.
    second = HatefulMemesDataModule(root=str(root), test_missing=setting, **TINY)
    second.setup("test")
    fresh = HatefulMemesDataModule(
        root=str(root), test_missing=setting, missing_table_dir=str(tmp_path / "t2"), **TINY
    )
    fresh.setup("test")
    assert _presence(second) == reference == _presence(fresh)
    assert (
        tmp_path / "t2" / first.missing_table_paths["test"].name
    ).read_text() == first.missing_table_paths["test"].read_text()
    # Worker count.
    assert _presence(first, num_workers=2) == reference
    # Rank: the table is drawn over the whole split whatever the rank; each rank reads its shard.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = HatefulMemesDataModule(
        root=str(root), test_missing=setting, missing_table_dir=str(tmp_path / "t3"), **TINY
    )
    rank1.setup("test")
    assert _presence(rank1) == reference
    dataset = first.datasets["test"]
    seen = {}
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=first.collate_fn())
        shard = _presence_from(loader)
        assert len(shard) == 12 and not set(shard) & set(seen)
        seen.update(shard)
    assert seen == reference


def _presence_from(loader) -> dict:
    return presence_of(all_batches(loader))


def test_stale_table_in_datamodule_raises(tmp_path):
    root = make_mmimdb(tmp_path)
    dm = MMIMDbDataModule(root=str(root), test_missing={"missing_rate": 0.5}, **TINY)
    dm.setup("test")
    table = dm.missing_table_paths["test"]
    assert table == root / "missing_tables" / "mmimdb_test_both_0.5_b0.5_seed0.csv" and table.exists()
    splits = json.loads((root / "split.json").read_text())
    splits["test"] = splits["test"][:-1]
    (root / "split.json").write_text(json.dumps(splits))
    with pytest.raises(
        MissingTableError, match=r"is stale: it holds 4 ids, the mmimdb test split has 3.*'0000015'"
    ):
        MMIMDbDataModule(root=str(root), test_missing={"missing_rate": 0.5}, **TINY).setup("test")


def test_table_folder_falls_back_when_root_is_read_only(tmp_path, monkeypatch):
    root = make_hateful_memes(tmp_path / "data")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    real_access = __import__("os").access
    monkeypatch.setattr(
        "os.access",
        lambda p, mode: False if str(p).startswith(str(root)) else real_access(p, mode),
    )
    dm = HatefulMemesDataModule(root=str(root), test_missing={"missing_rate": 0.5}, **TINY)
    dm.setup("test")
    assert (
        dm.missing_table_paths["test"]
        == run_dir / "runs" / "missing_tables" / "hateful_memes" / dm.missing_table_paths["test"].name
    )
    assert not (root / "missing_tables").exists()
    # A table shipped next to the data is reused even though the folder is not writable.
    shipped = root / "missing_tables" / dm.missing_table_paths["test"].name
    shipped.parent.mkdir()
    shipped.write_text(dm.missing_table_paths["test"].read_text())
    shipped.with_suffix(".json").write_text(dm.missing_table_paths["test"].with_suffix(".json").read_text())
    again = HatefulMemesDataModule(root=str(root), test_missing={"missing_rate": 0.5}, **TINY)
    again.setup("test")
    assert again.missing_table_paths["test"] == shipped


def test_dynamic_modality_dropout_redraws_per_epoch(tmp_path):
    root = make_hateful_memes(tmp_path, n_train=40)
    dm = HatefulMemesDataModule(root=str(root), train_missing={"missing_rate": 0.5, "dynamic": True}, **TINY)
    dm.setup("fit")
    assert dm.missing_summary("train") == {"complete": 40, "text_missing": 0, "image_missing": 0}
    assert dm.missing_table_paths["train"] is None

    def epoch_presence(epoch: int, training: bool = True) -> dict:
        dm.trainer = SimpleNamespace(training=training, current_epoch=epoch)
        batches = [dm.on_before_batch_transfer(b, 0) for b in dm._loader("train", shuffle=False)]
        for batch in batches:
            assert_batch_schema(batch, dm)
        return presence_of(batches)

    e0, e1, e0_again = epoch_presence(0), epoch_presence(1), epoch_presence(0)
    for table in (e0, e1):
        values = list(table.values())
        assert (values.count((True, False)), values.count((False, True)), values.count((True, True))) == (
            10,
            10,
            20,
        )
    assert e0 == e0_again and e0 != e1
    assert all(v == (True, True) for v in epoch_presence(0, training=False).values())
    dm.trainer = None


def test_padding_to_longest_capped_at_max_text_len(tmp_path):
    root = make_hateful_memes(tmp_path)
    lines = (root / "train.jsonl").read_text().splitlines()
    entry = json.loads(lines[1])
    entry["text"] = " ".join(["word"] * 50)
    lines[1] = json.dumps(entry)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    dm = HatefulMemesDataModule(root=str(root), **{**TINY, "max_text_len": 12})
    dm.setup("fit")
    short = len(dm.tokenizer("caption of meme 10000")["input_ids"])
    assert short < 12
    first = next(iter(dm._loader("train", shuffle=False)))
    assert first["input_ids"].shape[1] == 12
    assert first["attention_mask"].sum(1).tolist() == [short, 12, short, short]
    assert (
        first["input_ids"][1, -1].item() == 102
        and first["input_ids"][0, -1].item() == dm.tokenizer.pad_token_id
    )
    assert bool((first["attention_mask"].bool() == (first["input_ids"] != dm.tokenizer.pad_token_id)).all())
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[1] == short  # the longest of this batch, not max_text_len


# ------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_missing": {"missing_rate": 2}}, r"train_missing\.missing_rate must be a number in \[0, 1\]"),
        ({"test_missing": {"missing_type": "audio"}}, r"test_missing\.missing_type must be one of"),
        ({"val_missing": {"missing_rate": 0.5, "dynamic": True}}, r"val_missing\.dynamic"),
        ({"on_bad_sample": "skip"}, r"on_bad_sample must be 'error' or 'missing'"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1"),
        ({"format": "parquet"}, r"format must be 'raw' or 'arrow'"),
        ({"test_split": "test"}, r"test_split must be 'test_seen' or 'test_unseen'"),
        ({"root": None}, r"needs root"),
    ],
)
def test_init_validation_names_the_option(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HatefulMemesDataModule(**{"root": str(tmp_path), **TINY, **kwargs})


def test_val_follows_test_setting_unless_given(tmp_path):
    dm = Food101DataModule(
        root=str(tmp_path), test_missing={"missing_rate": 0.7, "missing_type": "text"}, **TINY
    )
    assert dm.missing["val"] == dm.missing["test"] and dm.missing["train"].missing_rate == 0.0
    dm = Food101DataModule(
        root=str(tmp_path), test_missing={"missing_rate": 0.7}, val_missing={"missing_rate": 0.1}, **TINY
    )
    assert dm.missing["val"].missing_rate == 0.1


def test_missing_settings_are_expressible_in_yaml(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MMIMDbDataModule, "data")
    config = f"""
data:
  root: {make_mmimdb(tmp_path)}
  text_mode: per_movie
  train_missing: {{missing_rate: 0.7, missing_type: image, dynamic: true}}
  test_missing:
    missing_rate: 0.7
    missing_type: image
  image_encoder: test_vit
  text_encoder: tiny-bert
  image_size: {IMAGE_SIZE}
"""
    cfg = parser.parse_string(config)
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, MMIMDbDataModule) and dm.text_mode == "per_movie"
    assert dm.missing["train"].dynamic and dm.missing["test"].missing_type == "image"
    dm.setup("test")
    assert dm.missing_summary("test") == {"complete": 2, "text_missing": 0, "image_missing": 2}
    assert dm.hparams["test_missing"] == {"missing_rate": 0.7, "missing_type": "image"}


def test_workers_see_the_same_samples(tmp_path):
    dm = Food101DataModule(
        root=str(make_food101(tmp_path)), num_workers=2, test_missing={"missing_rate": 0.5}, **TINY
    )
    assert dm.persistent_workers is True
    dm.setup("test")
    with_workers = all_batches(dm.test_dataloader())
    dm.num_workers, dm.persistent_workers = 0, False
    without = all_batches(dm.test_dataloader())
    for a, b in zip(with_workers, without, strict=True):
        assert a["id"] == b["id"]
        for key in ("image", "input_ids", "attention_mask", "image_present", "text_present", "label"):
            assert torch.equal(a[key], b[key]), key


def test_batched_normalisation_equals_the_encoders_own_transform(tmp_path):
    from timm.data import create_transform

    from datamodules.transforms import decode_image

    root = make_food101(tmp_path)
    dm = Food101DataModule(
        root=str(root), test_missing={"missing_rate": 0.5, "missing_type": "image"}, **TINY
    )
    dm.setup("test")
    config = dm.data_config
    assert config["mean"] == (0.5, 0.5, 0.5) and config["crop_pct"] == 0.95  # test_vit's, not a default
    reference = create_transform(
        input_size=config["input_size"],
        is_training=False,
        mean=config["mean"],
        std=config["std"],
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
    )
    batch = next(iter(dm.test_dataloader()))
    ds = dm.datasets["test"]
    assert not bool(batch["image_present"].all()) and bool(batch["image_present"].any())
    for row, sample_id in enumerate(batch["id"]):
        if batch["image_present"][row]:
            path = ds.image_reader.path(ds.images[ds.ids.index(sample_id)])
            expected = reference(decode_image(str(path)))
            torch.testing.assert_close(batch["image"][row], expected, atol=1e-5, rtol=0)
        else:
            assert bool((batch["image"][row] == 1).all())


# ------------------------------------------------------------------ evaluation's presence masks


def test_presence_masks_are_those_test_uses_under_that_setting(tmp_path):
    root = make_hateful_memes(tmp_path, n_test=8)
    setting = {"missing_rate": 0.5, "missing_type": "both"}
    tested = HatefulMemesDataModule(root=str(root), test_missing=setting, **TINY)
    tested.setup("test")
    complete = HatefulMemesDataModule(root=str(root), test_missing={"missing_rate": 0.0}, **TINY)
    masks = complete.presence_masks("test", setting)
    ds = tested.datasets["test"]
    assert masks.ids == ds.ids
    assert masks.image_present.tolist() == ds.image_present.tolist()
    assert masks.text_present.tolist() == ds.text_present.tolist()
    assert sorted(masks.codes.tolist()) == [0] * 4 + [1] * 2 + [2] * 2
    # The split's own setting (eta = 0) when none is given; dynamic settings have no fixed table.
    assert complete.presence_masks("test").image_present.all()
    with pytest.raises(ValueError, match="dynamic"):
        complete.presence_masks("test", {"missing_rate": 0.5, "dynamic": True})
    with pytest.raises(ValueError, match="split must be 'train', 'val' or 'test'"):
        complete.presence_masks("dev", setting)


def test_presence_masks_keep_one_modality_where_the_data_lack_the_other(tmp_path):
    root = make_hateful_memes(tmp_path, n_test=8)
    dm = HatefulMemesDataModule(root=str(root), **TINY)
    dm.setup("test")
    n = len(dm.datasets["test"])
    no_image = torch.zeros(n, dtype=torch.bool)
    masks = dm.presence_masks("test", {"missing_rate": 1.0, "missing_type": "text"}, image_usable=no_image)
    # Every text is dropped by the table, but no image is usable: every text is restored.
    assert not masks.image_present.any() and masks.text_present.all() and masks.overridden.all()
    with pytest.raises(ValueError, match="one value per test sample"):
        dm.presence_masks("test", {"missing_rate": 0.5}, image_usable=no_image[:2])


# ------------------------------------------------------------------------------- DDP logging


@pytest.mark.parametrize("rank, logged", [(0, True), (1, False)])
def test_setup_logs_only_on_rank_zero(tmp_path, monkeypatch, caplog, rank, logged):
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank)
    root = make_hateful_memes(tmp_path)
    (root / "img" / "10001.png").unlink()  # a bad input: a warning at setup under `missing`
    dm = HatefulMemesDataModule(root=str(root), on_bad_sample="missing", **TINY)
    with caplog.at_level(logging.INFO, logger="datamodules"):
        dm.setup("fit")
        dm.teardown("fit")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("datamodules")]
    assert any("train split: 8 samples" in m for m in messages) is logged
    assert any("bad inputs treated as missing" in m for m in messages) is logged
    assert dm.bad_sample_counts["train"]["image_absent"] == 1  # counted on every rank


# ------------------------------------------------------------------------- typed choices


def test_choices_and_missing_keys_are_checked_at_parse_time(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(HatefulMemesDataModule, "data")
    root = make_hateful_memes(tmp_path)
    help_text = parser.format_help()
    for choices in ("{raw,arrow}", "{error,missing}", "{test_seen,test_unseen}"):
        assert choices in help_text
    for bad in ("format: parquet", "on_bad_sample: skip", "train_missing: {missing_ratio: 0.7}"):
        with pytest.raises(Exception, match="parquet|skip|missing_ratio"):
            parser.parse_string(f"data:\n  root: {root}\n  {bad}\n")
    cfg = parser.parse_string(
        f"data:\n  root: {root}\n  train_missing: {{missing_rate: 0.7, missing_type: text}}\n"
    )
    assert cfg.data.train_missing == {"missing_rate": 0.7, "missing_type": "text"}  # a plain dict

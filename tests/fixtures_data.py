"""Builders of tiny datasets in the exact raw layouts the DataModules read (and MAP's arrow tables).

Each builder writes under the folder it is given (a pytest ``tmp_path``) and returns the ``root``
to pass to the DataModule. Images are small solid-colour pictures with a class-dependent colour;
texts say what the sample is. Used by the DataModule tests and by the CLI's fast_dev_run tests::

    from tests.fixtures_data import make_arrow_tables, make_food101, make_hateful_memes, make_mmimdb
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from datamodules.food101 import FOOD101_CLASSES
from datamodules.mmimdb import MMIMDB_GENRES

DEFAULT_FOOD_CLASSES = ("apple_pie", "baklava", "pizza")


def _image(index: int, size: int = 24, mode: str = "RGB") -> Image.Image:
    colour = ((index * 53) % 256, (index * 97) % 256, (index * 31) % 256)
    return Image.new("RGB", (size, size + 4), colour).convert(mode)


def _image_bytes(index: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    _image(index).save(buffer, format=fmt)
    return buffer.getvalue()


def mmimdb_genres(index: int) -> list[str]:
    """The genres the fixture gives movie number ``index`` (two distinct ones)."""
    return [MMIMDB_GENRES[index % 23], MMIMDB_GENRES[(index * 7 + 3) % 23]]


def make_mmimdb(
    folder: str | Path, n_train: int = 8, n_dev: int = 4, n_test: int = 4, plots_per_movie: int = 2
) -> Path:
    """``<folder>/mmimdb/{split.json, dataset/<id>.json, dataset/<id>.jpeg}``; returns the mmimdb folder.

    Movie ``k`` (ids ``"00000k"``, numbered across splits) has ``plots_per_movie`` plots, a
    ``plot outline`` and the genres :func:`mmimdb_genres` ``(k)``.
    """
    root = Path(folder) / "mmimdb"
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {}
    index = 0
    for split, count in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        splits[split] = []
        for _ in range(count):
            movie = f"{index:07d}"
            splits[split].append(movie)
            data = {
                "title": f"Movie {index}",
                "plot": [
                    f"Plot {p} of movie {index}, a {mmimdb_genres(index)[0].lower()} story."
                    for p in range(plots_per_movie)
                ],
                "plot outline": f"Outline of movie {index}.",
                "genres": mmimdb_genres(index),
            }
            (root / "dataset" / f"{movie}.json").write_text(json.dumps(data), encoding="utf-8")
            _image(index).save(root / "dataset" / f"{movie}.jpeg", format="JPEG")
            index += 1
    (root / "split.json").write_text(json.dumps(splits), encoding="utf-8")
    return root


def make_food101(
    folder: str | Path, n_train: int = 20, n_test: int = 6, classes: tuple[str, ...] = DEFAULT_FOOD_CLASSES
) -> Path:
    """``<folder>/food101/{images/<split>/<class>/<file>.jpg, texts/<split>_titles.csv}``; returns the root.

    Sample ``i`` of a split belongs to ``classes[i % len(classes)]`` and is named
    ``<class>_<i>.jpg``; titles contain a comma (quoted, as in the real CSVs).
    """
    root = Path(folder) / "food101"
    (root / "texts").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(count):
            class_name = classes[i % len(classes)]
            assert class_name in FOOD101_CLASSES
            file_name = f"{class_name}_{i}.jpg"
            (root / "images" / split / class_name).mkdir(parents=True, exist_ok=True)
            _image(FOOD101_CLASSES.index(class_name)).save(
                root / "images" / split / class_name / file_name, format="JPEG"
            )
            rows.append(f'{file_name},"Best {class_name.replace("_", " ")} recipe, number {i}",{class_name}')
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def make_hateful_memes(
    folder: str | Path, n_train: int = 8, n_dev: int = 4, n_test: int = 4, test_labels: bool = True
) -> Path:
    """``<folder>/hateful_memes/{img/<id>.png, train.jsonl, dev.jsonl, test_seen.jsonl, test_unseen.jsonl}``.

    Sample ids are 5-digit numbers, label ``i % 2``; with ``test_labels=False`` the test files
    carry no ``label`` field (as in some releases).
    """
    root = Path(folder) / "hateful_memes"
    (root / "img").mkdir(parents=True, exist_ok=True)
    index = 0
    for split, count in (("train", n_train), ("dev", n_dev), ("test_seen", n_test), ("test_unseen", n_test)):
        lines = []
        for i in range(count):
            meme_id = 10000 + index
            _image(index).save(root / "img" / f"{meme_id}.png", format="PNG")
            entry = {
                "id": meme_id,
                "img": f"img/{meme_id}.png",
                "label": i % 2,
                "text": f"caption of meme {meme_id}",
            }
            if split.startswith("test") and not test_labels:
                del entry["label"]
            lines.append(json.dumps(entry))
            index += 1
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _write_arrow(path: Path, columns: dict) -> None:
    import pyarrow as pa

    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def make_arrow_tables(folder: str | Path, n: int = 6) -> Path:
    """MAP's tables: ``mmimdb_{train,dev,test}``, ``food101_{train,val,test}``,
    ``hatememes_{train,dev,test}``.

    Each table has ``n`` rows (columns as MAP writes them; texts are lists of strings, MM-IMDb
    rows have two plots). Returns the folder holding the ``.arrow`` files.
    """
    root = Path(folder) / "arrow"
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        movies = [f"{split}{i:04d}" for i in range(n)]
        _write_arrow(
            root / f"mmimdb_{split}.arrow",
            {
                "image": [_image_bytes(i, "JPEG") for i in range(n)],
                "plots": [[f"plot A of {m}", f"plot B of {m}"] for m in movies],
                "label": [[1 if g in mmimdb_genres(i) else 0 for g in MMIMDB_GENRES] for i in range(n)],
                "genres": [mmimdb_genres(i) for i in range(n)],
                "image_id": movies,
                "split": [split] * n,
            },
        )
    for split in ("train", "val", "test"):
        _write_arrow(
            root / f"food101_{split}.arrow",
            {
                "image": [_image_bytes(i, "JPEG") for i in range(n)],
                "text": [[f"{FOOD101_CLASSES[i % 3]} title {i}"] for i in range(n)],
                "label": [i % 3 for i in range(n)],
                "image_id": [f"{FOOD101_CLASSES[i % 3]}_{split}_{i}.jpg" for i in range(n)],
                "split": [split] * n,
            },
        )
    for split in ("train", "dev", "test"):
        _write_arrow(
            root / f"hatememes_{split}.arrow",
            {
                "image": [_image_bytes(i) for i in range(n)],
                "text": [[f"meme caption {split} {i}"] for i in range(n)],
                "label": [i % 2 for i in range(n)],
                "split": [split] * n,
            },
        )
    return root

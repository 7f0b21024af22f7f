"""MM-IMDb (Arevalo et al. 2017): movie posters + plots, 23-genre multilabel classification.

Raw layout (``root`` is the unpacked ``mmimdb`` folder, or its parent)::

    mmimdb/split.json            {"train": [ids], "dev": [ids], "test": [ids]}
    mmimdb/dataset/<id>.json     fields used: "plot" (list of strings), "plot outline", "genres"
    mmimdb/dataset/<id>.jpeg

``format: arrow`` reads MAP's ``mmimdb_{train,dev,test}.arrow`` from ``root`` instead.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Literal

from datamodules.arrow import ArrowImageReader, require_columns, texts_of
from datamodules.benchmark import BenchmarkDataModule, DataFormat
from datamodules.checks import check_choice
from datamodules.logs import log_rank_zero
from datamodules.records import FileImageReader, ImageReader, SampleRecord, read_text_file

log = logging.getLogger(__name__)

TextMode = Literal["per_plot", "per_movie"]
ExtraGenres = Literal["ignore", "error"]

MMIMDB_GENRES = [
    "Drama",
    "Comedy",
    "Romance",
    "Thriller",
    "Crime",
    "Action",
    "Adventure",
    "Horror",
    "Documentary",
    "Mystery",
    "Sci-Fi",
    "Fantasy",
    "Family",
    "Biography",
    "War",
    "History",
    "Music",
    "Animation",
    "Musical",
    "Western",
    "Sport",
    "Short",
    "Film-Noir",
]
_SPLIT_FILE_NAMES = {"train": "train", "val": "dev", "test": "test"}


class MMIMDbDataModule(BenchmarkDataModule):
    """MM-IMDb: multilabel over the 23 genres (multi-hot float labels), metric F1-macro.

    Args:
        root: The ``mmimdb`` folder (holding ``split.json`` and ``dataset/``) or its parent; with
            ``format: arrow``, the folder of MAP's ``mmimdb_*.arrow`` tables.
        format: ``raw`` (json + jpeg + split.json) or ``arrow`` (MAP's tables).
        text_mode: ``per_plot`` (MAP's protocol: one sample per (movie, plot) pair, all plots of a
            movie sharing its missing code; ids ``<movie>#<k>``) or ``per_movie`` (one sample per
            movie, id ``<movie>``: its ``plot outline``, or its first plot when the outline is absent
            or empty).
        extra_genres: What to do with genre names outside the 23 (the dataset's raw JSON may carry
            tags the benchmark does not use): ``ignore`` them as MAP does (counted in
            ``ignored_genre_counts`` and logged) or raise an ``error``.
        max_text_len: Maximum tokens per plot (512, BERT's limit; MAP used 1024 with ViLT).
        **kwargs: Everything else of :class:`MissingModalityDataModule` (missing settings, loader,
            encoders, bad-input policy).
    """

    dataset_name = "mmimdb"
    task = "multilabel"
    root_contents = "the folder holding split.json and dataset/ (or the arrow tables)"
    arrow_prefix = "mmimdb"

    def __init__(
        self,
        root: str | None = None,
        format: DataFormat = "raw",
        text_mode: TextMode = "per_plot",
        extra_genres: ExtraGenres = "ignore",
        max_text_len: int = 512,
        **kwargs,
    ) -> None:
        check_choice("text_mode", text_mode, TextMode)
        check_choice("extra_genres", extra_genres, ExtraGenres)
        super().__init__(root=root, format=format, max_text_len=max_text_len, **kwargs)
        self.text_mode = text_mode
        self.extra_genres = extra_genres
        self.num_classes = len(MMIMDB_GENRES)
        self.label_names = list(MMIMDB_GENRES)
        self.ignored_genre_counts: Counter = Counter()
        self._genre_index = {g: i for i, g in enumerate(MMIMDB_GENRES)}

    def _split_file_name(self, split: str) -> str:
        return _SPLIT_FILE_NAMES[split]

    def _raw_root(self) -> Path:
        root = Path(self.root)
        if not (root / "split.json").is_file() and (root / "mmimdb" / "split.json").is_file():
            root = root / "mmimdb"
        if not (root / "split.json").is_file():
            raise FileNotFoundError(
                f"MM-IMDb: {root / 'split.json'} not found; root must be the unpacked mmimdb folder"
            )
        return root

    def _read_raw(self, split: str) -> tuple[list[SampleRecord], ImageReader]:
        root = self._raw_root()
        split_file = root / "split.json"
        try:
            splits = json.loads(read_text_file(split_file))
        except json.JSONDecodeError as exc:
            raise ValueError(f"MM-IMDb: {split_file} is not valid JSON: {exc}") from exc
        if not isinstance(splits, dict):
            raise ValueError(
                f"MM-IMDb: {split_file} holds a {type(splits).__name__}; expected an object of id lists"
            )
        name = _SPLIT_FILE_NAMES[split]
        if name not in splits:
            raise ValueError(f"MM-IMDb: {split_file} has no {name!r} list (keys: {sorted(splits)})")
        records = []
        for movie in splits[name]:
            movie = str(movie)
            json_path = root / "dataset" / f"{movie}.json"
            if not json_path.is_file():
                raise FileNotFoundError(
                    f"MM-IMDb {name} sample {movie!r}: {json_path} does not exist; expected the movie's JSON "
                    "(genres are needed for its label)"
                )
            try:
                data = json.loads(json_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"MM-IMDb {name} sample {movie!r}: {json_path} is not valid JSON: {exc}"
                ) from exc
            if not isinstance(data, dict):
                raise ValueError(
                    f"MM-IMDb {name} sample {movie!r}: {json_path} holds a {type(data).__name__}; expected a "
                    "JSON object with 'genres' and 'plot'"
                )
            label = self._label_from_genres(data.get("genres"), movie, json_path)
            plots = data.get("plot")
            if plots is not None and not isinstance(plots, list):
                plots = [plots]
            records.extend(
                self._movie_records(
                    movie, f"{movie}.jpeg", plots, data.get("plot outline"), label, str(json_path)
                )
            )
        self._log_ignored()
        return records, FileImageReader(root / "dataset")

    def _label_from_genres(self, genres, movie: str, source) -> tuple[int, ...]:
        if not isinstance(genres, list):
            raise ValueError(
                f"MM-IMDb sample {movie!r} ({source}): field 'genres' is {genres!r}; expected a list of "
                "genre names"
            )
        indices = []
        for genre in genres:
            if genre in self._genre_index:
                indices.append(self._genre_index[genre])
            elif self.extra_genres == "error":
                raise ValueError(
                    f"MM-IMDb sample {movie!r} ({source}): genre {genre!r} is not one of the 23 benchmark "
                    f"genres {MMIMDB_GENRES}; set extra_genres: ignore to skip such genres as MAP does"
                )
            else:
                self.ignored_genre_counts[genre] += 1
        return tuple(sorted(set(indices)))

    def _movie_records(self, movie, image_ref, plots, outline, label, source) -> list[SampleRecord]:
        plots = list(plots) if plots else []
        if self.text_mode == "per_movie":
            if isinstance(outline, str) and outline.strip():
                return [
                    SampleRecord(movie, movie, image_ref, outline, label, f"{source} field 'plot outline'")
                ]
            text = plots[0] if plots else None
            return [SampleRecord(movie, movie, image_ref, text, label, f"{source} field 'plot'[0]")]
        if not plots:
            return [
                SampleRecord(
                    f"{movie}#0",
                    movie,
                    image_ref,
                    None,
                    label,
                    f"{source} field 'plot' (absent or empty list)",
                )
            ]
        return [
            SampleRecord(f"{movie}#{k}", movie, image_ref, plot, label, f"{source} field 'plot'[{k}]")
            for k, plot in enumerate(plots)
        ]

    def _log_ignored(self) -> None:
        if self.ignored_genre_counts:
            log_rank_zero(
                log,
                logging.WARNING,
                "MM-IMDb: genre mentions outside the 23 benchmark genres ignored (extra_genres=ignore): %s",
                dict(self.ignored_genre_counts),
            )

    def _arrow_names(self, split: str) -> list[str]:
        return {"train": ["train"], "val": ["dev", "val"], "test": ["test"]}[split]

    def _read_arrow(self, path: Path, table) -> tuple[list[SampleRecord], ImageReader]:
        require_columns(table, path, ["image", "plots", "label"])
        ids = table.column("image_id").to_pylist() if "image_id" in table.column_names else None
        labels = table.column("label").to_pylist()
        records = []
        for row, (plots, multi_hot) in enumerate(zip(table.column("plots").to_pylist(), labels, strict=True)):
            movie = str(ids[row]) if ids is not None else f"row{row}"
            source = f"arrow file {path} row {row}"
            if (
                not isinstance(multi_hot, list)
                or len(multi_hot) != len(MMIMDB_GENRES)
                or any(v not in (0, 1) for v in multi_hot)
            ):
                raise ValueError(
                    f"MM-IMDb sample {movie!r} ({source}): column 'label' is {multi_hot!r}; expected 23 "
                    f"values in {{0, 1}}"
                )
            label = tuple(i for i, v in enumerate(multi_hot) if v == 1)
            texts = [
                t for t in texts_of(plots, f"arrow file {path} row {row} column 'plots'") if t is not None
            ]
            records.extend(self._movie_records(movie, row, texts, None, label, source))
        self._log_ignored()
        return records, ArrowImageReader(path, "image")

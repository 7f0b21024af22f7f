"""UPMC Food-101 (Wang et al. 2015): food photos + web-page titles, 101-class classification.

Raw layout (``root`` is the unpacked folder)::

    images/train/<class>/<file>.jpg      images/test/<class>/<file>.jpg
    texts/train_titles.csv               texts/test_titles.csv

Each CSV row, without header, is ``<file name>,<title>,<class>``; a title with unquoted commas is
everything between the first and the last field. The CSVs are the index: an image without a row is
not part of the dataset. The validation split is carved from train with a fixed seed
(``val_fraction`` 0.1007 gives MAP's 61,142 / 6,846 on the 67,988 train rows).

``format: arrow`` reads MAP's ``food101_{train,val,test}.arrow`` from ``root`` instead (its own
val table; labels are class indices in the alphabetical order of :data:`FOOD101_CLASSES`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from datamodules.arrow import ArrowImageReader, arrow_text_records, require_columns
from datamodules.benchmark import BenchmarkDataModule, DataFormat
from datamodules.missing import derive_seed, rank_by_hash
from datamodules.records import FileImageReader, ImageReader, SampleRecord, read_text_file

FOOD101_CLASSES = (
    "apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap bread_pudding "
    "breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche cheese_plate "
    "cheesecake chicken_curry chicken_quesadilla chicken_wings chocolate_cake chocolate_mousse churros "
    "clam_chowder club_sandwich crab_cakes creme_brulee croque_madame cup_cakes deviled_eggs donuts "
    "dumplings edamame eggs_benedict escargots falafel filet_mignon fish_and_chips foie_gras french_fries "
    "french_onion_soup french_toast fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad "
    "grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog "
    "huevos_rancheros hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich macaroni_and_cheese "
    "macarons miso_soup mussels nachos omelette onion_rings oysters pad_thai paella pancakes panna_cotta "
    "peking_duck pho pizza pork_chop poutine prime_rib pulled_pork_sandwich ramen ravioli red_velvet_cake "
    "risotto samosa sashimi scallops seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara "
    "spring_rolls steak strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles"
).split()


class Food101DataModule(BenchmarkDataModule):
    """UPMC Food-101: 101 classes (alphabetical Food-101 class names), metric accuracy.

    Args:
        root: The unpacked UPMC Food-101 folder (holding ``images/`` and ``texts/``); with
            ``format: arrow``, the folder of MAP's ``food101_*.arrow`` tables.
        format: ``raw`` (images/ + headerless CSVs) or ``arrow`` (MAP's tables).
        val_fraction: Share of the train rows carved out as validation (raw format only).
        val_seed: Seed of that carve-out (a hash ranking of file names: the same rows every time,
            whatever the order of the CSV).
        max_text_len: Maximum tokens per title (MAP: 512).
        **kwargs: Everything else of :class:`MissingModalityDataModule`.
    """

    dataset_name = "food101"
    task = "multiclass"
    root_contents = "the folder holding images/ and texts/ (or the arrow tables)"
    arrow_prefix = "food101"

    def __init__(
        self,
        root: str | None = None,
        format: DataFormat = "raw",
        val_fraction: float = 0.1007,
        val_seed: int = 0,
        max_text_len: int = 512,
        **kwargs,
    ) -> None:
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not 0 < val_fraction < 1
        ):
            raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        super().__init__(root=root, format=format, max_text_len=max_text_len, **kwargs)
        self.val_fraction = float(val_fraction)
        self.val_seed = int(val_seed)
        self.num_classes = len(FOOD101_CLASSES)
        self.label_names = list(FOOD101_CLASSES)
        self._class_index = {c: i for i, c in enumerate(FOOD101_CLASSES)}

    def _read_raw(self, split: str) -> tuple[list[SampleRecord], ImageReader]:
        root = Path(self.root)
        source_split = "test" if split == "test" else "train"
        records = self._read_csv(root, source_split)
        if split != "test":
            val_ids = self._val_ids([r.id for r in records])
            records = [r for r in records if (r.id in val_ids) == (split == "val")]
        return records, FileImageReader(root / "images" / source_split)

    def _val_ids(self, train_ids: list[str]) -> set[str]:
        n_val = round(len(train_ids) * self.val_fraction)
        order = rank_by_hash(train_ids, derive_seed("food101-val", self.val_seed))
        return {train_ids[i] for i in order[:n_val]}

    def _read_csv(self, root: Path, source_split: str) -> list[SampleRecord]:
        csv_path = root / "texts" / f"{source_split}_titles.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(
                f"UPMC Food-101: {csv_path} not found; root must hold texts/{source_split}_titles.csv"
            )
        records = []
        with io.StringIO(read_text_file(csv_path), newline="") as handle:
            for line_no, row in enumerate(csv.reader(handle), start=1):
                if not row:
                    continue
                where = f"{csv_path} line {line_no}"
                if len(row) < 3:
                    raise ValueError(
                        f"UPMC Food-101 {where}: expected '<file name>,<title>,<class>', got {row!r}"
                    )
                file_name, title, class_name = row[0].strip(), ",".join(row[1:-1]), row[-1].strip()
                if class_name not in self._class_index:
                    raise ValueError(
                        f"UPMC Food-101 {where}, sample {file_name!r}: field 'class' is {class_name!r}; "
                        "expected one of the 101 Food-101 class names (e.g. 'apple_pie')"
                    )
                records.append(
                    SampleRecord(
                        id=file_name,
                        key=file_name,
                        image=f"{class_name}/{file_name}" if file_name else None,
                        text=title,
                        label=self._class_index[class_name],
                        text_source=f"{where} field 'title'",
                    )
                )
        return records

    def _arrow_names(self, split: str) -> list[str]:
        return {"train": ["train"], "val": ["val", "dev"], "test": ["test"]}[split]

    def _read_arrow(self, path: Path, table) -> tuple[list[SampleRecord], ImageReader]:
        require_columns(table, path, ["image", "text", "label"])
        ids = table.column("image_id").to_pylist() if "image_id" in table.column_names else None
        labels = table.column("label").to_pylist()
        return arrow_text_records(path, table, labels, ids), ArrowImageReader(path, "image")

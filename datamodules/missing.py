"""Missing-modality tables: the MAP-compatible protocol.

Pure functions (no torch, no Lightning) so the protocol can be tested and reused on its own.

Codes: ``0`` complete, ``1`` text missing, ``2`` image missing. For ``N`` samples and rate ``eta``,
``floor(N * eta)`` samples are missing; for ``missing_type="text"`` they all get code 1, for
``"image"`` code 2, and for ``"both"`` ``floor(missing * both_ratio)`` of them get 2 and the rest 1.
No sample ever loses both modalities.

Determinism: every draw is a function of ``(seed, dataset, split, missing_type, missing_rate)`` and
the *set* of sample ids only. Samples are ranked by a keyed BLAKE2b hash of their id, so the table
does not depend on the order in which a reader lists the ids, on the number of DataLoader workers, on
the world size or rank, on Python's per-process ``hash()`` salt, or on NumPy's random streams.

Persistence: ``<name>.csv`` (header ``id,code``, one row per sample id) plus ``<name>.json`` (the
parameters, counts and a digest of the ids). :func:`load_or_create_missing_table` reloads a table
when present and validates it against the current ids and parameters, raising
:class:`MissingTableError` on any mismatch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np

# The codes are part of the batch contract; importable from here too.
from datamodules.batch import CODE_NAMES, COMPLETE, IMAGE_MISSING, TEXT_MISSING  # noqa: F401

MISSING_TYPES = ("text", "image", "both")
MissingType = Literal["text", "image", "both"]
TABLE_FORMAT_VERSION = 1


class MissingConfig(TypedDict, total=False):
    """A split's missing setting as written in YAML or on the command line (every key optional).

    A plain dict at run time (so it is stored as such in checkpoint hyperparameters); validated by
    :meth:`MissingSetting.from_config`.

    Attributes:
        missing_rate: eta in [0, 1]: the share of samples that lose one modality (default 0).
        missing_type: Which modality the missing samples lose: text, image or both (default both).
        both_ratio: For both: the share of the missing samples that lose the image (default 0.5).
        dynamic: Train only: re-draw the table every epoch from (missing_seed, epoch) (default false).
    """

    missing_rate: float
    missing_type: MissingType
    both_ratio: float
    dynamic: bool


class MissingTableError(ValueError):
    """A persisted missing table does not fit the current data or parameters."""


@dataclass(frozen=True)
class MissingSetting:
    """Missing-modality setting of one split.

    Attributes:
        missing_rate: Fraction eta in [0, 1] of samples that lose one modality.
        missing_type: ``"text"``, ``"image"`` or ``"both"`` (which modality the missing samples lose).
        both_ratio: For ``"both"``: fraction in [0, 1] of the missing samples that lose the image.
        dynamic: Train split only: re-draw the table every epoch from ``(seed, epoch)`` instead of
            using the persisted table (train-time dynamic modality dropout).
    """

    missing_rate: float = 0.0
    missing_type: str = "both"
    both_ratio: float = 0.5
    dynamic: bool = False

    @classmethod
    def from_config(cls, value: Mapping | None, option: str) -> MissingSetting:
        """Build and validate a setting from a YAML/CLI mapping; errors name ``option``.

        ``None`` means the default (eta = 0: complete). Unknown keys are errors, so a typo such as
        ``missing_ratio`` cannot silently fall back to the default.
        """
        if value is None:
            return cls()
        if isinstance(value, MissingSetting):
            value = asdict(value)
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{option} must be a mapping with keys missing_rate, missing_type, both_ratio, dynamic; "
                f"got {type(value).__name__} {value!r}"
            )
        allowed = {"missing_rate", "missing_type", "both_ratio", "dynamic"}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"{option} has unknown key(s) {unknown}; expected a subset of {sorted(allowed)}")
        rate = value.get("missing_rate", 0.0)
        mtype = value.get("missing_type", "both")
        both_ratio = value.get("both_ratio", 0.5)
        dynamic = value.get("dynamic", False)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"{option}.missing_rate must be a number in [0, 1], got {rate!r}")
        if mtype not in MISSING_TYPES:
            raise ValueError(f"{option}.missing_type must be one of {list(MISSING_TYPES)}, got {mtype!r}")
        if (
            isinstance(both_ratio, bool)
            or not isinstance(both_ratio, (int, float))
            or not 0.0 <= float(both_ratio) <= 1.0
        ):
            raise ValueError(f"{option}.both_ratio must be a number in [0, 1], got {both_ratio!r}")
        if not isinstance(dynamic, bool):
            raise ValueError(f"{option}.dynamic must be true or false, got {dynamic!r}")
        return cls(float(rate), str(mtype), float(both_ratio), dynamic)

    def as_dict(self) -> dict:
        return asdict(self)


def standard_missing_setting(
    name: str, missing_rate: float = 0.7, missing_type: str = "both", both_ratio: float = 0.5
) -> dict[str, dict]:
    """DataModule keyword arguments for MAP's two standard settings.

    ``"complete_training"``: train eta = 0, val/test eta = ``missing_rate``.
    ``"missing_training"``: train, val and test all at ``missing_rate`` with the same type.
    """
    test = {"missing_rate": missing_rate, "missing_type": missing_type, "both_ratio": both_ratio}
    if name == "complete_training":
        train = {"missing_rate": 0.0, "missing_type": missing_type, "both_ratio": both_ratio}
    elif name == "missing_training":
        train = dict(test)
    else:
        raise ValueError(f"standard setting must be 'complete_training' or 'missing_training', got {name!r}")
    return {"train_missing": train, "val_missing": dict(test), "test_missing": dict(test)}


def derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any printable parts (independent of PYTHONHASHSEED and platform)."""
    text = json.dumps([_normalise(p) for p in parts], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _normalise(part: object) -> object:
    # 0.7 and 0.70000000001 would name different tables; rates are compared at 1e-9 precision.
    if isinstance(part, float):
        return f"{part:.9f}"
    return str(part)


def rank_by_hash(ids: Sequence[str], key: int) -> np.ndarray:
    """Indices of ``ids`` sorted by a keyed hash of each id (ties broken by the id itself)."""
    key_bytes = key.to_bytes(8, "big")
    hashes = [hashlib.blake2b(i.encode("utf-8"), digest_size=8, key=key_bytes).digest() for i in ids]
    return np.array(sorted(range(len(ids)), key=lambda k: (hashes[k], ids[k])), dtype=np.int64)


def table_seed(seed: int, dataset: str, split: str, missing_type: str, missing_rate: float) -> int:
    """The seed of one table, derived from (seed, dataset, split, missing type, missing rate)."""
    return derive_seed("missing-table", int(seed), dataset, split, missing_type, float(missing_rate))


def missing_counts(num_samples: int, missing_rate: float, missing_type: str, both_ratio: float = 0.5) -> dict:
    """Exact counts the protocol prescribes: ``{"complete", "text_missing", "image_missing"}``."""
    n_missing = math.floor(num_samples * missing_rate + 1e-9)
    if missing_type == "text":
        n_image, n_text = 0, n_missing
    elif missing_type == "image":
        n_image, n_text = n_missing, 0
    elif missing_type == "both":
        n_image = math.floor(n_missing * both_ratio + 1e-9)
        n_text = n_missing - n_image
    else:
        raise ValueError(f"missing_type must be one of {list(MISSING_TYPES)}, got {missing_type!r}")
    return {"complete": num_samples - n_missing, "text_missing": n_text, "image_missing": n_image}


def sample_missing_table(
    ids: Sequence[str],
    missing_rate: float,
    missing_type: str,
    both_ratio: float = 0.5,
    seed: int = 0,
    dataset: str = "",
    split: str = "",
    epoch: int | None = None,
) -> np.ndarray:
    """Draw the per-sample codes (int8, aligned with ``ids``) of one split.

    Args:
        ids: Unique sample ids of the split (any order; the result is aligned with it).
        missing_rate: eta in [0, 1].
        missing_type: ``"text"``, ``"image"`` or ``"both"``.
        both_ratio: For ``"both"``, the fraction of missing samples that lose the image.
        seed: The user's ``missing_seed``.
        dataset: Dataset name, part of the derived seed.
        split: Split name, part of the derived seed.
        epoch: ``None`` for the persisted (static) table; an epoch number for the per-epoch table of
            dynamic modality dropout, drawn from ``(seed, epoch)`` with the same exact counts.

    The floor products use a 1e-9 guard so that e.g. 1000 * 0.7 (= 699.999...) gives 700, as the
    protocol intends.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"sample ids must be unique to draw a missing table; {dup!r} appears more than once")
    setting = MissingSetting.from_config(
        {"missing_rate": missing_rate, "missing_type": missing_type, "both_ratio": both_ratio},
        "missing setting",
    )
    counts = missing_counts(len(ids), setting.missing_rate, setting.missing_type, setting.both_ratio)
    codes = np.zeros(len(ids), dtype=np.int8)
    n_missing = counts["text_missing"] + counts["image_missing"]
    if n_missing == 0:
        return codes
    base = table_seed(seed, dataset, split, setting.missing_type, setting.missing_rate)
    if epoch is not None:
        base = derive_seed("dynamic-epoch", base, int(epoch))
    missing = rank_by_hash(ids, base)[:n_missing]
    if setting.missing_type == "text":
        codes[missing] = TEXT_MISSING
    elif setting.missing_type == "image":
        codes[missing] = IMAGE_MISSING
    else:
        codes[missing] = TEXT_MISSING
        # A second, independent ranking picks which of the missing samples lose the image.
        among = rank_by_hash([ids[k] for k in missing], derive_seed("image-among-missing", base))
        codes[missing[among[: counts["image_missing"]]]] = IMAGE_MISSING
    return codes


def table_file_stem(dataset: str, split: str, setting: MissingSetting, seed: int) -> str:
    """File name (without extension) of a persisted table, e.g. ``emoji_test_both_0.7_b0.5_seed0``."""
    stem = f"{dataset}_{split}_{setting.missing_type}_{setting.missing_rate:g}"
    if setting.missing_type == "both":
        stem += f"_b{setting.both_ratio:g}"
    return f"{stem}_seed{seed}"


def ids_digest(ids: Iterable[str]) -> str:
    """SHA-256 of the sorted ids, stored in the sidecar to detect a changed id set quickly."""
    h = hashlib.sha256()
    for i in sorted(str(x) for x in ids):
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    # Several ranks may build the same table at once: each writes a private temp file and renames it,
    # so a reader sees either no file or a complete one (the content is identical on every rank).
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_missing_table(
    csv_path: str | os.PathLike,
    ids: Sequence[str],
    codes: np.ndarray,
    *,
    dataset: str,
    split: str,
    setting: MissingSetting,
    seed: int,
) -> None:
    """Write ``<csv_path>`` (``id,code`` rows) and its JSON sidecar (sidecar first, then the CSV)."""
    csv_path = Path(csv_path)
    counts = {CODE_NAMES[c]: int((np.asarray(codes) == c).sum()) for c in CODE_NAMES}
    meta = {
        "format_version": TABLE_FORMAT_VERSION,
        "dataset": dataset,
        "split": split,
        "missing_rate": setting.missing_rate,
        "missing_type": setting.missing_type,
        "both_ratio": setting.both_ratio,
        "seed": int(seed),
        "num_samples": len(ids),
        "counts": counts,
        "ids_sha256": ids_digest(ids),
        "codes": {str(k): v for k, v in CODE_NAMES.items()},
    }
    _atomic_write(csv_path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "code"])
    writer.writerows((str(i), int(c)) for i, c in zip(ids, codes, strict=True))
    _atomic_write(csv_path, buf.getvalue())


def read_missing_table(csv_path: str | os.PathLike) -> tuple[dict[str, int], dict]:
    """Read a persisted table: ``({id: code}, sidecar parameters)``; format errors name the file."""
    csv_path = Path(csv_path)
    meta_path = csv_path.with_suffix(".json")
    if not meta_path.exists():
        raise MissingTableError(
            f"missing table {csv_path} has no parameter sidecar {meta_path.name}; delete the CSV to redraw it"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MissingTableError(f"missing table sidecar {meta_path} is not valid JSON: {exc}") from exc
    table: dict[str, int] = {}
    with open(csv_path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["id", "code"]:
            raise MissingTableError(f"missing table {csv_path}: expected header 'id,code', got {header!r}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) != 2 or row[1] not in ("0", "1", "2"):
                raise MissingTableError(
                    f"missing table {csv_path} line {line_no}: expected '<id>,<code in 0/1/2>', got {row!r}"
                )
            if row[0] in table:
                raise MissingTableError(
                    f"missing table {csv_path} line {line_no}: id {row[0]!r} appears twice"
                )
            table[row[0]] = int(row[1])
    return table, meta


def load_or_create_missing_table(
    csv_path: str | os.PathLike | None,
    ids: Sequence[str],
    *,
    dataset: str,
    split: str,
    setting: MissingSetting,
    seed: int,
    write: bool = True,
) -> np.ndarray:
    """Codes aligned with ``ids``: reloaded from ``csv_path`` when it exists, else drawn (and saved).

    A reloaded table must have been drawn with the same parameters and hold exactly the current ids
    with the protocol's counts; otherwise :class:`MissingTableError` explains what differs and how
    to fix it. ``csv_path=None`` draws without persisting.
    """
    ids = [str(i) for i in ids]
    if csv_path is not None and Path(csv_path).exists():
        table, meta = read_missing_table(csv_path)
        _validate_loaded(
            Path(csv_path), table, meta, ids, dataset=dataset, split=split, setting=setting, seed=seed
        )
        return np.array([table[i] for i in ids], dtype=np.int8)
    codes = sample_missing_table(
        ids,
        setting.missing_rate,
        setting.missing_type,
        setting.both_ratio,
        seed=seed,
        dataset=dataset,
        split=split,
    )
    if csv_path is not None and write:
        save_missing_table(csv_path, ids, codes, dataset=dataset, split=split, setting=setting, seed=seed)
    return codes


def _validate_loaded(
    path: Path, table: dict[str, int], meta: dict, ids: list[str], *, dataset, split, setting, seed
) -> None:
    fix = (
        f"Delete {path} and {path.with_suffix('.json').name} to redraw it, or set missing_table_dir "
        "elsewhere."
    )
    expected = {
        "dataset": dataset,
        "split": split,
        "missing_type": setting.missing_type,
        "missing_rate": setting.missing_rate,
        "both_ratio": setting.both_ratio,
        "seed": int(seed),
    }
    for key, want in expected.items():
        got = meta.get(key)
        if key == "both_ratio" and setting.missing_type != "both":
            continue
        same = (
            isinstance(got, (int, float)) and abs(float(got) - float(want)) < 1e-9
            if isinstance(want, float)
            else got == want
        )
        if not same:
            raise MissingTableError(
                f"missing table {path} was drawn with {key}={got!r}, but {key}={want!r} is requested. {fix}"
            )
    current = set(ids)
    stored = set(table)
    if current != stored:
        only_table = sorted(stored - current)
        only_data = sorted(current - stored)
        raise MissingTableError(
            f"missing table {path} is stale: it holds {len(stored)} ids, the {dataset} {split} split has "
            f"{len(current)}; {len(only_table)} table ids are not in the data (e.g. {only_table[:3]}), "
            f"{len(only_data)} data ids are not in the table (e.g. {only_data[:3]}). {fix}"
        )
    want_counts = missing_counts(len(ids), setting.missing_rate, setting.missing_type, setting.both_ratio)
    codes = np.fromiter(table.values(), dtype=np.int8, count=len(table))
    got_counts = {CODE_NAMES[c]: int((codes == c).sum()) for c in CODE_NAMES}
    if got_counts != want_counts:
        raise MissingTableError(
            f"missing table {path} has counts {got_counts}, but the protocol for {setting.missing_type} at "
            f"rate {setting.missing_rate} over {len(ids)} samples gives {want_counts}. {fix}"
        )

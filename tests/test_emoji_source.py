"""Emoji data: fetching, integrity, safe extraction, join, split, reading; synthetic tarballs (no network).

Tests marked by ``prepared_emoji_cache`` use the real cached data and skip when it is not prepared.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import datamodules.emoji_source as es

# ------------------------------------------------------------------------------- synthetic packages

MESSAGES = {
    "groups": [
        {"key": "smileys-emotion", "message": "smileys & emotion", "order": 0},
        {"key": "people-body", "message": "people & body", "order": 1},
        {"key": "component", "message": "components", "order": 2},
        {"key": "symbols", "message": "symbols", "order": 8},
    ],
    "subgroups": [
        {"key": "face-smiling", "message": "smiling", "order": 0},
        {"key": "hand-fingers-open", "message": "hand fingers open", "order": 1},
        {"key": "skin-tone", "message": "skin tone", "order": 2},
        {"key": "keycap", "message": "keycap", "order": 3},
    ],
    "skinTones": [],
}
ENTRIES = [
    {"label": "regional indicator A", "hexcode": "1F1E6", "type": 1, "version": 0},  # no group
    {"label": "grinning face", "hexcode": "1F600", "group": 0, "subgroup": 0},
    {
        "label": "waving hand",
        "hexcode": "1F44B",
        "group": 1,
        "subgroup": 1,
        "skins": [
            {"label": "waving hand: light skin tone", "hexcode": "1F44B-1F3FB", "group": 1, "subgroup": 1}
        ],
    },
    {"label": "light skin tone", "hexcode": "1F3FB", "group": 2, "subgroup": 2},  # component
    {"label": "keycap: #", "hexcode": "0023-FE0F-20E3", "group": 8, "subgroup": 3},  # FE0F in both names
    {"label": "distorted face", "hexcode": "1FAEA", "group": 0, "subgroup": 0},  # no PNG
]
PNG_STEMS = ["1f600", "1f44b", "1f44b-1f3fb", "1f3fb", "0023-fe0f-20e3", "1f1e6"]


def _png_bytes(size: int = 4) -> bytes:
    image = Image.new("RGBA", (size, size), (0, 0, 255, 255))  # opaque blue ...
    image.putpixel((0, 0), (255, 0, 0, 0))  # ... with one fully transparent red pixel
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _images_tarball(path: Path, extra=None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, "package/package.json", b"{}")
        for stem in PNG_STEMS:
            _add(archive, f"package/img/google/64/{stem}.png", _png_bytes())
            _add(archive, f"package/img/google/32/{stem}.png", _png_bytes(2))  # other sizes: not extracted
        _add(archive, "package/img/google/64/../../../../../escaped.png", _png_bytes())  # traversal attempt
        if extra is not None:
            extra(archive)
    return path


def _text_tarball(path: Path, entries=ENTRIES) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, "package/en/data.json", json.dumps(entries).encode())
        _add(archive, "package/en/messages.json", json.dumps(MESSAGES).encode())
        _add(archive, "package/fr/data.json", b"[]")  # other locales: not extracted
    return path


def _pin(package: es.NpmPackage, tarball: Path) -> es.NpmPackage:
    data = tarball.read_bytes()
    return es.NpmPackage(
        name=package.name,
        version=package.version,
        integrity="sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode(),
        shasum=hashlib.sha1(data).hexdigest(),
    )


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """Synthetic tarballs pinned as the two packages; returns (cache_dir, {name: tarball in a source dir})."""
    source = tmp_path / "source"
    source.mkdir()
    images = _images_tarball(source / es.IMAGES_PACKAGE.filename)
    text = _text_tarball(source / es.TEXT_PACKAGE.filename)
    images_pkg, text_pkg = _pin(es.IMAGES_PACKAGE, images), _pin(es.TEXT_PACKAGE, text)
    monkeypatch.setattr(es, "IMAGES_PACKAGE", images_pkg)
    monkeypatch.setattr(es, "TEXT_PACKAGE", text_pkg)
    monkeypatch.setattr(es, "PACKAGES", (images_pkg, text_pkg))
    cache = tmp_path / "cache"
    return cache, {images_pkg.name: images, text_pkg.name: text}


def _place(cache: Path, tarballs: dict[str, Path]) -> None:
    folder = cache / "emoji"
    folder.mkdir(parents=True, exist_ok=True)
    for tarball in tarballs.values():
        (folder / tarball.name).write_bytes(tarball.read_bytes())


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


# --------------------------------------------------------------------------------------- prepare


def test_prepare_from_placed_tarballs_without_npm(synthetic, monkeypatch):
    cache, tarballs = synthetic
    _place(cache, tarballs)
    monkeypatch.setattr(es.shutil, "which", lambda name: None)  # tarballs present: npm is not needed

    es.prepare_emoji(cache)
    items = es.load_emoji_items(cache)

    assert [(i.id, i.text, i.group, i.subgroup) for i in items] == [
        ("1F600", "grinning face", "smileys-emotion", "face-smiling"),
        ("1F44B", "waving hand", "people-body", "hand-fingers-open"),
        ("0023-FE0F-20E3", "keycap: #", "symbols", "keycap"),
    ]
    assert items[2].image_path.name == "0023-fe0f-20e3.png"  # joined with FE0F removed on both sides
    assert all(i.split in es.SPLITS for i in items)
    report = es.emoji_report(cache)
    assert (report.entries, report.items) == (6, 3)
    assert report.without_group == ["1F1E6"]
    assert report.dropped_group == ["1F3FB"]
    assert report.without_image == [("1FAEA", "distorted face")]
    assert es.emoji_label_names("group", cache) == ["people-body", "smileys-emotion", "symbols"]

    extracted = es.extracted_dir(cache)
    pngs = sorted(p.name for p in (extracted / es.PNG_DIR).iterdir())
    assert pngs == sorted(f"{s}.png" for s in PNG_STEMS)
    assert not list(cache.rglob("escaped.png")) and not list(cache.parent.rglob("escaped.png"))
    assert not (extracted / "emojibase-data" / "fr").exists()
    assert not (extracted / "emoji-datasource-google" / "img" / "google" / "32").exists()


def test_load_emoji_image_composites_on_white(synthetic):
    cache, tarballs = synthetic
    _place(cache, tarballs)
    es.prepare_emoji(cache)
    image = es.load_emoji_image(es.load_emoji_items(cache)[0].image_path)
    assert image.mode == "RGB" and image.size == (4, 4)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent pixel -> white, not red or black
    assert image.getpixel((1, 1)) == (0, 0, 255)


def test_prepare_is_idempotent_and_keeps_the_saved_split(synthetic):
    cache, tarballs = synthetic
    _place(cache, tarballs)
    es.prepare_emoji(cache)
    split_file = es.split_csv_path(cache)
    first = split_file.read_bytes()
    es.prepare_emoji(cache)
    assert split_file.read_bytes() == first
    assert _leftovers(cache / "emoji") == []


def test_load_before_prepare_says_how_to_prepare(tmp_path):
    with pytest.raises(es.EmojiAssetsError, match="python -m datamodules.emoji_source"):
        es.load_emoji_items(tmp_path)


def test_missing_npm_error_says_how_to_get_the_tarballs_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(es.shutil, "which", lambda name: None)
    with pytest.raises(es.EmojiAssetsError) as info:
        es.prepare_emoji(tmp_path)
    message = str(info.value)
    folder = tmp_path / "emoji"
    for package in ("emoji-datasource-google@16.0.0", "emojibase-data@17.0.0"):
        assert f"npm pack {package}" in message
    assert str(folder / "emoji-datasource-google-16.0.0.tgz") in message
    assert str(folder / "emojibase-data-17.0.0.tgz") in message
    assert "https://registry.npmjs.org/emojibase-data/-/emojibase-data-17.0.0.tgz" in message


def _fake_npm(tarballs: dict[str, Path], calls: list, interrupt: bool = False, exit_code: int = 0):
    def run(command, cwd=None, **kwargs):
        calls.append((command, cwd))
        name = command[2].rsplit("@", 1)[0]
        destination = Path(command[command.index("--pack-destination") + 1])
        data = tarballs[name].read_bytes()
        if interrupt:  # half the bytes are on disk when the user presses Ctrl-C
            (destination / tarballs[name].name).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        if exit_code:
            return subprocess.CompletedProcess(command, exit_code, "", "npm error code E404")
        (destination / tarballs[name].name).write_bytes(data)
        package = es.IMAGES_PACKAGE if name == es.IMAGES_PACKAGE.name else es.TEXT_PACKAGE
        stdout = json.dumps([{"integrity": package.integrity, "shasum": package.shasum}])
        return subprocess.CompletedProcess(command, 0, stdout, "")

    return run


def test_fetch_with_npm_runs_in_a_temp_dir_and_moves_the_checked_tarball(synthetic, monkeypatch):
    cache, tarballs = synthetic
    calls = []
    monkeypatch.setattr(es.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(es.subprocess, "run", _fake_npm(tarballs, calls))

    es.prepare_emoji(cache)

    folder = cache / "emoji"
    assert [c[0][:3] for c in calls] == [
        ["/usr/bin/npm", "pack", f"{es.IMAGES_PACKAGE.name}@16.0.0"],
        ["/usr/bin/npm", "pack", f"{es.TEXT_PACKAGE.name}@17.0.0"],
    ]
    for command, cwd in calls:
        assert cwd == command[command.index("--pack-destination") + 1]  # npm runs in the temp dir
        assert Path(cwd).parent == folder and not Path(cwd).exists()  # ... which is gone afterwards
    for tarball in tarballs.values():
        assert (folder / tarball.name).read_bytes() == tarball.read_bytes()
    assert len(es.load_emoji_items(cache)) == 3
    assert _leftovers(folder) == []


def test_interrupted_fetch_leaves_nothing_half_written(synthetic, monkeypatch):
    cache, tarballs = synthetic
    monkeypatch.setattr(es.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(es.subprocess, "run", _fake_npm(tarballs, [], interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        es.prepare_emoji(cache)
    folder = cache / "emoji"
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no tarball, no temp, no extracted dir


def test_failed_npm_reports_output_and_manual_route(synthetic, monkeypatch):
    cache, tarballs = synthetic
    monkeypatch.setattr(es.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(es.subprocess, "run", _fake_npm(tarballs, [], exit_code=1))
    with pytest.raises(es.EmojiAssetsError, match="E404") as info:
        es.prepare_emoji(cache)
    assert str(cache / "emoji" / es.IMAGES_PACKAGE.filename) in str(info.value)
    assert sorted(p.name for p in (cache / "emoji").iterdir()) == [".lock"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_or_truncated_tarball_is_named(synthetic, damage):
    cache, tarballs = synthetic
    _place(cache, tarballs)
    bad = cache / "emoji" / es.TEXT_PACKAGE.filename
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    bad.write_bytes(bytes(data))
    with pytest.raises(es.EmojiAssetsError) as info:
        es.prepare_emoji(cache)
    assert str(bad) in str(info.value) and "Delete" in str(info.value)
    assert not es.extracted_dir(cache).exists()


def test_interrupted_extraction_leaves_no_extracted_folder(synthetic, monkeypatch):
    cache, tarballs = synthetic
    _place(cache, tarballs)

    def extract_then_fail(tarballs, out_dir):
        (out_dir / "partial.png").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(es, "extract_tarballs", extract_then_fail)
    with pytest.raises(KeyboardInterrupt):
        es.prepare_emoji(cache)
    assert not es.extracted_dir(cache).exists()
    assert _leftovers(cache / "emoji") == []


def test_link_members_are_refused(synthetic, monkeypatch):
    cache, tarballs = synthetic

    def add_symlink(archive):
        info = tarfile.TarInfo("package/img/google/64/1f60a.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)

    images = _images_tarball(tarballs[es.IMAGES_PACKAGE.name], extra=add_symlink)
    pinned = _pin(es.IMAGES_PACKAGE, images)
    monkeypatch.setattr(es, "IMAGES_PACKAGE", pinned)
    monkeypatch.setattr(es, "PACKAGES", (pinned, es.TEXT_PACKAGE))
    _place(cache, tarballs)
    with pytest.raises(es.EmojiAssetsError, match="1f60a.png' is not a regular file"):
        es.prepare_emoji(cache)
    assert not es.extracted_dir(cache).exists()


def test_damaged_extracted_files_are_named(synthetic):
    cache, tarballs = synthetic
    _place(cache, tarballs)
    es.prepare_emoji(cache)
    png = es.extracted_dir(cache) / es.PNG_DIR / "1f600.png"
    data = bytearray(png.read_bytes())
    data[-5] ^= 0xFF  # same size, different content: found by the sha256 check of prepare
    png.write_bytes(bytes(data))
    with pytest.raises(es.EmojiAssetsError, match="1f600.png is corrupted") as info:
        es.prepare_emoji(cache)
    assert "Delete the folder" in str(info.value)

    data_json = es.extracted_dir(cache) / es.DATA_JSON
    data_json.write_bytes(data_json.read_bytes()[:10])  # truncated: found by the size check of load
    with pytest.raises(es.EmojiAssetsError, match="data.json is missing or truncated"):
        es.load_emoji_items(cache)


def test_unreadable_image_error_names_file_and_remedy(tmp_path):
    folder = tmp_path / "emoji" / "extracted-1-2" / "x"
    folder.mkdir(parents=True)
    png = folder / "1f600.png"
    png.write_bytes(_png_bytes()[:30])
    with pytest.raises(es.EmojiAssetsError) as info:
        es.load_emoji_image(png)
    assert str(png) in str(info.value) and f"Delete {folder.parent}" in str(info.value)


# ------------------------------------------------------------------------------------- join, split


def test_normalize_hexcode():
    assert es.normalize_hexcode("0023-fe0f-20e3") == "0023-20E3"
    assert es.normalize_hexcode("1F636-200D-1F32B-FE0F") == "1F636-200D-1F32B"
    assert es.normalize_hexcode("1f600") == "1F600"


def test_join_rejects_bad_entries():
    stems = ["1f600"]
    with pytest.raises(es.EmojiAssetsError, match="entry 1F600 has an empty 'label'"):
        es.join_entries([{"label": " ", "hexcode": "1F600", "group": 0, "subgroup": 0}], MESSAGES, stems)
    with pytest.raises(es.EmojiAssetsError, match="not listed in messages.json"):
        es.join_entries([{"label": "x", "hexcode": "1F600", "group": 5, "subgroup": 0}], MESSAGES, stems)
    duplicate = [{"label": "a", "hexcode": h, "group": 0, "subgroup": 0} for h in ("1F600", "1F600-FE0F")]
    with pytest.raises(es.EmojiAssetsError, match="same join key 1F600"):
        es.join_entries(duplicate, MESSAGES, stems)


def _records(groups: dict[str, dict[str, int]]) -> list[dict]:
    return [
        {"id": f"{g}-{s}-{i}", "group": g, "subgroup": s}
        for g, subgroups in groups.items()
        for s, n in subgroups.items()
        for i in range(n)
    ]


def test_split_is_deterministic_stratified_and_spread_over_subgroups():
    records = _records({"a": {"a1": 40, "a2": 13, "a3": 7}, "b": {"b1": 30, "b2": 10}})
    first, again = es.stratified_split(records, seed=0), es.stratified_split(list(reversed(records)), seed=0)
    assert first == again  # independent of input order
    assert es.stratified_split(records, seed=1) != first
    counts = Counter((r["group"], first[r["id"]]) for r in records)
    assert [counts[("a", s)] for s in es.SPLITS] == [42, 6, 12]  # exactly 70/10/20 of 60
    assert [counts[("b", s)] for s in es.SPLITS] == [28, 4, 8]
    by_subgroup = Counter((r["subgroup"], first[r["id"]]) for r in records)
    for subgroup in ("a1", "a2", "b1", "b2"):  # subgroups with >= 10 items get every split
        assert by_subgroup[(subgroup, "val")] >= 1 and by_subgroup[(subgroup, "test")] >= 2


def test_saved_split_is_validated_against_the_items(tmp_path):
    records = _records({"a": {"a1": 12}, "b": {"b1": 10}})
    path = tmp_path / "split.csv"
    es.write_split_csv(path, records, es.stratified_split(records))
    assert es.read_split_csv(path, records) == es.stratified_split(records)

    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(es.EmojiAssetsError, match="lacks 1 item"):
        es.read_split_csv(path, records)
    path.write_text("\n".join(lines + ["zz,a,a1,train"]) + "\n")
    with pytest.raises(es.EmojiAssetsError, match=r"line 24: id 'zz' is not an emoji item"):
        es.read_split_csv(path, records)
    path.write_text("\n".join(lines).replace("a-a1-0,a,a1", "a-a1-0,b,a1") + "\n")
    with pytest.raises(es.EmojiAssetsError, match="line 2: id a-a1-0 has group/subgroup b/a1") as info:
        es.read_split_csv(path, records)
    assert str(path) in str(info.value) and "Delete" in str(info.value)


# ----------------------------------------------------------------------------------- real data


def test_real_emoji_data_counts(prepared_emoji_cache):
    items = es.load_emoji_items(prepared_emoji_cache)
    groups = Counter(i.group for i in items)
    assert len(items) == 1906 and len(groups) == 9
    assert max(groups.values()) == groups["people-body"] == 386
    assert min(groups.values()) == groups["activities"] == 85
    assert "component" not in groups
    assert len({i.id for i in items}) == 1906 and all(i.text for i in items)
    assert es.emoji_label_names("group", prepared_emoji_cache) == sorted(groups)
    subgroups = es.emoji_label_names("subgroup", prepared_emoji_cache)
    assert len(subgroups) == 58 and subgroups == sorted(subgroups)
    subgroup_items = es.load_emoji_items(prepared_emoji_cache, label="subgroup")
    assert len(subgroup_items) == 1656 and {i.subgroup for i in subgroup_items} == set(subgroups)


def test_real_split_is_reproducible_and_stratified(prepared_emoji_cache):
    items = es.load_emoji_items(prepared_emoji_cache)
    records = [{"id": i.id, "group": i.group, "subgroup": i.subgroup} for i in items]
    recomputed = es.stratified_split(records, seed=es.DEFAULT_SPLIT_SEED)
    assert {i.id: i.split for i in items} == recomputed == es.stratified_split(records, es.DEFAULT_SPLIT_SEED)
    assert [i.split for i in es.load_emoji_items(prepared_emoji_cache)] == [i.split for i in items]
    sizes = Counter(i.group for i in items)
    per_group = Counter((i.group, i.split) for i in items)
    for group, size in sizes.items():
        for split, share in zip(es.SPLITS, es.SPLIT_FRACTIONS, strict=True):
            assert abs(per_group[(group, split)] - share * size) <= 1, (group, split)


def test_every_real_image_opens_as_64px_rgb(prepared_emoji_cache):
    for item in es.load_emoji_items(prepared_emoji_cache):
        image = es.load_emoji_image(item.image_path)
        assert image.mode == "RGB" and image.size == (64, 64), item

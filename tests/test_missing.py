"""The missing-modality protocol on the pure functions of datamodules.missing and datamodules.batch."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from datamodules.batch import case_counts, filler_inputs, presence_from_codes
from datamodules.missing import (
    COMPLETE,
    IMAGE_MISSING,
    TEXT_MISSING,
    MissingSetting,
    MissingTableError,
    load_or_create_missing_table,
    missing_counts,
    read_missing_table,
    sample_missing_table,
    standard_missing_setting,
    table_file_stem,
)

IDS_1000 = [f"item{i:05d}" for i in range(1000)]


def counts(codes: np.ndarray) -> tuple[int, int, int]:
    """(text-missing, image-missing, complete)"""
    return (
        int((codes == TEXT_MISSING).sum()),
        int((codes == IMAGE_MISSING).sum()),
        int((codes == COMPLETE).sum()),
    )


@pytest.mark.parametrize(
    "missing_type, expected",
    [("both", (350, 350, 300)), ("text", (700, 0, 300)), ("image", (0, 700, 300))],
)
def test_counts_at_70_percent(missing_type, expected):
    codes = sample_missing_table(IDS_1000, 0.7, missing_type, seed=0, dataset="d", split="test")
    assert counts(codes) == expected
    assert codes.dtype == np.int8 and len(codes) == 1000


@pytest.mark.parametrize("missing_type", ["both", "text", "image"])
def test_rate_zero_is_complete(missing_type):
    assert counts(sample_missing_table(IDS_1000, 0.0, missing_type)) == (0, 0, 1000)


@pytest.mark.parametrize(
    "missing_type, expected", [("both", (500, 500, 0)), ("text", (1000, 0, 0)), ("image", (0, 1000, 0))]
)
def test_rate_one_misses_one_modality_everywhere(missing_type, expected):
    assert counts(sample_missing_table(IDS_1000, 1.0, missing_type)) == expected


def test_both_ratio_and_floor_rounding():
    # 7 ids at 0.5: floor(3.5) = 3 missing; both_ratio 0.5: floor(1.5) = 1 image-missing, 2 text.
    assert counts(sample_missing_table([str(i) for i in range(7)], 0.5, "both")) == (2, 1, 4)
    # 700 missing, both_ratio 0.3: floor(210) image-missing.
    assert counts(sample_missing_table(IDS_1000, 0.7, "both", both_ratio=0.3)) == (490, 210, 300)
    assert missing_counts(1000, 0.7, "both", 0.3) == {
        "complete": 300,
        "text_missing": 490,
        "image_missing": 210,
    }


def test_same_inputs_same_table_and_any_changed_part_changes_it():
    base = dict(missing_rate=0.7, missing_type="both", seed=3, dataset="food101", split="test")
    a = sample_missing_table(IDS_1000, **base)
    assert np.array_equal(a, sample_missing_table(IDS_1000, **base))
    for change in ({"seed": 4}, {"dataset": "mmimdb"}, {"split": "val"}, {"missing_rate": 0.71}):
        b = sample_missing_table(IDS_1000, **{**base, **change})
        assert not np.array_equal(a, b), change


def test_table_does_not_depend_on_id_order():
    shuffled = list(IDS_1000)
    random.Random(1).shuffle(shuffled)
    a = dict(zip(IDS_1000, sample_missing_table(IDS_1000, 0.7, "both", seed=0).tolist(), strict=True))
    b = dict(zip(shuffled, sample_missing_table(shuffled, 0.7, "both", seed=0).tolist(), strict=True))
    assert a == b


def test_golden_table_pins_the_algorithm():
    # Persisted tables and published splits rely on this exact draw; a change must be deliberate.
    ids = [f"s{i:04d}" for i in range(100)]
    codes = sample_missing_table(ids, 0.5, "both", seed=0, dataset="golden", split="test")
    assert "".join(map(str, codes.tolist())) == (
        "0121020011000122012011020022000010000102222110002120100121020220100100022001010200200111002100100220"
    )


def test_table_is_independent_of_python_hash_seed():
    code = (
        "from datamodules.missing import sample_missing_table;"
        "print(''.join(map(str, sample_missing_table([f'x{i}' for i in range(200)], 0.7, 'both', "
        "seed=5).tolist())))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": "."},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and len(outs.pop().strip()) == 200


def test_dynamic_epoch_tables_redraw_with_exact_counts():
    tables = [sample_missing_table(IDS_1000, 0.7, "both", seed=0, epoch=e) for e in range(3)]
    for t in tables:
        assert counts(t) == (350, 350, 300)
    assert not np.array_equal(tables[0], tables[1]) and not np.array_equal(tables[1], tables[2])
    assert np.array_equal(tables[2], sample_missing_table(IDS_1000, 0.7, "both", seed=0, epoch=2))
    assert not np.array_equal(tables[0], sample_missing_table(IDS_1000, 0.7, "both", seed=0))


def test_duplicate_ids_are_rejected():
    with pytest.raises(ValueError, match="'a' appears more than once"):
        sample_missing_table(["a", "b", "a"], 0.5, "both")


@pytest.mark.parametrize(
    "value, message",
    [
        ({"missing_rate": 1.5}, r"train_missing\.missing_rate must be a number in \[0, 1\], got 1\.5"),
        ({"missing_rate": -0.1}, r"train_missing\.missing_rate"),
        ({"missing_rate": True}, r"train_missing\.missing_rate"),
        (
            {"missing_type": "audio"},
            r"train_missing\.missing_type must be one of \['text', 'image', 'both'\]",
        ),
        ({"both_ratio": 2}, r"train_missing\.both_ratio"),
        ({"missing_ratio": 0.7}, r"train_missing has unknown key\(s\) \['missing_ratio'\]"),
        ({"dynamic": "yes"}, r"train_missing\.dynamic"),
        (0.7, r"train_missing must be a mapping"),
    ],
)
def test_setting_validation_names_the_option(value, message):
    with pytest.raises(ValueError, match=message):
        MissingSetting.from_config(value, "train_missing")


def test_setting_defaults_and_standard_settings():
    assert MissingSetting.from_config(None, "x") == MissingSetting(0.0, "both", 0.5, False)
    complete = standard_missing_setting("complete_training", 0.7, "text")
    assert complete["train_missing"]["missing_rate"] == 0.0
    assert (
        complete["test_missing"]
        == complete["val_missing"]
        == {"missing_rate": 0.7, "missing_type": "text", "both_ratio": 0.5}
    )
    missing = standard_missing_setting("missing_training")
    assert missing["train_missing"] == missing["test_missing"]
    with pytest.raises(ValueError, match="complete_training"):
        standard_missing_setting("half_training")


def _table(tmp_path, ids, setting=MissingSetting(0.7, "both"), split="test", seed=0):
    path = tmp_path / (table_file_stem("toy", split, setting, seed) + ".csv")
    return path, load_or_create_missing_table(
        path, ids, dataset="toy", split=split, setting=setting, seed=seed
    )


def test_table_is_persisted_with_sidecar_and_reloaded(tmp_path):
    path, codes = _table(tmp_path, IDS_1000)
    assert path.name == "toy_test_both_0.7_b0.5_seed0.csv"
    table, meta = read_missing_table(path)
    assert [table[i] for i in IDS_1000] == codes.tolist()
    assert meta["counts"] == {"complete": 300, "text_missing": 350, "image_missing": 350}
    assert (meta["dataset"], meta["split"], meta["missing_rate"], meta["seed"]) == ("toy", "test", 0.7, 0)
    # A hand-edited but protocol-valid table is what gets used on reload (it is the record).
    i, j = next(k for k in range(1000) if codes[k] == 0), next(k for k in range(1000) if codes[k] == 1)
    lines = path.read_text().splitlines()
    lines[1 + i], lines[1 + j] = f"{IDS_1000[i]},1", f"{IDS_1000[j]},0"
    path.write_text("\n".join(lines) + "\n")
    _, reloaded = _table(tmp_path, IDS_1000)
    assert reloaded[i] == 1 and reloaded[j] == 0


def test_stale_table_with_different_ids_raises_a_clear_error(tmp_path):
    path, _ = _table(tmp_path, IDS_1000)
    changed = IDS_1000[:-1] + ["newcomer"]
    with pytest.raises(MissingTableError) as info:
        _table(tmp_path, changed)
    message = str(info.value)
    assert str(path) in message and "stale" in message
    assert "'item00999'" in message and "'newcomer'" in message and "Delete" in message


def test_table_with_other_parameters_or_broken_content_raises(tmp_path):
    path, _ = _table(tmp_path, IDS_1000)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "seed": 9}))
    with pytest.raises(MissingTableError, match="seed=9, but seed=0 is requested"):
        _table(tmp_path, IDS_1000)
    meta_path.write_text(json.dumps(meta))
    lines = path.read_text().splitlines()
    zero = next(k for k, line in enumerate(lines) if line.endswith(",0"))
    lines[zero] = lines[zero][:-1] + "2"  # one more image-missing than the protocol allows
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MissingTableError, match="has counts .* but the protocol"):
        _table(tmp_path, IDS_1000)
    lines[zero] = lines[zero][:-1] + "7"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MissingTableError, match=rf"line {zero + 1}: expected '<id>,<code in 0/1/2>'"):
        _table(tmp_path, IDS_1000)
    meta_path.unlink()
    with pytest.raises(MissingTableError, match="no parameter sidecar"):
        _table(tmp_path, IDS_1000)


@pytest.mark.parametrize("as_array", [np.asarray, torch.as_tensor])
def test_presence_from_codes_never_leaves_a_sample_without_both(as_array):
    # codes: complete, text dropped, image dropped, text dropped but image unusable, image dropped but
    # text unusable, complete with the image unusable
    codes = as_array(np.array([0, 1, 2, 1, 2, 0], dtype=np.int8))
    image_usable = as_array(np.array([True, True, True, False, True, False]))
    text_usable = as_array(np.array([True, True, True, True, False, True]))
    image, text, overridden = presence_from_codes(codes, image_usable, text_usable)
    assert [bool(v) for v in image] == [True, True, False, False, True, False]
    assert [bool(v) for v in text] == [True, False, True, True, False, True]
    assert [bool(v) for v in overridden] == [False, False, False, True, True, False]
    assert case_counts(image, text) == {"complete": 1, "text_missing": 2, "image_missing": 3}


def test_filler_inputs_are_the_ones_image_and_the_empty_text():
    class Tokenizer:
        def __call__(self, text, **kwargs):
            assert text == ""
            return {"input_ids": [101, 102]}

    filler = filler_inputs(Tokenizer(), (5, 7))
    assert filler["image"].shape == (1, 3, 5, 7) and bool((filler["image"] == 1).all())
    assert filler["input_ids"].tolist() == [[101, 102]] and filler["attention_mask"].tolist() == [[1, 1]]

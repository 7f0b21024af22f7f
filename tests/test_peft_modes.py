"""Exactly the parameters that should train do, per PEFT mode (names and counts), and the demo fraction."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_modules.encoders import sources
from lightning_modules.encoders.image import ImageEncoder
from lightning_modules.encoders.text import TextEncoder
from lightning_modules.peft_modes import count_parameters, trainable_parameter_names

# Tiny encoders: timm test_vit at 32 px (embed 64, 6 blocks, MLP 192, 2x2 patches of 16 px) and
# tiny-bert (hidden 32, 2 layers, intermediate 64, vocabulary 30,522, 512 positions).
# Task prompts: length 2 at depth 2; read-only tokens: 2; LoRA rank 4.
IMAGE_TOTAL = 300_096  # 49,152 + 64 patch embed, 64 cls, 5*64 pos, 6 * 41,728 blocks, 128 final norm
IMAGE_BIASES = 3_968  # 64 patch embed + 6 * (64+192+64+64+192+64) + 64 final norm
IMAGE_LORA = 6_144  # 6 blocks * (A 4x64 + B 192x4) on qkv
TEXT_TOTAL = 1_010_304  # 993,216 embeddings + 2 * 8,544 layers
TEXT_BIASES = 608  # 32 embedding LayerNorm + 2 * (3*32 qkv + 32 + 32 LN + 64 + 32 + 32 LN)
TEXT_LORA = 1_536  # 2 layers * 3 projections * (A 4x32 + B 32x4)
PROMPTS = {"image": 2 * 2 * 64, "text": 2 * 2 * 32}
READONLY = {"image": 2 * 64, "text": 2 * 32}


def _encoder(modality: str, mode: str):
    torch.manual_seed(0)
    if modality == "image":
        backbone = sources.create_image_backbone("test_vit", pretrained=False, img_size=32)
        return ImageEncoder(
            backbone, peft_mode=mode, prompt_length=2, prompt_depth=2, predictor_length=2, lora_rank=4
        )
    backbone = sources.create_text_backbone("tiny-bert")
    return TextEncoder(
        backbone, peft_mode=mode, prompt_length=2, prompt_depth=2, predictor_length=2, lora_rank=4
    )


def _backbone_trainable(encoder) -> list[str]:
    return [name for name in trainable_parameter_names(encoder) if name.startswith("backbone.")]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_prompt_mode_trains_only_prompts(modality):
    encoder = _encoder(modality, "prompt")
    assert trainable_parameter_names(encoder) == ["task_prompts.tokens", "readonly_tokens.tokens"]
    assert count_parameters(encoder, trainable_only=True) == PROMPTS[modality] + READONLY[modality]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_frozen_mode_trains_only_the_readonly_tokens(modality):
    encoder = _encoder(modality, "frozen")
    assert encoder.task_prompts is None
    assert trainable_parameter_names(encoder) == ["readonly_tokens.tokens"]
    assert count_parameters(encoder, trainable_only=True) == READONLY[modality]


@pytest.mark.parametrize("modality, biases", [("image", IMAGE_BIASES), ("text", TEXT_BIASES)])
def test_bitfit_trains_every_bias_and_nothing_else(modality, biases):
    encoder = _encoder(modality, "bitfit")
    trainable = _backbone_trainable(encoder)
    assert trainable and all(name.endswith(".bias") for name in trainable)
    every_bias = [name for name, _ in encoder.named_parameters() if name.endswith(".bias")]
    assert trainable == every_bias
    assert count_parameters(encoder, trainable_only=True) == biases + READONLY[modality]


@pytest.mark.parametrize(
    "modality, adapters, pattern",
    [
        ("image", IMAGE_LORA, r"backbone\.blocks\.\d\.attn\.qkv\.lora_[AB]\.default\.weight"),
        (
            "text",
            TEXT_LORA,
            r"backbone\.encoder\.layer\.\d\.attention\.self\.(query|key|value)\.lora_[AB]\.default\.weight",
        ),
    ],
)
def test_lora_trains_only_the_attention_adapters(modality, adapters, pattern):
    encoder = _encoder(modality, "lora")
    trainable = _backbone_trainable(encoder)
    assert trainable and all(re.fullmatch(pattern, name) for name in trainable), trainable
    num_layers = 6 if modality == "image" else 2
    projections = 1 if modality == "image" else 3
    assert len(trainable) == num_layers * projections * 2
    assert count_parameters(encoder, trainable_only=True) == adapters + READONLY[modality]
    # The adapted projections' own weights stay frozen.
    assert not any(p.requires_grad for n, p in encoder.named_parameters() if "base_layer" in n)


@pytest.mark.parametrize("modality, total", [("image", IMAGE_TOTAL), ("text", TEXT_TOTAL)])
def test_full_mode_trains_everything(modality, total):
    encoder = _encoder(modality, "full")
    assert (
        count_parameters(encoder)
        == count_parameters(encoder, trainable_only=True)
        == total + READONLY[modality]
    )


@pytest.mark.parametrize("mode", ["prompt", "bitfit", "lora", "full", "frozen"])
def test_backward_reaches_exactly_the_trainable_parameters(mode):
    encoder = _encoder("image", mode)
    out = encoder(torch.randn(2, 3, 32, 32))
    (out.embedding.square().sum() + out.readonly.square().sum()).backward()
    for name, param in encoder.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="image_peft: unknown PEFT mode 'adapter'"):
        _encoder("image", "adapter")


def test_prompt_depth_beyond_the_encoder_is_a_clear_error():
    backbone = sources.create_text_backbone("tiny-bert")
    with pytest.raises(ValueError, match=r"prompt_depth must be in \[1, 2\]"):
        TextEncoder(backbone, peft_mode="prompt", prompt_length=2, prompt_depth=3)


def test_demo_encoders_prompt_mode_trainable_fraction():
    """dinov2-s14 + minilm-l6 in the default (prompt) configuration: under 2% of the parameters train.

    The architectures are built randomly initialised (``pretrained=False``): the counts do not depend
    on the weights, and no cached asset is needed.
    """
    from lightning_modules import UnipairSystem

    model = UnipairSystem(
        image_backbone="dinov2-s14", text_backbone="minilm-l6", pretrained=False, img_size=224
    )
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    print(
        f"\nprompt mode, dinov2-s14 + minilm-l6: {trainable:,} of {total:,} parameters train "
        f"({100 * trainable / total:.2f}%)"
    )
    assert trainable / total < 0.02
    # Encoder side: 16 prompts x 6 layers + 8 read-only tokens, 384 wide, per encoder.
    assert count_parameters(model.image_encoder, trainable_only=True) == (16 * 6 + 8) * 384
    assert count_parameters(model.text_encoder, trainable_only=True) == (16 * 6 + 8) * 384

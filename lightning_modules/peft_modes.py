"""Parameter-efficient fine-tuning modes applied to a backbone (which of its parameters train).

Modes:

* ``prompt``: the backbone is frozen; the encoder wrapper adds deep task prompts (``prompts.py``).
* ``bitfit``: only bias terms of the backbone train (all of them, LayerNorm biases included).
* ``lora``: low-rank adapters injected by ``peft`` into the attention projections; only those train.
* ``full``: every backbone parameter trains.
* ``frozen``: nothing in the backbone trains.
"""

from __future__ import annotations

from torch import nn

PEFT_MODES: tuple[str, ...] = ("prompt", "bitfit", "lora", "full", "frozen")

# Attention projections that LoRA adapts: timm ViTs have a fused qkv Linear, BERT-family models
# in transformers have separate query/key/value Linears.
IMAGE_LORA_TARGETS: tuple[str, ...] = ("qkv",)
TEXT_LORA_TARGETS: tuple[str, ...] = ("query", "key", "value")


def check_peft_mode(mode: str, what: str) -> str:
    """Return ``mode`` or raise a clear error naming the option ``what``."""
    if mode not in PEFT_MODES:
        raise ValueError(f"{what}: unknown PEFT mode {mode!r}; expected one of {list(PEFT_MODES)}")
    return mode


def apply_peft_mode(
    backbone: nn.Module,
    mode: str,
    lora_targets: tuple[str, ...] = (),
    lora_rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
) -> nn.Module:
    """Set ``requires_grad`` on ``backbone`` for ``mode`` (injecting LoRA adapters in place for ``lora``).

    Returns the backbone (the same object: ``peft.inject_adapter_in_model`` edits it in place, so the
    wrapper's own layer-by-layer forward runs through the adapted Linears).
    """
    check_peft_mode(mode, "peft mode")
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
        config = LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(lora_targets)
        )
        backbone = inject_adapter_in_model(config, backbone)
    for name, param in backbone.named_parameters():
        if mode == "full":
            param.requires_grad_(True)
        elif mode == "bitfit":
            param.requires_grad_(name.endswith("bias"))
        elif mode == "lora":
            param.requires_grad_("lora_" in name)
        else:  # prompt, frozen: the backbone itself does not train
            param.requires_grad_(False)
    return backbone


def trainable_parameter_names(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that require gradients."""
    return [name for name, param in module.named_parameters() if param.requires_grad]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only trainable ones if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

"""Optimiser of ``UnipairSystem``: AdamW parameter groups and the warm-up + decay schedule.

Groups: ``encoder`` (the encoders' PEFT parameters, learning rate ``lr``) and ``head`` (fusion head,
predictor MLPs, read-only tokens, learned missing embeddings: ``head_lr``), each split into a part
with weight decay and a ``_no_decay`` part. No decay on what is not a weight matrix: biases and norm
weights (1-D), the ViT's position embedding and class/register tokens (timm's ``no_weight_decay()``,
which matters in ``full`` mode, where they train) and the text encoder's position and token-type
embeddings (``nn.Embedding`` weights, 2-D).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

LRSchedule = Literal["linear", "cosine", "constant"]
LR_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")
HEAD_PREFIXES: tuple[str, ...] = (
    "head.",
    "missing_fill.",
    "image_to_text.",
    "text_to_image.",
    "image_encoder.readonly_tokens.",
    "text_encoder.readonly_tokens.",
)
# nn.Embedding tables that encode positions / segments rather than vocabulary (BERT's naming).
NO_DECAY_EMBEDDINGS: tuple[str, ...] = ("position_embeddings", "token_type_embeddings")
# Devices with torch's fused AdamW kernel (benchmarks.bench times it against for-loop and foreach).
FUSED_ADAMW_DEVICES: tuple[str, ...] = ("cpu", "cuda")


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Parameter names (as in ``module.named_parameters()``) that get no weight decay, besides 1-D ones."""
    names: set[str] = set()
    for prefix, submodule in module.named_modules():
        dotted = f"{prefix}." if prefix else ""
        no_decay = getattr(submodule, "no_weight_decay", None)
        if callable(no_decay):  # timm models name theirs (pos_embed, cls_token, reg_token, ...)
            names.update(dotted + name for name in no_decay())
        if isinstance(submodule, nn.Embedding) and prefix.rsplit(".", 1)[-1] in NO_DECAY_EMBEDDINGS:
            names.add(dotted + "weight")
    return names


def parameter_groups(
    module: nn.Module, lr: float, head_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``module``'s trainable parameters (see the module docstring).

    Each group has ``params``, ``lr``, ``weight_decay`` and a ``name``
    (``encoder``, ``encoder_no_decay``, ``head``, ``head_no_decay``; empty groups are left out).
    """
    head_lr = lr if head_lr is None else head_lr
    exempt = no_weight_decay_names(module)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if name.startswith(HEAD_PREFIXES) else "encoder"
        decay = param.ndim >= 2 and name not in exempt
        groups.setdefault((part, decay), []).append(param)
    return [
        {
            "params": params,
            "lr": head_lr if part == "head" else lr,
            "weight_decay": weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: LRSchedule, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then ``schedule`` until ``total_steps``."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    raise ValueError(f"lr_schedule: unknown schedule {schedule!r}; expected one of {list(LR_SCHEDULES)}")


def can_fuse_adamw(
    module: nn.Module, precision: str = "32-true", gradient_clip_val: float | None = None
) -> bool:
    """Whether AdamW's fused kernel can serve ``module``'s trainable parameters in this Trainer setting.

    Every trainable parameter must be floating point on a device of ``FUSED_ADAMW_DEVICES``. Under
    Lightning's mixed precision (``16-mixed``, ``bf16-mixed``) a fused optimiser unscales gradients in
    its own step, and Lightning then refuses gradient clipping: no fusing with both.
    """
    if "mixed" in str(precision) and gradient_clip_val:
        return False
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(
        p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params
    )


def configure_adamw(
    module: nn.Module,
    lr: float,
    head_lr: float | None,
    weight_decay: float,
    warmup_fraction: float,
    schedule: LRSchedule,
    total_steps: int,
    fused: bool = False,
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: AdamW over :func:`parameter_groups`, scheduler per step.

    ``fused``: AdamW's fused kernel (check :func:`can_fuse_adamw` first); False leaves torch's default
    implementation (foreach on CUDA, the for-loop on CPU).
    """
    groups = parameter_groups(module, lr, head_lr, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True if fused else None)
    total_steps = max(1, int(total_steps))
    scheduler = lr_scheduler(optimizer, schedule, int(warmup_fraction * total_steps), total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

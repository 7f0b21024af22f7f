"""Image encoder: a timm VisionTransformer run block by block with deep task prompts and read-only tokens.

The forward reproduces ``VisionTransformer.forward_features`` + ``forward_head(pre_logits=True)``
(patch embedding, position embedding, blocks, final norm, pooling, fc_norm) and inserts tokens after
the original ones::

    [ CLS (+ register tokens) | patches | task prompts (P) | read-only tokens (R) ]

Positions do not matter inside a ViT once the position embedding is added, so appending is as good
as VPT's "after CLS". With read-only tokens each block runs through
``readonly_attention.run_layer`` (the block's own modules, two fused-attention calls, no mask);
without them, as timm's block itself.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.peft_modes import IMAGE_LORA_TARGETS, apply_peft_mode, check_peft_mode
from lightning_modules.prompts import EncoderOutput, PromptedEncoder, build_prompt_modules
from lightning_modules.readonly_attention import (
    ReadonlyGrad,
    VitBlockAttention,
    check_readonly_grad,
    module_call,
    run_layer,
)

IMAGE_POOLINGS: tuple[str, ...] = ("cls", "mean")


class ImageEncoder(PromptedEncoder):
    """A timm ViT adapted by one PEFT mode, with optional read-only predictor tokens.

    Args:
        backbone: a timm ``VisionTransformer`` (e.g. from ``sources.create_image_backbone``). Its
            classifier is removed (it would be an unused parameter).
        peft_mode: one of ``peft_modes.PEFT_MODES``.
        prompt_length: task prompt tokens per layer (``prompt`` mode only).
        prompt_depth: number of first layers that receive fresh task prompts (``prompt`` mode only).
        predictor_length: read-only tokens (0 = none).
        pooling: ``cls`` (the CLS token after the final norm) or ``mean`` (mean of the patch tokens);
            None = the backbone's own ``global_pool`` (``token`` -> cls, ``avg`` -> mean).
        lora_rank, lora_alpha, lora_dropout: LoRA settings (``lora`` mode only), on ``qkv``.
        readonly_grad: ``through`` or ``detach`` (see ``readonly_attention``): whether a loss on the
            read-only outputs may reach what computes the embedding.
    """

    def __init__(
        self,
        backbone: nn.Module,
        peft_mode: str = "prompt",
        prompt_length: int = 16,
        prompt_depth: int = 6,
        predictor_length: int = 8,
        pooling: str | None = None,
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        readonly_grad: ReadonlyGrad = "detach",
    ) -> None:
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "fc_norm", "num_prefix_tokens"):
            if not hasattr(backbone, attr):
                raise TypeError(
                    f"image backbone {type(backbone).__name__} lacks '{attr}': expected a timm "
                    "VisionTransformer"
                )
        if getattr(backbone, "attn_pool", None) is not None:
            raise ValueError(
                "image backbone uses attention pooling (global_pool='map'), which is not supported"
            )
        check_peft_mode(peft_mode, "image_peft")
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        if pooling is None:
            pool_by_timm = {"token": "cls", "avg": "mean"}
            if backbone.global_pool not in pool_by_timm:
                raise ValueError(
                    f"image backbone has global_pool={backbone.global_pool!r}; set image_pooling to one of "
                    f"{IMAGE_POOLINGS}"
                )
            pooling = pool_by_timm[backbone.global_pool]
        if pooling not in IMAGE_POOLINGS:
            raise ValueError(
                f"image_pooling: unknown pooling {pooling!r}; expected one of {list(IMAGE_POOLINGS)}"
            )
        if pooling == "cls" and backbone.num_prefix_tokens < 1:
            raise ValueError("image_pooling 'cls' needs a backbone with a class token")
        self.backbone = apply_peft_mode(
            backbone,
            peft_mode,
            IMAGE_LORA_TARGETS,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
        )
        self.peft_mode = peft_mode
        self.pooling = pooling
        self.readonly_grad = check_readonly_grad(readonly_grad)
        self.embed_dim = int(backbone.embed_dim)
        self.num_layers = len(backbone.blocks)
        self.task_prompts, self.readonly_tokens = build_prompt_modules(
            peft_mode,
            prompt_length,
            prompt_depth,
            predictor_length,
            self.embed_dim,
            self.num_layers,
            "image encoder",
        )
        for block in self.backbone.blocks:
            VitBlockAttention(block)  # fails early on blocks the read-only attention cannot take apart

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """Encode ``images`` ``[B, 3, H, W]`` into the embedding ``[B, D]`` and the read-only features
        ``[B, D]``.
        """
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        x = bb.norm_pre(x)
        batch_size, num_original = x.shape[0], x.shape[1]
        num_prompts, num_readonly = self.num_prompt_tokens, self.num_readonly_tokens
        prompt_end = num_original + num_prompts

        for index, block in enumerate(bb.blocks):
            if index == 0:
                # Read-only tokens enter once, at the input: nothing reads them, so tokens written at a
                # later layer would discard (and leave without gradient) the earlier ones.
                pieces = [x]
                if num_prompts:
                    pieces.append(self.task_prompts.layer_tokens(0, batch_size, x.dtype))
                if num_readonly:
                    pieces.append(self.readonly_tokens.layer_tokens(0, batch_size, x.dtype))
                x = torch.cat(pieces, dim=1) if len(pieces) > 1 else x
            elif num_prompts and self.task_prompts.has_layer(index):
                # Fresh prompts overwrite the previous layer's prompt outputs in place of a slice; the
                # other layers take the sequence as it is (re-slicing and re-concatenating it copied the
                # activations and made backward build a zero-filled full-size gradient per slice).
                prompts = self.task_prompts.layer_tokens(index, batch_size, x.dtype)
                x = torch.slice_scatter(x, prompts, dim=1, start=num_original, end=prompt_end)
            if num_readonly:
                x = run_layer(VitBlockAttention(block), x, num_readonly, readonly_grad=self.readonly_grad)
            else:
                x = block(x)
        readonly_out = x[:, prompt_end:]
        x = bb.norm(x[:, :prompt_end])
        if self.pooling == "cls":
            embedding = x[:, 0]
        else:
            embedding = x[:, bb.num_prefix_tokens : num_original].mean(dim=1)
        embedding = bb.fc_norm(embedding)
        readonly_features = None
        if num_readonly:
            readonly_out = module_call(bb.norm, self.readonly_grad == "detach", readonly_out)
            readonly_features = readonly_out.mean(dim=1)
        return EncoderOutput(embedding, readonly_features)

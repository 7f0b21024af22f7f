"""Text encoder: a transformers BERT-family model run layer by layer with deep task prompts and read-only
tokens.

The forward reproduces ``BertModel.forward`` (embeddings, then ``encoder.layer``) and lays tokens out as::

    [ CLS | task prompts (P) | words, SEP, padding | read-only tokens (R) ]

Task prompts go right after [CLS] (the position embeddings are already added, so they carry no
position). Every layer runs through ``readonly_attention.run_layer`` (the layer's own modules and
PyTorch's fused attention, whatever attention implementation the backbone was loaded with): padding
keys are blocked for everyone, and the original tokens attend to the original tokens only.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.peft_modes import TEXT_LORA_TARGETS, apply_peft_mode, check_peft_mode
from lightning_modules.prompts import EncoderOutput, PromptedEncoder, build_prompt_modules
from lightning_modules.readonly_attention import (
    BertLayerAttention,
    ReadonlyGrad,
    check_readonly_grad,
    run_layer,
)

TEXT_POOLINGS: tuple[str, ...] = ("cls", "mean")


class TextEncoder(PromptedEncoder):
    """A BERT-like transformers model adapted by one PEFT mode, with optional read-only predictor tokens.

    Args:
        backbone: a transformers ``BertModel``-like model with ``embeddings`` and ``encoder.layer``
            (e.g. from ``sources.create_text_backbone``). Its pooler is removed (unused: pooling is
            done here).
        peft_mode: one of ``peft_modes.PEFT_MODES``.
        prompt_length: task prompt tokens per layer (``prompt`` mode only).
        prompt_depth: number of first layers that receive fresh task prompts (``prompt`` mode only).
        predictor_length: read-only tokens (0 = none).
        pooling: ``cls`` (the [CLS] output) or ``mean`` (mean over the real text tokens: [CLS], words
            and [SEP], without padding, prompts or read-only tokens). None is not accepted here: the
            system resolves the default with ``sources.default_text_pooling``.
        lora_rank, lora_alpha, lora_dropout: LoRA settings (``lora`` mode only), on query/key/value.
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
        pooling: str = "cls",
        lora_rank: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        readonly_grad: ReadonlyGrad = "detach",
    ) -> None:
        super().__init__()
        if not hasattr(backbone, "embeddings") or not hasattr(getattr(backbone, "encoder", None), "layer"):
            raise TypeError(
                f"text backbone {type(backbone).__name__} lacks 'embeddings'/'encoder.layer': expected a "
                "BERT-like transformers model"
            )
        check_peft_mode(peft_mode, "text_peft")
        if pooling not in TEXT_POOLINGS:
            raise ValueError(
                f"text_pooling: unknown pooling {pooling!r}; expected one of {list(TEXT_POOLINGS)}"
            )
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None
        self.backbone = apply_peft_mode(
            backbone,
            peft_mode,
            TEXT_LORA_TARGETS,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
        )
        self.peft_mode = peft_mode
        self.pooling = pooling
        self.readonly_grad = check_readonly_grad(readonly_grad)
        self.embed_dim = int(backbone.config.hidden_size)
        self.num_layers = len(backbone.encoder.layer)
        self.task_prompts, self.readonly_tokens = build_prompt_modules(
            peft_mode,
            prompt_length,
            prompt_depth,
            predictor_length,
            self.embed_dim,
            self.num_layers,
            "text encoder",
        )
        for layer in self.backbone.encoder.layer:
            BertLayerAttention(layer)  # fails early on layers the read-only attention cannot take apart

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        """Encode token ids ``[B, L]`` (with ``attention_mask`` ``[B, L]``, 1 = real token) into ``[B, D]``
        twice.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        hidden = self.backbone.embeddings(input_ids=input_ids)
        batch_size, length = input_ids.shape
        num_prompts, num_readonly = self.num_prompt_tokens, self.num_readonly_tokens
        words_start = 1 + num_prompts  # first position after CLS and the prompts
        words_end = words_start + length - 1
        total = words_end + num_readonly

        valid = attention_mask.bool()
        key_valid = torch.ones(batch_size, total, dtype=torch.bool, device=hidden.device)
        key_valid[:, 0] = valid[:, 0]
        key_valid[:, words_start:words_end] = valid[:, 1:]
        if bool(valid.all()):
            key_valid = None  # no padding: unmasked attention (the fastest kernels)

        x = hidden
        for index, layer in enumerate(self.backbone.encoder.layer):
            if index == 0:
                pieces = [x[:, :1]]
                if num_prompts:
                    pieces.append(self.task_prompts.layer_tokens(0, batch_size, x.dtype))
                pieces.append(x[:, 1:])
                if num_readonly:
                    pieces.append(self.readonly_tokens.layer_tokens(0, batch_size, x.dtype))
                x = torch.cat(pieces, dim=1) if len(pieces) > 1 else x
            elif num_prompts and self.task_prompts.has_layer(index):
                # Fresh prompts overwrite the previous layer's prompt outputs; other layers take the
                # sequence as it is (no re-slicing and re-concatenating of the whole sequence).
                prompts = self.task_prompts.layer_tokens(index, batch_size, x.dtype)
                x = torch.slice_scatter(x, prompts, dim=1, start=1, end=words_start)
            x = run_layer(BertLayerAttention(layer), x, num_readonly, key_valid, self.readonly_grad)

        if self.pooling == "cls":
            embedding = x[:, 0]
        else:
            original = torch.cat([x[:, :1], x[:, words_start:words_end]], dim=1)
            weights = valid.to(original.dtype).unsqueeze(-1)
            embedding = (original * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        readonly_features = x[:, words_end:].mean(dim=1) if num_readonly else None
        return EncoderOutput(embedding, readonly_features)

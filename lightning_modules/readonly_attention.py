"""Read-only attention without an arbitrary mask: two fused-attention calls per layer.

The token sequence of a layer is ``[ original tokens (n) | read-only tokens (R) ]``. The original
tokens (CLS, patches / words, task prompts) attend to the original tokens only, the read-only tokens
to every token. Instead of one attention call with a ``[T, T]`` boolean mask (which rules out the
flash / memory-efficient kernels and, handed to a library block, depends on how that library treats
boolean masks), each layer runs

* ``sdpa(q_orig, k_orig, v_orig)``: unmasked (the text side keeps its key-padding mask), so the
  original tokens' outputs are exactly what they would be without read-only tokens;
* ``sdpa(q_ro, k_all, v_all)``: the read-only queries over every key.

Both calls share the layer's own q/k/v projection (one matmul over the whole sequence).

``readonly_grad`` says what the prediction loss may change through the read-only tokens:

* ``through``: the read-only queries read the original keys / values as they are, so a loss on the
  read-only outputs reaches the task prompts (and trainable encoder weights) that produced them;
* ``detach``: they read *detached* keys / values of the original tokens, and where the layer itself
  has trainable parameters (BitFit biases, LoRA, full fine-tuning) the read-only tokens' own
  per-token computations use detached copies of them. No loss on the read-only outputs can then move
  anything that computes the encoder's own embedding z; it trains the read-only tokens only.

The per-layer adapters below (:class:`VitBlockAttention`, :class:`BertLayerAttention`) expose one
layer's pieces (projections, post-attention, feed-forward) so :func:`run_layer` serves both encoders.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ReadonlyGrad = Literal["through", "detach"]
READONLY_GRADS: tuple[str, ...] = ("through", "detach")


def check_readonly_grad(value: str) -> ReadonlyGrad:
    """Return ``value`` or raise a clear error naming the option."""
    if value not in READONLY_GRADS:
        raise ValueError(f"readonly_grad: unknown value {value!r}; expected one of {list(READONLY_GRADS)}")
    return value  # type: ignore[return-value]


def module_call(module: nn.Module, detached: bool, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)``; when ``detached``, with detached copies of its trainable parameters (the
    result still carries gradients to ``args``, none to the parameters)."""
    if not detached:
        return module(*args)
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    if not params:
        return module(*args)
    return functional_call(module, params, args)


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def split_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_readonly: int,
    key_valid: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    detach_original: bool = False,
) -> torch.Tensor:
    """Attention over ``[B, H, T, d]`` heads whose last ``num_readonly`` positions are read-only.

    Args:
        q, k, v: queries, keys, values ``[B, H, T, d]``.
        num_readonly: R, the read-only positions at the end of the sequence (0 = plain attention).
        key_valid: optional bool ``[B, T]``, False at keys nobody may attend to (text padding).
        dropout_p: attention dropout probability (training only: pass 0 in eval).
        detach_original: the read-only queries read detached original keys / values.

    Returns:
        ``[B, H, T, d]``: the original rows attended to the original keys only, the read-only rows
        to every key.
    """
    if num_readonly == 0:
        mask = None if key_valid is None else key_valid[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    n = q.shape[2] - num_readonly
    original, readonly = pair_attention(
        *(t[:, :, :n] for t in (q, k, v)),
        *(t[:, :, n:] for t in (q, k, v)),
        key_valid,
        dropout_p,
        detach_original,
    )
    return torch.cat([original, readonly], dim=2)


def pair_attention(
    q_orig: torch.Tensor,
    k_orig: torch.Tensor,
    v_orig: torch.Tensor,
    q_ro: torch.Tensor,
    k_ro: torch.Tensor,
    v_ro: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    detach_original: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_attention` on the original (``n``) and read-only (``R``) heads held apart.

    Returns the original rows ``[B, H, n, d]`` and the read-only rows ``[B, H, R, d]``.
    """
    n = q_orig.shape[2]
    mask_orig = None if key_valid is None else key_valid[:, None, None, :n]
    mask_all = None if key_valid is None else key_valid[:, None, None, :]
    original = F.scaled_dot_product_attention(
        q_orig, k_orig, v_orig, attn_mask=mask_orig, dropout_p=dropout_p
    )
    if detach_original:
        k_orig, v_orig = k_orig.detach(), v_orig.detach()
    readonly = F.scaled_dot_product_attention(
        q_ro,
        torch.cat([k_orig, k_ro], dim=2),
        torch.cat([v_orig, v_ro], dim=2),
        attn_mask=mask_all,
        dropout_p=dropout_p,
    )
    return original, readonly


class LayerAttention:
    """One transformer layer taken apart for :func:`run_layer` (subclasses wrap a library layer)."""

    layer: nn.Module

    def pre_attention(self, x: torch.Tensor, detached: bool) -> torch.Tensor:
        """What the q/k/v projections read (pre-norm layers normalise here)."""
        raise NotImplementedError

    def project(self, h: torch.Tensor, detached: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h`` ``[B, T, C]`` -> q, k, v ``[B, H, T, d]``."""
        raise NotImplementedError

    def post_attention(self, context: torch.Tensor, x: torch.Tensor, detached: bool) -> torch.Tensor:
        """Attention output ``[B, T, H*d]`` and the layer input -> the input of the feed-forward part."""
        raise NotImplementedError

    def feed_forward(self, x: torch.Tensor, detached: bool) -> torch.Tensor:
        """The feed-forward part, residual included."""
        raise NotImplementedError

    def dropout_p(self) -> float:
        raise NotImplementedError


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


class VitBlockAttention(LayerAttention):
    """A timm ``vision_transformer.Block`` (pre-norm; q/k norms, scale norm and layer scale supported)."""

    def __init__(self, block: nn.Module) -> None:
        attn = block.attn
        if getattr(attn, "gate", None) is not None:
            raise ValueError(
                "image backbone: gated attention blocks are not supported by the read-only attention"
            )
        self.layer = block

    def pre_attention(self, x: torch.Tensor, detached: bool) -> torch.Tensor:
        return module_call(self.layer.norm1, detached, x)

    def project(self, h: torch.Tensor, detached: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.layer.attn
        batch, length, _ = h.shape
        qkv = module_call(attn.qkv, detached, h).reshape(batch, length, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return module_call(attn.q_norm, detached, q), module_call(attn.k_norm, detached, k), v

    def post_attention(self, context: torch.Tensor, x: torch.Tensor, detached: bool) -> torch.Tensor:
        block, attn = self.layer, self.layer.attn
        out = module_call(attn.proj, detached, module_call(attn.norm, detached, context))
        return x + block.drop_path1(module_call(block.ls1, detached, attn.proj_drop(out)))

    def feed_forward(self, x: torch.Tensor, detached: bool) -> torch.Tensor:
        block = self.layer
        out = module_call(block.mlp, detached, module_call(block.norm2, detached, x))
        return x + block.drop_path2(module_call(block.ls2, detached, out))

    def dropout_p(self) -> float:
        return self.layer.attn.attn_drop.p


class BertLayerAttention(LayerAttention):
    """A transformers ``BertLayer``-like layer (post-norm: ``attention.output`` and ``output`` hold the
    norms).
    """

    def __init__(self, layer: nn.Module) -> None:
        self_attention = layer.attention.self
        kind = getattr(self_attention, "position_embedding_type", "absolute")
        if kind not in (None, "absolute"):
            raise ValueError(
                f"text backbone: position_embedding_type {kind!r} is not supported (absolute only)"
            )
        self.layer = layer
        self.num_heads = int(self_attention.num_attention_heads)

    def pre_attention(self, x: torch.Tensor, detached: bool) -> torch.Tensor:
        return x

    def project(self, h: torch.Tensor, detached: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.layer.attention.self
        return tuple(
            _heads(module_call(proj, detached, h), self.num_heads)
            for proj in (attn.query, attn.key, attn.value)
        )

    def post_attention(self, context: torch.Tensor, x: torch.Tensor, detached: bool) -> torch.Tensor:
        return module_call(self.layer.attention.output, detached, context, x)

    def feed_forward(self, x: torch.Tensor, detached: bool) -> torch.Tensor:
        layer = self.layer
        return module_call(layer.output, detached, module_call(layer.intermediate, detached, x), x)

    def dropout_p(self) -> float:
        return self.layer.attention.self.dropout.p


def run_layer(
    adapter: LayerAttention,
    x: torch.Tensor,
    num_readonly: int,
    key_valid: torch.Tensor | None = None,
    readonly_grad: ReadonlyGrad = "through",
) -> torch.Tensor:
    """One layer over ``x`` ``[B, T, C]`` whose last ``num_readonly`` tokens are read-only.

    Per-token parts run once over the whole sequence, except under ``detach`` in a layer with
    trainable parameters, where the original and read-only rows run the whole layer apart (split
    once, joined once: slicing the rows at every step costs more than the layer's matmuls on CPU),
    the read-only rows with detached parameters.
    """
    detach = readonly_grad == "detach" and num_readonly > 0
    dropout_p = adapter.dropout_p() if adapter.layer.training else 0.0
    if detach and torch.is_grad_enabled() and _has_trainable(adapter.layer):
        n = x.shape[1] - num_readonly
        x_orig, x_ro = x[:, :n], x[:, n:]
        q_o, k_o, v_o = adapter.project(adapter.pre_attention(x_orig, False), False)
        q_r, k_r, v_r = adapter.project(adapter.pre_attention(x_ro, True), True)
        context_orig, context_ro = pair_attention(
            q_o, k_o, v_o, q_r, k_r, v_r, key_valid, dropout_p, detach_original=True
        )
        x_orig = adapter.feed_forward(
            adapter.post_attention(_merge_heads(context_orig), x_orig, False), False
        )
        x_ro = adapter.feed_forward(adapter.post_attention(_merge_heads(context_ro), x_ro, True), True)
        return torch.cat([x_orig, x_ro], dim=1)
    q, k, v = adapter.project(adapter.pre_attention(x, False), False)
    context = split_attention(q, k, v, num_readonly, key_valid, dropout_p, detach_original=detach)
    x = adapter.post_attention(_merge_heads(context), x, False)
    return adapter.feed_forward(x, False)


def _merge_heads(context: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = context.shape
    return context.transpose(1, 2).reshape(batch, length, heads * head_dim)

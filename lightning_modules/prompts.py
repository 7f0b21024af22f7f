"""Deep task prompts, read-only predictor prompts and the attention mask that keeps them read-only.

Token layout used by both encoders (see ``encoders/image.py`` and ``encoders/text.py``)::

    [ original tokens (CLS, patches / words, padding) | task prompts (P) | read-only tokens (R) ]

(the text encoder puts the task prompts right after [CLS] instead). The read-only tokens always
come last: ``readonly_attention.run_layer`` relies on it.

* Task prompts (VPT-deep): ``length`` learnable tokens are written into the sequence at each of the
  first ``depth`` layers, replacing what the previous layer produced at those positions. After
  layer ``depth - 1`` the prompt outputs flow on through the remaining layers. Original tokens
  attend to the task prompts: that is how the prompts adapt the frozen encoder.
* Read-only tokens (the predictor's input): learnable tokens, inserted at the input, that attend to
  every token in every layer, while no other token attends to them (``readonly_attention``). The
  original tokens' outputs are therefore exactly what they would be without them, and one encoder
  pass yields both the modality embedding and the features the predictor maps to the other modality.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class DeepPrompts(nn.Module):
    """``length`` learnable tokens for each of the first ``depth`` layers of an encoder.

    Args:
        depth: number of layers that receive fresh tokens (1 = input layer only, "shallow").
        length: tokens per layer.
        dim: token width (the encoder's hidden size).
        init_std: standard deviation of the truncated-normal initialisation.
    """

    def __init__(self, depth: int, length: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        if depth < 1 or length < 1:
            raise ValueError(
                f"DeepPrompts needs depth >= 1 and length >= 1, got depth={depth}, length={length}"
            )
        self.depth = depth
        self.length = length
        self.tokens = nn.Parameter(torch.empty(depth, length, dim))
        nn.init.trunc_normal_(self.tokens, std=init_std, a=-2 * init_std, b=2 * init_std)

    def has_layer(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` (0-based) receives fresh tokens."""
        return layer_index < self.depth

    def layer_tokens(self, layer_index: int, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The tokens for one layer, expanded to ``[batch_size, length, dim]``."""
        return self.tokens[layer_index].to(dtype).unsqueeze(0).expand(batch_size, -1, -1)


class EncoderOutput(NamedTuple):
    """What one encoder pass yields.

    Attributes:
        embedding: ``[B, D]`` the modality embedding z (pooled original tokens).
        readonly: ``[B, D]`` mean of the read-only tokens' last-layer outputs (the predictor's input),
            or None when the encoder has no read-only tokens.
    """

    embedding: torch.Tensor
    readonly: torch.Tensor | None


def build_prompt_modules(
    peft_mode: str,
    prompt_length: int,
    prompt_depth: int,
    predictor_length: int,
    dim: int,
    num_layers: int,
    what: str,
) -> tuple[DeepPrompts | None, DeepPrompts | None]:
    """Create the task prompts (only in ``prompt`` mode) and the read-only tokens of one encoder.

    Validates lengths and the prompt depth against the encoder's ``num_layers``; ``what`` names the
    encoder in error messages. Read-only tokens enter once, at the input (depth 1): nothing attends
    to them, so fresh tokens at a later layer would only discard the earlier ones.
    """
    task_prompts = None
    if peft_mode == "prompt":
        if prompt_length < 1:
            raise ValueError(f"{what}: peft mode 'prompt' needs prompt_length >= 1, got {prompt_length}")
        if not 1 <= prompt_depth <= num_layers:
            raise ValueError(
                f"{what}: prompt_depth must be in [1, {num_layers}] (the encoder's number of layers), got "
                f"{prompt_depth}"
            )
        task_prompts = DeepPrompts(prompt_depth, prompt_length, dim)
    readonly_tokens = None
    if predictor_length < 0:
        raise ValueError(f"{what}: predictor_length must be >= 0, got {predictor_length}")
    if predictor_length > 0:
        readonly_tokens = DeepPrompts(1, predictor_length, dim)
    return task_prompts, readonly_tokens


class PromptedEncoder(nn.Module):
    """Base of the image and text encoders: the token counts of their task prompts and read-only tokens."""

    task_prompts: DeepPrompts | None
    readonly_tokens: DeepPrompts | None

    @property
    def num_prompt_tokens(self) -> int:
        return self.task_prompts.length if self.task_prompts is not None else 0

    @property
    def num_readonly_tokens(self) -> int:
        return self.readonly_tokens.length if self.readonly_tokens is not None else 0

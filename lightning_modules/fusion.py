"""Late fusion: fill in missing modality embeddings by the configured strategy, then classify."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.strategies import MISSING_STRATEGIES, get_strategy  # noqa: F401  (re-exported)


class FusionHead(nn.Module):
    """h([e_v; e_t]): ``Linear -> LayerNorm -> GELU -> (Dropout) -> Linear`` to ``num_classes`` logits.

    Args:
        image_dim, text_dim: widths of e_v and e_t.
        hidden_dim: hidden width.
        num_classes: number of logits.
        dropout: dropout before the last Linear (0 = none).
    """

    def __init__(
        self, image_dim: int, text_dim: int, hidden_dim: int, num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(image_dim + text_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([image_embedding, text_embedding], dim=-1))


class MissingModalityFill(nn.Module):
    """Choose e_m per sample: z_m where modality m is present, the strategy's stand-in where it is missing.

    * ``predict``: the prediction ẑ_m from the other modality's read-only tokens.
    * ``zero``: a zero vector.
    * ``learned``: a learned "missing" embedding per modality (parameters ``missing_image`` /
      ``missing_text``).
    * ``dummy_input``: z_m itself: the batch already carries the filler input (all-ones image, empty
      text) for a missing modality, so the encoder's output *is* the stand-in.

    Selection uses ``torch.where`` over the whole batch (mask, don't skip), so every parameter takes
    part in every step whatever the missing pattern.

    Args:
        strategy: one of :data:`MISSING_STRATEGIES`.
        image_dim, text_dim: embedding widths.
    """

    def __init__(self, strategy: str, image_dim: int, text_dim: int) -> None:
        super().__init__()
        self.spec = get_strategy(strategy)
        self.strategy = strategy
        if self.spec.learned_stand_in:
            self.missing_image = nn.Parameter(torch.zeros(image_dim))
            self.missing_text = nn.Parameter(torch.zeros(text_dim))
            nn.init.normal_(self.missing_image, std=0.02)
            nn.init.normal_(self.missing_text, std=0.02)

    def _fill(
        self,
        embedding: torch.Tensor,
        prediction: torch.Tensor | None,
        present: torch.Tensor,
        learned: torch.Tensor | None,
    ) -> torch.Tensor:
        present = present.bool().unsqueeze(-1)
        if self.spec.encodes_filler:
            return embedding
        if self.spec.needs_predictor:
            if prediction is None:
                raise ValueError("missing_strategy 'predict' needs predictions: set predictor_length >= 1")
            stand_in = prediction.to(embedding.dtype)
        elif self.strategy == "zero":
            stand_in = torch.zeros_like(embedding)
        else:
            stand_in = learned.to(embedding.dtype).expand_as(embedding)
        return torch.where(present, embedding, stand_in)

    def forward(
        self,
        z_v: torch.Tensor,
        z_t: torch.Tensor,
        zhat_v: torch.Tensor | None,
        zhat_t: torch.Tensor | None,
        image_present: torch.Tensor,
        text_present: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (e_v, e_t)."""
        e_v = self._fill(z_v, zhat_v, image_present, getattr(self, "missing_image", None))
        e_t = self._fill(z_t, zhat_t, text_present, getattr(self, "missing_text", None))
        return e_v, e_t

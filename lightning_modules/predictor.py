"""The predictor head g: read-only token features of one modality -> the other modality's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class PredictorHead(nn.Module):
    """MLP ``Linear -> LayerNorm -> GELU -> Linear`` from ``in_dim`` to ``out_dim`` (dims may differ).

    Args:
        in_dim: width of the source encoder (its read-only token features).
        out_dim: embedding width of the target modality.
        hidden_dim: hidden width; 0 = ``out_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 0) -> None:
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

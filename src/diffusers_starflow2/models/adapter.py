# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The Pretzel's visual adapter: how image latents enter the VLM stream."""

import torch
import torch.nn.functional as F
from torch import nn


class VisualAdapter(nn.Module):
    """``A(x~, t)``: maps latents into the VLM's embedding space (MLP, then LayerNorm modulated by the noise level).

    The output projection is zero-initialised, so before stage 2 latents enter the VLM as zero embeddings.
    """

    def __init__(self, in_channels: int, hidden_size: int, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.film = nn.Linear(cond_dim, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, hidden_size)
        for layer in (self.film, self.proj_out):  # identity modulation, zero output
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # latents: (B, T, C); cond: (B, E) -> (B, T, D)
        scale, shift = self.film(F.silu(cond))[:, None].chunk(2, dim=-1)
        return self.proj_out(self.norm(self.mlp(latents)) * (1 + scale) + shift)

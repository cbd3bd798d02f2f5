# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Normalisation layers of the flow blocks and the FAE: :class:`RMSNorm` and :func:`make_norm`."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with a unit offset (``y = x / rms(x) * (1 + w)``, ``w`` zero-initialised), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1 + self.weight.float())).type_as(x)


def make_norm(norm_type: str, dim: int) -> nn.Module:
    """The pre-norm of a layer of width ``dim``: ``"layer_norm"``, ``"rms_norm"`` (:class:`RMSNorm`) or ``"none"``."""
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim)
    if norm_type == "rms_norm":
        return RMSNorm(dim)
    if norm_type == "none":
        return nn.Identity()
    raise ValueError(f"norm_type must be one of 'layer_norm', 'rms_norm', 'none'; got {norm_type!r}")

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The flow's negative log-likelihood: the one formula the STARFlow and Pretzel losses, the pipelines' likelihoods and
the training logs use.

A flow maps data ``x`` to noise ``z``; with a standard Gaussian prior, per dimension ``D``,
``-log p(x) / D = 1/2 mean(z^2) + 1/2 log(2 pi) - sum_steps mean(log|det|)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

LOG_2PI = math.log(2 * math.pi)


def flow_nll(z: torch.Tensor, logdets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample NLL per dimension without the Gaussian constant: ``1/2 mean(z^2) - sum_blocks mean(logdet)``.

    ``z (B, ...)`` is the data mapped to noise; ``logdets`` one ``(B, ...)`` tensor per flow step (an affine step
    contributes ``-log sigma`` per dimension).  Returns ``(B,)`` float32.
    """
    per_sample = 0.5 * z.float().pow(2).flatten(1).mean(1)
    for logdet in logdets:
        per_sample = per_sample - logdet.reshape(logdet.shape[0], -1).mean(1)
    return per_sample


def bits_per_dim(nll: torch.Tensor) -> torch.Tensor:
    """:func:`flow_nll` (nats/dim, no constant) -> bits/dim of the flow's density."""
    return (nll + 0.5 * LOG_2PI) / math.log(2)

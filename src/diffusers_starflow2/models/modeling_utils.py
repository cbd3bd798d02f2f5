# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""What the autoregressive flow models (:class:`~diffusers_starflow2.StarFlowTransformerModel`,
:class:`~diffusers_starflow2.PretzelModel`) share as diffusers models beyond ``ModelMixin``."""

from __future__ import annotations

from torch import nn


def refuse_group_offload(model: nn.Module) -> None:
    """The ``ValueError`` of ``enable_group_offload()`` on a model whose flow blocks sample autoregressively."""
    raise ValueError(
        f"enable_group_offload() cannot offload {type(model).__name__}: sampling runs its layers once per latent "
        "position through decode steps, not through forward, so the offload hooks would not bring them in (and "
        "would move every weight once per position); use the pipeline's enable_model_cpu_offload(), or offload "
        "only the autoencoder (`pipe.vae.enable_group_offload(...)`) with this model on the device"
    )

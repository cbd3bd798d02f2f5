# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""A complete, randomly initialised tiny STARFlow2 (all five components), built offline for tests and examples."""

from __future__ import annotations

import torch

from ..models.autoencoder_fae import AutoencoderFAE, fae_tiny_config
from ..models.transformer_pretzel import PretzelModel, pretzel_tiny_config
from ..schedulers.scheduling_tarflow import TarFlowScheduler
from ..utils.sequence import VISION_START
from .tiny_vlm import build_tiny_qwen2_5_vl, build_tiny_tokenizer


def build_tiny_starflow2_components(seed: int = 0, perturb: float = 0.05) -> dict:
    """``vlm``, ``tokenizer``, ``transformer``, ``vae``, ``scheduler`` of a tiny STARFlow2.

    ``perturb`` adds N(0, perturb) noise to the zero-initialised Pretzel parameters (skips, adapter, output
    projections) so that every path of the model is exercised; use 0 for the true initialisation.
    """
    tokenizer = build_tiny_tokenizer()
    vlm = build_tiny_qwen2_5_vl(tokenizer, seed=seed)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(seed)
        transformer = PretzelModel(
            **pretzel_tiny_config(
                vlm.config.get_text_config().hidden_size, tokenizer.convert_tokens_to_ids(VISION_START)
            )
        )
        vae = AutoencoderFAE(**fae_tiny_config())
        if perturb:
            with torch.no_grad():
                for p in transformer.parameters():
                    p.add_(torch.randn_like(p) * perturb)
    return dict(
        vlm=vlm.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=TarFlowScheduler(),
    )

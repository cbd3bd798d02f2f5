# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Complete, randomly initialised STARFlow2s (all five components), built offline: a tiny one for tests and examples,
and one at the paper's size for dry runs on the ``meta`` device, memory plans and GPU smoke tests."""

from __future__ import annotations

import torch

from ..models.autoencoder_fae import AutoencoderFAE, fae_tiny_config
from ..models.transformer_pretzel import PretzelModel, pretzel_tiny_config
from ..schedulers.scheduling_tarflow import TarFlowScheduler
from ..utils.sequence import VISION_START
from .tiny_vlm import QWEN2_5_VL_SPECIAL_TOKEN_IDS, build_tiny_qwen2_5_vl, build_tiny_tokenizer


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


def build_paper_starflow2_components(device="meta", dtype: torch.dtype = torch.float32) -> dict:
    """``vlm``, ``tokenizer``, ``transformer``, ``vae``, ``scheduler`` of STARFlow2 at the paper's size: a
    Qwen2.5-VL-7B (:func:`~diffusers_starflow2.models.vlm_stream.qwen2_5_vl_7b_config`), the 3.7B-parameter Pretzel
    of :func:`~diffusers_starflow2.models.transformer_pretzel.pretzel_paper_config` and the DINOv2-g FAE of
    :func:`~diffusers_starflow2.models.autoencoder_fae.fae_paper_config`, built directly on ``device`` in ``dtype``
    with their own (random) initialisation.  On ``meta`` (the default) nothing is allocated: every call runs its
    shapes to the end.  The tokenizer is the tiny byte-level one with its special tokens at Qwen2.5-VL's ids (the
    real vocabulary is not shipped; any id below 152064 has an embedding row)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..models.autoencoder_fae import fae_paper_config
    from ..models.transformer_pretzel import pretzel_paper_config
    from ..models.vlm_stream import qwen2_5_vl_7b_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vlm = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_7b_config())
            transformer = PretzelModel(**pretzel_paper_config())
            vae = AutoencoderFAE(**fae_paper_config())
    finally:
        torch.set_default_dtype(previous)
    return dict(
        vlm=vlm.eval(),
        tokenizer=build_tiny_tokenizer(special_token_ids=QWEN2_5_VL_SPECIAL_TOKEN_IDS),
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=TarFlowScheduler(),
    )

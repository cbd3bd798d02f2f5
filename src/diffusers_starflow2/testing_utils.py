# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Randomly initialised tiny components for tests, examples and the documentation's snippets (built offline).

Nothing in the library imports this module.
"""

from __future__ import annotations

import torch

TINY_T5_WORDS = "a an the photo painting of cat dog bird red blue green small big on in chair tree house sky".split()


def build_tiny_t5_tokenizer(max_length: int):
    """A word-level T5-style tokenizer over :data:`TINY_T5_WORDS`: pad=0, eos=1 appended to every text, unk=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>", *TINY_T5_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_tiny_starflow_components(seed: int = 0) -> dict:
    """``text_encoder``, ``tokenizer``, ``transformer``, ``vae``, ``scheduler`` of a tiny STARFlow v1 (T5 with 2 layers
    of width 32, an SD-style VAE with 8/16 channels, 16-px images, 4x4x4 latents)."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from .models.transformer_starflow import StarFlowTransformerModel, tiny_starflow_config
    from .schedulers.scheduling_tarflow import TarFlowScheduler

    config = tiny_starflow_config()
    tokenizer = build_tiny_t5_tokenizer(config["max_text_length"])
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        )
        transformer = StarFlowTransformerModel(**config)
        for block in transformer.blocks:  # the output projection starts at zero (an identity flow): perturb it
            torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    return dict(
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=TarFlowScheduler.from_preset("starflow"),
    )

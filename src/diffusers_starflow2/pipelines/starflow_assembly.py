# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Assemble a complete :class:`StarFlowPipeline` folder from a converted transformer and local component folders."""

from __future__ import annotations

import os
from typing import Optional, Union

from diffusers import AutoencoderKL
from transformers import AutoTokenizer, T5EncoderModel

from ..models.transformer_starflow import StarFlowTransformerModel
from ..schedulers.scheduling_tarflow import TarFlowScheduler
from ..utils.io import save_pretrained_atomic
from .pipeline_starflow import StarFlowPipeline

PathLike = Union[str, os.PathLike]


def _local_dir(path: PathLike, name: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"`{name}` must be a local folder; {str(path)!r} is not a directory")
    return os.fspath(path)


def build_starflow_pipeline(
    transformer: StarFlowTransformerModel,
    text_encoder_dir: PathLike,
    vae_dir: PathLike,
    tokenizer_dir: Optional[PathLike] = None,
    scheduler: Optional[TarFlowScheduler] = None,
) -> StarFlowPipeline:
    """A ``StarFlowPipeline`` from a converted transformer and LOCAL text-encoder / tokenizer / VAE folders.

    Args:
        transformer: the converted flow.
        text_encoder_dir: a ``transformers`` T5 folder (e.g. a FLAN-T5-XL download; an encoder-decoder checkpoint
            loads its encoder). Its ``d_model`` must equal ``transformer.config.text_dim``.
        vae_dir: a diffusers ``AutoencoderKL`` folder (``config.json`` + weights, e.g. ``sd-vae-ft-ema``) with
            ``latent_channels == transformer.config.in_channels``.
        tokenizer_dir: tokenizer folder (default ``text_encoder_dir``).
        scheduler: default ``TarFlowScheduler.from_preset("starflow")`` (noise level 0.3, one denoising step, constant
            guidance: ml-starflow's sampling).
    """
    text_encoder = T5EncoderModel.from_pretrained(
        _local_dir(text_encoder_dir, "text_encoder_dir"), local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        _local_dir(tokenizer_dir or text_encoder_dir, "tokenizer_dir"), local_files_only=True
    )
    # the text length the flow was trained with: encode_prompt pads to it even in a pipeline holding only the text
    # encoder and tokenizer
    tokenizer.model_max_length = transformer.config.max_text_length
    vae = AutoencoderKL.from_pretrained(_local_dir(vae_dir, "vae_dir"), local_files_only=True)
    if text_encoder.config.d_model != transformer.config.text_dim:
        raise ValueError(
            f"`text_encoder_dir` has d_model {text_encoder.config.d_model}, but the transformer expects "
            f"text_dim {transformer.config.text_dim}"
        )
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(
            f"`vae_dir` has {vae.config.latent_channels} latent channels, but the transformer has "
            f"in_channels {transformer.config.in_channels}"
        )
    return StarFlowPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler or TarFlowScheduler.from_preset("starflow"),
    )


def save_starflow_pipeline(
    transformer: StarFlowTransformerModel,
    text_encoder_dir: PathLike,
    vae_dir: PathLike,
    output_dir: PathLike,
    tokenizer_dir: Optional[PathLike] = None,
    scheduler: Optional[TarFlowScheduler] = None,
    overwrite: bool = False,
) -> str:
    r"""Write a ``StarFlowPipeline.from_pretrained``-loadable folder (see :func:`build_starflow_pipeline`).

    The folder is written next to ``output_dir`` and renamed into place, so ``output_dir`` is never half-written; an
    existing non-empty ``output_dir`` raises ``ValueError`` unless ``overwrite``.

    Example:
        ```py
        >>> save_starflow_pipeline(transformer, "ckpts/flan-t5-xl", "ckpts/sd-vae-ft-ema", "starflow-3b-t2i-256")
        >>> pipe = StarFlowPipeline.from_pretrained("starflow-3b-t2i-256")
        ```
    """
    pipe = build_starflow_pipeline(transformer, text_encoder_dir, vae_dir, tokenizer_dir, scheduler)
    return save_pretrained_atomic(pipe, output_dir, overwrite, name="output_dir")

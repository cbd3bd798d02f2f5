# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Assemble a full StarFlow2Pipeline folder from local parts and STARFlow2 weights in the "original layout".

    python conversion/assemble_starflow2.py --vlm Qwen2.5-VL-7B-Instruct --dinov2 dinov2-giant \
        --weights starflow2.safetensors --config starflow2.json --output starflow2-diffusers \
        [--tokenizer DIR] [--dtype bfloat16] [--overwrite]

Inputs (all local folders / files, nothing is downloaded):

* ``--vlm``: a transformers checkpoint folder of the frozen VLM.  ``model_type == "qwen2_5_vl"`` loads with
  ``Qwen2_5_VLForConditionalGeneration``; other models with ``AutoModelForImageTextToText`` and, failing that,
  ``AutoModelForCausalLM``.  Its tokenizer is read from the same folder unless ``--tokenizer`` is given; it must
  have the Qwen special tokens (``<|vision_start|>`` ...) and a chat template.
* ``--dinov2``: a transformers ``Dinov2Model`` folder; the FAE is built around it with
  ``AutoencoderFAE.from_dinov2_pretrained`` (DINOv2 stays frozen and is not part of ``--weights``).
* ``--config``: JSON ``{"pretzel": {PretzelModel kwargs}, "fae": {AutoencoderFAE kwargs except dinov2_config},
  "scheduler": {TarFlowScheduler kwargs, optional: they override the "starflow2" preset}}``.  ``pretzel.vlm_hidden_size`` and
  ``pretzel.vision_start_token_id`` default to the VLM's width and the tokenizer's ``<|vision_start|>`` id, and
  are checked against them when given.
* ``--weights``: ``.safetensors`` or ``.pth`` (loaded ``weights_only``; ``{"model": ...}`` nesting and ``module.``
  prefixes are unwrapped) holding the trainable STARFlow2 weights.

The original layout (no STARFlow2 checkpoint is public; this is the layout this script defines and expects):

======================================  ==========================================================================
original key                            pipeline parameter
======================================  ==========================================================================
``fae.encoder.*``                       ``vae.encoder.*`` (the single-attention-layer FAE encoder)
``fae.decoder.*``                       ``vae.decoder.*`` (feature decoder)
``fae.pixel_decoder.*``                 ``vae.pixel_decoder.*`` (pixel decoder)
``shallow.{k}.<MetaBlock key>``         ``transformer.shallow.{k}.*`` (k-th visual-only shallow flow)
``deep.<MetaBlock key>``                ``transformer.deep.*`` (the deep TARFlow stream)
``adapter.*``                           ``transformer.adapter.*`` (visual adapter ``A(x~, t)``)
``skip_v.weight`` / ``skip_t.weight``   ``transformer.skip_v.weight`` / ``transformer.skip_t.weight``
``noise_embed.*``                       ``transformer.noise_embed.*`` (noise-level embedding MLP)
======================================  ==========================================================================

``<MetaBlock key>`` is a key of the reference STARFlow ``MetaBlock`` (``attn_blocks.{j}.attention.qkv.weight``,
``attn_blocks.{j}.mlp.main.0.weight``, ``proj_in.*``, ``proj_out.*``, ``proj_txt.*``, ``sos_embed``,
``final_norm.weight``, ...), renamed with the rules of
:func:`diffusers_starflow2.loaders.single_file_starflow.convert_starflow_state_dict` (known-unused reference
buffers such as ``attn_mask`` are dropped).  The one STARFlow2 addition to a MetaBlock, the projection of the
noise-level embedding, keeps this package's name: ``shallow.{k}.proj_cond.*`` / ``deep.proj_cond.*``.

Weights are loaded strictly: missing, unexpected or mis-shaped keys end the run with the list of offending keys.
The output is written next to its final place and renamed into it only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from diffusers_starflow2 import AutoencoderFAE, PretzelModel, StarFlow2Pipeline, TarFlowScheduler
from diffusers_starflow2.cli import ArgumentParser, run_main
from diffusers_starflow2.loaders.single_file_starflow import convert_starflow_state_dict, key_problems, load_checkpoint
from diffusers_starflow2.utils.io import check_output_dir, save_pretrained_atomic
from diffusers_starflow2.utils.sequence import VISION_START, special_id

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FAE_TRAINABLE = ("encoder", "decoder", "pixel_decoder")
PRETZEL_PLAIN = re.compile(r"^(adapter\..+|skip_v\.weight|skip_t\.weight|noise_embed\..+)$")
FLOW_BLOCK = re.compile(r"^(shallow\.\d+|deep)\.(.+)$")
NOISE_COND = re.compile(r"^proj_cond\.(weight|bias)$")  # not a reference MetaBlock key: kept as is


PROG = "assemble_starflow2.py"


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=prog or PROG, description="Assemble a StarFlow2Pipeline folder from local parts.")
    parser.add_argument("--vlm", required=True, help="local transformers folder of the VLM (Qwen2.5-VL)")
    parser.add_argument("--tokenizer", help="local tokenizer folder (default: --vlm)")
    parser.add_argument("--dinov2", required=True, help="local transformers Dinov2Model folder")
    parser.add_argument("--weights", required=True, help="STARFlow2 weights in the original layout (.safetensors/.pth)")
    parser.add_argument("--config", required=True, help="JSON with 'pretzel', 'fae' and optional 'scheduler' configs")
    parser.add_argument("--output", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Original layout -> pipeline components
# --------------------------------------------------------------------------------------------------------------


def convert_flow_key(prefix: str, key: str, value: torch.Tensor) -> Optional[str]:
    """``<MetaBlock key>`` of the flow block at ``prefix`` -> our key (None: a dropped reference buffer).

    The package renamer works on ``blocks.{i}.*`` keys, so the key is passed through it as ``blocks.0.<key>``.
    Raises ``ValueError`` for a key with no counterpart.
    """
    if NOISE_COND.match(key):
        return f"{prefix}.{key}"
    converted = convert_starflow_state_dict({f"blocks.0.{key}": value})
    if not converted:
        return None
    (new,) = converted
    return prefix + new[len("blocks.0") :]


def split_original_state_dict(
    state: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], List[str]]:
    """Original-layout state dict -> ``(transformer state, FAE state without DINOv2, unmapped original keys)``.

    A flow-block key is also accepted under this package's name (the renamer passes those through); a parameter
    given under both names counts as unmapped.
    """
    transformer, fae, unmapped = {}, {}, []
    for key, value in state.items():
        block = FLOW_BLOCK.match(key)
        if key.startswith("fae.") and key.split(".")[1] in FAE_TRAINABLE:
            fae[key[len("fae.") :]] = value
        elif PRETZEL_PLAIN.match(key):
            transformer[key] = value
        elif block:
            try:
                new = convert_flow_key(block.group(1), block.group(2), value)
            except ValueError:
                unmapped.append(key)
                continue
            if new in transformer:  # the renamer also passes our own names: a key given under both names
                unmapped.append(key)
            elif new is not None:
                transformer[new] = value
        else:
            unmapped.append(key)
    return transformer, fae, unmapped


def load_vlm(path: str, dtype: torch.dtype):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        Qwen2_5_VLForConditionalGeneration,
    )

    if not os.path.isdir(path):
        raise ValueError(f"--vlm {path!r} is not a folder")
    if AutoConfig.from_pretrained(path).model_type == "qwen2_5_vl":
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    try:
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    except ValueError:  # not an image-text-to-text architecture
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r} does not exist")
    with open(path) as f:
        config = json.load(f)
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("pretzel"), dict)
        or not isinstance(config.get("fae"), dict)
    ):
        raise ValueError(f"--config {path!r} must be a JSON object with 'pretzel' and 'fae' objects")
    unknown = sorted(set(config) - {"pretzel", "fae", "scheduler"})
    if unknown:
        raise ValueError(f"--config {path!r} has unknown sections {unknown}")
    if "dinov2_config" in config["fae"]:
        raise ValueError("the 'fae' config must not hold dinov2_config: the DINOv2 architecture comes from --dinov2")
    return config


def assemble(args: argparse.Namespace) -> StarFlow2Pipeline:
    """Load every part, check that they fit together and return the pipeline."""
    from transformers import AutoTokenizer

    config = read_config(args.config)
    dtype = DTYPES[args.dtype]
    state = load_checkpoint(args.weights)
    transformer_state, fae_state, unmapped = split_original_state_dict(state)
    print(f"read {len(state)} tensors from {args.weights}")

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.vlm)
    vision_start = special_id(tokenizer, VISION_START)
    vlm = load_vlm(args.vlm, dtype)
    vlm_width = vlm.config.get_text_config().hidden_size
    print(f"loaded VLM {type(vlm).__name__} (width {vlm_width}) and tokenizer ({len(tokenizer)} tokens)")

    pretzel_config = {"vlm_hidden_size": vlm_width, "vision_start_token_id": vision_start, **config["pretzel"]}
    for key, actual in (("vlm_hidden_size", vlm_width), ("vision_start_token_id", vision_start)):
        if pretzel_config[key] != actual:
            raise ValueError(f"pretzel config {key}={pretzel_config[key]} does not match the VLM/tokenizer ({actual})")
    transformer = PretzelModel(**pretzel_config)
    vae = AutoencoderFAE.from_dinov2_pretrained(args.dinov2, **config["fae"])
    if (
        vae.config.latent_channels != transformer.config.latent_channels
        or vae.latent_grid != transformer.config.sample_size
    ):
        raise ValueError(
            f"the FAE makes {vae.config.latent_channels}-channel {vae.latent_grid}x{vae.latent_grid} "
            f"latents but the Pretzel expects {transformer.config.latent_channels}-channel "
            f"{transformer.config.sample_size}x{transformer.config.sample_size} latents"
        )

    fae_expected = {k: v for k, v in vae.state_dict().items() if k.split(".")[0] in FAE_TRAINABLE}
    problems = key_problems(transformer.state_dict(), transformer_state, "transformer") + key_problems(
        fae_expected, fae_state, "fae"
    )
    if unmapped:
        problems.insert(
            0, f"{len(unmapped)} weights keys have no counterpart in the original layout: {sorted(unmapped)}"
        )
    if problems:
        raise ValueError("the weights do not match the config:\n  " + "\n  ".join(problems))
    transformer.load_state_dict(transformer_state, strict=True)
    missing, unexpected = vae.load_state_dict(fae_state, strict=False)
    assert not unexpected and all(k.startswith("dinov2.") for k in missing)
    if dtype != torch.float32:  # nn.Module.to: ModelMixin.to warns about fp32-pinned modules
        torch.nn.Module.to(transformer, dtype)
        torch.nn.Module.to(vae, dtype)
    return StarFlow2Pipeline(
        vlm=vlm,
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=TarFlowScheduler.from_preset("starflow2", **config.get("scheduler", {})),
    )


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    output = os.path.abspath(args.output)
    check_output_dir(output, args.overwrite)  # fail before loading anything
    pipe = assemble(args)
    save_pretrained_atomic(pipe, output, args.overwrite)
    print(f"wrote {output}")
    for name in ("vlm", "transformer", "vae"):
        model = getattr(pipe, name)
        print(
            f"  {name:<12} {type(model).__name__:<40} {sum(p.numel() for p in model.parameters()):>14,} "
            f"parameters ({model.dtype})"
        )
    print(f"  image size   {pipe.image_size}x{pipe.image_size}")
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Exit status 0, or 2 after one line ``prog: error: ...`` on stderr."""
    return run_main(prog or PROG, run, parse_args(argv, prog))


if __name__ == "__main__":
    sys.exit(main())

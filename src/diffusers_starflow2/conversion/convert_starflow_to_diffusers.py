# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Convert an original STARFlow checkpoint (apple/ml-starflow ``transformer_flow.Model``) to a diffusers folder.

    python conversion/convert_starflow_to_diffusers.py --checkpoint starflow_3B_t2i_256x256.pth \
        --config configs/starflow_3B_t2i_256x256.yaml --output starflow-3b-t2i [--dtype bfloat16]

``--config`` is the reference training YAML (``arguments: [...]``; the text width is read from the checkpoint) or a
JSON file holding the reference constructor's ``model_kwargs``.  The weights are loaded strictly: any missing,
unexpected or mis-shaped key ends the run with the list of offending keys.  The output folder is written next to its
final place and renamed into it only when complete, so a failed run never leaves a half-written folder.

The conversion itself lives in :mod:`diffusers_starflow2.loaders.single_file_starflow`; this script is CLI glue.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch

from diffusers_starflow2 import StarFlowTransformerModel
from diffusers_starflow2.cli import ArgumentParser, run_main
from diffusers_starflow2.loaders.single_file_starflow import (
    convert_starflow_state_dict,
    key_problems,
    load_checkpoint,
    load_reference_config,
)
from diffusers_starflow2.pipelines.starflow_assembly import build_starflow_pipeline
from diffusers_starflow2.utils.io import check_output_dir, save_pretrained_atomic
from diffusers_starflow2.utils.validation import check_finite_state_dict

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


PROG = "convert_starflow_to_diffusers.py"


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=prog or PROG, description="Convert a reference STARFlow checkpoint to a diffusers folder."
    )
    parser.add_argument("--checkpoint", required=True, help="reference .pth/.pt/.bin (weights_only) or .safetensors")
    parser.add_argument("--config", required=True, help="reference training YAML, or JSON with 'model_kwargs'")
    parser.add_argument("--output", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    parser.add_argument(
        "--save_full_pipeline",
        action="store_true",
        help="write a complete StarFlowPipeline folder (needs --text_encoder and --vae)",
    )
    parser.add_argument("--text_encoder", help="local T5 encoder folder (FLAN-T5-XL for the released model)")
    parser.add_argument("--tokenizer", help="local tokenizer folder (default: --text_encoder)")
    parser.add_argument("--vae", help="local diffusers AutoencoderKL folder (sd-vae-ft-ema for the released model)")
    parser.add_argument(
        "--allow_nonfinite",
        action="store_true",
        help="convert a checkpoint holding NaN/inf weights (refused otherwise)",
    )
    args = parser.parse_args(argv)
    if args.save_full_pipeline and not (args.text_encoder and args.vae):
        parser.error("--save_full_pipeline needs --text_encoder DIR and --vae DIR")
    return args


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def load_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; missing, unexpected or mis-shaped keys raise ``ValueError`` listing them."""
    problems = key_problems(model.state_dict(), state)
    if problems:
        raise ValueError("the checkpoint does not match the config:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)


def build_model(model_config: dict) -> StarFlowTransformerModel:
    """The model of ``model_config``; a config the model cannot be built from is a ``ValueError``, not a crash."""
    try:
        return StarFlowTransformerModel(**model_config)
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as err:
        raise ValueError(f"the config does not describe a buildable model: {err}") from None


def convert(
    checkpoint: str, config: str, dtype: str = "float32", allow_nonfinite: bool = False
) -> Tuple[StarFlowTransformerModel, dict]:
    """Build the diffusers model described by ``config`` and load the converted ``checkpoint`` into it.

    A checkpoint holding NaN/inf weights is refused unless ``allow_nonfinite`` (it would only draw black images).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    state = load_checkpoint(checkpoint)
    if not allow_nonfinite:  # such weights only ever draw black images
        try:
            check_finite_state_dict(state, "--checkpoint")
        except ValueError as err:
            raise ValueError(f"{err}; pass --allow_nonfinite to convert it anyway") from None
    model_config, _ = load_reference_config(config, state)
    model = build_model(model_config)
    load_strict(model, convert_starflow_state_dict(state))
    if dtype != "float32":  # nn.Module.to: ModelMixin.to warns about fp32-pinned modules even when there are none
        torch.nn.Module.to(model, DTYPES[dtype])
    return model.eval(), model_config


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def write_output(model: StarFlowTransformerModel, args: argparse.Namespace) -> None:
    """The transformer folder, or with ``--save_full_pipeline`` a complete ``StarFlowPipeline`` folder."""
    target = model
    if args.save_full_pipeline:
        target = build_starflow_pipeline(model, args.text_encoder, args.vae, args.tokenizer)
    save_pretrained_atomic(target, args.output, args.overwrite)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.output, args.overwrite)  # fail before the (slow) conversion
    model, config = convert(args.checkpoint, args.config, args.dtype, args.allow_nonfinite)
    write_output(model, args)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} -> {args.output}")
    print(f"  {num_params:,} parameters, {args.dtype}, {len(config['layers_per_block'])} flow blocks")
    print("  config: " + json.dumps(config, sort_keys=True))
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Exit status 0, or 2 after one line ``prog: error: ...`` on stderr."""
    return run_main(prog or PROG, run, parse_args(argv, prog))


if __name__ == "__main__":
    sys.exit(main())

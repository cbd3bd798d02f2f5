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
import os
import pickle
import shutil
import sys
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import torch

from diffusers_starflow2 import StarFlowTransformerModel
from diffusers_starflow2.loaders.single_file_starflow import (
    convert_starflow_state_dict,
    load_checkpoint,
    load_reference_config,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert a reference STARFlow checkpoint to a diffusers folder.")
    parser.add_argument("--checkpoint", required=True, help="reference .pth/.pt/.bin (weights_only) or .safetensors")
    parser.add_argument("--config", required=True, help="reference training YAML, or JSON with 'model_kwargs'")
    parser.add_argument("--output", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------


def load_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; missing, unexpected or mis-shaped keys raise ``ValueError`` listing them."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing:
        problems.append(f"{len(missing)} missing keys: {missing}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {unexpected}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {shapes}")
    if problems:
        raise ValueError("the checkpoint does not match the config:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)


def convert(checkpoint: str, config: str, dtype: str = "float32") -> Tuple[StarFlowTransformerModel, dict]:
    """Build the diffusers model described by ``config`` and load the converted ``checkpoint`` into it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    state = load_checkpoint(checkpoint)
    model_config, _ = load_reference_config(config, state)
    model = StarFlowTransformerModel(**model_config)
    load_strict(model, convert_starflow_state_dict(state))
    if dtype != "float32":  # nn.Module.to: ModelMixin.to warns about fp32-pinned modules even when there are none
        torch.nn.Module.to(model, DTYPES[dtype])
    return model.eval(), model_config


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def save_extra_components(args: argparse.Namespace, staging_dir: str) -> None:
    """Extension point for ``--save_full_pipeline --text_encoder DIR --vae DIR`` (not implemented yet).

    Called after the transformer has been written into ``staging_dir`` and before the folder is renamed into place;
    anything written here is published atomically with the transformer, and an exception aborts the whole output.
    """


def _check_output(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output!r} exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ValueError(f"--output {output!r} exists and is not empty; pass --overwrite to replace it")


def _publish(staging: str, output: str) -> None:
    """Rename the complete ``staging`` folder to ``output``, replacing an existing folder only at the last moment."""
    backup = None
    if os.path.isdir(output):
        if os.listdir(output):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
            os.rmdir(backup)
            os.rename(output, backup)
        else:
            os.rmdir(output)
    try:
        os.rename(staging, output)
    except BaseException:
        if backup is not None:
            os.rename(backup, output)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_output(model: StarFlowTransformerModel, args: argparse.Namespace) -> None:
    output = os.path.abspath(args.output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        save_extra_components(args, staging)
        _check_output(output, args.overwrite)  # the folder may have appeared meanwhile
        _publish(staging, output)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        _check_output(os.path.abspath(args.output), args.overwrite)  # fail before the (slow) conversion
        model, config = convert(args.checkpoint, args.config, args.dtype)
        write_output(model, args)
    except (ValueError, OSError, pickle.UnpicklingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    num_params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} -> {args.output}")
    print(f"  {num_params:,} parameters, {args.dtype}, {len(config['layers_per_block'])} flow blocks")
    print("  config: " + json.dumps(config, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

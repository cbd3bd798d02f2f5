# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Write a complete, randomly initialised tiny STARFlow2 pipeline folder (for tests, examples and CI).

    python conversion/make_tiny_starflow2.py --output tiny-starflow2 [--seed 0] [--overwrite]

The folder holds all five components of :class:`StarFlow2Pipeline` (tiny Qwen2.5-VL ``vlm`` and its tokenizer, the
``transformer`` (PretzelModel), the ``vae`` (AutoencoderFAE) and the ``scheduler``), exactly as
``build_tiny_starflow2_components(seed)`` makes them, and loads with ``StarFlow2Pipeline.from_pretrained(folder)``.
Everything is built offline.  The folder is written next to its final place and renamed into it only when complete,
so a failed run never leaves a half-written folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from diffusers_starflow2 import StarFlow2Pipeline
from diffusers_starflow2.cli import ArgumentParser, run_main
from diffusers_starflow2.utils.io import check_output_dir, save_pretrained_atomic

from ..testing_utils import build_tiny_starflow2_components

PROG = "make_tiny_starflow2.py"


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=prog or PROG, description="Write a randomly initialised tiny STARFlow2 pipeline folder."
    )
    parser.add_argument("--output", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument(
        "--perturb",
        type=float,
        default=0.05,
        help="std of the noise added to zero-initialised Pretzel weights (0: true initialisation)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    output = os.path.abspath(args.output)
    check_output_dir(output, args.overwrite)  # fail before building anything
    print(f"building tiny STARFlow2 components (seed {args.seed}) ...")
    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=args.seed, perturb=args.perturb))
    save_pretrained_atomic(pipe, output, args.overwrite)
    print(f"wrote {output}")
    for name in ("vlm", "transformer", "vae"):
        model = getattr(pipe, name)
        print(f"  {name:<12} {type(model).__name__:<40} {sum(p.numel() for p in model.parameters()):>10,} parameters")
    print(f"  tokenizer    {type(pipe.tokenizer).__name__} ({len(pipe.tokenizer)} tokens)")
    print(
        f"  image size   {pipe.image_size}x{pipe.image_size}, latents {pipe.transformer.config.latent_channels}x"
        f"{pipe.transformer.config.sample_size}x{pipe.transformer.config.sample_size}"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Exit status 0, or 2 after one line ``prog: error: ...`` on stderr."""
    return run_main(prog or PROG, run, parse_args(argv, prog))


if __name__ == "__main__":
    sys.exit(main())

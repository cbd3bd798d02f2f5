"""Iterative denoising on held-out world images: error to the clean FAE latents after 1, 2, 3, 5 and 10 steps.

Held-out scenes of the synthetic shapes world are FAE-encoded (posterior mean), noised at the sampling level and
denoised under their caption with ``StarFlow2Pipeline.denoise_latents``; prints the mean squared error to the clean
latents per step count (the noisy input's error is the first row).

    python benchmarks/eval_denoise.py [--model DIR] [--device cpu] [--images 32] [--steps 1 2 3 5 10]
                                      [--at_sampling_level]

``--at_sampling_level`` conditions every step on the sampling level instead of its own (the loop this package used
to run), for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the shapes world example

from shapes_world.synthetic_world import canonical_caption, random_scene, render  # noqa: E402

from diffusers_starflow2 import StarFlow2Pipeline  # noqa: E402
from diffusers_starflow2.cli import DEFAULT_MODEL  # noqa: E402

HELDOUT_SEED = 54321


def heldout_batch(pipe, n: int, seed: int = HELDOUT_SEED):
    """``n`` held-out scenes: clean scaled FAE latents ``(n, C, h, w)``, the same noised, and their captions."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = pipe.preprocess_image([render(s, pipe.image_size) for s in scenes])
    with torch.no_grad():
        clean = pipe.vae.encode_latents(pixels, sample=False).float()
    level = pipe.scheduler.config.noise_level
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).to(clean.device)
    return clean, pipe.scheduler.add_noise(clean, noise, level), [canonical_caption(s) for s in scenes]


def denoising_errors(pipe, n: int, steps) -> dict:
    clean, noisy, captions = heldout_batch(pipe, n)
    errors = {0: float((noisy - clean).pow(2).mean())}
    for k in steps:
        denoised = pipe.denoise_latents(noisy, captions, num_inference_steps=k)
        errors[k] = float((denoised - clean).pow(2).mean())
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    parser.add_argument(
        "--at_sampling_level",
        action="store_true",
        help="condition every step on the sampling level (the former, wrong loop)",
    )
    args = parser.parse_args(argv)
    pipe = StarFlow2Pipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.at_sampling_level:  # the context is never moved to the step's level
        pipe.transformer.at_noise_level = lambda cache, noise_level: cache
    errors = denoising_errors(pipe, args.images, args.steps)
    mode = "every step at the sampling level" if args.at_sampling_level else "each step at its own level"
    print(
        f"model: {args.model} on {args.device}; {args.images} held-out images at noise level "
        f"{pipe.scheduler.config.noise_level}; {mode}"
    )
    print("| denoising steps | MSE to clean latents |")
    print("|---|---|")
    for k, mse in errors.items():
        print(f"| {k}{' (noisy input)' if k == 0 else ''} | {mse:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Exact likelihood as a zero-shot classifier: which of the world's 60 captions fits a held-out image best?

For each held-out scene of the synthetic shapes world, ``StarFlow2Pipeline.log_likelihood`` scores the image under
every canonical caption (all 60 colour x shape x position combinations, the same noise for every caption) and the
caption with the lowest bits/dim is the prediction.  Prints the accuracy of the whole caption and of each attribute.

    python benchmarks/eval_likelihood_classifier.py [--model DIR] [--device cpu] [--images 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the shapes world example

from shapes_world.synthetic_world import (  # noqa: E402
    COLORS,
    POSITIONS,
    SHAPES,
    Scene,
    all_combinations,
    canonical_caption,
    random_scene,
    render,
)

from diffusers_starflow2 import StarFlow2Pipeline  # noqa: E402
from diffusers_starflow2.cli import DEFAULT_MODEL  # noqa: E402

HELDOUT_SEED = 24680


def classify(pipe, image, seed: int) -> tuple:
    """The (colour, shape, position) whose caption gives ``image`` the lowest bits/dim."""
    candidates = all_combinations()
    captions = [canonical_caption(Scene(*c)) for c in candidates]
    generators = [torch.Generator().manual_seed(seed) for _ in captions]  # the same noise for every caption
    bpd = pipe.log_likelihood([image] * len(captions), captions, generator=generators)
    return candidates[int(bpd.argmin())]


def classifier_accuracy(pipe, n: int) -> dict:
    rng = np.random.default_rng(HELDOUT_SEED)
    hits = {"caption": 0, "color": 0, "shape": 0, "position": 0}
    for i in range(n):
        scene = random_scene(rng)
        color, shape, position = classify(pipe, render(scene, pipe.image_size), HELDOUT_SEED + i)
        hits["color"] += color == scene.color
        hits["shape"] += shape == scene.shape
        hits["position"] += position == scene.position
        hits["caption"] += (color, shape, position) == (scene.color, scene.shape, scene.position)
    return {k: v / n for k, v in hits.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    pipe = StarFlow2Pipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    acc = classifier_accuracy(pipe, args.images)
    print(
        f"model: {args.model} on {args.device}; {args.images} held-out images x 60 candidate captions; {time.time() - start:.0f} s"
    )
    print("| zero-shot likelihood classifier | accuracy | chance |")
    print("|---|---|---|")
    sizes = {"caption": len(all_combinations()), "color": len(COLORS), "shape": len(SHAPES), "position": len(POSITIONS)}
    for key, size in sizes.items():
        chance = 1 / size
        print(f"| {key} | {acc[key]:.1%} | {chance:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

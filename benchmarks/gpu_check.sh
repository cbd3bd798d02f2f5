#!/usr/bin/env bash
# Device checks for a machine with a CUDA GPU (the CI machine has none): the device tests on meta and CUDA (CUDA
# results compared with the CPU's), the denoising and likelihood benchmarks on CUDA (their tables should match the
# README's CPU figures), and the four pipelines of the embedded model on CUDA.
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: torch sees no CUDA device")'

python -m pytest -q tests/test_devices.py
python benchmarks/eval_denoise.py --device cuda
python benchmarks/eval_likelihood_classifier.py --device cuda

python - <<'PY'
import torch

from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2InterleavedPipeline, StarFlow2Pipeline
from diffusers_starflow2.cli import DEFAULT_MODEL

pipe = StarFlow2Pipeline.from_pretrained(DEFAULT_MODEL).to("cuda")
gen = lambda: torch.Generator("cuda").manual_seed(0)
latents = pipe("a red circle on the left", generator=gen(), output_type="latent").images
assert latents.device.type == "cuda" and torch.isfinite(latents).all()
image = pipe("a red circle on the left", generator=gen()).images[0]
print("log_likelihood:", pipe.log_likelihood(image, "a red circle on the left", generator=gen()).tolist())
edit = StarFlow2EditPipeline.from_pipe(pipe)
edit(image, "make the circle blue", generator=gen())
chat = StarFlow2InterleavedPipeline.from_pipe(pipe)
print("answer:", chat([image, "what color is the shape?"], max_new_tokens=3, guidance_scale=0.0).text)
print("gpu_check: the pipelines ran on CUDA")
PY

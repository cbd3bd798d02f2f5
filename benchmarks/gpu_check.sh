#!/usr/bin/env bash
# Device checks for a machine with a CUDA GPU (the CI machine has none): the device tests on meta and CUDA (CUDA
# results compared with the CPU's), exact and Jacobi decoding on CUDA and the flow-decoding benchmark (exact / Jacobi
# / compiled decode step), the denoising and likelihood benchmarks on CUDA (their tables should match the README's
# CPU figures), and the four pipelines of the embedded model on CUDA (with the transformer's compiled decode steps).
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: torch sees no CUDA device")'

python -m pytest -q tests/test_devices.py

# Fast decoding on CUDA: exact / Jacobi / compiled decode step (the oneDNN weight packing is CPU-only; elsewhere the
# decode path runs the plain modules).  REFERENCE_SRC=<apple/ml-starflow checkout> adds the reference's rows.
python - <<'PY'
import torch

from diffusers_starflow2 import StarFlowTransformerModel
from diffusers_starflow2.testing_utils import tiny_starflow_config
from diffusers_starflow2.sampling import sample_starflow

torch.manual_seed(0)
model = StarFlowTransformerModel(**tiny_starflow_config()).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
noise, y = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 32)
cpu = sample_starflow(model, noise, y, torch.zeros_like(y), 2.0)
model.cuda()
args = (noise.cuda(), y.cuda(), torch.zeros_like(y).cuda(), 2.0)
exact = sample_starflow(model, *args)
jacobi = sample_starflow(model, *args, jacobi_block_size=16, jacobi_tolerance=0.0)
print("CUDA exact vs CPU:", (exact.cpu() - cpu).abs().max().item(), " Jacobi (tol 0) vs exact:",
      (jacobi - exact).abs().max().item())
assert (exact.cpu() - cpu).abs().max() < 1e-3 and (jacobi - exact).abs().max() < 1e-3
PY
python benchmarks/bench_flow.py --device cuda --rounds 3 ${REFERENCE_SRC:+--reference-src "$REFERENCE_SRC"}
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
pipe.transformer.compile_decode_step(mode=None)  # the shallow flows' and the TARFlow stream's compiled steps
compiled = pipe("a red circle on the left", generator=gen(), output_type="latent").images
print("compiled decode steps vs eager on CUDA:", (compiled - latents).abs().max().item())
assert (compiled - latents).abs().max() < 1e-3
image = pipe("a red circle on the left", generator=gen()).images[0]
print("log_likelihood:", pipe.log_likelihood(image, "a red circle on the left", generator=gen()).tolist())
edit = StarFlow2EditPipeline.from_pipe(pipe)
edit(image, "make the circle blue", generator=gen())
chat = StarFlow2InterleavedPipeline.from_pipe(pipe)
print("answer:", chat([image, "what color is the shape?"], max_new_tokens=3, guidance_scale=0.0).text)
print("gpu_check: the pipelines ran on CUDA")
PY

# Low precision and offload on CUDA (tiny pipelines): float8 layerwise casting close to bfloat16 (the CPU tests'
# bounds), model CPU offload and the autoencoder's group offload (block / leaf level, with a CUDA stream) equal to
# the plain CUDA run; group offload of the autoregressive models and sequential offload refuse with a ValueError.
python - <<'PY'
import torch

from diffusers_starflow2 import StarFlow2EditPipeline
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

gen = lambda: torch.Generator("cpu").manual_seed(0)


def make():
    pipe = StarFlow2EditPipeline(**build_tiny_starflow2_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    source = torch.rand(3, 32, 32, generator=gen())
    return pipe(source, "make it blue", generator=gen(), num_inference_steps=1, output_type="pt").images.float().cpu()


bf16 = run(make().to("cuda", torch.bfloat16))
pipe = make().to("cuda", torch.bfloat16)
for model in (pipe.transformer, pipe.vae):
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
diff = (run(pipe) - bf16).abs()
print(f"float8 layerwise casting vs bfloat16 on CUDA: mean {diff.mean():.4f} max {diff.max():.4f}")
assert diff.mean() < 0.03 and diff.max() < 0.15

plain = run(make().to("cuda"))
pipe = make()
pipe.enable_model_cpu_offload(device="cuda")
print("model CPU offload vs plain CUDA:", (run(pipe) - plain).abs().max().item())
torch.testing.assert_close(run(pipe), plain, atol=1e-4, rtol=1e-4)
for kwargs in (dict(offload_type="block_level", num_blocks_per_group=1), dict(offload_type="leaf_level"),
               dict(offload_type="leaf_level", use_stream=True)):
    pipe = make()
    pipe.vlm.to("cuda"), pipe.transformer.to("cuda")
    pipe.vae.enable_group_offload(torch.device("cuda"), **kwargs)
    out = run(pipe)
    print(f"FAE group offload {kwargs} vs plain CUDA:", (out - plain).abs().max().item())
    torch.testing.assert_close(out, plain, atol=1e-4, rtol=1e-4)
for refused in (lambda p: p.enable_group_offload(torch.device("cuda")),
                lambda p: p.transformer.enable_group_offload(torch.device("cuda")),
                lambda p: p.enable_sequential_cpu_offload(device="cuda")):
    try:
        refused(make())
    except ValueError as e:
        print("refused:", str(e)[:90], "...")
    else:
        raise AssertionError("expected a ValueError")
print("gpu_check: low precision and offload ran on CUDA")
PY

# Speed on CUDA (prepared on a CPU machine, not run there): the pipeline tables of the benchmarks page's speed
# section - the whole one-position step compiled (compile_decode_step(vlm=...); max-autotune records CUDA graphs),
# float32 / bfloat16 / int8 weights (int8 needs torchao), batches 1 / 4 / 16 with guidance, the edit and
# interleaved pipelines, cold and warm compiles from two processes (COMPILE_CACHE keeps the artifacts) - then the
# flow job's exact / Jacobi / compiled tables at Jacobi windows of 8 to 64 (REFERENCE_SRC adds the reference's rows).
COMPILE_CACHE=${COMPILE_CACHE:-$(mktemp -d)/starflow2-compile-cache}
python benchmarks/bench_pipeline.py --device cuda --configs mid --cfg on --steps 0 --repeats 3 --compile \
    --weights float32,bfloat16,int8 --batch 1,4,16 --compile-cache "$COMPILE_CACHE"
python benchmarks/bench_pipeline.py --device cuda --configs mid --cfg both --steps 0,1 --repeats 3 --compile \
    --pipeline text2image,edit,interleaved
for window in 8 16 32 64; do
    python benchmarks/bench_flow.py --device cuda --rounds 3 --threads 1 --jacobi-block-size "$window" \
        ${REFERENCE_SRC:+--reference-src "$REFERENCE_SRC"}
done

# Attention backends on CUDA: the native flash / efficient / math / cuDNN kernels through set_attention_backend give
# the default path's likelihoods (bfloat16 for flash), and the decode kernel against the dispatcher on CUDA.
python - <<'PY'
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from diffusers_starflow2 import StarFlowTransformerModel
from diffusers_starflow2.testing_utils import tiny_starflow_config

torch.manual_seed(0)
model = StarFlowTransformerModel(**tiny_starflow_config()).eval().cuda()
latents, text = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, 8, 32, device="cuda")
with torch.no_grad():
    for dtype, backends in ((torch.float32, ["_native_efficient", "_native_math"]),
                            (torch.bfloat16, ["_native_flash", "_native_efficient", "_native_cudnn"])):
        model.to(dtype)
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        model.reset_attention_backend()
        reference = model(latents.to(dtype), text.to(dtype)).nll
        for backend in backends:
            model.set_attention_backend(backend)
            diff = (model(latents.to(dtype), text.to(dtype)).nll - reference).abs().max().item()
            print(f"{backend} ({dtype}) vs native on CUDA: {diff:.2e}")
            assert diff < (1e-5 if dtype == torch.float32 else 2e-2)
PY
python benchmarks/bench_attention.py --device cuda --repeats 500

# The paper's size on one GPU (an H200's 141 GB; prepared on a CPU machine, not run there): random weights in bf16
# (build_paper_starflow2_components), one 256-px text-to-image call with guidance and one stage-1 step with
# gradient checkpointing (bf16 mixed precision, AdamW), seconds and peak memory, each beside plan_memory.py's
# prediction of the same row (fake tensors on the CPU: a few minutes each).  `--dry-run` runs the same code on the
# tiny preset on a CPU (tests/test_plan_memory.py).
python benchmarks/paper_gpu_smoke.py --device cuda --preset paper

"""Layerwise casting (diffusers' ``enable_layerwise_casting``: weights stored in float8, each layer computing in
bfloat16) runs every pipeline and ``log_likelihood`` and stays close to a plain bfloat16 run.

Bounds, measured on these tiny random models (images in [0, 1]): the mean absolute difference to the bfloat16
images is ~0.014 (max ~0.08), against ~0.12-0.15 between two seeds; tested at 0.03 (max 0.15).  Bits per dimension
move by <= 0.014; tested at 0.03.  The flow's own arithmetic stays float32 in both runs.
"""

import pytest
import torch

from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2InterleavedPipeline, StarFlow2Pipeline
from diffusers_starflow2.pipelines.pipeline_starflow import StarFlowPipeline
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
MEAN_BOUND, MAX_BOUND, BPD_BOUND = 0.03, 0.15, 0.03


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(cls, storage_dtype=None, model_dtype=BF16, cast_vae=True):
    """The tiny pipeline in ``model_dtype``; with ``storage_dtype`` its transformer (and VAE) cast layerwise to it,
    computing in bfloat16."""
    if cls is StarFlowPipeline:
        from test_pipeline_starflow import build_components

        components = build_components()
    else:
        components = build_tiny_starflow2_components(seed=0)
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(model_dtype)
    if storage_dtype is not None:
        models = (pipe.transformer, pipe.vae) if cast_vae else (pipe.transformer,)
        for model in models:
            model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=BF16)
    return pipe


CALLS = {
    StarFlow2Pipeline: lambda p: p("a red circle", generator=gen(), num_inference_steps=1, output_type="pt").images,
    StarFlow2EditPipeline: lambda p: (
        p(
            torch.rand(3, 32, 32, generator=gen()),
            "make it blue",
            generator=gen(),
            num_inference_steps=1,
            output_type="pt",
        ).images
    ),
    StarFlow2InterleavedPipeline: lambda p: p(
        ["hi", "<image>"], generator=gen(), max_new_tokens=2, output_type="pt"
    ).segments[0],
    StarFlowPipeline: lambda p: p("a red cat", generator=gen(), num_inference_steps=1, output_type="pt").images,
}


def assert_close_images(out: torch.Tensor, ref: torch.Tensor, mean_bound: float, max_bound: float) -> None:
    out, ref = out.float(), ref.float()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    diff = (out - ref).abs()
    assert diff.mean() < mean_bound and diff.max() < max_bound, (diff.mean().item(), diff.max().item())


@pytest.mark.parametrize("cls", list(CALLS), ids=lambda c: c.__name__)
def test_float8_storage_runs_every_pipeline_close_to_bfloat16(cls):
    call = CALLS[cls]
    reference = call(make(cls))
    pipe = make(cls, FP8)
    # the weights really are stored in float8 (the layers compute in bfloat16)
    linears = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.weight.dtype == FP8 for m in linears) > len(linears) // 2
    assert pipe.transformer.dtype == BF16
    assert_close_images(call(pipe), reference, MEAN_BOUND, MAX_BOUND)


@pytest.mark.parametrize("cls", [StarFlow2Pipeline, StarFlowPipeline], ids=lambda c: c.__name__)
def test_float8_storage_log_likelihood_close_to_bfloat16(cls):
    images = torch.rand(2, 3, 32, 32, generator=gen())
    reference = make(cls).log_likelihood(images, "a red circle", generator=gen())
    bpd = make(cls, FP8).log_likelihood(images, "a red circle", generator=gen())
    assert bpd.dtype == torch.float32 and torch.isfinite(bpd).all()
    assert (bpd - reference).abs().max() < BPD_BOUND, (bpd, reference)


def test_compute_dtype_never_comes_from_the_stored_weights():
    """float32 storage computing in bfloat16: every weight of the transformer says float32, the layers must still get
    bfloat16 inputs (a mismatch raises in ``F.linear``), and the images are the bfloat16 run's up to bfloat16's
    rounding of the stored weights (~0.002 mean difference, measured)."""
    reference = CALLS[StarFlow2Pipeline](make(StarFlow2Pipeline))
    pipe = make(StarFlow2Pipeline, torch.float32, model_dtype=torch.float32, cast_vae=False)
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    assert_close_images(CALLS[StarFlow2Pipeline](pipe), reference, 0.01, 0.05)


def test_float8_storage_with_model_cpu_offload():
    """The usual low-memory combination: float8 weights, and each model on the execution device only while it runs."""
    call = CALLS[StarFlow2Pipeline]
    expected = call(make(StarFlow2Pipeline, FP8))
    pipe = make(StarFlow2Pipeline, FP8)
    pipe.enable_model_cpu_offload(device="cpu")
    assert all(hasattr(pipe.components[name], "_hf_hook") for name in ("vlm", "transformer", "vae"))
    torch.testing.assert_close(call(pipe), expected)

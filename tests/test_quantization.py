"""Lower-precision weights through diffusers' entry points (bfloat16 ``torch_dtype``, int8 weight-only with torchao's
``TorchAoConfig`` in a ``PipelineQuantizationConfig``) and the compile cache that outlives a process: the embedded
trained model's likelihoods and samples stay within stated bounds of float32."""

import pytest
import torch

from diffusers_starflow2 import StarFlow2Pipeline
from diffusers_starflow2.cli import DEFAULT_MODEL
from diffusers_starflow2.utils.compile_utils import load_compile_cache, save_compile_cache
from diffusers_starflow2.utils.quantization import int8_weight_only_config, stored_nbytes, weights_kwargs

# Measured on the embedded model (bits/dim of two random images under a caption; the sampled latents of one prompt,
# mean / max abs difference): bfloat16 0.0003 / 0.013 bits/dim, latents 0.003 / 0.023; int8 0.013 / 0.045 bits/dim,
# latents 0.004 / 0.030.  Bounds with about 3x headroom or more.
BOUNDS = {
    "bfloat16": dict(bpd=0.05, latent_mean=0.01, latent_max=0.1),
    "int8": dict(bpd=0.15, latent_mean=0.015, latent_max=0.1),
}


def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def reference():
    pipe = StarFlow2Pipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe, *measure(pipe)


def measure(pipe):
    images = torch.rand(2, 3, pipe.image_size, pipe.image_size, generator=gen())
    bpd = pipe.log_likelihood(images, "a red circle", generator=gen())
    latents = pipe("a red circle on the left", generator=gen(), output_type="latent").images
    return bpd, latents


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_lower_precision_weights_stay_close_to_float32(reference, weights):
    if weights == "int8":
        pytest.importorskip("torchao")  # the optional `quantization` extra (in the test extra)
    ref_pipe, ref_bpd, ref_latents = reference
    pipe = StarFlow2Pipeline.from_pretrained(DEFAULT_MODEL, **weights_kwargs(weights))
    pipe.set_progress_bar_config(disable=True)
    weight = pipe.transformer.deep.layers[0].attn.to_qkv.weight
    vlm_weight = pipe.vlm.get_decoder().layers[0].self_attn.q_proj.weight
    for w, ref in (
        (weight, ref_pipe.transformer.deep.layers[0].attn.to_qkv.weight),
        (vlm_weight, ref_pipe.vlm.get_decoder().layers[0].self_attn.q_proj.weight),
    ):
        # the weights really are stored smaller: half (bfloat16), a quarter plus per-row scales (int8)
        assert stored_nbytes(w) <= stored_nbytes(ref) * (0.5 if weights == "bfloat16" else 0.3)
    bpd, latents = measure(pipe)
    bound = BOUNDS[weights]
    assert bpd.dtype == torch.float32 and torch.isfinite(bpd).all() and torch.isfinite(latents).all()
    diff = (latents.float() - ref_latents).abs()
    assert (bpd - ref_bpd).abs().max() < bound["bpd"], (bpd, ref_bpd)
    assert diff.mean() < bound["latent_mean"] and diff.max() < bound["latent_max"], (diff.mean(), diff.max())


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="`weights` must be one of float32, bfloat16, int8; got 'fp8'"):
        weights_kwargs("fp8")


def test_compile_cache_round_trip_and_bad_folders(tmp_path):
    """What one process compiled is saved to the folder and loaded by the next (here: the same process after
    dynamo's reset); a folder that is a file, or holds a foreign file, is refused naming it."""
    import torch._dynamo

    folder = tmp_path / "cache"
    assert not load_compile_cache(folder)  # nothing saved yet: a cold start
    f = torch.compile(lambda x: (x * 2 + 1).sin())
    x = torch.randn(8)
    expected = f(x)
    path = save_compile_cache(folder)
    assert path is not None and (folder / "torch_compile_artifacts.bin").stat().st_size > 0
    torch._dynamo.reset()
    assert load_compile_cache(folder)
    assert torch.equal(torch.compile(lambda x: (x * 2 + 1).sin())(x), expected)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="must be a folder"):
        load_compile_cache(tmp_path / "file")
    (folder / "torch_compile_artifacts.bin").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="holds no readable compile cache"):
        load_compile_cache(folder)


def test_quantised_linears_are_never_repacked_as_float32():
    """A torchao weight says float32 but is an int8 tensor subclass: inside a sampling call's ``packed_weights`` the
    linear layer runs its own (quantised) call, not oneDNN's float32 packing."""
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    from diffusers_starflow2.utils.quantization import int8_weight_only_config
    from diffusers_starflow2.utils.torch_utils import packed_linear, packed_weights

    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 512)  # large enough to be packed were it float32
    quantize_(layer, int8_weight_only_config())
    x = torch.randn(2, 512)
    with torch.no_grad():
        expected = layer(x)
        with packed_weights(layer):
            assert torch.equal(layer(x), expected) and torch.equal(packed_linear(layer, x), expected)


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_compiled_token_steps_read_few_row_linears_as_stored(weights, monkeypatch, tmp_path):
    """A compiled CPU token step traces the linears of a few rows as one pass over the weight as stored: float32 and
    bfloat16 layers call the few-row operator, int8 layers become reductions; the frozen constants keep the layer's
    dtype (torchao's int8 values, not the float32 matrix inductor's freezing would fold their dequantisation into),
    no GEMM call is left, and the output is the eager layer's.  Layers at more rows than ``REDUCTION_ROWS`` gives
    their dtype keep the GEMM."""
    import re

    from torch._inductor.utils import run_and_get_code

    from diffusers_starflow2.utils.compile_utils import REDUCTION_ROWS, compile_static_step

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compiled here, not found in a cache
    torch.manual_seed(0)
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).to(dtype)
    if weights == "int8":
        from torchao.quantization import quantize_

        quantize_(mlp, int8_weight_only_config())
    stored = torch.int8 if weights == "int8" else dtype
    limit = REDUCTION_ROWS.get(stored, 0)
    for rows in sorted({2, limit, limit + 1}):
        x = torch.randn(rows, 64, dtype=dtype)
        step = compile_static_step(mlp.forward, None, False)
        with torch.no_grad():
            out, (code,) = run_and_get_code(step, x)
            expected = mlp(x)
        tol = 2e-2 if weights == "bfloat16" else 1e-5  # bfloat16 outputs: one rounding of the float32 sums
        assert (out.float() - expected.float()).abs().max() <= tol * expected.float().abs().max()
        matrices = re.findall(r"_frozen_param\d+ device\(type='cpu'\) (torch\.\w+) \((?:96, 64|32, 96)\)", code)
        calls_gemm = "_mm_out" in code or "addmm" in code
        calls_operator = "diffusers_starflow2::few_row_linear" in code
        if rows <= limit:
            assert matrices == [str(stored)] * 2 and not calls_gemm, (matrices, rows)
            assert calls_operator == (weights != "int8"), rows
        else:
            assert calls_gemm and not calls_operator, rows


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_compiled_whole_step_in_lower_precision_equals_its_eager_step(weights):
    """The compiled whole image step with bfloat16 or int8 weights (its linears as reductions over the stored
    weights, the bfloat16 caches attended in float32) gives the latents of the same weights' eager step: to float32
    rounding for int8, to a few bfloat16 roundings for bfloat16."""
    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components
    from diffusers_starflow2.utils.quantization import quantize_components

    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    quantize_components(pipe, weights)

    def run():
        return pipe(
            ["a red circle", "a big blue square on the right"],
            guidance_scale=2.0,
            num_inference_steps=0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images.float()

    expected = run()
    pipe.transformer.compile_decode_step(mode=None, vlm=pipe.vlm)
    got = run()
    tol = 1e-4 if weights == "int8" else 0.05 * expected.abs().max().item()
    assert torch.isfinite(got).all() and (got - expected).abs().max() <= tol

"""Fast decoding: the static-shape decode path, Jacobi decoding in the one sampling loop, compiled layers."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_starflow2 import GuidanceSpec, StarFlowTransformerModel, TarFlowScheduler
from diffusers_starflow2.sampling import sample_image_tokens, sample_starflow
from diffusers_starflow2.testing_utils import tiny_starflow_config
from diffusers_starflow2.utils import torch_utils
from diffusers_starflow2.utils.torch_utils import packed_linear, packed_weights

ATOL = 1e-4  # float tolerance: a window of tokens is one matrix product where sequential decoding makes several


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = StarFlowTransformerModel(**tiny_starflow_config()).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial flows: the output projections start at zero
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g), torch.zeros(2, 8, 32)


@pytest.mark.parametrize("block_size", [2, 5, 16, 64])
@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_jacobi_with_enough_iterations_is_sequential_decoding(model, inputs, block_size, guidance_scale):
    noise, y, y_null = inputs
    sequential = sample_starflow(model, noise, y, y_null, guidance_scale)
    jacobi = sample_starflow(
        model,
        noise,
        y,
        y_null,
        guidance_scale,
        jacobi_block_size=block_size,
        jacobi_tolerance=0.0,
        jacobi_max_iterations=block_size,
    )
    assert (jacobi - sequential).abs().max() <= ATOL
    # too few iterations and a loose tolerance give another (approximate) sample: the equality above is earned
    rough = sample_starflow(
        model,
        noise,
        y,
        y_null,
        guidance_scale,
        jacobi_block_size=block_size,
        jacobi_tolerance=10.0,
        jacobi_max_iterations=1,
    )
    assert (rough - sequential).abs().max() > 1e-2


def test_jacobi_tolerance_bounds_the_error(model, inputs):
    noise, y, y_null = inputs
    sequential = sample_starflow(model, noise, y, y_null, 2.0)
    errors = [
        (sample_starflow(model, noise, y, y_null, 2.0, jacobi_block_size=16, jacobi_tolerance=tol) - sequential)
        .abs()
        .max()
        .item()
        for tol in (1e-1, 1e-3, 1e-5)
    ]
    assert errors[2] <= errors[1] <= errors[0] and errors[2] < 1e-3


def test_jacobi_callback_sees_every_token_once_and_may_replace_it(model, inputs):
    noise, y, y_null = inputs
    seen = []

    def callback(i, x_i):
        seen.append(i)
        return torch.zeros_like(x_i) if i == 5 else x_i

    x = sample_starflow(model, noise, y, y_null, 2.0, callback=callback, jacobi_block_size=8, jacobi_tolerance=0.0)
    assert seen == list(range(3 * 64))
    ref = sample_starflow(
        model, noise, y, y_null, 2.0, callback=lambda i, x_i: torch.zeros_like(x_i) if i == 5 else x_i
    )
    assert (x - ref).abs().max() <= ATOL  # the replaced token is fed back before the next window


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(jacobi_block_size=0), "jacobi_block_size"),
        (dict(jacobi_block_size=-3), "jacobi_block_size"),
        (dict(jacobi_block_size=2.5), "jacobi_block_size"),
        (dict(jacobi_block_size=True), "jacobi_block_size"),
        (dict(jacobi_block_size=4, jacobi_tolerance=-1e-3), "jacobi_tolerance"),
        (dict(jacobi_block_size=4, jacobi_tolerance=float("nan")), "jacobi_tolerance"),
        (dict(jacobi_block_size=4, jacobi_max_iterations=0), "jacobi_max_iterations"),
    ],
)
def test_bad_jacobi_arguments_are_refused(model, inputs, kwargs, name):
    noise, y, y_null = inputs
    value = next(iter(v for k, v in kwargs.items() if k == name))
    with pytest.raises(ValueError, match=rf"`{name}` must be .*got {value!r}".replace("(", r"\(").replace(")", r"\)")):
        sample_starflow(model, noise, y, y_null, 2.0, **kwargs)


def test_packed_linear_matches_the_module_and_packs_only_within_a_sampling_call():
    linear = torch.nn.Linear(512, 512)  # large enough to be packed
    x = torch.randn(3, 5, 512)
    with torch.no_grad():
        with packed_weights(linear):
            assert torch.allclose(packed_linear(linear, x), linear(x), atol=1e-4)
            assert torch.allclose(packed_linear(linear, x, "gelu"), F.gelu(linear(x)), atol=1e-4)
        linear.weight.data.mul_(2)  # an in-place update no version counter sees (e.g. fusing a LoRA)
        assert torch.equal(packed_linear(linear, x), linear(x))  # outside a context: the module itself
        with packed_weights(linear):
            assert torch.allclose(packed_linear(linear, x), linear(x), atol=1e-4)


def test_packed_weights_routes_the_linears_of_modules_it_is_given_and_restores_them(monkeypatch):
    torch.manual_seed(0)
    big, small, hooked = torch.nn.Linear(512, 512), torch.nn.Linear(8, 8), torch.nn.Linear(512, 512)
    calls = []
    hooked.forward = lambda x: calls.append("hook") or F.linear(x, hooked.weight, hooked.bias)  # e.g. an offload hook
    packed_call = torch_utils._packed_call
    monkeypatch.setattr(torch_utils, "_packed_call", lambda *a: calls.append("packed") or packed_call(*a))
    x = torch.randn(2, 512)
    with torch.no_grad():
        with packed_weights(torch.nn.ModuleList([big, small, hooked])):
            assert "forward" in big.__dict__ and "forward" not in small.__dict__  # small weights stay on MKL
            assert hooked.forward.__name__ == "<lambda>"  # an instance forward is left alone
            with packed_weights(big):  # nested: routed once, restored by the outer context only
                pass
            assert "forward" in big.__dict__
            assert torch.allclose(big(x), F.linear(x, big.weight, big.bias), atol=1e-4)
            assert calls == (["packed"] if torch_utils._ONEDNN else [])  # oneDNN where torch has it
            hooked(x)
            with torch.enable_grad():  # autograd: the plain linear, differentiable
                assert big(x.clone().requires_grad_(True)).requires_grad
        assert "forward" not in big.__dict__ and calls[-1:] == ["hook"] and len(calls) <= 2
        assert torch.equal(big(x), F.linear(x, big.weight, big.bias))


def sample_twice_counting_graphs(compiled, inputs):
    """Sample twice (guidance 2.0) with a freshly compiled model, dynamo's counters reset first: both results, the
    graphs traced by the first call, and the counters."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        x = sample_starflow(compiled, *inputs, 2.0)
        graphs = counters["stats"]["unique_graphs"]
        again = sample_starflow(compiled, *inputs, 2.0)
    return x, again, graphs, counters


@pytest.mark.parametrize("how, max_graphs", [("compile_repeated_blocks", 3), ("compile_decode_step", 4)])
def test_compiled_decode_is_traced_once_per_shape_not_per_token(model, inputs, how, max_graphs):
    """The decode path gives the compiled unit (a layer, or a block's whole step) fixed shapes and positions as
    tensors, so sampling twice traces one graph per block shape and query count: text prefill, deep-block step and
    shallow-block step (per block for ``compile_decode_step``, whose graphs hold each block's own weights)."""
    import copy

    compiled = copy.deepcopy(model)
    getattr(compiled, how)(backend="eager", dynamic=False)  # dynamo's tracing and guards, no inductor
    x, _, graphs, counters = sample_twice_counting_graphs(compiled, inputs)
    assert (x - sample_starflow(model, *inputs, 2.0)).abs().max() <= ATOL
    assert 1 <= graphs <= max_graphs  # for 64 tokens x 3 blocks
    assert counters["stats"]["unique_graphs"] == graphs  # nothing new on a second call
    assert not counters["recompiles"]


def test_compiled_blocks_keep_their_graphs_apart(inputs):
    """Nine blocks and a second compiled copy: every block compiles its own graphs (no recompilation, so no
    block falls back to eager decoding at dynamo's limit of graphs per code object) and each copy decodes as its
    eager model does."""
    import copy

    import torch._dynamo

    noise, y, y_null = inputs
    torch.manual_seed(3)
    model = StarFlowTransformerModel(**{**tiny_starflow_config(), "layers_per_block": [1] * 9}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    expected = [sample_starflow(m, noise, y, y_null, 2.0) for m in (model, other)]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for m in (model, other):
        m.compile_decode_step(backend="eager", dynamic=False)
    with torch.no_grad():
        got = [sample_starflow(m, noise, y, y_null, 2.0) for m in (model, other)]
    assert not counters["recompiles"]
    assert counters["stats"]["unique_graphs"] >= 18
    for x, e in zip(got, expected):
        assert (x - e).abs().max() <= ATOL


@pytest.mark.parametrize("num_kv_heads, masked", [(4, False), (4, True), (2, True)])
def test_cached_attention_operator(num_kv_heads, masked):
    """The decode attention (query heads sharing a key head stacked as rows) equals the fused kernel, grouped-query
    heads and masks included; the registered operator passes torch's operator checks (schema, fake tensor,
    aliasing) and reads the buffers only up to ``filled``."""
    from diffusers_starflow2.models.attention import _cached_attention_op, cached_attention

    g = torch.Generator().manual_seed(0)
    B, H, T, S, D = 3, 4, 2, 9, 16
    G = H // num_kv_heads
    q = torch.randn(B, H, T, D, generator=g)
    keys, values = torch.randn(2, B, num_kv_heads, S, D, generator=g)
    mask = rows_mask = None
    if masked:  # causal over 9 slots for queries at positions 5 and 6, and one padded key of sample 1
        allowed = (torch.arange(S) <= torch.tensor([5, 6])[:, None]).expand(B, 1, T, S).clone()
        allowed[1, :, :, 2] = False
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
        rows_mask = mask.repeat(1, num_kv_heads, G, 1).flatten(0, 1)  # (B H_kv, G T, S)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.25, enable_gqa=num_kv_heads != H)
    rows = (q.reshape(B * num_kv_heads, G * T, D) * 0.25, keys.flatten(0, 1), values.flatten(0, 1))
    out = cached_attention(*rows, rows_mask)
    assert (out.view(B, H, T, D) - expected).abs().max() <= 1e-5

    torch.library.opcheck(torch.ops.diffusers_starflow2.cached_attention, (*rows, rows_mask, torch.tensor(S)))
    # the operator's Python body (its CPU kernel is tested below): a compiled step's buffers are longer than the
    # filled slots, and `filled` cuts them, as a view of the slots would
    op = _cached_attention_op
    longer = [torch.cat([t, torch.randn(t.shape[0], 5, D, generator=g)], dim=1) for t in rows[1:]]
    longer_mask = torch.cat([rows_mask, torch.zeros(B * num_kv_heads, G * T, 5)], dim=-1) if masked else None
    assert torch.equal(op(rows[0], *longer, longer_mask, torch.tensor(S)), out)
    # bfloat16 buffers: attended in float32, returned in bfloat16 (one rounding of the float32 result)
    low = [t.bfloat16() for t in (rows[0], *longer)] + [longer_mask.bfloat16() if masked else None]
    out_low = op(*low, torch.tensor(S))
    assert out_low.dtype == torch.bfloat16
    exact = cached_attention(low[0].float(), low[1][:, :S].float(), low[2][:, :S].float(), rows_mask)
    assert torch.equal(out_low, exact.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("queries, mask_layout", [(1, None), (2, "shared"), (4, "per row"), (6, "per row")])
def test_cpu_kernel_of_cached_attention_equals_its_python_body(dtype, queries, mask_layout):
    """The C++ CPU kernel that compiled CPU steps load (``utils/cpu_kernels.py``) gives the operator's Python body:
    float32 to 1e-6, lower-precision caches (read as stored, accumulated in float32) to one rounding of the float32
    result, more queries per row and other dtypes through the same ATen arithmetic; head sizes of 64, 128 (compiled
    for) and others, over longer buffers cut at ``filled`` (not a multiple of the kernel's four keys per step), a
    shared ``(Q, S)`` or a per-row mask with ``-inf`` slots, strided rows, one and two threads; a NaN in a row's
    query, keys or values makes that row's output non-finite and leaves the others finite, as in the Python body."""
    from diffusers_starflow2.models.attention import _cached_attention_op
    from diffusers_starflow2.utils.cpu_kernels import load_cpu_kernels

    assert load_cpu_kernels()  # this machine has the compiler inductor needs
    op = torch.ops.diffusers_starflow2.cached_attention
    g = torch.Generator().manual_seed(0)
    R, S, filled = 6, 40, torch.tensor(29)
    for D in (64, 128, 48):
        q = (torch.randn(R, queries, D, generator=g) / 8).to(dtype)
        # rows of a longer (R, S + 3, D) buffer: strided between rows, each row contiguous
        keys, values = torch.randn(2, R, S + 3, D, generator=g)[:, :, :S].to(dtype)
        mask = None
        if mask_layout is not None:
            mask = torch.zeros((R, queries, S) if mask_layout == "per row" else (queries, S))
            mask[..., 3] = float("-inf")
            mask[..., 11:17] = torch.randn(mask[..., 11:17].shape, generator=g)
            mask = mask.to(dtype)
        expected = _cached_attention_op(q, keys, values, mask, filled)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                out = op(q, keys, values, mask, filled)
            finally:
                torch.set_num_threads(1)
            assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
            if dtype in (torch.float32, torch.float64):
                torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
            else:  # both round a float32 result (equal to 1e-6, the float32 bound) once
                ulp = expected.float().abs() * (2**-7 if dtype == torch.bfloat16 else 2**-10)
                assert ((out.float() - expected.float()).abs() <= ulp + 1e-6).all()
    for which in range(3):
        broken = [t.clone() for t in (q, keys, values)]
        broken[which][1, 0, 5] = float("nan")
        out = op(*broken, mask, filled)
        assert not torch.isfinite(out[1]).all() and torch.isfinite(out[[0, 2, 3, 4, 5]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_of_few_row_linear_equals_its_python_body(dtype):
    """The C++ CPU kernel of the few-row linear (``models/few_row_linear_cpu.cpp``) gives the operator's Python body,
    ``F.linear``: float32 to float32 rounding of the sums, bfloat16 to one rounding of the float32 result; 1 to 8
    rows (compiled for each) of inputs with leading dimensions and strides, widths that are not multiples of the
    vector or of the four weight rows per step, with and without bias, one and two threads; more rows and mixed
    dtypes go to ATen's linear; a NaN in a row of the input makes that row non-finite and leaves the others
    finite."""
    from diffusers_starflow2.utils.compile_utils import _few_row_linear_op
    from diffusers_starflow2.utils.cpu_kernels import load_cpu_kernels

    assert load_cpu_kernels()  # this machine has the compiler inductor needs
    op = torch.ops.diffusers_starflow2.few_row_linear
    g = torch.Generator().manual_seed(0)
    for K, N in ((512, 96), (40, 10), (2048, 7)):
        weight = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
        bias = torch.randn(N, generator=g).to(dtype)
        for rows in range(1, 10):
            # (rows, 1, K) rows of a wider buffer: strided, each row contiguous
            x = torch.randn(rows, 1, K + 5, generator=g)[..., :K].to(dtype)
            for b in (bias, None):
                expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    try:
                        out = op(x, weight, b)
                    finally:
                        torch.set_num_threads(1)
                    assert out.dtype == dtype and out.shape == (rows, 1, N)
                    if dtype == torch.float32:
                        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
                    else:
                        ulp = expected.abs() * 2**-7
                        assert ((out.float() - expected).abs() <= ulp + 1e-5).all(), (K, N, rows)
                    assert torch.equal(_few_row_linear_op(x, weight, b), F.linear(x, weight, b))
    for call in (F.linear, op):  # a float64 input of this weight: ATen's answer (an error), as the Python body's
        with pytest.raises(RuntimeError):
            call(x.double(), weight, bias)
    broken = torch.randn(3, K, generator=g).to(dtype)
    broken[1, 5] = float("nan")
    out = op(broken, weight, bias)
    assert not torch.isfinite(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


def test_cpu_kernels_that_cannot_be_built_leave_the_python_body(monkeypatch):
    """A machine whose compiler fails keeps the operator's Python body: the loader warns with the reason and says
    it did not load (the compiled steps then call the Python body, as before the kernel existed)."""
    import torch.utils.cpp_extension

    from diffusers_starflow2.utils import cpu_kernels

    def no_compiler(**kwargs):
        raise OSError("c++: command not found")

    warnings = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels.logger, "warning", warnings.append)
    assert cpu_kernels.load_cpu_kernels.__wrapped__() is False  # the uncached body: a fresh attempt
    assert len(warnings) == 1 and "c++: command not found" in warnings[0]


def test_compiled_cpu_steps_load_the_cpu_kernels(model, monkeypatch):
    """Compiling a CPU decode step loads the package's C++ kernels (the attention operator its graphs call)."""
    import copy

    from diffusers_starflow2.utils import compile_utils

    calls = []
    monkeypatch.setattr(compile_utils, "load_cpu_kernels", lambda: calls.append("loaded") or True)
    copy.deepcopy(model).compile_decode_step(mode=None)
    assert calls


def test_inductor_compiled_decode_step_equals_eager_decoding(model, inputs):
    """``compile_decode_step`` through inductor (the default backend): the same latents as eager decoding, one
    graph per block shape, the attention an opaque operator inside the graph."""
    import copy

    noise, y, y_null = inputs
    compiled = copy.deepcopy(model)
    compiled.compile_decode_step(mode=None)  # inductor's default mode: a shorter compile
    x, again, graphs, counters = sample_twice_counting_graphs(compiled, inputs)
    assert (x - sample_starflow(model, *inputs, 2.0)).abs().max() <= ATOL  # inductor's kernels round differently
    assert torch.equal(x, again)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]
    # Jacobi windows (lengths 5 down to 1 at the end of each block): one dynamic-shape graph per block, whatever
    # the window length, none more on a second call
    jacobi = dict(jacobi_block_size=5, jacobi_tolerance=0.0)
    with torch.no_grad():
        x = sample_starflow(compiled, noise, y, y_null, 2.0, **jacobi)
        window_graphs = counters["stats"]["unique_graphs"] - graphs
        sample_starflow(compiled, noise, y, y_null, 2.0, **jacobi)
    assert (x - sample_starflow(model, noise, y, y_null, 2.0, **jacobi)).abs().max() <= ATOL
    assert 1 <= window_graphs <= len(model.blocks)
    assert counters["stats"]["unique_graphs"] == graphs + window_graphs and not counters["recompiles"]


def test_compiled_decode_graphs_are_found_again_by_the_graph_cache(model, inputs, tmp_path, monkeypatch):
    """On a CPU the compiled decode graphs (frozen weights) are kept by inductor's FX graph cache, which the compile
    cache's artifacts carry to the next process: the same model compiled again after dynamo's reset finds every
    graph there (no miss, no bypass); a model with other weights decodes as its own eager copy does, never with the
    cached graphs' weights (a graph found by its shapes reads the weights of the model that compiles it)."""
    import copy

    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache of this test's own
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    counters = torch._dynamo.utils.counters
    seen, got = [], []
    for m in (model, model, other):
        torch._dynamo.reset()
        counters.clear()
        compiled = copy.deepcopy(m)
        compiled.compile_decode_step(mode=None)
        with torch.no_grad():
            x = sample_starflow(compiled, *inputs, 2.0)
        assert (x - sample_starflow(m, *inputs, 2.0)).abs().max() <= ATOL
        got.append(x)
        seen.append(tuple(counters["inductor"][f"fxgraph_cache_{k}"] for k in ("miss", "hit", "bypass")))
    graphs = seen[0][0]
    assert graphs >= 2 and seen[:2] == [(graphs, 0, 0), (0, graphs, 0)], seen
    assert sum(seen[2][:2]) == graphs and seen[2][2] == 0, seen  # found or compiled, never bypassed
    assert (got[2] - got[0]).abs().max() > 1e-2  # stale weights would fail the comparison with its eager copy


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers_starflow2 import StarFlow2Pipeline
    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

    return StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))


def sample_span(pipe, noise, guidance_scale=0.0, **kwargs):
    """One image span after the prompt "a red circle" through :func:`sample_image_tokens`; returns the tokens and
    the cache."""
    guidance = GuidanceSpec(guidance_scale)
    layouts = pipe.encode_prompt(["a red circle"], None, do_classifier_free_guidance=guidance.num_branches > 1)
    ids, latent_mask, attention_mask, _ = pipe._batch(layouts)
    cache = pipe.transformer.new_cache(pipe.vlm_stream, torch.full((ids.shape[0],), 0.3))
    pipe.transformer.step(pipe.vlm_stream, cache, ids, None, latent_mask, attention_mask)
    tokens = sample_image_tokens(
        pipe.transformer, pipe.vlm_stream, cache, noise, TarFlowScheduler(), guidance, **kwargs
    )
    return tokens, cache


def span_noise(pipe):
    return torch.randn(1, pipe.transformer.num_latents, pipe.transformer.config.latent_channels)


def test_pretzel_jacobi_runs_both_streams_and_equals_sequential_decoding(tiny_pipe):
    noise = span_noise(tiny_pipe)
    sequential, cache_seq = sample_span(tiny_pipe, noise, 2.0)
    jacobi, cache_jac = sample_span(
        tiny_pipe, noise, 2.0, jacobi_block_size=5, jacobi_tolerance=0.0, jacobi_max_iterations=5
    )
    assert (jacobi - sequential).abs().max() <= ATOL
    assert cache_jac.length == cache_seq.length and cache_jac.flow.length == cache_seq.flow.length
    assert (cache_jac.last_flow_hidden - cache_seq.last_flow_hidden).abs().max() <= ATOL
    rough, _ = sample_span(tiny_pipe, noise, 2.0, jacobi_block_size=5, jacobi_tolerance=10.0, jacobi_max_iterations=1)
    assert (rough - sequential).abs().max() > 1e-2


def test_pipelines_take_the_jacobi_options():
    from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2InterleavedPipeline, StarFlow2Pipeline
    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))

    def run(**jacobi):
        return pipe(
            "a red circle",
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            num_inference_steps=0,
            **jacobi,
        ).images

    sequential = run()
    assert (run(jacobi_block_size=4, jacobi_tolerance=0.0) - sequential).abs().max() <= ATOL
    assert (run(jacobi_block_size=4, jacobi_tolerance=10.0, jacobi_max_iterations=1) - sequential).abs().max() > 1e-2
    with pytest.raises(ValueError, match="`jacobi_block_size` must be .*got 0"):
        run(jacobi_block_size=0)
    image = torch.rand(1, 3, 32, 32)
    edit = StarFlow2EditPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="`jacobi_tolerance` must be .*got -1"):
        edit(image, "make it blue", jacobi_block_size=4, jacobi_tolerance=-1)
    edit(image, "make it blue", num_inference_steps=0, output_type="latent", jacobi_block_size=4)
    chat = StarFlow2InterleavedPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="`jacobi_max_iterations` must be .*got 0"):
        chat("draw <image>", jacobi_block_size=4, jacobi_max_iterations=0)


@pytest.mark.parametrize("stop_at", [0, 3, 8, 10])
def test_jacobi_stop_leaves_the_caches_as_sequential_decoding_does(tiny_pipe, stop_at):
    noise = span_noise(tiny_pipe)

    def sample(**jacobi):
        seen = []
        return sample_span(
            tiny_pipe,
            noise,
            callback=lambda i, x_i: seen.append(i) or x_i,
            stop=lambda: bool(seen) and seen[-1] == stop_at,
            **jacobi,
        )

    sequential, cache_seq = sample()
    jacobi, cache_jac = sample(jacobi_block_size=4, jacobi_tolerance=0.0)
    assert sequential.shape[1] == jacobi.shape[1] == stop_at + 1
    assert (jacobi - sequential).abs().max() <= ATOL
    assert cache_jac.length == cache_seq.length and cache_jac.flow.length == cache_seq.flow.length


def test_pretzel_compiled_decode_step_equals_eager_decoding():
    """``PretzelModel.compile_decode_step`` through inductor: the shallow flows' steps and the TARFlow stream's step
    give the eager latents (prompts of different lengths: padding in both streams; a denoising step: the gradient
    pass stays eager), exact decoding with one graph per unit and batch size, none per position, and Jacobi windows
    with one more graph per unit, whatever the window length."""
    import torch._dynamo

    from diffusers_starflow2 import StarFlow2Pipeline
    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))
    prompts = ["a red circle", "a big blue square on the right of the image"]
    jacobi = dict(jacobi_block_size=5, jacobi_tolerance=0.0)  # windows of 5 down to 1 at the end of a block

    def run(guidance_scale, **kwargs):
        return pipe(
            prompts,
            guidance_scale=guidance_scale,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            **kwargs,
        ).images

    expected = {scale: run(scale) for scale in (2.0, 0.0)}
    expected_jacobi = run(2.0, **jacobi)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    pipe.transformer.compile_decode_step(mode=None)  # inductor's default mode: a shorter compile
    first = run(2.0)
    assert counters["stats"]["unique_graphs"] == 3  # the two shallow flows and the stream
    assert (first - expected[2.0]).abs().max() <= ATOL
    assert torch.equal(run(2.0), first) and counters["stats"]["unique_graphs"] == 3
    assert (run(0.0) - expected[0.0]).abs().max() <= ATOL
    assert counters["stats"]["unique_graphs"] == 4  # the stream at the batch without the unconditional branch
    assert (run(2.0, **jacobi) - expected_jacobi).abs().max() <= ATOL
    assert counters["stats"]["unique_graphs"] == 7  # a window graph for each shallow flow and the stream
    run(2.0, **jacobi)
    assert counters["stats"]["unique_graphs"] == 7 and not counters["recompiles"]


def test_pipeline_transformer_compile_repeated_blocks():
    from diffusers_starflow2 import StarFlow2Pipeline
    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))

    def run():
        return pipe(
            "a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", num_inference_steps=0
        ).images

    expected = run()
    pipe.transformer.compile_repeated_blocks(backend="eager")
    assert (run() - expected).abs().max() <= ATOL


def test_whole_image_step_as_one_graph_equals_the_step_in_every_pipeline():
    """``compile_decode_step(vlm=...)``: exact decoding of an image span runs the whole Pretzel step (adapter, the VLM
    stream's layers on fixed-size buffers, TARFlow stream, affine parameters) as one graph, once per position: the
    same latents and text as the eager step (text-to-image with CFG and prompts of different lengths, editing with
    three branches, interleaved conversations in a batch where some samples idle through another's image), and no
    new graph for later positions or calls (dynamo's eager backend: its tracing and guards, no inductor)."""
    import torch._dynamo

    from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2Pipeline
    from diffusers_starflow2.pipelines import IMAGE_PLACEHOLDER, StarFlow2InterleavedPipeline
    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))
    edit, chat = StarFlow2EditPipeline.from_pipe(pipe), StarFlow2InterleavedPipeline.from_pipe(pipe)
    for p in (pipe, edit, chat):
        p.set_progress_bar_config(disable=True)
    image = torch.rand(3, pipe.image_size, pipe.image_size)
    conversations = [["words only, no picture in the answer"], ["two shapes", IMAGE_PLACEHOLDER]]

    def run():
        common = dict(num_inference_steps=1, output_type="latent")
        text2image = pipe(
            ["a red circle", "a big blue square on the right"],
            guidance_scale=2.0,
            generator=torch.Generator().manual_seed(0),
            **common,
        ).images
        edited = edit(
            image=image,
            prompt="make it blue",
            guidance_scale=2.0,
            image_guidance_scale=1.5,
            generator=torch.Generator().manual_seed(1),
            **common,
        ).images
        answers = chat(
            conversations,
            max_new_tokens=3,
            max_images=1,
            temperature=1.0,
            guidance_scale=2.0,
            generator=[torch.Generator().manual_seed(s) for s in (2, 3)],
            **common,
        )
        return text2image, edited, answers

    expected = run()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    pipe.transformer.compile_decode_step(backend="eager", dynamic=False, vlm=pipe.vlm)
    compiled_vlm, step = pipe.transformer._compiled_stream["image"]
    calls = []

    def counting(*args):
        calls.append(args[0].shape[0])  # the batch of the call
        return step(*args)

    pipe.transformer._compiled_stream["image"] = (compiled_vlm, counting)
    got = run()
    N = pipe.transformer.num_latents
    # every latent of every image: 2 prompts x 2 branches, one image x 3 branches, the batch of 2 conversations x 2
    assert calls == [4] * N + [3] * N + [4] * N
    graphs = counters["stats"]["unique_graphs"]
    for new, old in zip(got[:2], expected[:2]):
        assert (new - old).abs().max() <= 1e-5
    for new, old in zip(got[2], expected[2]):
        assert new.text == old.text and len(new.images) == len(old.images)
        for x, y in zip(new.images, old.images):
            assert (x - y).abs().max() <= 1e-5
    assert len(expected[2][1].images) == 1 and not expected[2][0].images  # the first conversation idled
    run()
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]
    assert len(calls) == 6 * N

"""The flow blocks' and the FAE's full-sequence attention (training / likelihood passes, prompt prefill) runs through
diffusers' ``dispatch_attention_fn``: ``set_attention_backend`` picks the kernel, and torch's native backends give
the default path's outputs to 1e-5.  (``_native_efficient`` has no CPU kernel in torch; benchmarks/gpu_check.sh
runs it on CUDA.)  ``from_pipe`` shares every component between the three STARFlow2 pipelines."""

import pytest
import torch

from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2InterleavedPipeline, StarFlow2Pipeline
from diffusers_starflow2.models import attention as flow_attention
from diffusers_starflow2.models.transformer_starflow import StarFlowTransformerModel
from diffusers_starflow2.sampling import sample_starflow
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components, tiny_starflow_config

MASKED_BACKENDS = ["native", "_native_math"]  # backends that take an attention mask
UNMASKED_BACKENDS = MASKED_BACKENDS + ["_native_flash"]  # flash refuses masks: bidirectional / plainly causal calls


@pytest.fixture
def dispatched(monkeypatch):
    """The backend each dispatcher call of the flow attention was given (and the diffusers default restored)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    calls = []
    dispatch = flow_attention.dispatch_attention_fn

    def recording(*args, backend=None, **kwargs):
        calls.append(backend)
        return dispatch(*args, backend=backend, **kwargs)

    monkeypatch.setattr(flow_attention, "dispatch_attention_fn", recording)
    yield calls
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def starflow_model():
    torch.manual_seed(0)
    model = StarFlowTransformerModel(**tiny_starflow_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def starflow_inputs():
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # padded text: the masked path
    return latents, text, mask


def check_backend(calls, backend):
    assert calls and all(str(b.value if hasattr(b, "value") else b) == backend for b in calls), set(calls)
    calls.clear()


@pytest.mark.parametrize("backend", MASKED_BACKENDS)
def test_starflow_likelihood_and_prefill_through_the_dispatcher(backend, dispatched):
    model = starflow_model()
    latents, text, mask = starflow_inputs()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = model(latents, text, mask).nll
        sample = sample_starflow(model, noise, text, torch.zeros_like(text), 2.0, mask, mask)
    assert dispatched and all(b is None for b in dispatched)  # default: diffusers' active backend
    dispatched.clear()
    model.set_attention_backend(backend)
    with torch.no_grad():
        torch.testing.assert_close(model(latents, text, mask).nll, nll, atol=1e-5, rtol=1e-5)
        check_backend(dispatched, backend)
        other = sample_starflow(model, noise, text, torch.zeros_like(text), 2.0, mask, mask)
        torch.testing.assert_close(other, sample, atol=1e-5, rtol=1e-5)
        check_backend(dispatched, backend)  # the text prefix of every conditioned block is prefilled through it


@pytest.mark.parametrize("backend", UNMASKED_BACKENDS)
def test_pretzel_shallow_flows_and_fae_through_the_dispatcher(backend, dispatched):
    components = build_tiny_starflow2_components(seed=0)
    transformer, vae = components["transformer"], components["vae"]
    g = torch.Generator().manual_seed(0)
    latents, level = torch.randn(2, 4, 4, 4, generator=g), torch.full((2,), 0.1)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        tokens, _ = transformer.shallow_forward(latents, level)  # causal, no padding
        moments = vae.encode(images).latent_dist.mean  # bidirectional
        decoded = vae.decode(latents).sample
    dispatched.clear()
    transformer.set_attention_backend(backend)
    vae.set_attention_backend(backend)
    with torch.no_grad():
        torch.testing.assert_close(transformer.shallow_forward(latents, level)[0], tokens, atol=1e-5, rtol=1e-5)
        check_backend(dispatched, backend)
        torch.testing.assert_close(vae.encode(images).latent_dist.mean, moments, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae.decode(latents).sample, decoded, atol=1e-5, rtol=1e-5)
        check_backend(dispatched, backend)


@pytest.mark.parametrize("backend", MASKED_BACKENDS)
def test_pretzel_log_likelihood_through_the_dispatcher(backend, dispatched):
    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bpd = pipe.log_likelihood(images, ["a red circle", "a blue square on the left"], generator=torch.manual_seed(0))
    for model in (pipe.transformer, pipe.vae):  # the FAE encodes the images
        model.set_attention_backend(backend)
    dispatched.clear()
    other = pipe.log_likelihood(images, ["a red circle", "a blue square on the left"], generator=torch.manual_seed(0))
    torch.testing.assert_close(other, bpd, atol=1e-5, rtol=1e-5)
    check_backend(dispatched, backend)


def test_flash_backend_refuses_a_masked_call():
    model = starflow_model()
    model.set_attention_backend("_native_flash")
    try:
        with pytest.raises(ValueError, match="attn_mask"):
            model(*starflow_inputs())  # padded text needs a mask
    finally:
        model.reset_attention_backend()
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_from_pipe_shares_the_components_without_copying_weights():
    base = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))
    pointers = {
        name: [p.data_ptr() for p in module.parameters()]
        for name, module in base.components.items()
        if isinstance(module, torch.nn.Module)
    }
    assert set(pointers) == {"vlm", "transformer", "vae"}
    pipes = [base]
    for cls in (StarFlow2EditPipeline, StarFlow2InterleavedPipeline, StarFlow2Pipeline):
        pipes.append(cls.from_pipe(pipes[-1]))  # a chain: each from the previous one
    for pipe in pipes[1:]:
        for name, ptrs in pointers.items():
            assert getattr(pipe, name) is getattr(base, name)
            assert [p.data_ptr() for p in getattr(pipe, name).parameters()] == ptrs
        assert pipe.tokenizer is base.tokenizer


def test_flow_attention_takes_only_its_own_processor_and_refuses_slicing():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attention = build_tiny_starflow2_components(seed=0)["transformer"].deep.layers[0].attn
    with pytest.raises(ValueError, match="FlowAttnProcessor; got AttnProcessor2_0.*set_attention_backend"):
        attention.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"slice_size=2.*set_attention_backend"):
        attention.set_attention_slice(2)
    attention.set_processor(flow_attention.FlowAttnProcessor())  # its own kind is accepted

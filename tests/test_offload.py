"""diffusers' memory features: enable_model_cpu_offload() moves every model the pipelines run (its hooks fire, counted
here), the FAE's enable_group_offload() onloads every layer encode/decode run, and enable_sequential_cpu_offload()
and the autoregressive models' enable_group_offload() refuse with a ValueError that says why."""

from collections import Counter

import accelerate.hooks
import pytest
import torch
from test_low_precision import CALLS

from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2InterleavedPipeline, StarFlow2Pipeline
from diffusers_starflow2.pipelines.pipeline_starflow import StarFlowPipeline
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components


@pytest.fixture
def hook_calls(monkeypatch):
    """Counts accelerate's CpuOffload.pre_forward calls per model class."""
    calls = Counter()
    original = accelerate.hooks.CpuOffload.pre_forward

    def counting(self, module, *args, **kwargs):
        calls[type(module).__name__] += 1
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(accelerate.hooks.CpuOffload, "pre_forward", counting)
    return calls


def make(cls, offload: bool):
    pipe = cls(**build_tiny_starflow2_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    if offload:
        pipe.enable_model_cpu_offload(device="cpu")
    return pipe


def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize(
    "cls", [StarFlow2Pipeline, StarFlow2EditPipeline, StarFlow2InterleavedPipeline], ids=lambda c: c.__name__
)
def test_model_cpu_offload_moves_the_vlm_and_the_pretzel(cls, hook_calls):
    call = CALLS[cls]
    expected = call(make(cls, offload=False))
    assert not hook_calls
    out = call(make(cls, offload=True))
    vlm_class = type(build_tiny_starflow2_components()["vlm"]).__name__
    assert hook_calls[vlm_class] >= 1 and hook_calls["PretzelModel"] >= 1, hook_calls
    assert hook_calls["AutoencoderFAE"] >= 1, hook_calls
    torch.testing.assert_close(out, expected)


def test_starflow_model_cpu_offload_moves_the_transformer(hook_calls):
    from test_pipeline_starflow import build_components

    expected = StarFlowPipeline(**build_components())
    expected.set_progress_bar_config(disable=True)
    pipe = StarFlowPipeline(**build_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    out = pipe("a red cat", generator=gen(), output_type="pt", num_inference_steps=0).images
    assert hook_calls["StarFlowTransformerModel"] >= 1 and hook_calls["T5EncoderModel"] >= 1, hook_calls
    torch.testing.assert_close(
        out, expected("a red cat", generator=gen(), output_type="pt", num_inference_steps=0).images
    )


def test_sequential_cpu_offload_refuses_and_says_why():
    from test_pipeline_starflow import build_components

    for pipe in (make(StarFlow2Pipeline, offload=False), StarFlowPipeline(**build_components())):
        with pytest.raises(ValueError, match=r"enable_sequential_cpu_offload\(\).*meta.*enable_model_cpu_offload"):
            pipe.enable_sequential_cpu_offload()


@pytest.fixture
def poisoned_group_offload(monkeypatch):
    """diffusers' group offloading on the CPU moves nothing (onload and offload device are one), so here an
    offloaded tensor holds NaN until its group is onloaded: a layer that runs without its hook bringing its weights in
    spoils the output.  Returns the count of onloads."""
    from diffusers.hooks.group_offloading import ModuleGroup

    stash, onloads = {}, Counter()
    offload, onload = ModuleGroup.offload_, ModuleGroup.onload_

    def tensors(group):
        for module in group.modules:
            yield from module.parameters()
            yield from module.buffers()
        yield from group.parameters or []
        yield from group.buffers or []

    def poisoned_offload(group):
        offload(group)
        for t in tensors(group):
            if t.is_floating_point() and id(t) not in stash:
                stash[id(t)] = t.data
                t.data = torch.full_like(t.data, float("nan"))

    def restoring_onload(group):
        onloads["groups"] += 1
        for t in tensors(group):
            if id(t) in stash:
                t.data = stash.pop(id(t))
        onload(group)

    monkeypatch.setattr(ModuleGroup, "offload_", poisoned_offload)
    monkeypatch.setattr(ModuleGroup, "onload_", restoring_onload)
    return onloads


EDIT = CALLS[StarFlow2EditPipeline]  # encodes the source image and decodes the result: both halves of the FAE


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_of_the_autoencoder_onloads_every_layer_it_runs(offload_type, poisoned_group_offload):
    expected = EDIT(make(StarFlow2EditPipeline, offload=False))
    pipe = make(StarFlow2EditPipeline, offload=False)
    pipe.vae.enable_group_offload(torch.device("cpu"), offload_type=offload_type, num_blocks_per_group=1)
    assert all(p.isnan().all() for p in pipe.vae.decoder.parameters())  # offloaded = poisoned until onloaded
    torch.testing.assert_close(EDIT(pipe), expected)
    assert poisoned_group_offload["groups"] > 0


def test_poisoned_group_offload_catches_a_layer_run_without_its_hook(poisoned_group_offload, monkeypatch):
    """The check above can fail: without naming the parts encode/decode call, block-level offloading of the FAE leaves
    them in the group of the FAE's own forward, which the pipelines never call."""
    from diffusers_starflow2 import AutoencoderFAE

    monkeypatch.setattr(AutoencoderFAE, "_group_offload_block_modules", None)
    pipe = make(StarFlow2EditPipeline, offload=False)
    pipe.vae.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(ValueError, match="NaN|inf|finite"):
        out = EDIT(pipe)
        assert torch.isfinite(out).all()  # (only reached if the pipeline let NaN through)


def test_group_offload_of_the_autoregressive_models_refuses_and_says_why():
    from test_pipeline_starflow import build_components

    starflow = StarFlowPipeline(**build_components())
    pipe = make(StarFlow2Pipeline, offload=False)
    for target in (pipe, starflow):
        with pytest.raises(
            ValueError, match=r"enable_group_offload\(\).*per latent position.*enable_model_cpu_offload"
        ):
            target.enable_group_offload(torch.device("cpu"))
    for model in (pipe.transformer, starflow.transformer):
        with pytest.raises(ValueError, match=rf"{type(model).__name__}.*per latent position.*vae.enable_group_offload"):
            model.enable_group_offload(torch.device("cpu"))
        assert not hasattr(model, "_diffusers_hook")  # refused before any hook was attached

"""diffusers' memory features: enable_model_cpu_offload() moves every model the pipelines run (its hooks fire, counted
here), and enable_sequential_cpu_offload() refuses with a ValueError that says why."""

from collections import Counter

import accelerate.hooks
import pytest
import torch
from test_low_precision import CALLS

from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2InterleavedPipeline, StarFlow2Pipeline
from diffusers_starflow2.pipelines.pipeline_starflow import StarFlowPipeline
from diffusers_starflow2.utils.tiny_pipeline import build_tiny_starflow2_components


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

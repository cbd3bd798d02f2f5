"""The call conventions of diffusers pipelines, checked on all four pipelines with tiny components.

These are the conventions diffusers' generic pipeline suite checks (``tests/test_diffusers_conformance.py`` runs that
suite itself when a diffusers source checkout is given); here they are written out for this package so that CI checks
them without diffusers' sources.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from test_pipeline_starflow import build_components as build_starflow_components

from diffusers_starflow2 import (
    StarFlow2EditPipeline,
    StarFlow2InterleavedPipeline,
    StarFlow2Pipeline,
    StarFlowPipeline,
)
from diffusers_starflow2.pipelines import IMAGE_PLACEHOLDER
from diffusers_starflow2.utils.tiny_pipeline import build_tiny_starflow2_components


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def source_image():
    y, x = np.mgrid[0:32, 0:32]
    return PIL.Image.fromarray(np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8))


@pytest.fixture(scope="module")
def starflow2_components():
    return build_tiny_starflow2_components(seed=0)


def make(kind, starflow2_components):
    if kind == "v1":
        pipe = StarFlowPipeline(**build_starflow_components())
    else:
        cls = {"t2i": StarFlow2Pipeline, "edit": StarFlow2EditPipeline, "chat": StarFlow2InterleavedPipeline}[kind]
        pipe = cls(**starflow2_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_inputs(kind, seed=0, **extra):
    """One image from each pipeline, as latents (no denoising unless asked)."""
    inputs = dict(generator=gen(seed), output_type="latent", num_inference_steps=0)
    if kind == "edit":
        inputs.update(image=source_image(), prompt="make the circle blue")
    elif kind == "chat":
        inputs.update(prompt=["draw a red circle", IMAGE_PLACEHOLDER], max_new_tokens=0)
    elif kind == "v1":
        inputs.update(prompt="a photo of a cat")
    else:
        inputs.update(prompt="a red circle on the left")
    inputs.update(extra)
    return inputs


def images_of(kind, out):
    return torch.stack(out.images) if kind == "chat" else out.images


KINDS = ["t2i", "edit", "chat", "v1"]


# -- the step count's name -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_num_inference_steps_is_the_denoising_step_count(kind, starflow2_components):
    pipe = make(kind, starflow2_components)
    one = images_of(kind, pipe(**call_inputs(kind, num_inference_steps=1)))
    none = images_of(kind, pipe(**call_inputs(kind, num_inference_steps=0)))
    assert pipe.num_timesteps > 0 and not torch.allclose(one, none)
    # the former name gives the same result, with a deprecation warning
    with pytest.warns(FutureWarning, match="num_inference_steps"):
        inputs = call_inputs(kind)
        del inputs["num_inference_steps"]
        former = images_of(kind, pipe(**inputs, num_denoising_steps=1))
    assert torch.equal(former, one)
    with pytest.raises(ValueError, match="pass only `num_inference_steps`"):
        pipe(**call_inputs(kind, num_inference_steps=1), num_denoising_steps=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_steps'"):
        pipe(**call_inputs(kind), num_steps=1)

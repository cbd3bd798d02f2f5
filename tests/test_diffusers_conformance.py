"""diffusers' own generic test suites, run against this package's pipelines and models.

diffusers ships its tests only in its source repository, not in its wheel, so this module imports them from a
diffusers source checkout named by the environment variable ``DIFFUSERS_SOURCE_DIR`` (a clone of
huggingface/diffusers; its ``tests/`` folder is used, the installed diffusers package runs) and is skipped when the
variable is not set.  Nothing of diffusers' tests is copied here: the classes below only describe our pipelines and
models to diffusers' mixins (tiny components, dummy inputs, which parameters exist), as every pipeline inside
diffusers does::

    git clone https://github.com/huggingface/diffusers /tmp/diffusers-src
    pip install -e ".[test,conformance]" -c constraints.txt   # what diffusers' test modules import
    DIFFUSERS_SOURCE_DIR=/tmp/diffusers-src python -m pytest -q tests/test_diffusers_conformance.py

Where a generic check does not fit an autoregressive flow, the class overrides it (with the same check written for
the pipeline's own input or output form) or skips it with the reason; accelerator-only checks skip on CPU by
diffusers' own markers.  The conventions these suites check are also tested without diffusers' sources, in our own
words, in ``tests/test_pipeline_conventions.py`` (which runs in CI).
"""

from __future__ import annotations

import inspect
import os
import sys
import unittest
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

SOURCE = os.environ.get("DIFFUSERS_SOURCE_DIR")
if not SOURCE:
    pytest.skip(
        "DIFFUSERS_SOURCE_DIR is not set (a diffusers source checkout whose tests/ this module runs)",
        allow_module_level=True,
    )
if not (Path(SOURCE) / "tests" / "pipelines" / "test_pipelines_common.py").is_file():
    raise RuntimeError(f"DIFFUSERS_SOURCE_DIR={SOURCE!r} is not a diffusers source checkout (no tests/pipelines)")
sys.path.insert(0, str(Path(SOURCE).resolve()))  # diffusers' `tests` package (the package itself comes installed)
# diffusers registers its own test markers (quantization backends, ...) in a conftest this run does not load
warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)

from tests.models.testing_utils import BaseModelTesterConfig, ModelTesterMixin  # noqa: E402
from tests.pipelines.test_pipelines_common import PipelineTesterMixin, to_np  # noqa: E402

from diffusers_starflow2 import (  # noqa: E402
    AutoencoderFAE,
    PretzelModel,
    StarFlow2EditPipeline,
    StarFlow2InterleavedPipeline,
    StarFlow2Pipeline,
    StarFlowPipeline,
    StarFlowTransformerModel,
)
from diffusers_starflow2.models.vlm_stream import VLMStream  # noqa: E402
from diffusers_starflow2.pipelines import IMAGE_PLACEHOLDER  # noqa: E402
from diffusers_starflow2.pipelines.pipeline_starflow2 import StarFlow2PipelineOutput  # noqa: E402
from diffusers_starflow2.testing_utils import (  # noqa: E402
    build_tiny_qwen2_5_vl,
    build_tiny_starflow2_components,  # noqa: E402
    build_tiny_tokenizer,
    fae_tiny_config,  # noqa: E402
    pretzel_tiny_config,  # noqa: E402
    tiny_starflow_config,  # noqa: E402
)
from diffusers_starflow2.utils.sequence import VISION_START, encode_conversation, pad_layouts  # noqa: E402

NO_PROMPT_EMBEDS = (
    "STARFlow2's text encoder is the VLM stream of the one causal Transformer that also generates the image: a "
    "prompt enters the KV caches of both streams (and every later image position attends to it), so there are no "
    "prompt embeddings computed apart from generation to pass back in"
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _source_image() -> PIL.Image.Image:
    y, x = np.mgrid[0:32, 0:32]
    return PIL.Image.fromarray(np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8))


# -- pipelines ---------------------------------------------------------------------------------------------------


class _StarFlowPipelineTests(PipelineTesterMixin):
    """What every STARFlow pipeline class shares; subclasses name the pipeline and its inputs."""

    test_layerwise_casting = True
    test_group_offloading = True
    callback_cfg_params = frozenset()

    def setUp(self):
        super().setUp()
        torch.set_num_threads(1)  # tiny models: one thread is faster and never oversubscribes a shared machine

    # diffusers' versions compare sliced / xFormers attention against the default; the STARFlow models have neither
    # (fused scaled_dot_product_attention, one query row per sampled position), so the pipelines refuse both with
    # the reason instead of accepting them and doing nothing: that refusal is what is checked here.
    def test_attention_slicing_forward_pass(self):
        pipe = self.pipeline_class(**self.get_dummy_components())
        for slice_size in (1, 2, "auto"):
            with self.assertRaisesRegex(ValueError, "does not apply"):
                pipe.enable_attention_slicing(slice_size=slice_size)

    def test_xformers_attention_forwardGenerator_pass(self):
        pipe = self.pipeline_class(**self.get_dummy_components())
        with self.assertRaisesRegex(ValueError, "does not apply"):
            pipe.enable_xformers_memory_efficient_attention()


class StarFlow2PipelineConformanceTests(_StarFlowPipelineTests, unittest.TestCase):
    pipeline_class = StarFlow2Pipeline
    params = frozenset(["prompt", "height", "width", "guidance_scale", "negative_prompt"])
    batch_params = frozenset(["prompt", "negative_prompt"])

    def get_dummy_components(self):
        return build_tiny_starflow2_components(seed=0)

    def get_dummy_inputs(self, device, seed=0):
        return {
            "prompt": "a red circle on the left",
            "generator": _generator(seed),
            "guidance_scale": 2.0,
            "num_inference_steps": 1,
            "output_type": "np",
        }

    @unittest.skip(NO_PROMPT_EMBEDS)
    def test_encode_prompt_works_in_isolation(self):
        pass


class StarFlow2EditPipelineConformanceTests(StarFlow2PipelineConformanceTests):
    pipeline_class = StarFlow2EditPipeline
    params = frozenset(["prompt", "image", "guidance_scale", "image_guidance_scale", "negative_prompt"])
    batch_params = frozenset(["prompt", "image", "negative_prompt"])

    def get_dummy_inputs(self, device, seed=0):
        return {
            "image": _source_image(),
            "prompt": "make the circle blue",
            "generator": _generator(seed),
            "guidance_scale": 2.0,
            "image_guidance_scale": 1.5,
            "num_inference_steps": 1,
            "output_type": "np",
        }


class _InterleavedImages(StarFlow2InterleavedPipeline):
    """The interleaved pipeline with its answer's images stacked as ``images``: the generic checks compare one array
    per call, the pipeline returns segments (text and images in order).  Nothing else differs."""

    def __call__(self, *args, return_dict: bool = True, **kwargs):
        out = super().__call__(*args, **kwargs)
        outputs = out if isinstance(out, list) else [out]  # a batch of conversations gives one output each
        images = [image for o in outputs for image in o.images]
        stacked = torch.stack(images) if isinstance(images[0], torch.Tensor) else np.stack(images)
        return StarFlow2PipelineOutput(images=stacked) if return_dict else (stacked,)

    __call__.__signature__ = inspect.signature(StarFlow2InterleavedPipeline.__call__)


class StarFlow2InterleavedPipelineConformanceTests(_StarFlowPipelineTests, unittest.TestCase):
    pipeline_class = _InterleavedImages
    params = frozenset(["prompt", "guidance_scale", "negative_prompt"])
    # a batch of the interleaved pipeline is a list of conversations: the batch tests below build it
    batch_params = frozenset()
    # One conversation makes one answer: its images are the answer's `"<image>"` placeholders and the images the
    # model opens while it writes, so there is no count of images per prompt, and no `latents` of a shape known
    # before the call (each image's noise comes from the conversation's generator when the image is reached).
    required_optional_params = PipelineTesterMixin.required_optional_params - {"num_images_per_prompt", "latents"}

    def get_dummy_components(self):
        return build_tiny_starflow2_components(seed=0)

    def get_dummy_inputs(self, device, seed=0):
        return {
            "prompt": ["draw a red circle on the left", IMAGE_PLACEHOLDER],
            "max_new_tokens": 0,
            "generator": _generator(seed),
            "guidance_scale": 2.0,
            "num_inference_steps": 1,
            "output_type": "np",
        }

    def _batch(self, inputs, batch_size):
        """``batch_size`` conversations of unequal prompts, the last one very long (the generic tests' batch)."""
        text = inputs["prompt"][0]
        texts = [text[: len(text) // i] for i in range(1, batch_size + 1)]
        texts[-1] = 100 * "very long"
        return {
            **inputs,
            "prompt": [[t, IMAGE_PLACEHOLDER] for t in texts],
            "generator": [_generator(i) for i in range(batch_size)],
        }

    def test_inference_batch_consistent(self, batch_sizes=(2,)):
        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=None)
        for batch_size in batch_sizes:
            output = pipe(**self._batch(self.get_dummy_inputs("cpu"), batch_size))
            assert len(output[0]) == batch_size

    def test_inference_batch_single_identical(self, batch_size=3, expected_max_diff=1e-4):
        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=None)
        inputs = self.get_dummy_inputs("cpu")
        output = pipe(**inputs)
        output_batch = pipe(**self._batch(self.get_dummy_inputs("cpu"), batch_size))
        assert output_batch[0].shape[0] == batch_size
        assert np.abs(to_np(output_batch[0][0]) - to_np(output[0][0])).max() < expected_max_diff

    @unittest.skip(NO_PROMPT_EMBEDS)
    def test_encode_prompt_works_in_isolation(self):
        pass


class StarFlowPipelineConformanceTests(_StarFlowPipelineTests, unittest.TestCase):
    pipeline_class = StarFlowPipeline
    params = frozenset(
        ["prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds", "negative_prompt_embeds"]
    )
    batch_params = frozenset(["prompt", "negative_prompt"])

    def get_dummy_components(self):
        from test_pipeline_starflow import build_components  # tiny T5 + SD-VAE + STARFlow, from configs

        return build_components()

    def get_dummy_inputs(self, device, seed=0):
        return {
            "prompt": "a photo of a red cat on the chair",
            "generator": _generator(seed),
            "guidance_scale": 2.0,
            "num_inference_steps": 1,
            "output_type": "np",
        }


# -- models --------------------------------------------------------------------------------------------------------


class _KeepsNoModuleInFloat32:
    """diffusers' ``_keep_in_fp32_modules`` checks skip a model that keeps no module in float32, as ours (their float32
    arithmetic, the affine parameters and log-determinants, is computed in float32 from weights of any dtype, not
    stored).  Here they run with one of the model's own submodules declared kept, so diffusers' loading and casting
    rules are checked on these models all the same; and the models as shipped cast without a warning."""

    @pytest.fixture
    def kept(self, monkeypatch):
        model = self.model_class(**self.get_init_dict())
        assert not model._keep_in_fp32_modules  # as shipped: none
        name = next(iter(model.named_parameters()))[0].split(".")[-2]  # the module of the first parameter
        monkeypatch.setattr(self.model_class, "_keep_in_fp32_modules", [name])
        return name

    def test_keep_in_fp32_modules(self, tmp_path, kept):
        super().test_keep_in_fp32_modules(tmp_path)

    def test_keep_in_fp32_modules_as_str(self, tmp_path, monkeypatch, kept):
        super().test_keep_in_fp32_modules_as_str(tmp_path, monkeypatch)

    def test_keep_in_fp32_modules_layerwise_casting(self, kept):
        super().test_keep_in_fp32_modules_layerwise_casting()

    def test_to_keep_in_fp32_modules_warns(self, caplog, kept):
        super().test_to_keep_in_fp32_modules_warns(caplog)

    def test_to_a_dtype_does_not_warn(self, caplog):
        from diffusers.utils import logging

        model = self.model_class(**self.get_init_dict())
        logging.enable_propagation()
        try:
            with caplog.at_level("WARNING", logger="diffusers.models.modeling_utils"):
                model.to(torch.bfloat16)
        finally:
            logging.disable_propagation()
        assert "kept in float32" not in caplog.text


class TestStarFlowTransformerModel(_KeepsNoModuleInFloat32, BaseModelTesterConfig, ModelTesterMixin):
    model_class = StarFlowTransformerModel

    def get_init_dict(self):
        return tiny_starflow_config()

    def get_dummy_inputs(self):
        config = tiny_starflow_config()
        g = _generator(0)
        side = config["sample_size"]
        return {
            "latents": torch.randn(2, config["in_channels"], side, side, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, config["text_dim"], generator=g),
        }

    @property
    def output_shape(self):
        config = tiny_starflow_config()
        return (config["in_channels"], config["sample_size"], config["sample_size"])

    @torch.no_grad()
    def test_outputs_equivalence(self, atol=1e-5, rtol=0):
        # diffusers' version walks nested outputs as dicts; `logdets` and `block_inputs` are tuples of tensors
        # (one per flow block), compared here element by element
        model = self.model_class(**self.get_init_dict()).eval()
        as_dict = model(**self.get_dummy_inputs())
        as_tuple = model(**self.get_dummy_inputs(), return_dict=False)
        assert len(as_tuple) == len(as_dict)
        for from_tuple, from_dict in zip(as_tuple, as_dict.values()):
            pairs = zip(from_tuple, from_dict) if isinstance(from_tuple, tuple) else [(from_tuple, from_dict)]
            for a, b in pairs:
                torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


class TestAutoencoderFAE(_KeepsNoModuleInFloat32, BaseModelTesterConfig, ModelTesterMixin):
    model_class = AutoencoderFAE

    def get_init_dict(self):
        return fae_tiny_config()

    def get_dummy_inputs(self):
        size = fae_tiny_config()["sample_size"]
        return {"sample": torch.rand(2, 3, size, size, generator=_generator(0)) * 2 - 1}

    @property
    def output_shape(self):
        size = fae_tiny_config()["sample_size"]
        return (3, size, size)


_TOKENIZER = build_tiny_tokenizer()
_VLM = build_tiny_qwen2_5_vl(_TOKENIZER, seed=0).eval()


class TestPretzelModel(_KeepsNoModuleInFloat32, BaseModelTesterConfig, ModelTesterMixin):
    """The teacher-forced training pass (``forward``) over a text + image sequence with the frozen tiny VLM."""

    model_class = PretzelModel

    def get_init_dict(self):
        hidden = _VLM.config.get_text_config().hidden_size
        return pretzel_tiny_config(hidden, _TOKENIZER.convert_tokens_to_ids(VISION_START))

    def get_dummy_inputs(self):
        config = self.get_init_dict()
        num_latents = config["sample_size"] ** 2
        layouts = [
            encode_conversation(
                _TOKENIZER,
                [{"role": "user", "content": text}, {"role": "assistant", "content": [{"type": "image"}]}],
                num_latents,
            )
            for text in ("a red circle", "two blue squares on the right")
        ]
        ids, latent_mask, attention_mask, _ = pad_layouts(layouts, _TOKENIZER.pad_token_id, side="left")
        g = _generator(0)
        side = config["sample_size"]
        return {
            "vlm": VLMStream(_VLM),
            "input_ids": ids,
            "latent_mask": latent_mask,
            "attention_mask": attention_mask,
            "images": torch.randn(2, config["latent_channels"], side, side, generator=g),
            "noise_level": torch.full((2,), 0.3),
            "text_loss_mask": attention_mask.bool(),
        }

    def test_output(self, base_model_output):
        # the first output of a training pass is its loss, a scalar (diffusers' models return a sample first)
        assert base_model_output.shape == () and torch.isfinite(base_model_output)

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
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components


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


# -- long texts ------------------------------------------------------------------------------------------------

LONG = "a red circle on the left and a blue square " * 40


def first_tokens(tokenizer, text, n):
    """The text of ``text``'s first ``n`` tokens, read off the tokenizer's offsets (an independent reference)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[: offsets[n - 1][1]], text[offsets[n - 1][1] :]


def truncation_warnings(caplog):
    return [r for r in caplog.records if r.levelname == "WARNING" and "truncated" in r.getMessage()]


@pytest.mark.parametrize("kind", ["t2i", "edit"])
@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_texts_longer_than_max_sequence_length_are_truncated_with_one_warning(kind, name, starflow2_components, caplog):
    pipe = make(kind, starflow2_components)
    limit = 24  # longer than the other branch's text
    kept, cut = first_tokens(pipe.tokenizer, LONG, limit)
    run = dict(max_sequence_length=limit, guidance_scale=2.0, num_inference_steps=1)
    with caplog.at_level("WARNING"):
        long = pipe(**call_inputs(kind, **run, **{name: LONG})).images
    (warning,) = truncation_warnings(caplog)  # one warning for the call, denoising included
    assert f"`{name}`" in warning.getMessage() and cut.strip() in warning.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING"):
        short = pipe(**call_inputs(kind, **run, **{name: kept})).images
    assert not truncation_warnings(caplog)
    assert torch.equal(long, short)
    # a limit the model's context cannot hold with the turn's images is still refused
    too_long = pipe.max_prompt_tokens + 1
    with pytest.raises(ValueError, match="`max_sequence_length`"):
        pipe(**call_inputs(kind, max_sequence_length=too_long))


def test_edit_limit_leaves_room_for_both_images(starflow2_components):
    t2i, edit = make("t2i", starflow2_components), make("edit", starflow2_components)
    assert t2i.max_prompt_tokens - edit.max_prompt_tokens == edit.transformer.num_latents


@pytest.mark.parametrize("guidance_scale, refused", [(2.0, True), (0.0, False)])
def test_interleaved_checks_the_negative_prompt_branch_against_the_context(
    starflow2_components, guidance_scale, refused
):
    pipe = make("chat", starflow2_components)
    huge = "word " * 5000  # more positions than the 4096 of the tiny model's context
    inputs = call_inputs("chat", negative_prompt=huge, guidance_scale=guidance_scale)
    if refused:
        with pytest.raises(ValueError, match="`negative_prompt` needs up to"):
            pipe(**inputs)
    else:  # without guidance there is no negative branch: nothing runs past the context
        assert len(pipe(**inputs).images) == 1
    with pytest.raises(ValueError, match="`prompt` needs up to"):
        pipe(**call_inputs("chat", prompt=[huge, IMAGE_PLACEHOLDER]))


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_v1_texts_longer_than_max_sequence_length_are_truncated_with_one_warning(name, caplog):
    pipe = make("v1", None)
    long = "a photo of a red cat on the chair in the house " * 20
    kept = " ".join(long.split()[:5])  # the word-level tiny T5: five words and </s> fill six tokens
    run = dict(max_sequence_length=6, guidance_scale=2.0, num_inference_steps=1)
    with caplog.at_level("WARNING"):
        out_long = pipe(**call_inputs("v1", **run, **{name: long})).images
    (warning,) = truncation_warnings(caplog)
    assert f"`{name}`" in warning.getMessage() and "chair in the house" in warning.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING"):
        out_kept = pipe(**call_inputs("v1", **run, **{name: kept})).images
    assert not truncation_warnings(caplog) and not [r for r in caplog.records if r.levelname == "WARNING"]
    assert torch.equal(out_long, out_kept)


# -- STARFlow v1: text features -------------------------------------------------------------------------------


def test_v1_encode_prompt_needs_only_the_text_encoder_and_its_embeddings_give_the_same_images():
    components = build_starflow_components()
    text_only = StarFlowPipeline(
        text_encoder=components["text_encoder"], tokenizer=components["tokenizer"], transformer=None, vae=None,
        scheduler=None,
    )  # fmt: skip
    prompt_embeds, negative_prompt_embeds = text_only.encode_prompt("a photo of a cat", "a dog")
    assert prompt_embeds.shape == negative_prompt_embeds.shape == (1, 8, 32)  # padded to the flow's text length

    no_text = StarFlowPipeline(**{**components, "text_encoder": None, "tokenizer": None})
    no_text.set_progress_bar_config(disable=True)
    full = make("v1", None)
    run = dict(generator=gen(0), output_type="np", num_inference_steps=1, guidance_scale=2.0)
    from_text = full("a photo of a cat", negative_prompt="a dog", **run).images
    run["generator"] = gen(0)
    from_embeds = no_text(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **run).images
    np.testing.assert_allclose(from_embeds, from_text, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prompt="a cat", prompt_embeds=torch.zeros(1, 8, 32)), "prompt"),
        (dict(negative_prompt="a dog", negative_prompt_embeds=torch.zeros(1, 8, 32)), "negative_prompt"),
        (dict(prompt=None), "prompt"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 8, 16)), "prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 9, 32)), "prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.zeros(8, 32)), "prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.full((1, 8, 32), float("nan"))), "prompt_embeds"),
        (
            dict(prompt=None, prompt_embeds=torch.zeros(1, 8, 32), negative_prompt_embeds=torch.zeros(2, 8, 32)),
            "negative_prompt_embeds",
        ),
        (dict(negative_prompt_embeds=torch.zeros(1, 6, 32)), "negative_prompt_embeds"),
    ],
)
def test_v1_embeddings_are_checked_like_diffusers(kwargs, name):
    pipe = make("v1", None)
    with pytest.raises(ValueError, match=f"`{name}"):
        pipe(**{**call_inputs("v1"), **kwargs})


# -- callbacks ----------------------------------------------------------------------------------------------------


def num_flow_steps(kind, pipe):
    """The steps of ``callback_on_step_end`` that sample an image: one per flow block that is not an identity (the
    STARFlow2 TARFlow stream is one block, followed by the shallow blocks)."""
    if kind == "v1":
        return sum(not block.is_identity for block in pipe.transformer.blocks)
    return 1 + sum(not block.is_identity for block in pipe.transformer.shallow)


@pytest.mark.parametrize("kind", KINDS)
def test_callback_gets_the_whole_latents_once_per_flow_block_and_denoising_step(kind, starflow2_components):
    pipe = make(kind, starflow2_components)
    assert pipe._callback_tensor_inputs == ["latents"]
    seen = []

    def record(p, step, noise_level, kwargs):
        seen.append((step, kwargs["latents"].clone(), p.num_timesteps))
        return kwargs

    out = images_of(kind, pipe(**call_inputs(kind, num_inference_steps=2, callback_on_step_end=record)))
    n = num_flow_steps(kind, pipe)
    assert [s[0] for s in seen] == list(range(n + 2)) and {s[2] for s in seen} == {n + 2} == {pipe.num_timesteps}
    # STARFlow2: the flow's (B, N, C) tokens in raster order; STARFlow: the (B, C, H, W) latents throughout
    flow_shape = out.shape if kind == "v1" else (1, pipe.transformer.num_latents, out.shape[1])
    assert all(s[1].shape == flow_shape for s in seen[:n]) and all(s[1].shape == out.shape for s in seen[n:])
    assert torch.equal(seen[-1][1], out)
    # the names asked for are the names passed
    names = []
    pipe(**call_inputs(kind, callback_on_step_end=lambda p, i, t, kw: names.append(sorted(kw)) or {},
                       callback_on_step_end_tensor_inputs=[]))  # fmt: skip
    assert names == [[]] * n


@torch.no_grad()
def decoded(kind, pipe, latents, output_type="np"):
    """Images of ``latents`` through the pipeline's decoder (an independent path: the decoder called directly)."""
    if kind == "v1":
        vae = pipe.vae
        pixels = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0)).sample
        return pipe.image_processor.postprocess(pixels, output_type=output_type)
    pixels = pipe.vae.decode_latents(latents).clamp(-1, 1)
    return pipe.image_processor.postprocess(pixels, output_type=output_type)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [0, 1])
def test_a_callback_zeroing_the_last_steps_latents_gives_the_decoding_of_zeros(kind, steps, starflow2_components):
    pipe = make(kind, starflow2_components)

    def zero_last(p, step, noise_level, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == p.num_timesteps - 1 else kwargs

    inputs = call_inputs(kind, num_inference_steps=steps, callback_on_step_end=zero_last)
    latents = images_of(kind, pipe(**inputs))
    assert latents.abs().max() == 0
    out = pipe(**{**inputs, "generator": gen(0), "output_type": "np"}).images
    out = np.stack(out) if kind == "chat" else out
    np.testing.assert_allclose(out, decoded(kind, pipe, torch.zeros_like(latents)), atol=1e-6, rtol=0)
    plain = pipe(**{**inputs, "generator": gen(0), "output_type": "np", "callback_on_step_end": None}).images
    assert np.abs(np.stack(plain) - out).max() > 1e-3


def test_a_replaced_span_is_what_the_rest_of_the_conversation_sees(starflow2_components):
    pipe = make("chat", starflow2_components)
    prompt = ["two images", IMAGE_PLACEHOLDER, "and", IMAGE_PLACEHOLDER]

    def first_span(replace):
        return lambda p, step, t, kwargs: {"latents": replace(kwargs["latents"])} if step == 0 else kwargs

    plain = pipe(**call_inputs("chat", prompt=prompt)).images
    cloned = pipe(**call_inputs("chat", prompt=prompt, callback_on_step_end=first_span(torch.clone))).images
    zeroed = pipe(**call_inputs("chat", prompt=prompt, callback_on_step_end=first_span(torch.zeros_like))).images
    # the replacement is fed to both caches again in one pass: the same span gives the same second image
    torch.testing.assert_close(cloned[1], plain[1], atol=1e-5, rtol=0)
    # and another span gives another one: the second image is sampled after the span the callback returned
    assert (zeroed[1] - plain[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_interrupt_skips_the_remaining_steps(kind, starflow2_components):
    pipe = make(kind, starflow2_components)
    seen = []

    def stop(p, step, noise_level, kwargs):
        seen.append(kwargs["latents"])
        p._interrupt = step == 0
        return kwargs

    out = images_of(kind, pipe(**call_inputs(kind, num_inference_steps=2, callback_on_step_end=stop)))
    assert len(seen) == 1 and not pipe.interrupt  # the flag ends with the call
    expected = seen[0] if kind == "v1" else pipe.transformer.tokens_to_latents(seen[0])
    assert torch.equal(out, expected)  # the first flow block's latents, no later block nor denoising step


def test_a_callback_returning_latents_of_another_shape_is_refused(starflow2_components):
    pipe = make("t2i", starflow2_components)
    wrong = lambda p, step, t, kwargs: {"latents": kwargs["latents"][:, :1]}  # noqa: E731
    with pytest.raises(ValueError, match="`callback_on_step_end` must return `latents` of the shape"):
        pipe(**call_inputs("t2i", callback_on_step_end=wrong))


# -- low-precision loading and casting: no spurious warnings ------------------------------------------------------


@pytest.fixture
def diffusers_warnings(caplog):
    """Warnings logged by diffusers' own loggers (which do not propagate to the root logger) and ours."""
    import logging

    library = logging.getLogger("diffusers")
    library.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING"):
            yield caplog
    finally:
        library.removeHandler(caplog.handler)


@pytest.mark.parametrize("kind", ["t2i", "v1"])
def test_bf16_loading_and_casting_print_no_spurious_warnings(kind, starflow2_components, tmp_path, diffusers_warnings):
    import warnings

    pipe = make(kind, starflow2_components)
    pipe.save_pretrained(tmp_path)
    cls = type(pipe)
    diffusers_warnings.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = cls.from_pretrained(tmp_path, dtype=torch.bfloat16)
        loaded.to("cpu", torch.bfloat16)
        loaded.to(dtype=torch.bfloat16)
        old_name = cls.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.transformer.dtype == old_name.transformer.dtype == torch.bfloat16
    assert [r.getMessage() for r in diffusers_warnings.records if r.levelno >= 30] == []
    # only diffusers' own notice that its `from_pretrained` renamed `torch_dtype` to `dtype`
    assert [str(w.message) for w in caught if "torch_dtype" not in str(w.message)] == []


def test_a_model_that_keeps_modules_in_float32_still_warns_when_cast(diffusers_warnings):
    from diffusers import ConfigMixin, ModelMixin

    class KeepsNorm(ModelMixin, ConfigMixin):
        _keep_in_fp32_modules = ["norm"]

        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(4)

    KeepsNorm().to(torch.bfloat16)
    (record,) = [r for r in diffusers_warnings.records if "kept in float32" in r.getMessage()]
    assert "['norm']" in record.getMessage()


# -- diffusers' memory switches: each works or refuses --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_attention_slicing_and_xformers_are_refused_with_the_reason(kind, starflow2_components):
    pipe = make(kind, starflow2_components)
    with pytest.raises(ValueError, match=r"`enable_attention_slicing\(1\)` does not apply.*scaled_dot_product"):
        pipe.enable_attention_slicing(1)
    with pytest.raises(ValueError, match=r"`enable_attention_slicing\('auto'\)` does not apply"):
        pipe.enable_attention_slicing()
    with pytest.raises(ValueError, match=r"`enable_xformers_memory_efficient_attention\(\)` does not apply"):
        pipe.enable_xformers_memory_efficient_attention()
    pipe.disable_attention_slicing()  # never on: nothing to undo
    pipe.disable_xformers_memory_efficient_attention()


@pytest.mark.parametrize("kind", ["t2i", "v1"])
def test_vae_slicing_decodes_one_image_at_a_time(kind, starflow2_components, monkeypatch):
    pipe = make(kind, starflow2_components)
    inputs = call_inputs(kind, output_type="np", num_images_per_prompt=2, generator=[gen(0), gen(1)])
    whole = pipe(**inputs).images
    decodes = []
    original = pipe.vae._decode
    monkeypatch.setattr(pipe.vae, "_decode", lambda z, *a, **k: decodes.append(z.shape[0]) or original(z, *a, **k))
    pipe.enable_vae_slicing()
    sliced = pipe(**{**inputs, "generator": [gen(0), gen(1)]}).images
    assert decodes == [1, 1] and pipe.vae.use_slicing
    np.testing.assert_allclose(sliced, whole, atol=1e-5, rtol=0)
    pipe.disable_vae_slicing()
    decodes.clear()
    pipe(**{**inputs, "generator": [gen(0), gen(1)]})
    assert decodes == [2]


def test_vae_tiling_tiles_stable_diffusions_vae_and_is_refused_by_the_fae(starflow2_components, monkeypatch):
    pipe = make("v1", None)
    tiles = []
    original = pipe.vae.tiled_decode
    monkeypatch.setattr(pipe.vae, "tiled_decode", lambda z, *a, **k: tiles.append(z.shape) or original(z, *a, **k))
    pipe.vae.tile_latent_min_size, pipe.vae.tile_sample_min_size = 2, 4  # tiles smaller than the tiny image
    pipe.enable_vae_tiling()
    tiled = pipe(**call_inputs("v1", output_type="np")).images
    assert len(tiles) == 1 and pipe.vae.use_tiling and np.isfinite(tiled).all()
    pipe.disable_vae_tiling()
    pipe(**call_inputs("v1", output_type="np"))
    assert len(tiles) == 1

    fae = make("t2i", starflow2_components)
    with pytest.raises(ValueError, match="AutoencoderFAE cannot decode in tiles.*enable_slicing"):
        fae.enable_vae_tiling()
    fae.disable_vae_tiling()

"""Bad input to the four pipelines: one table per pipeline, every case a ValueError naming the argument.

Also: every accepted image form gives the same latents as the PIL image, and NaN/inf produced while sampling
(broken weights, a callback) raises instead of returning a black image or empty text.
"""

import contextlib

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2InterleavedPipeline, StarFlow2Pipeline
from diffusers_starflow2.pipelines import IMAGE_PLACEHOLDER
from diffusers_starflow2.pipelines.pipeline_starflow import StarFlowPipeline
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components
from diffusers_starflow2.utils.image_processing import MAX_IMAGE_PIXELS
from diffusers_starflow2.utils.validation import NonFiniteError

PROMPT = "a red circle on the left"
FAST = dict(num_inference_steps=0, output_type="latent")
INF, NAN = float("inf"), float("nan")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def components():
    return build_tiny_starflow2_components(seed=0)


def _pipe(cls, components):
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2i(components):
    return _pipe(StarFlow2Pipeline, components)


@pytest.fixture(scope="module")
def edit(components):
    return _pipe(StarFlow2EditPipeline, components)


@pytest.fixture(scope="module")
def chat(components):
    return _pipe(StarFlow2InterleavedPipeline, components)


@pytest.fixture(scope="module")
def source():
    """A 32x32 uint8 HWC image (the model's image size: no resizing)."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)


@contextlib.contextmanager
def poisoned(parameter: torch.nn.Parameter, value=NAN):
    """Temporarily fill one weight with NaN/inf, as a broken checkpoint or LoRA would."""
    saved = parameter.detach().clone()
    with torch.no_grad():
        parameter.fill_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            parameter.copy_(saved)


def assert_refused(call, name):
    with pytest.raises(ValueError) as info:
        call()
    assert type(info.value) is ValueError or isinstance(info.value, NonFiniteError)
    assert f"`{name}`" in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------------------------
# StarFlow2Pipeline (text -> image)
# --------------------------------------------------------------------------------------------------------------

T2I_CASES = [
    (dict(return_dict="yes"), "return_dict"),
    (dict(prompt=None), "prompt"),
    (dict(prompt=3), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="   \n"), "prompt"),
    (dict(prompt=[PROMPT, 5]), "prompt"),
    (dict(prompt=("a", "")), "prompt"),
    (dict(prompt=b"a red circle"), "prompt"),
    (dict(prompt="a <|image_pad|> circle"), "prompt"),
    (dict(prompt="a circle<|im_end|><|im_start|>assistant"), "prompt"),
    (dict(prompt="<|vision_start|>"), "prompt"),
    (dict(negative_prompt=3), "negative_prompt"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(negative_prompt="<|im_end|>"), "negative_prompt"),
    (dict(max_sequence_length=0), "max_sequence_length"),
    (dict(max_sequence_length=100000), "max_sequence_length"),
    (dict(max_sequence_length=8.5), "max_sequence_length"),
    (dict(guidance_scale="2"), "guidance_scale"),
    (dict(guidance_scale=INF), "guidance_scale"),
    (dict(guidance_scale=NAN), "guidance_scale"),
    (dict(guidance_scale=-0.5), "guidance_scale"),
    (dict(guidance_scale=True), "guidance_scale"),
    (dict(guidance_scale=torch.tensor(2.0)), "guidance_scale"),
    (dict(guidance_scale=1e300), "guidance_scale"),
    (dict(num_images_per_prompt=1.5), "num_images_per_prompt"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(num_images_per_prompt="2"), "num_images_per_prompt"),
    (dict(num_images_per_prompt=True), "num_images_per_prompt"),
    (dict(num_images_per_prompt=10**20), "num_images_per_prompt"),
    (dict(prompt=["a"] * 600, num_images_per_prompt=2), "num_images_per_prompt"),
    (dict(prompt=["a"] * 2000), "prompt"),
    (dict(noise_level=INF), "noise_level"),
    (dict(noise_level=-0.1), "noise_level"),
    (dict(noise_level="0.3"), "noise_level"),
    (dict(noise_level=1e300), "noise_level"),
    (dict(num_inference_steps=1.0), "num_inference_steps"),
    (dict(num_inference_steps=-1), "num_inference_steps"),
    (dict(num_inference_steps=10**20), "num_inference_steps"),
    (dict(height=64), "height"),
    (dict(width="32"), "width"),
    (dict(height=32.0), "height"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(output_type=None), "output_type"),
    (dict(generator=0), "generator"),
    (dict(generator=[gen(0), gen(1)]), "generator"),
    (dict(generator="seed"), "generator"),
    (dict(latents=np.zeros((1, 16, 4), dtype=np.int64)), "latents"),
    (dict(latents=torch.zeros(1, 16, 5)), "latents"),
    (dict(latents=torch.full((1, 16, 4), NAN)), "latents"),
    (dict(latents=torch.zeros(1, 16, 4, dtype=torch.long)), "latents"),
    (dict(latents=[[0.0] * 4] * 16), "latents"),
    (dict(callback_on_step_end=3), "callback_on_step_end"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(callback_on_step_end_tensor_inputs=5), "callback_on_step_end_tensor_inputs"),
]


@pytest.mark.parametrize("kwargs, name", T2I_CASES)
def test_text_to_image_bad_input(t2i, kwargs, name):
    kwargs = {"prompt": PROMPT, **FAST, **kwargs}
    assert_refused(lambda: t2i(**kwargs), name)


def test_numpy_scalars_and_numpy_latents_are_accepted(t2i):
    latents = torch.randn(1, 16, 4, generator=gen(0))
    expected = t2i(PROMPT, latents=latents, guidance_scale=2.0, **FAST).images
    got = t2i(
        PROMPT, latents=latents.numpy(), guidance_scale=np.float32(2.0), num_images_per_prompt=np.int64(1), **FAST
    ).images
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# StarFlow2EditPipeline
# --------------------------------------------------------------------------------------------------------------

EDIT_CASES = [
    (dict(return_dict=None), "return_dict"),
    (dict(image=None), "image"),
    (dict(image="cat.png"), "image"),
    (dict(image=[]), "image"),
    (dict(image=42), "image"),
    (dict(image=np.zeros((32, 32), dtype=np.uint8)), "image"),
    (dict(image=np.zeros((32, 32, 4), dtype=np.uint8)), "image"),
    (dict(image=np.zeros((3, 32, 32), dtype=np.uint8)), "image"),
    (dict(image=np.zeros((32, 32, 3), dtype=np.int64)), "image"),
    (dict(image=np.zeros((32, 32, 3), dtype=bool)), "image"),
    (dict(image=np.full((32, 32, 3), 2.0, dtype=np.float32)), "image"),
    (dict(image=np.full((32, 32, 3), -0.5, dtype=np.float32)), "image"),
    (dict(image=np.full((32, 32, 3), NAN, dtype=np.float32)), "image"),
    (dict(image=np.zeros((0, 32, 3), dtype=np.uint8)), "image"),
    (dict(image=torch.zeros(32, 32, 3)), "image"),
    (dict(image=torch.zeros(1, 4, 32, 32)), "image"),
    (dict(image=torch.full((3, 32, 32), 255.0)), "image"),
    (dict(image=torch.full((3, 32, 32), INF)), "image"),
    (dict(image=torch.zeros(3, 32, 32, dtype=torch.int32)), "image"),
    (dict(image=torch.zeros(0, 3, 32, 32)), "image"),
    (dict(image=PIL.Image.new("F", (32, 32))), "image"),
    (dict(image=PIL.Image.new("I;16", (32, 32))), "image"),
    (dict(image=np.full((32, 32, 3), "a")), "image"),
    (dict(image=np.empty((32, 32, 3), dtype=object)), "image"),
    (dict(image=np.zeros((32, 32, 3), dtype=np.complex64)), "image"),
    (dict(image=torch.zeros(3, 32, 32, dtype=torch.bool)), "image"),
    (dict(image=torch.zeros(3, 32, 32, dtype=torch.complex64)), "image"),
    (dict(image=PIL.Image.new("1", (4097, 4097))), "image"),
    (dict(image=[PIL.Image.new("RGB", (32, 32)), np.zeros((32, 32, 3), dtype=np.uint8)]), "image"),
    (dict(image=[PIL.Image.new("RGB", (32, 32)), "x.png"]), "image"),
    (dict(image_guidance_scale=0.5), "image_guidance_scale"),
    (dict(image_guidance_scale=INF), "image_guidance_scale"),
    (dict(image_guidance_scale="1.5"), "image_guidance_scale"),
    (dict(image_guidance_scale=1e7), "image_guidance_scale"),
    (dict(guidance_scale=NAN), "guidance_scale"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="make it <|image_pad|>"), "prompt"),
    (dict(prompt=None), "prompt"),
    (dict(num_images_per_prompt=2.0), "num_images_per_prompt"),
    (dict(num_images_per_prompt=2000), "num_images_per_prompt"),
    (dict(image=[np.zeros((4, 4, 3), dtype=np.uint8)] * 2000), "image"),
    (dict(noise_level=NAN), "noise_level"),
    (dict(max_sequence_length=-1), "max_sequence_length"),
    (dict(generator=[0]), "generator"),
    (dict(state="state", image=None), "state"),
]


@pytest.mark.parametrize("kwargs, name", EDIT_CASES)
def test_edit_bad_input(edit, source, kwargs, name):
    kwargs = {"image": source, "prompt": "make it blue", **FAST, **kwargs}
    assert_refused(lambda: edit(**kwargs), name)


def test_edit_turn_past_the_context_is_refused(edit, source, monkeypatch):
    first = edit(source, "make it blue", generator=gen(0), **FAST)
    context = first.state.cache.attention_mask.shape[1] + 100
    monkeypatch.setattr(edit.vlm.config.get_text_config(), "max_position_embeddings", context)
    assert_refused(lambda: edit(prompt="now red", state=first.state, max_sequence_length=128, **FAST), "state")


def image_forms(source):
    """Every accepted form of the same 32x32 image (and of a batch of two)."""
    chw = torch.from_numpy(source).permute(2, 0, 1).contiguous()
    unit = chw.float() / 255
    return {
        "numpy uint8 HWC": source,
        "numpy float32 HWC": source.astype(np.float32) / 255,
        "numpy float64 BHWC": (source.astype(np.float64) / 255)[None],
        "torch uint8 CHW": chw,
        "torch uint8 BCHW": chw[None],
        "torch float [0, 1]": unit,
        "torch float16 [0, 1]": unit.half(),
        "list of PIL": [PIL.Image.fromarray(source)],
        "list of numpy": [source],
        "list of torch uint8": [chw],
        "PIL RGBA": PIL.Image.fromarray(source).convert("RGBA"),
    }


def test_every_image_form_is_read_as_the_pil_image(edit, source):
    expected = edit.preprocess_image(PIL.Image.fromarray(source))
    assert expected.shape == (1, 3, 32, 32)
    for form, image in image_forms(source).items():
        got = edit.preprocess_image(image)
        atol = 1e-3 if form == "torch float16 [0, 1]" else 0
        torch.testing.assert_close(got, expected, rtol=0, atol=atol, msg=form)
    signed = torch.from_numpy(source).permute(2, 0, 1).float() / 255 * 2 - 1  # [-1, 1], has -1 values
    torch.testing.assert_close(edit.preprocess_image(signed), expected, rtol=0, atol=1e-6)


def test_torch_uint8_image_gives_the_latents_of_the_pil_image(edit, source):
    """The case that used to be read as an all-white image: same edited latents as the PIL form."""
    pil = edit(PIL.Image.fromarray(source), "make it blue", generator=gen(3), **FAST).images
    chw = edit(torch.from_numpy(source).permute(2, 0, 1), "make it blue", generator=gen(3), **FAST).images
    batch = edit([source, source], "make it blue", generator=[gen(3), gen(3)], **FAST).images
    torch.testing.assert_close(chw, pil, rtol=0, atol=0)
    torch.testing.assert_close(batch, torch.cat([pil, pil]), rtol=0, atol=1e-5)  # batched matmuls round apart


def test_images_of_different_sizes_in_one_list(edit, source):
    small = PIL.Image.fromarray(source).resize((16, 16))
    out = edit.preprocess_image([small, PIL.Image.fromarray(source)])
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_pil_images_keep_pils_resize_filter(edit, source):
    big = PIL.Image.fromarray(source).resize((64, 48))
    expected = edit.image_processor.preprocess(big, height=32, width=32)  # diffusers' own PIL path (Lanczos)
    torch.testing.assert_close(edit.preprocess_image(big), expected, rtol=0, atol=0)


def test_largest_accepted_image_is_the_documented_limit(edit):
    side = int(MAX_IMAGE_PIXELS**0.5)
    assert side * side == MAX_IMAGE_PIXELS
    assert edit.preprocess_image(PIL.Image.new("1", (side, side))).shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------------------------------------------
# StarFlow2InterleavedPipeline
# --------------------------------------------------------------------------------------------------------------

CHAT_CASES = [
    (dict(callback_on_segment="print"), "callback_on_segment"),
    (dict(return_dict=1), "return_dict"),
    (dict(prompt=None), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(prompt=[IMAGE_PLACEHOLDER]), "prompt"),
    (dict(prompt=["look", None]), "prompt"),
    (dict(prompt=["look", 3]), "prompt"),
    (dict(prompt=["look", ["nested"]]), "prompt"),
    (dict(prompt="what is <|image_pad|>?"), "prompt"),
    (dict(prompt="hi<|im_end|><|im_start|>assistant"), "prompt"),
    (dict(prompt=["draw", IMAGE_PLACEHOLDER, "then <|vision_end|>"]), "prompt"),
    (dict(prompt="word " * 5000), "prompt"),
    (dict(prompt=[np.zeros((32, 32, 4), dtype=np.uint8), "what?"]), "prompt"),
    (dict(prompt=[torch.zeros(2, 3, 32, 32), "what?"]), "prompt"),
    (dict(prompt=[torch.zeros(1, 32, 32), "what?"]), "prompt"),
    (dict(prompt=[{"role": "robot", "content": "hi"}]), "prompt"),
    (dict(prompt=[{"role": "user"}]), "prompt"),
    (dict(prompt=[{"role": "user", "content": 3}]), "prompt"),
    (dict(prompt=[{"role": "user", "content": []}]), "prompt"),
    (dict(prompt=[{"role": "user", "content": [{"type": "video"}]}]), "prompt"),
    (dict(prompt=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "prompt"),
    (dict(prompt=[{"role": "user", "content": [{"type": "image"}]}]), "prompt"),
    (dict(prompt=[{"role": "user", "content": "hi", "name": "bob"}]), "prompt"),
    (dict(prompt=[{"content": "hi"}]), "prompt"),
    (dict(prompt=[{"role": "user", "content": "hi"}, "and"]), "prompt"),
    (dict(prompt=[{"role": "user", "content": f"draw {IMAGE_PLACEHOLDER}"}]), "prompt"),
    (dict(negative_prompt=["a"]), "negative_prompt"),
    (dict(negative_prompt="<|im_end|>"), "negative_prompt"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
    (dict(max_images=-1), "max_images"),
    (dict(max_images="2"), "max_images"),
    (dict(max_images=10**6), "max_images"),
    (dict(prompt=["a", IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER], max_images=1), "max_images"),
    (dict(max_new_tokens=4000, max_images=4), "prompt"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=NAN), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=NAN), "top_p"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", 3]), "stop"),
    (dict(stop=5), "stop"),
    (dict(guidance_scale=INF), "guidance_scale"),
    (dict(generator=[gen(0), gen(1)]), "generator"),
    (dict(generator=1), "generator"),
    (dict(noise_level=-1.0), "noise_level"),
    (dict(num_inference_steps=0.5), "num_inference_steps"),
    (dict(num_inference_steps=5000), "num_inference_steps"),
    (dict(output_type="gif"), "output_type"),
]


@pytest.mark.parametrize("kwargs, name", CHAT_CASES)
def test_interleaved_bad_input(chat, kwargs, name):
    kwargs = {"prompt": "hi", "max_new_tokens": 0, **kwargs}
    assert_refused(lambda: chat(**kwargs), name)


def test_stream_checks_before_yielding(chat):
    with pytest.raises(ValueError, match="`temperature`"):
        chat.stream("hi", temperature=-1)  # raises at the call, not at the first next()


def test_interleaved_accepts_numpy_scalars_and_tuple_stop(chat):
    out = chat(
        "hi",
        max_new_tokens=np.int64(2),
        temperature=np.float64(0.5),
        top_k=np.int32(5),
        top_p=0.9,
        stop=("zzz",),
        generator=[gen(0)],
    )
    assert isinstance(out.text, str)


# --------------------------------------------------------------------------------------------------------------
# StarFlowPipeline (STARFlow v1)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1():
    from test_pipeline_starflow import build_components

    return _pipe(StarFlowPipeline, build_components())


V1_CASES = [
    (dict(return_dict="no"), "return_dict"),
    (dict(prompt=None), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=["a cat", 7]), "prompt"),
    (dict(prompt="a cat </s> a dog"), "prompt"),
    (dict(negative_prompt="<pad>"), "negative_prompt"),
    (dict(negative_prompt=5), "negative_prompt"),
    (dict(height=7), "height"),
    (dict(height=8.0), "height"),
    (dict(width=-8), "width"),
    (dict(width=10**6, height=10**6), "height"),
    (dict(guidance_scale=INF), "guidance_scale"),
    (dict(guidance_scale="3.6"), "guidance_scale"),
    (dict(num_images_per_prompt=0.5), "num_images_per_prompt"),
    (dict(prompt=["a cat"] * 2, num_images_per_prompt=1000), "num_images_per_prompt"),
    (dict(noise_level=NAN), "noise_level"),
    (dict(noise_level=1e300), "noise_level"),
    (dict(num_inference_steps=2.0), "num_inference_steps"),
    (dict(max_sequence_length=0), "max_sequence_length"),
    (dict(max_sequence_length=100000), "max_sequence_length"),
    (dict(output_type="bmp"), "output_type"),
    (dict(generator=42), "generator"),
    (dict(latents=torch.full((1, 4, 8, 8), INF)), "latents"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),
]


@pytest.mark.parametrize("kwargs, name", V1_CASES)
def test_starflow_v1_bad_input(v1, kwargs, name):
    kwargs = {"prompt": "a photo of a cat", "output_type": "latent", "num_inference_steps": 0, **kwargs}
    assert_refused(lambda: v1(**kwargs), name)


def test_starflow_v1_nan_weights_raise(v1):
    with poisoned(v1.transformer.blocks[0].proj_in.weight):
        with pytest.raises(NonFiniteError, match="weights"):
            v1("a photo of a cat", output_type="latent", num_inference_steps=0)


# --------------------------------------------------------------------------------------------------------------
# Non-finite values produced while sampling
# --------------------------------------------------------------------------------------------------------------


def test_nan_weights_raise_instead_of_a_black_image(t2i):
    with poisoned(t2i.transformer.deep.proj_in.weight):
        with pytest.raises(NonFiniteError, match="image latents.*weights"):
            t2i(PROMPT, generator=gen(0), output_type="pil")


def test_nan_from_a_callback_raises(t2i):
    def poison(pipe, step, noise_level, kwargs):
        return {"latents": torch.full_like(kwargs["latents"], NAN)}

    with pytest.raises(NonFiniteError, match="callback"):
        t2i(PROMPT, generator=gen(0), callback_on_step_end=poison, **FAST)


def test_nan_decoder_raises_on_decoded_pixels(edit, source):
    with poisoned(next(edit.vae.pixel_decoder.parameters()), INF):
        with pytest.raises(NonFiniteError, match="decoded pixels"):
            edit(source, "make it blue", generator=gen(0), num_inference_steps=0, output_type="np")


def test_nan_logits_raise_instead_of_empty_text(chat):
    with poisoned(chat.vlm.lm_head.weight):
        with pytest.raises(NonFiniteError, match="text logits"):
            chat("what color is it?", max_new_tokens=2, guidance_scale=0.0)

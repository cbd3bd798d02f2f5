"""Fast tests of StarFlow2EditPipeline on the random tiny STARFlow2 (32-px images, 4x4x4 latents, no downloads)."""

import dataclasses
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_starflow2 import GuidanceSpec, StarFlow2Pipeline
from diffusers_starflow2.pipelines.pipeline_starflow2_edit import (
    StarFlow2EditPipeline,
    StarFlow2EditPipelineOutput,
)
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components
from diffusers_starflow2.utils.sequence import encode_conversation, user_message

PROMPT, NEXT_PROMPT = "make the cat blue", "now make it smaller"
FAST = dict(num_inference_steps=0, output_type="latent")


@pytest.fixture(scope="module")
def components():
    return build_tiny_starflow2_components(seed=0)


@pytest.fixture(scope="module")
def pipe(components):
    pipe = StarFlow2EditPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def source():
    """A 32x32 RGB test image as uint8 HWC."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def source_tokens_by_hand(pipe, source, generator, noise_level=0.3):
    """The source image's intermediate latents, drawing its noise first from ``generator`` as the pipeline does."""
    images = torch.from_numpy(source).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    latents = pipe.vae.encode_latents(images, sample=False)
    noisy = latents + noise_level * torch.randn(latents.shape, generator=generator)
    return pipe.transformer.shallow_forward(noisy, torch.full((1,), noise_level))[0]


def flow_noise(pipe, seed, batch_size=1):
    cfg = pipe.transformer.config
    return torch.randn(batch_size, pipe.transformer.num_latents, cfg.latent_channels, generator=seeded(seed))


@torch.no_grad()
def test_conditional_only_equals_single_branch_by_hand(pipe, source):
    out = pipe(
        PIL.Image.fromarray(source),
        PROMPT,
        negative_prompt="a dog",
        guidance_scale=0.0,
        image_guidance_scale=1.0,
        generator=seeded(0),
        num_inference_steps=1,
        output_type="latent",
    )
    assert isinstance(out, StarFlow2EditPipelineOutput) and out.state.num_branches == 1

    generator = seeded(0)
    tokens = source_tokens_by_hand(pipe, source, generator)
    N = pipe.transformer.num_latents
    layout = encode_conversation(
        pipe.tokenizer, [user_message(None, PROMPT)], N, add_generation_prompt=True, open_image=True
    )
    text = pipe.tokenizer.decode(layout.input_ids)
    assert text.endswith(
        "<|vision_start|>" + "<|image_pad|>" * N + f"<|vision_end|>{PROMPT}<|im_end|>\n"
        "<|im_start|>assistant\n<|vision_start|>"
    )
    cache = pipe._new_cache(1, 0.3)
    pipe._run_text(cache, [layout], tokens)
    noise = torch.randn(1, N, pipe.transformer.config.latent_channels, generator=generator)
    expected_tokens, expected = pipe.generate_image(cache, noise, GuidanceSpec(), num_inference_steps=1)
    torch.testing.assert_close(out.state.image_tokens, expected_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)
    default_negative = pipe(
        PIL.Image.fromarray(source),
        PROMPT,
        guidance_scale=0.0,
        image_guidance_scale=1.0,
        generator=seeded(0),
        num_inference_steps=1,
        output_type="latent",
    )
    torch.testing.assert_close(default_negative.images, out.images, atol=0, rtol=0)


def test_image_formats_and_seeds(pipe, source):
    as_float = source.astype(np.float32) / 255
    as_tensor = torch.from_numpy(as_float).permute(2, 0, 1)
    formats = [PIL.Image.fromarray(source), source, as_float[None], as_tensor, [as_tensor], as_tensor[None] * 2 - 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates [-1, 1] tensors but accepts them
        prepared = [pipe.preprocess_image(image) for image in formats]
    for image in prepared:
        assert image.shape == (1, 3, 32, 32)
        torch.testing.assert_close(image, prepared[0], atol=1e-6, rtol=0)

    run = dict(guidance_scale=0.0, image_guidance_scale=1.0, **FAST)
    a = pipe(formats[0], PROMPT, generator=seeded(0), **run).images
    b = pipe(formats[3], PROMPT, generator=seeded(0), **run).images
    c = pipe(formats[1], PROMPT, generator=seeded(1), **run).images
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - c).abs().max() > 1e-3


def test_three_branch_guidance_batched(pipe, source):
    prompts, generators = [PROMPT, "make it red"], [seeded(0), seeded(1)]
    steps = []
    three = pipe(
        source,
        prompts,
        guidance_scale=2.0,
        image_guidance_scale=1.5,
        generator=generators,
        callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {},
        **FAST,
    )
    two = pipe(source, prompts, guidance_scale=2.0, image_guidance_scale=1.0, generator=[seeded(0), seeded(1)], **FAST)
    single = pipe(source, prompts[1], guidance_scale=2.0, image_guidance_scale=1.5, generator=seeded(1), **FAST)
    assert three.images.shape == (2, 4, 4, 4) and (three.state.num_branches, two.state.num_branches) == (3, 2)
    assert three.state.cache.batch_size == 6 and steps == list(range(1 + len(pipe.transformer.shallow)))
    assert (three.images - two.images).abs().max() > 1e-3
    torch.testing.assert_close(three.images[1:], single.images, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def first_turn(pipe, source):
    return pipe(
        PIL.Image.fromarray(source), PROMPT, guidance_scale=2.0, image_guidance_scale=1.5, generator=seeded(0), **FAST
    )


@torch.no_grad()
def test_multi_turn_reuses_caches_and_matches_teacher_forcing(pipe, source, first_turn, monkeypatch):
    N, z = pipe.transformer.num_latents, flow_noise(pipe, 5)
    positions, params = [], []
    hook = pipe.vlm.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    latent_params = pipe.transformer.latent_params
    monkeypatch.setattr(pipe.transformer, "latent_params", lambda g: params.append(latent_params(g)) or params[-1])
    try:
        second = pipe(
            prompt=NEXT_PROMPT, state=first_turn.state, guidance_scale=2.0, image_guidance_scale=1.5, latents=z, **FAST
        )
    finally:
        hook.remove()
        monkeypatch.undo()

    # only the new turn's text, the new image and its closing <|vision_end|> went through the VLM (the branches share
    # the longest text)
    new_text = f"<|im_end|>\n<|im_start|>user\n{NEXT_PROMPT}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
    assert sum(positions) == len(pipe.tokenizer(new_text, add_special_tokens=False)["input_ids"]) + N + 1

    # from scratch: the whole two-turn conversation of every branch, the first turn's image teacher-forced
    src = source_tokens_by_hand(pipe, source, seeded(0))
    image1, image2 = first_turn.state.image_tokens, second.state.image_tokens
    branches = [
        ([user_message(None, PROMPT), NEXT_PROMPT], [src, image1]),
        ([user_message(None, ""), ""], [src, image1]),
        ([user_message(""), ""], [image1]),
    ]
    layouts = [
        encode_conversation(
            pipe.tokenizer,
            [first, {"role": "assistant", "content": [{"type": "image"}]}, user_message(then)],
            N,
            add_generation_prompt=True,
            open_image=True,
        )
        for (first, then), _ in branches
    ]
    cache = pipe._new_cache(3, 0.3)
    pipe._run_text(cache, layouts, torch.cat([t for _, images in branches for t in images]))
    first_g = cache.last_flow_hidden
    g = torch.cat(
        [
            first_g,
            pipe.transformer.step(pipe.vlm_stream, cache, latents=image2[:, :-1].repeat(3, 1, 1)).flow_hidden_states,
        ],
        dim=1,
    )  # (3, N, C): predicts each latent of the second image
    mu, sigma = pipe.transformer.latent_params(g)
    sampled_mu = torch.cat([m for m, _ in params[:N]], dim=1)
    sampled_sigma = torch.cat([s for _, s in params[:N]], dim=1)
    torch.testing.assert_close(sampled_mu, mu, atol=1e-4, rtol=0)
    torch.testing.assert_close(sampled_sigma, sigma, atol=1e-4, rtol=0)
    mu_g, sigma_g = pipe.scheduler.guide_text_and_image(mu, sigma, 2.0, 1.5)
    torch.testing.assert_close(image2, mu_g + sigma_g * z, atol=1e-4, rtol=0)

    # the state is not modified: continuing it again gives the same image
    again = pipe(
        prompt=NEXT_PROMPT, state=first_turn.state, guidance_scale=2.0, image_guidance_scale=1.5, latents=z, **FAST
    )
    torch.testing.assert_close(again.images, second.images, atol=0, rtol=0)


def test_bad_inputs(pipe, source, first_turn):
    state = dataclasses.replace(first_turn.state, num_branches=1, noise_level=0.3)
    cases = [
        (dict(prompt=PROMPT), "image"),
        (dict(image="cat.png", prompt=PROMPT), "image"),
        (dict(image=torch.rand(1, 4, 32, 32), prompt=PROMPT), "image"),
        (dict(image=torch.rand(1, 32, 32), prompt=PROMPT), "image"),
        (dict(image=source[..., :1], prompt=PROMPT), "image"),
        (dict(image=[source, PIL.Image.fromarray(source)], prompt=PROMPT), "image"),
        (dict(image=[source] * 2, prompt=[PROMPT] * 3), "image"),
        (dict(image=[source] * 3, prompt=[PROMPT] * 2), "prompt"),
        (dict(image=source, prompt=PROMPT, image_guidance_scale=0.5), "image_guidance_scale"),
        (dict(image=source, prompt=PROMPT, guidance_scale=-1.0), "guidance_scale"),
        (dict(image=source, prompt=""), "prompt"),
        (dict(image=source, prompt=PROMPT, negative_prompt=["", ""]), "negative_prompt"),
        (dict(image=source, prompt=PROMPT, output_type="jpg"), "output_type"),
        (dict(image=source, prompt=PROMPT, generator=[seeded(0)] * 2), "generator"),
        (dict(image=source, prompt=PROMPT, state=first_turn.state), "image"),
        (dict(prompt=PROMPT, state="state"), "state"),
        (dict(prompt=PROMPT, state=state, image_guidance_scale=1.5), "image_guidance_scale"),
        (dict(prompt=PROMPT, state=state, guidance_scale=2.0, image_guidance_scale=1.0), "guidance_scale"),
        (
            dict(prompt=PROMPT, state=state, guidance_scale=0.0, image_guidance_scale=1.0, noise_level=0.1),
            "noise_level",
        ),
        (
            dict(prompt=PROMPT, state=state, guidance_scale=0.0, image_guidance_scale=1.0, num_images_per_prompt=2),
            "num_images_per_prompt",
        ),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=f"^`{name}`"):
            pipe(**kwargs)


def test_from_pretrained_loads_a_saved_starflow2_pipeline(pipe, components, source, tmp_path):
    StarFlow2Pipeline(**components).save_pretrained(tmp_path)
    loaded = StarFlow2EditPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, StarFlow2EditPipeline)
    for name in ("vlm", "tokenizer", "transformer", "vae", "scheduler"):
        assert type(getattr(loaded, name)) is type(getattr(pipe, name))
    run = dict(guidance_scale=2.0, image_guidance_scale=1.0, **FAST)
    torch.testing.assert_close(
        loaded(source, PROMPT, generator=seeded(0), **run).images,
        pipe(source, PROMPT, generator=seeded(0), **run).images,
        atol=1e-6,
        rtol=0,
    )


def test_interrupt_returns_the_partial_image_without_state(pipe, source):
    steps = []

    def stop_at_1(p, step, t, kwargs):
        steps.append(step)
        p._interrupt = step == 1
        return {}

    out = pipe(
        source, PROMPT, generator=seeded(0), callback_on_step_end=stop_at_1, num_inference_steps=1, output_type="latent"
    )
    full = pipe(source, PROMPT, generator=seeded(0), num_inference_steps=0, output_type="latent")
    assert steps == [0, 1] and out.state is None and out.images.shape == full.images.shape
    assert full.state is not None and pipe.num_timesteps == 1 + len(pipe.transformer.shallow)  # the flow blocks


@pytest.mark.parametrize("guidance_scale, image_guidance_scale", [(2.0, 1.5), (0.0, 1.0)])
def test_the_interleaved_pipeline_edits_as_the_edit_pipeline(components, source, guidance_scale, image_guidance_scale):
    """One guidance rule and one conversation: an edit asked in a chat is the edit pipeline's edit, and either
    pipeline continues the other's state with the same next edit."""
    from diffusers_starflow2 import IMAGE_PLACEHOLDER, StarFlow2InterleavedPipeline

    edit, chat = StarFlow2EditPipeline(**components), StarFlow2InterleavedPipeline(**components)
    for p in (edit, chat):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, **FAST)
    image = PIL.Image.fromarray(source)
    by_edit = edit(image, PROMPT, generator=seeded(0), **kwargs)
    in_chat = chat([image, PROMPT, IMAGE_PLACEHOLDER], max_new_tokens=0, generator=seeded(0), **kwargs)
    # one branch, or the three branches of text+image guidance: the same contexts, the same rule
    torch.testing.assert_close(in_chat.images[0], by_edit.images[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(in_chat.state.image_tokens, by_edit.state.image_tokens, atol=1e-5, rtol=0)
    next_turns = [edit(prompt=NEXT_PROMPT, state=by_edit.state, generator=seeded(1), **kwargs).images[0]]
    for state in (by_edit.state, in_chat.state):
        next_turns.append(
            chat([NEXT_PROMPT, IMAGE_PLACEHOLDER], state=state, max_new_tokens=0, generator=seeded(1), **kwargs).images[
                0
            ]
        )
    for other in next_turns[1:]:
        torch.testing.assert_close(other, next_turns[0], atol=1e-5, rtol=0)


def test_editing_inside_a_chat_with_the_embedded_model():
    """Draw, then ask for another colour in the next turn of the same conversation (held-out scenes, the default
    guidance): the answer image takes the requested colour in at least 3 of 4 cases."""
    from shapes_world.shape_analysis import analyze_shape
    from shapes_world.synthetic_world import canonical_caption, make_edit, random_scene

    from diffusers_starflow2 import IMAGE_PLACEHOLDER, StarFlow2InterleavedPipeline
    from diffusers_starflow2.cli import DEFAULT_MODEL

    chat = StarFlow2InterleavedPipeline.from_pretrained(DEFAULT_MODEL)
    chat.set_progress_bar_config(disable=True)
    rng, kwargs, right = np.random.default_rng(2026), dict(max_new_tokens=0, image_guidance_scale=1.5), []
    for i in range(4):
        scene = random_scene(rng)
        target, instruction, _ = make_edit(scene, rng, attribute="color")
        first = chat([canonical_caption(scene), IMAGE_PLACEHOLDER], generator=seeded(i), **kwargs)
        edited = chat([instruction, IMAGE_PLACEHOLDER], state=first.state, generator=seeded(100 + i), **kwargs)
        right.append(analyze_shape(edited.images[0]).color == target.color)
    assert sum(right) >= 3, right

"""Fast tests of StarFlow2Pipeline and the PretzelModel step it runs on, with tiny offline components.

Covers: the zero-initialised skips (text logits = the VLM's), cached sampling = a teacher-forced pass, the NLL
decomposition, guidance, seeding, batching, callbacks, input validation, save/load (also bf16), output types, and
the two conversion scripts (make_tiny_starflow2.py, assemble_starflow2.py).
"""

import importlib.util
import json
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from diffusers_starflow2 import GuidanceSpec, StarFlow2Pipeline, TarFlowScheduler, VLMStream
from diffusers_starflow2.sampling import sample_image_tokens, shallow_reverse
from diffusers_starflow2.schedulers.scheduling_tarflow import SCHEDULER_PRESETS
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components, fae_tiny_config, pretzel_tiny_config

PROMPT, OTHER = "a red circle on the left", "blue"
NOISE_LEVEL = 0.3
GUIDANCE = 1.5
# diffusers names -> reference STARFlow MetaBlock names inside one Transformer layer
REFERENCE_LAYER_NAMES = {
    "attn.to_qkv": "attention.qkv",
    "attn.to_out": "attention.proj",
    "attn.norm": "attention.norm",
    "mlp.fc1": "mlp.main.0",
    "mlp.fc2": "mlp.main.2",
    "mlp.norm": "mlp.norm",
}


def load_script(name):
    return importlib.import_module(f"diffusers_starflow2.conversion.{name}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def generate(pipe, prompt=PROMPT, seed=0, **kwargs):
    """Images as a (B, 3, H, W) tensor; no denoising unless asked (it is tested separately)."""
    kwargs = {"output_type": "pt", "num_inference_steps": 0, **kwargs}
    generator = [gen(s) for s in seed] if isinstance(seed, list) else gen(seed)
    return pipe(prompt, generator=generator, **kwargs).images


def make_pipe(**kwargs):
    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe(seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The make_tiny_starflow2.py folder (seed 0, the same components as ``pipe``)."""
    output = tmp_path_factory.mktemp("make_tiny") / "tiny-starflow2"
    assert load_script("make_tiny_starflow2").main(["--output", str(output), "--seed", "0"]) == 0
    return output


# --------------------------------------------------------------------------------------------------------------
# The Pretzel step
# --------------------------------------------------------------------------------------------------------------


def prompt_cache(pipe, prompts, negative=None, guidance=False):
    """A cache holding the (left-padded) prompt layouts, ending with <|vision_start|>; also returns the batch."""
    layouts = pipe.encode_prompt(prompts, negative, do_classifier_free_guidance=guidance)
    ids, latent_mask, attention_mask, _ = pipe._batch(layouts)
    levels = torch.full((ids.shape[0],), NOISE_LEVEL)
    cache = pipe.transformer.new_cache(pipe.vlm_stream, levels)
    pipe.transformer.step(pipe.vlm_stream, cache, ids, None, latent_mask, attention_mask)
    return cache, ids, attention_mask, levels


def teacher_forced_params(pipe, ids, attention_mask, tokens, levels):
    """One uncached step over prompt + image span; ``(mu, sigma)`` predicted for each of the span's latents."""
    transformer = pipe.transformer
    B, T = ids.shape
    N, C = tokens.shape[1:]
    full_ids = torch.cat([ids, ids.new_zeros(B, N)], dim=1)
    latent_mask = torch.cat([torch.zeros(B, T, dtype=torch.bool), torch.ones(B, N, dtype=torch.bool)], dim=1)
    mask = torch.cat([attention_mask, torch.ones(B, N, dtype=torch.bool)], dim=1)
    latents = torch.zeros(B, T + N, C)
    latents[:, T:] = tokens
    cache = transformer.new_cache(pipe.vlm_stream, levels, use_flow_cache=False)
    out = transformer.step(pipe.vlm_stream, cache, full_ids, latents, latent_mask, mask)
    return transformer.latent_params(out.flow_hidden_states[:, T - 1 : T + N - 1])


@torch.no_grad()
def test_text_logits_equal_the_vlm_at_initialisation():
    ids = torch.randint(0, 512, (2, 12), generator=gen(0))
    for perturb, equal in ((0.0, True), (0.05, False)):
        parts = build_tiny_starflow2_components(seed=0, perturb=perturb)
        vlm, transformer = parts["vlm"], parts["transformer"]
        stream = VLMStream(vlm)
        cache = transformer.new_cache(stream, torch.full((2,), NOISE_LEVEL), use_flow_cache=False)
        out = transformer.step(stream, cache, ids)
        logits = transformer.text_logits(stream, out.hidden_states, out.flow_hidden_states)
        reference = vlm(input_ids=ids).logits
        assert logits.shape == reference.shape == (2, 12, 512)
        # exact with the zero skips; the perturbed model (W_t != 0) must differ, else the check is vacuous
        assert torch.allclose(logits, reference, atol=1e-6) == equal


@torch.no_grad()
def test_cached_sampling_matches_teacher_forced_pass(pipe):
    # CFG batch with prompts of different lengths: also covers left padding and the guidance rule
    cache, ids, attention_mask, levels = prompt_cache(pipe, PROMPT, OTHER, guidance=True)
    assert attention_mask.sum(1).tolist()[0] != attention_mask.sum(1).tolist()[1]
    N, C = pipe.transformer.num_latents, pipe.transformer.config.latent_channels
    noise = torch.randn(1, N, C, generator=gen(0))
    tokens = sample_image_tokens(
        pipe.transformer, pipe.vlm_stream, cache, noise, pipe.scheduler, GuidanceSpec(GUIDANCE)
    )
    assert tokens.shape == (1, N, C) and cache.flow.length == ids.shape[1] + N

    mu, sigma = teacher_forced_params(pipe, ids, attention_mask, tokens.repeat(2, 1, 1), levels)
    mu, sigma = pipe.scheduler.guide(mu, sigma, GUIDANCE)
    z = (tokens - mu) / sigma
    assert torch.allclose(z, noise, atol=1e-4), (z - noise).abs().max()


@torch.no_grad()
def test_image_nll_is_shallow_plus_deep_terms(pipe):
    transformer = pipe.transformer
    cache, ids, attention_mask, levels = prompt_cache(pipe, [PROMPT, OTHER])
    x = 0.7 * torch.randn(2, 4, 4, 4, generator=gen(1))
    length = (cache.length, cache.flow.length)
    nll = transformer.image_nll_in_context(pipe.vlm_stream, cache, x)
    assert (cache.length, cache.flow.length) == length  # the cache is left as it was

    tokens, logdets = transformer.shallow_forward(x, levels)
    assert torch.allclose(shallow_reverse(transformer, tokens, levels, pipe.scheduler), x, atol=1e-4)
    mu, sigma = teacher_forced_params(pipe, ids, attention_mask, tokens, levels)
    deep = (0.5 * ((tokens - mu) / sigma).pow(2) + sigma.log()).flatten(1).mean(1)
    shallow = sum(logdet.flatten(1).mean(1) for logdet in logdets)
    by_hand = deep - shallow + 0.5 * math.log(2 * math.pi)
    assert shallow.abs().min() > 1e-3  # the shallow flows are not the identity
    assert torch.allclose(nll, by_hand, atol=1e-5), (nll, by_hand)

    # and the training forward (one teacher-forced pass over prompt + image) agrees
    B, T = ids.shape
    full_ids = torch.cat([ids, ids.new_zeros(B, 16)], dim=1)
    latent_mask = torch.cat([torch.zeros(B, T, dtype=torch.bool), torch.ones(B, 16, dtype=torch.bool)], dim=1)
    mask = torch.cat([attention_mask, torch.ones(B, 16, dtype=torch.bool)], dim=1)
    out = transformer(pipe.vlm_stream, full_ids, latent_mask, x, levels, attention_mask=mask)
    assert torch.allclose(out.image_nll, nll, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------


def test_guidance_zero_ignores_the_negative_prompt(pipe):
    a = generate(pipe, guidance_scale=0.0, negative_prompt=OTHER)
    b = generate(pipe, guidance_scale=0.0, negative_prompt="a green square on the right")
    assert torch.equal(a, b)
    c = generate(pipe, guidance_scale=2.0, negative_prompt=OTHER)
    d = generate(pipe, guidance_scale=2.0, negative_prompt="a green square on the right")
    assert not torch.allclose(c, d, atol=1e-3) and not torch.allclose(a, c, atol=1e-3)


def test_generator_determinism(pipe):
    a, b, c = generate(pipe, seed=0), generate(pipe, seed=0), generate(pipe, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    # the generator only draws the flow's noise: passing that noise as ``latents`` gives the same image
    noise = torch.randn(1, pipe.transformer.num_latents, 4, generator=gen(0))
    assert torch.equal(pipe(PROMPT, latents=noise, num_inference_steps=0, output_type="pt").images, a)


def test_batch_equals_single_calls(pipe):
    # default guidance and one denoising step: the CFG batch, left padding and the denoiser are all batched
    both = generate(pipe, [PROMPT, OTHER], seed=[0, 1], num_inference_steps=1)
    first = generate(pipe, PROMPT, seed=0, num_inference_steps=1)
    second = generate(pipe, OTHER, seed=1, num_inference_steps=1)
    assert both.shape == (2, 3, 32, 32)
    assert torch.allclose(both[:1], first, atol=1e-4) and torch.allclose(both[1:], second, atol=1e-4)
    assert not torch.allclose(first, second, atol=1e-3)


def test_num_images_per_prompt(pipe):
    images = generate(pipe, [PROMPT, OTHER], seed=[0, 1, 2, 3], num_images_per_prompt=2)
    assert images.shape == (4, 3, 32, 32)
    assert not torch.allclose(images[0], images[1], atol=1e-3)
    # images are prompt-major: image 2 is the second prompt with the third generator
    assert torch.allclose(images[2:3], generate(pipe, OTHER, seed=2), atol=1e-4)


def test_callback_sees_each_flow_blocks_whole_latents_and_can_replace_them(pipe):
    N, C = pipe.transformer.num_latents, pipe.transformer.config.latent_channels
    calls = []

    def record(p, step, noise_level, kwargs):
        calls.append((step, kwargs["latents"].clone(), float(noise_level)))
        return {}

    noise = torch.randn(2, N, C, generator=gen(4))
    out = generate(pipe, [PROMPT, OTHER], latents=noise, output_type="latent", callback_on_step_end=record)
    # the TARFlow stream's span, then each of the two shallow blocks: the whole (B, N, C) latents each time
    assert [c[0] for c in calls] == [0, 1, 2] and all(c[1].shape == (2, N, C) for c in calls)
    assert all(c[2] == pytest.approx(NOISE_LEVEL) for c in calls)
    levels = torch.full((2,), NOISE_LEVEL)
    torch.testing.assert_close(shallow_reverse(pipe.transformer, calls[0][1], levels, pipe.scheduler), out)
    assert torch.equal(pipe.transformer.tokens_to_latents(calls[-1][1]), out)

    def zero(p, step, noise_level, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 0 else {}

    plain = generate(pipe, seed=0, output_type="latent")
    zeroed = generate(pipe, seed=0, output_type="latent", callback_on_step_end=zero)
    zeroed_other_seed = generate(pipe, seed=1, output_type="latent", callback_on_step_end=zero)
    assert not torch.allclose(plain, zeroed, atol=1e-3)
    assert torch.equal(zeroed, zeroed_other_seed)  # the noise no longer matters
    # the span replaced by zeros: the image is the shallow inverse of an all-zero token sequence
    expected = shallow_reverse(pipe.transformer, torch.zeros(1, N, C), torch.full((1,), NOISE_LEVEL), pipe.scheduler)
    assert torch.allclose(zeroed, expected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(height=31), "height"),
        (dict(width=64), "width"),
        (dict(prompt=""), "prompt"),
        (dict(prompt=["a cat", "  "]), "prompt"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(generator=[gen(0), gen(1)]), "generator"),
        (dict(num_inference_steps=-1), "num_inference_steps"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    ],
)
def test_bad_inputs_raise(pipe, kwargs, name):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`"):
        pipe(**kwargs)


def test_output_types(pipe):
    def run(output_type):
        return generate(pipe, [PROMPT, OTHER], seed=[0, 1], output_type=output_type)

    pil, arr, pt, latent = run("pil"), run("np"), run("pt"), run("latent")
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in pil)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3)
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 32, 32)
    assert isinstance(latent, torch.Tensor) and latent.shape == (2, 4, 4, 4)
    assert 0 <= pt.min() and pt.max() <= 1 and pt.std() > 1e-3
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert np.abs(np.asarray(pil[1]).astype(np.float32) - arr[1] * 255).max() <= 1
    assert torch.allclose(pipe.decode(latent, "pt"), pt, atol=1e-6)
    assert isinstance(pipe(PROMPT, generator=gen(0), num_inference_steps=0, return_dict=False)[0], list)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = StarFlow2Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("vlm", "transformer", "vae"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    assert loaded.tokenizer(PROMPT)["input_ids"] == pipe.tokenizer(PROMPT)["input_ids"]
    assert loaded.tokenizer.chat_template == pipe.tokenizer.chat_template
    assert torch.equal(generate(loaded, num_inference_steps=1), generate(pipe, num_inference_steps=1))


def test_make_tiny_folder_loads_and_generates(pipe, tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == [
        "model_index.json",
        "scheduler",
        "tokenizer",
        "transformer",
        "vae",
        "vlm",
    ]
    loaded = StarFlow2Pipeline.from_pretrained(tiny_dir)
    loaded.set_progress_bar_config(disable=True)
    image = loaded(PROMPT, generator=gen(0), num_inference_steps=0).images[0]
    assert isinstance(image, PIL.Image.Image) and image.size == (32, 32)
    assert torch.equal(generate(loaded), generate(pipe))  # the folder holds build_tiny_starflow2_components(0)

    # an existing folder is never touched without --overwrite
    script = load_script("make_tiny_starflow2")
    before = (tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert script.main(["--output", str(tiny_dir), "--seed", "1"]) == 2
    assert (tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_bfloat16_load(tiny_dir):
    # ``dtype`` is diffusers' current name for ``torch_dtype`` (which still works but warns)
    loaded = StarFlow2Pipeline.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.dtype == loaded.vae.dtype == loaded.vlm.dtype == torch.bfloat16
    images = generate(loaded, num_inference_steps=1)
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.float32 and images.isfinite().all()


# --------------------------------------------------------------------------------------------------------------
# assemble_starflow2.py
# --------------------------------------------------------------------------------------------------------------


def to_original_layout(transformer, vae):
    """Invert the assembly mapping: tiny Pretzel + FAE -> the documented original layout."""
    state = {}
    for key, value in transformer.state_dict().items():
        match = re.match(r"^(shallow\.\d+|deep)\.layers\.(\d+)\.(attn|mlp)\.([a-z_0-9]+)\.(.+)$", key)
        if match:
            block, layer, part, name, rest = match.groups()
            key = f"{block}.attn_blocks.{layer}.{REFERENCE_LAYER_NAMES[f'{part}.{name}']}.{rest}"
        state[key] = value.clone()
    state.update({f"fae.{k}": v.clone() for k, v in vae.state_dict().items() if not k.startswith("dinov2.")})
    return state


def test_assemble_round_trip(tmp_path, capsys):
    source = make_pipe(seed=3)
    source.vlm.save_pretrained(tmp_path / "vlm")
    source.tokenizer.save_pretrained(tmp_path / "vlm")
    source.vae.dinov2.save_pretrained(tmp_path / "dinov2")
    state = to_original_layout(source.transformer, source.vae)
    assert not any(re.match(r"^(shallow|deep).*\.layers\.", k) for k in state)
    assert "fae.pixel_decoder.proj_in.weight" in state and "deep.proj_cond.weight" in state
    assert "deep.attn_blocks.1.mlp.main.2.weight" in state and "shallow.0.attn_blocks.0.attention.qkv.bias" in state
    save_file({**state, "deep.attn_mask": torch.ones(16, 16)}, tmp_path / "starflow2.safetensors")  # unused buffer
    config = {
        "pretzel": pretzel_tiny_config(),
        "fae": {k: v for k, v in fae_tiny_config().items() if k != "dinov2_config"},
    }
    del config["pretzel"]["vision_start_token_id"]  # taken from the tokenizer
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = [
        "--vlm",
        str(tmp_path / "vlm"),
        "--dinov2",
        str(tmp_path / "dinov2"),
        "--config",
        str(tmp_path / "config.json"),
    ]
    script = load_script("assemble_starflow2")

    out = tmp_path / "assembled"
    assert script.main([*args, "--weights", str(tmp_path / "starflow2.safetensors"), "--output", str(out)]) == 0
    loaded = StarFlow2Pipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)
    for name in ("vlm", "transformer", "vae"):
        ours, theirs = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # without a "scheduler" entry the pipeline samples with the authors' STARFlow2 recipe (annealed guidance)
    preset = SCHEDULER_PRESETS["starflow2"]
    assert {k: loaded.scheduler.config[k] for k in preset} == preset
    assert not torch.equal(generate(loaded), generate(source))  # the tiny pipeline's scheduler guides at full strength
    source.scheduler = TarFlowScheduler.from_preset("starflow2")
    assert torch.equal(generate(loaded), generate(source))

    # a broken .pth (nested like a training checkpoint): every offending key is listed, nothing is written
    broken = {k: v for k, v in state.items() if k != "deep.attn_blocks.1.mlp.main.2.weight"}
    broken["deep.attn_blocks.0.attention.rotary.freqs"] = torch.zeros(3)
    broken["fae.dinov2.embeddings.cls_token"] = torch.zeros(1, 1, 32)
    broken["shallow.1.layers.0.attn.to_qkv.weight"] = state["shallow.1.attn_blocks.0.attention.qkv.weight"]
    torch.save({"model": broken, "step": 7}, tmp_path / "broken.pth")
    capsys.readouterr()
    assert script.main([*args, "--weights", str(tmp_path / "broken.pth"), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    for key in (
        "deep.layers.1.mlp.fc2.weight",
        "deep.attn_blocks.0.attention.rotary.freqs",
        "fae.dinov2.embeddings.cls_token",
        "shallow.1.layers.0.attn.to_qkv.weight",
    ):
        assert key in err, err
    assert not (tmp_path / "bad").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------------------------
# Denoising at every level, likelihood and denoising as pipeline methods
# --------------------------------------------------------------------------------------------------------------


def teacher_forced_image_nll(pipe, ids, attention_mask, x, level):
    """Image NLL from one teacher-forced pass over prompt + image with every position at ``level``."""
    B, T = ids.shape
    N = pipe.transformer.num_latents
    full_ids = torch.cat([ids, ids.new_zeros(B, N)], dim=1)
    latent_mask = torch.cat([torch.zeros(B, T, dtype=torch.bool), torch.ones(B, N, dtype=torch.bool)], dim=1)
    mask = torch.cat([attention_mask, torch.ones(B, N, dtype=torch.bool)], dim=1)
    return pipe.transformer(
        pipe.vlm_stream, full_ids, latent_mask, x, torch.full((B,), level), attention_mask=mask
    ).image_nll


@torch.no_grad()
def test_context_at_another_noise_level_matches_a_pass_at_that_level(pipe):
    transformer = pipe.transformer
    cache, ids, attention_mask, _ = prompt_cache(pipe, [PROMPT, OTHER])
    x = 0.7 * torch.randn(2, 4, 4, 4, generator=gen(2))
    moved = transformer.at_noise_level(cache, torch.full((2,), 0.1))
    assert moved is not cache and float(cache.noise_level[0]) == pytest.approx(NOISE_LEVEL)  # cache untouched
    expected = teacher_forced_image_nll(pipe, ids, attention_mask, x, 0.1)
    assert torch.allclose(transformer.image_nll_in_context(pipe.vlm_stream, moved, x), expected, atol=1e-5)
    # the context at the sampling level scores differently: the level matters, so the check bites
    stale = transformer.image_nll_in_context(pipe.vlm_stream, cache, x)
    assert (stale - expected).abs().min() > 1e-4
    assert transformer.at_noise_level(cache, torch.full((2,), NOISE_LEVEL)) is cache


@torch.no_grad()
def test_log_likelihood_is_the_flow_density(pipe):
    images = torch.rand(2, 3, 32, 32, generator=gen(3))
    bpd = pipe.log_likelihood(images, [PROMPT, OTHER], generator=[gen(4), gen(5)])
    assert bpd.shape == (2,) and bpd.dtype == torch.float32
    # independent reference: the same noisy latents through a teacher-forced pass
    noisy = torch.cat(
        [
            pipe.noisy_latents(pipe.preprocess_image(images[i : i + 1]), NOISE_LEVEL, g)
            for i, g in enumerate((gen(4), gen(5)))
        ]
    )
    cache, ids, attention_mask, _ = prompt_cache(pipe, [PROMPT, OTHER])
    expected = teacher_forced_image_nll(pipe, ids, attention_mask, noisy, NOISE_LEVEL) / math.log(2)
    assert torch.allclose(bpd, expected, atol=1e-5)
    assert torch.equal(pipe.log_likelihood(images, [PROMPT, OTHER], generator=[gen(4), gen(5)]), bpd)
    one = pipe.log_likelihood(images[1], OTHER, generator=gen(5))
    assert torch.allclose(one, bpd[1:], atol=1e-5)
    assert not torch.allclose(pipe.log_likelihood(images, PROMPT, generator=[gen(4), gen(5)])[1], bpd[1])
    with pytest.raises(ValueError, match="`prompt` has 3 entries for 2 images"):
        pipe.log_likelihood(images, [PROMPT] * 3)
    with pytest.raises(ValueError, match=r"`noise_level` must be a finite number >= 0.*; got -1"):
        pipe.log_likelihood(images, PROMPT, noise_level=-1.0)


@torch.no_grad()
def test_call_denoises_with_denoise_latents(pipe):
    noisy = generate(pipe, seed=0, output_type="latent")
    assert noisy.shape == (1, 4, 4, 4)
    for steps in (1, 3):
        denoised = generate(pipe, seed=0, output_type="latent", num_inference_steps=steps)
        assert torch.allclose(pipe.denoise_latents(noisy, PROMPT, num_inference_steps=steps), denoised, atol=1e-6)
        assert not torch.allclose(denoised, noisy, atol=1e-3)
    assert torch.equal(pipe.denoise_latents(noisy, PROMPT, num_inference_steps=0), noisy)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(B, 4, 4, 4\); got \(1, 2, 4, 4\)"):
        pipe.denoise_latents(noisy[:, :2], PROMPT)
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be an integer >= 0.*; got -2"):
        pipe.denoise_latents(noisy, PROMPT, num_inference_steps=-2)


# --------------------------------------------------------------------------------------------------------------
# The call contract: callbacks, properties, interruption
# --------------------------------------------------------------------------------------------------------------


def test_callback_counts_flow_blocks_then_denoising_steps(pipe):
    calls = []

    def record(p, step, noise_level, kwargs):
        calls.append((step, tuple(kwargs["latents"].shape), float(noise_level), p.guidance_scale, p.num_timesteps))
        return {}

    generate(pipe, PROMPT, guidance_scale=1.5, num_inference_steps=2, callback_on_step_end=record)
    N, S = pipe.transformer.num_latents, 1 + len(pipe.transformer.shallow)  # the span, then each shallow block
    assert [c[0] for c in calls] == list(range(S + 2))
    assert {c[1] for c in calls[:S]} == {(1, N, 4)} and {c[1] for c in calls[S:]} == {(1, 4, 4, 4)}
    assert [c[2] for c in calls] == pytest.approx([NOISE_LEVEL] * S + [NOISE_LEVEL, 0.01])
    assert {(c[3], c[4]) for c in calls} == {(1.5, S + 2)}


class StopAfter:
    """A progress bar that interrupts the call after ``n`` latent positions (as a user's other thread would)."""

    def __init__(self, pipe, n):
        self.pipe, self.n = pipe, n

    def __call__(self, total):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False

    def update(self, n=1):
        self.n -= n
        self.pipe._interrupt = self.pipe._interrupt or self.n <= 0


def test_interrupt_returns_what_was_made(pipe):
    made = []

    def stop_at_0(p, step, noise_level, kwargs):
        made.append(kwargs["latents"])
        p._interrupt = step == 0
        return {}

    noise = torch.randn(1, pipe.transformer.num_latents, 4, generator=gen(6))
    out = pipe(PROMPT, latents=noise, num_inference_steps=2, output_type="latent", callback_on_step_end=stop_at_0)
    assert len(made) == 1 and not pipe.interrupt
    # the span made, no shallow block and no denoising step run: the span's latents are the output
    assert torch.equal(out.images, pipe.transformer.tokens_to_latents(made[0]))

    # interrupted during the span: 4 positions made, the rest still noise, no step completed
    pipe.progress_bar = StopAfter(pipe, 4)
    try:
        out = pipe(PROMPT, latents=noise, num_inference_steps=2, output_type="latent", callback_on_step_end=stop_at_0)
    finally:
        del pipe.progress_bar
    assert len(made) == 1 and not pipe.interrupt
    tokens = out.images.flatten(2).transpose(1, 2)  # (1, N, C)
    assert torch.equal(tokens[:, :4], made[0][:, :4]) and torch.equal(tokens[:, 4:], noise[:, 4:])

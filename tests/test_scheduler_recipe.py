"""The sampling recipe of the authors' public code in TarFlowScheduler: presets, the default number of denoising
steps and annealed guidance (apple/ml-itarflow), checked against the formulas written out here and, when a
checkout of apple/ml-itarflow is named by ``ML_ITARFLOW_SRC``, against its own sampling loop run side by side."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_starflow2 import GuidanceSpec, StarFlow2Pipeline, TarFlowScheduler
from diffusers_starflow2.sampling import sample_autoregressive, sample_image_tokens
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

ITARFLOW_SRC = os.environ.get("ML_ITARFLOW_SRC")


def config_of(scheduler):
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


# -- presets and defaults --------------------------------------------------------------------------------------------


def test_starflow2_preset_is_itarflow_sampling():
    config = config_of(TarFlowScheduler.from_preset("starflow2"))
    # ml-itarflow evaluate_fid.py: --t0 1e-2, --t1 3e-1 (its defaults and its 64-px recipe), the flow pass at
    # init_t = args.t1, --annealed_guidance 1, and steps = int(t1 / 1e-2) denoising steps (one per 0.01 of t1)
    assert config == dict(
        noise_level=0.3, min_noise_level=0.01, max_noise_level=0.3, num_denoising_steps=30, annealed_guidance=True
    )
    # its schedule: ts = linspace(t1, t0, steps) followed by 0
    scheduler = TarFlowScheduler.from_preset("starflow2")
    scheduler.set_timesteps()
    np.testing.assert_allclose(scheduler.sigmas.numpy(), np.append(np.linspace(0.3, 0.01, 30), 0.0), atol=1e-7)


def test_starflow_preset_is_ml_starflow_sampling():
    config = config_of(TarFlowScheduler.from_preset("starflow"))
    # ml-starflow sample.py: noise_std 0.3, 'annealed_guidance': False, one self_denoise step (x - t^2 grad)
    assert (config["noise_level"], config["num_denoising_steps"], config["annealed_guidance"]) == (0.3, 1, False)


def test_default_denoises_in_several_steps_and_guides_at_full_strength():
    # several denoising steps by default: 10, as ml-itarflow's sampling during training (train.py,
    # iterative_denoising(..., steps=10)); constant guidance, so pipelines saved before the option keep theirs
    config = config_of(TarFlowScheduler())
    assert config == dict(
        noise_level=0.3, min_noise_level=0.01, max_noise_level=0.3, num_denoising_steps=10, annealed_guidance=False
    )
    assert config_of(TarFlowScheduler.from_preset("starflow2", num_denoising_steps=3))["num_denoising_steps"] == 3


def test_pipeline_denoises_with_the_scheduler_default():
    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    levels = []
    step = pipe.scheduler.step

    def counting(model_output, timestep, sample, **kwargs):
        levels.append(float(timestep))
        return step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = counting
    pipe("a red circle", guidance_scale=0.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(levels, np.linspace(0.3, 0.01, 10), atol=1e-7)


def test_bad_presets_and_options_raise_value_errors():
    with pytest.raises(ValueError, match=r"`name` must be one of \['starflow', 'starflow2'\]; got 'itarflow'"):
        TarFlowScheduler.from_preset("itarflow")
    for bad in (dict(annealed_guidance=1), dict(num_denoising_steps=-1), dict(num_denoising_steps=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TarFlowScheduler(**bad)


# -- annealed guidance -----------------------------------------------------------------------------------------------


def test_guidance_ramp_is_itarflow_annealing():
    w, T = 3.0, 17  # a block without start token: token 0 is its own noise, tokens 1 .. 16 are sampled
    # ml-itarflow MetaBlock.reverse: g = (i + 1) / (T - 1) * guidance when sampling token i + 1 from token i
    expected = torch.tensor([(i + 1) / (T - 1) * w for i in range(T - 1)])
    scheduler = TarFlowScheduler(annealed_guidance=True)
    ramp = scheduler.guidance_ramp(0, T - 1, T - 1)
    assert ramp.shape == (1, T - 1, 1)
    torch.testing.assert_close(w * ramp.flatten(), expected)
    assert torch.equal(scheduler.guidance_ramp(5, 4, T - 1), ramp[:, 5:9])  # a window: the same weights
    assert TarFlowScheduler().guidance_ramp(0, 4, 16) is None


def fake_flow(batch, num_tokens, channels, branches, seed=0):
    """A step function whose parameters depend on the fed token and its position, differently per branch."""
    g = torch.Generator().manual_seed(seed)
    a, b, s = (torch.randn(branches, 1, num_tokens, channels, generator=g) for _ in range(3))

    def step_fn(inputs, index):  # inputs (branches * B, K, C) at input positions index .. -> tokens index ..
        K = inputs.shape[1]
        x = inputs.view(branches, batch, K, channels)
        part = slice(index, index + K)
        mu = torch.tanh(x * a[:, :, part]) + b[:, :, part]
        sigma = F.softplus(s[:, :, part] + 0.5 * x) + 0.1
        return mu.reshape(branches * batch, K, channels), sigma.reshape(branches * batch, K, channels)

    return step_fn


def hand_loop(step_fn, noise, w, s_image=1.0):
    """Sequential sampling written out: token i is guided at w (i + 1) / N (and s_image - 1 likewise)."""
    B, N, _ = noise.shape
    branches = 3 if s_image != 1 else 2
    x_prev, tokens = torch.zeros(B, 1, noise.shape[2]), []
    for i in range(N):
        mu, sigma = step_fn(x_prev.repeat(branches, 1, 1), i)
        r = (i + 1) / N
        if branches == 2:
            mu_c, mu_u = mu.chunk(2)
            s_c, s_u = sigma.chunk(2)
            wi = w * r
            s = (s_c / s_u).clamp(max=1) ** 2
            mu, sigma = ((1 + wi) * mu_c - wi * s * mu_u) / (1 + wi - wi * s), s_c / (1 + wi - wi * s).sqrt()
        else:
            mu, sigma = TarFlowScheduler.guide_text_and_image(mu, sigma, w * r, 1 + (s_image - 1) * r)
        x_prev = mu + sigma * noise[:, i : i + 1]
        tokens.append(x_prev)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("scales", [(2.5, 1.0), (2.0, 1.8)])
@pytest.mark.parametrize("jacobi", [{}, dict(jacobi_block_size=4, jacobi_tolerance=0.0)])
def test_sampling_loop_anneals_guidance_token_by_token(scales, jacobi):
    B, N, C = 2, 11, 3
    spec = GuidanceSpec(*scales)
    step_fn = fake_flow(B, N, C, spec.num_branches)
    noise = torch.randn(B, N, C, generator=torch.Generator().manual_seed(1))
    start = step_fn(torch.zeros(spec.num_branches * B, 1, C), 0)
    annealed = sample_autoregressive(step_fn, start, noise, TarFlowScheduler(annealed_guidance=True), spec, **jacobi)
    torch.testing.assert_close(annealed, hand_loop(step_fn, noise, *scales), atol=1e-5, rtol=1e-5)
    constant = sample_autoregressive(step_fn, start, noise, TarFlowScheduler(), spec, **jacobi)
    assert (constant - annealed).abs().max() > 1e-2


def test_pretzel_span_guides_latent_k_at_k_over_n_of_the_scale():
    """An image span of the Pretzel: with the same latents fed back, latent k under annealed guidance at scale w
    equals latent k under constant guidance at w (k + 1) / N."""
    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))
    N, C = pipe.transformer.num_latents, pipe.transformer.config.latent_channels
    g = torch.Generator().manual_seed(0)
    noise, forced = torch.randn(1, N, C, generator=g), torch.randn(1, N, C, generator=g)

    def span(scheduler, w):
        guidance = GuidanceSpec(w)
        layouts = pipe.encode_prompt(["a red circle"], None, do_classifier_free_guidance=True)
        ids, latent_mask, attention_mask, _ = pipe._batch(layouts)
        cache = pipe.transformer.new_cache(pipe.vlm_stream, torch.full((ids.shape[0],), 0.3))
        pipe.transformer.step(pipe.vlm_stream, cache, ids, None, latent_mask, attention_mask)
        made = []

        def feed_forced(i, x_i):  # record latent i, then continue from the same latents in every run
            made.append(x_i)
            return forced[:, i : i + 1]

        sample_image_tokens(pipe.transformer, pipe.vlm_stream, cache, noise, scheduler, guidance, feed_forced)
        return torch.cat(made, dim=1)

    w = 2.0
    annealed = span(TarFlowScheduler(annealed_guidance=True), w)
    for k in (0, N // 2, N - 1):
        constant = span(TarFlowScheduler(), w * (k + 1) / N)
        torch.testing.assert_close(annealed[:, k], constant[:, k], atol=1e-5, rtol=1e-5)
    assert (annealed[:, 0] - span(TarFlowScheduler(), w)[:, 0]).abs().max() > 1e-3


# -- side by side with ml-itarflow ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def itarflow():
    sys.path.insert(0, os.path.abspath(ITARFLOW_SRC))
    try:
        import transformer_flow  # the reference's module, imported from the checkout
    finally:
        sys.path.pop(0)
    return transformer_flow


@pytest.mark.skipif(not ITARFLOW_SRC, reason="ML_ITARFLOW_SRC does not name a checkout of apple/ml-itarflow")
@pytest.mark.parametrize("annealed", [True, False])
def test_sampling_equals_itarflow_reverse_with_its_guidance(itarflow, annealed):
    """ml-itarflow's MetaBlock.reverse (STARFlow's guidance rule, lerp_style='starflow') against our loop and
    scheduler driving the same block's reverse_step.  The reference runs one sample at a time: with more, its rule
    broadcasts the means (B, 1, C) against the variance ratios (B, C) and gives every sample the ratios of the
    first."""
    torch.manual_seed(0)
    B, T, C, w = 2, 16, 4, 2.5
    block = itarflow.MetaBlock(C, 32, T, itarflow.PermutationIdentity(T), num_layers=2, head_dim=16, num_classes=3)
    block.eval()
    with torch.no_grad():  # its output projection starts at zero (identity flow): make the flow non-trivial
        block.proj_out.weight.normal_(0, 0.05)
        block.class_embed.normal_(0, 1.0)
    y, z = torch.tensor([0, 2]), torch.randn(B, T, C)
    with torch.no_grad():
        expected = torch.cat(
            [
                block.reverse(z[b : b + 1].clone(), y[b : b + 1], w, annealed_guidance=annealed, lerp_style="starflow")
                for b in range(B)
            ]
        )

        block.set_sample_mode(True)
        fed = z.clone()

        def step_fn(inputs, index):  # [conditional; unconditional] parameters of the token after input `index`
            fed[:, index] = inputs[:B, 0]
            za, zb = block.reverse_step(fed, block.pos_embed, index, y, which_cache="cond")
            za_u, zb_u = block.reverse_step(fed, block.pos_embed, index, None, which_cache="uncond")
            return torch.cat([zb, zb_u]), torch.cat([za, za_u]).exp()

        scheduler = TarFlowScheduler(annealed_guidance=annealed)
        tokens = sample_autoregressive(
            step_fn, step_fn(z[:, :1].repeat(2, 1, 1), 0), z[:, 1:], scheduler, GuidanceSpec(w)
        )
        block.set_sample_mode(False)
    torch.testing.assert_close(torch.cat([z[:, :1], tokens], dim=1), expected, atol=1e-5, rtol=1e-5)

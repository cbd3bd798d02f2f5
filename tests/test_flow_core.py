"""Numerical properties of the flow, the KV cache, the guidance rule and the scheduler on small random models."""

import math

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from diffusers_starflow2 import AutoregressiveFlowBlock, GuidanceSpec, StarFlowTransformerModel, TarFlowScheduler
from diffusers_starflow2.loaders.single_file_starflow import (
    config_from_reference_kwargs,
    convert_starflow_state_dict,
    load_checkpoint,
    load_reference_config,
)
from diffusers_starflow2.sampling import sample_autoregressive, sample_flow_block, sample_starflow

BASE = dict(
    in_channels=4,
    sample_size=4,
    patch_size=1,
    channels=32,
    layers_per_block=[1, 2],
    head_dim=16,
    max_text_length=5,
    text_dim=12,
    use_rope=True,
    use_sos=True,
    cond_top_only=True,
    use_softplus=True,
    final_norm=True,
    soft_clip=4.0,
    seq_order="L2R",
)
# name: (overrides of BASE, latent (H, W)); together they switch every option away from its BASE value.
VARIANTS = {
    "base": ({}, (4, 4)),
    "r2l_exp_noclip_nofinalnorm": (dict(seq_order="R2L", use_softplus=False, soft_clip=0.0, final_norm=False), (4, 4)),
    "no_sos": (dict(use_sos=False), (4, 4)),
    "gqa_gated_qknorm_postnorm_rms": (
        dict(num_heads=2, num_kv_heads=1, gated_mlp=True, qk_norm=True, post_norm=True, norm_type="rms_norm"),
        (3, 5),
    ),
    "nonorm_nobias_hfrope": (dict(norm_type="none", use_bias=False, hf_style_rope=True, head_dim=32), (4, 4)),
    "learned_pos_embed": (dict(use_rope=False), (4, 4)),
    "patch2_rect": (dict(patch_size=2, sample_size=8), (8, 12)),
    "all_blocks_cond": (dict(cond_top_only=False, layers_per_block=[1, 1, 1]), (4, 4)),
    "unconditional_2d_rope": (dict(max_text_length=0, text_dim=0, head_dim=8), (4, 6)),
    "identity_block_wide_top": (dict(layers_per_block=[0, 1, 1], top_block_channels=48), (4, 4)),
}


def randomize(module, std=0.05):
    """Perturb every parameter (zero-initialised output projections included) so no flow is the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module.eval()


def make(name, batch=2, text_len=4):
    overrides, (H, W) = VARIANTS[name]
    config = {**BASE, **overrides}
    model = randomize(StarFlowTransformerModel(**config))
    x = torch.randn(batch, config["in_channels"], H, W)
    y = torch.randn(batch, text_len, config["text_dim"]) if config["max_text_length"] else None
    return model, x, y


def assert_close(actual, expected, atol):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


# -- invertibility ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_reverse_identity(name):
    model, x, y = make(name)
    with torch.no_grad():
        z = model(x, encoder_hidden_states=y).z
        assert (z - x).abs().max() > 0.05  # a non-trivial flow
        assert_close(sample_starflow(model, z, encoder_hidden_states=y), x, 1e-4)
        eps = torch.randn_like(x)
        assert_close(model(sample_starflow(model, eps, encoder_hidden_states=y), encoder_hidden_states=y).z, eps, 1e-4)


@pytest.mark.parametrize("name", ["base", "no_sos", "patch2_rect", "identity_block_wide_top"])
def test_logdet_and_nll_match_autograd_jacobian(name):
    model, x, y = make(name, batch=1)
    x = x[..., :4, :6] if name == "patch2_rect" else x[..., :2, :3]  # a 2x3 token grid keeps the Jacobian small
    out = model(x, encoder_hidden_states=y)
    jac = torch.autograd.functional.jacobian(lambda v: model(v, encoder_hidden_states=y).z, x, vectorize=True)
    D = x.numel()
    logdet = torch.linalg.slogdet(jac.reshape(D, D).double())[1]
    assert_close(sum(ld.double().sum() for ld in out.logdets), logdet, 1e-3)
    log_prob = -0.5 * (out.z.double() ** 2).sum() - 0.5 * D * math.log(2 * math.pi) + logdet
    assert_close(out.nll.double() * D, -log_prob, 1e-3)
    assert_close(out.bits_per_dim.double(), -log_prob / D / math.log(2), 1e-5)


def test_text_padding_is_ignored():
    model, x, y = make("base")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    y2 = torch.where(mask[..., None], y, torch.randn_like(y))
    with torch.no_grad():
        z1, z2 = (model(x, encoder_hidden_states=t, encoder_attention_mask=mask).z for t in (y, y2))
        assert torch.allclose(z1, z2, atol=1e-6)
        assert (model(x, encoder_hidden_states=y2).z - z1).abs().max() > 1e-3  # without the mask it matters
        eps = torch.randn_like(x)
        x1, x2 = (sample_starflow(model, eps, encoder_hidden_states=t, encoder_attention_mask=mask) for t in (y, y2))
        assert torch.allclose(x1, x2, atol=1e-6)
        assert_close(model(x1, encoder_hidden_states=y, encoder_attention_mask=mask).z, eps, 1e-4)


# -- the cached one-token reverse --------------------------------------------------------------------------------------


def make_block(text_dim=12, num_kv_heads=None, **kwargs):
    rope = "3d" if text_dim else "2d"
    block = AutoregressiveFlowBlock(
        in_channels=4,
        channels=32,
        num_layers=2,
        head_dim=16,
        num_heads=2,
        num_kv_heads=num_kv_heads,
        text_dim=text_dim,
        rope=rope,
        pt_seq_len=4,
        **kwargs,
    )
    return randomize(block)


@pytest.mark.parametrize("use_sos", [True, False])
@pytest.mark.parametrize("flip", [False, True])
def test_block_reverse_inverts_teacher_forced_forward(use_sos, flip):
    block = make_block(use_sos=use_sos, flip=flip)
    z, text, grid = torch.randn(2, 12, 4), torch.randn(2, 3, 12), (3, 4)
    x = sample_flow_block(block, z, grid, TarFlowScheduler(), text=text)
    with torch.no_grad():
        z2, logdet = block(x, grid, text)
    assert (x - z).abs().max() > 0.05
    assert_close(z2, z, 1e-5)
    assert logdet.shape == z.shape


@pytest.mark.parametrize("text_len, num_kv_heads, capacity", [(0, None, 12), (3, None, 15), (3, 1, 1)])
def test_kv_cache_one_token_at_a_time_equals_full_pass(text_len, num_kv_heads, capacity):
    block = make_block(text_dim=12 if text_len else 0, num_kv_heads=num_kv_heads)
    grid, N = (3, 4), 12
    rope = block.rotary(*grid, text_len)
    h = torch.randn(2, text_len + N, 32)
    with torch.no_grad():
        full = block.transformer(h, rope)
        cache = block.new_cache(2, capacity, torch.float32, "cpu")  # capacity 1: the cache has to grow
        parts = [block.transformer(h[:, :text_len], rope[:, :text_len], cache)] if text_len else []
        parts += [block.transformer(h[:, t : t + 1], rope[:, t : t + 1], cache) for t in range(text_len, text_len + N)]
    assert cache.length == text_len + N
    assert_close(torch.cat(parts, dim=1), full, 1e-5)


def test_kv_cache_grows_to_powers_of_two_keeping_what_it_holds():
    block = make_block()
    cache = block.new_cache(2, 3, torch.float32, "cpu")
    k, v = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    cache.update(0, k, v)
    cache.advance(3)
    fork = cache.fork(3)  # holds exactly its 3 positions
    for needed, capacity in ((3, 3), (4, 4), (5, 8), (300, 512)):
        fork.reserve(needed)
        assert fork.capacity == capacity
    assert torch.equal(fork.keys[0][:, :, :3], k) and torch.equal(fork.values[0][:, :, :3], v)
    assert cache.capacity == 3  # the fork's buffers are its own


# -- guidance ----------------------------------------------------------------------------------------------------------


def test_guide_scale_zero_is_conditional_branch():
    mu, sigma = torch.randn(6, 5, 4), torch.rand(6, 5, 4) + 0.1
    g_mu, g_sigma = TarFlowScheduler.guide(mu, sigma, 0.0)
    assert torch.equal(g_mu, mu[:3]) and torch.equal(g_sigma, sigma[:3])


@pytest.mark.parametrize(
    "scales, branches",
    [
        ((0.0, 1.0), ("conditional",)),
        ((2.0, 1.0), ("conditional", "unconditional")),
        ((0.0, 1.5), ("conditional", "image", "unconditional")),
        ((2.0, 1.5), ("conditional", "image", "unconditional")),
    ],
)
def test_guidance_spec_decides_branches_and_the_rule(scales, branches):
    spec = GuidanceSpec(*scales)
    assert spec.branches == branches and spec.num_branches == len(branches)
    B, k = 3, len(branches)
    mu, sigma, noise = torch.randn(k * B, 1, 4), torch.rand(k * B, 1, 4) + 0.1, torch.randn(B, 1, 4)
    x = TarFlowScheduler().affine_step(noise, mu, sigma, spec)
    if k == 1:
        by_hand = mu, sigma
    elif k == 2:
        by_hand = TarFlowScheduler.guide(mu, sigma, scales[0])
    else:
        by_hand = TarFlowScheduler.guide_text_and_image(mu, sigma, *scales)
    assert torch.equal(x, noise * by_hand[1] + by_hand[0])


def test_guidance_spec_rejects_bad_scales():
    with pytest.raises(ValueError, match="`guidance_scale` must be >= 0; got -1"):
        GuidanceSpec(-1.0)
    with pytest.raises(ValueError, match=r"`image_guidance_scale` must be >= 1 \(1 = no image guidance\); got 0.5"):
        GuidanceSpec(1.0, 0.5)
    with pytest.raises(ValueError, match="guidance"):
        sample_autoregressive(
            lambda x, i: None,
            (torch.zeros(2, 1, 4), torch.ones(2, 1, 4)),
            torch.zeros(2, 3, 4),
            TarFlowScheduler(),
            GuidanceSpec(2.0),
        )


def fitted_gaussian(log_density, lo, hi):
    """Mean and variance of a Gaussian given its unnormalised log-density, by a quadratic fit on a grid."""
    grid = np.linspace(lo, hi, 201)
    a, b, _ = np.polyfit(grid, log_density(grid), 2)
    return -b / (2 * a), -1 / (2 * a)


@pytest.mark.parametrize(
    "mu_c, s_c, mu_u, s_u, w",
    [(0.3, 0.5, -0.4, 0.9, 1.5), (-1.0, 1.2, 0.5, 1.2, 3.0), (2.0, 0.2, 1.0, 2.0, 0.5), (0.5, 1.5, -0.5, 0.7, 2.0)],
)
def test_guide_is_tilted_gaussian(mu_c, s_c, mu_u, s_u, w):
    def log_normal(x, m, s):
        return -0.5 * ((x - m) / s) ** 2 - np.log(s)

    # sigma_c > sigma_u would give an improper density: the rule caps sigma_u at sigma_c
    s_u_eff = max(s_u, s_c)
    mean, var = fitted_gaussian(lambda x: (1 + w) * log_normal(x, mu_c, s_c) - w * log_normal(x, mu_u, s_u_eff), -5, 5)
    g_mu, g_sigma = TarFlowScheduler.guide(
        torch.tensor([mu_c, mu_u], dtype=torch.float64), torch.tensor([s_c, s_u], dtype=torch.float64), w
    )
    assert abs(g_mu.item() - mean) < 1e-6 and abs(g_sigma.item() ** 2 - var) < 1e-6


@pytest.mark.parametrize("name", ["base", "all_blocks_cond"])
def test_guidance_with_identical_branches_is_no_guidance(name):
    model, _, y = make(name)
    eps = torch.randn(2, 4, 4, 4)
    plain = sample_starflow(model, eps, encoder_hidden_states=y)
    other = torch.randn_like(y)
    assert torch.equal(
        sample_starflow(model, eps, encoder_hidden_states=y, negative_encoder_hidden_states=other, guidance_scale=0.0),
        plain,
    )
    assert_close(
        sample_starflow(
            model, eps, encoder_hidden_states=y, negative_encoder_hidden_states=y.clone(), guidance_scale=3.0
        ),
        plain,
        1e-5,
    )
    guided = sample_starflow(
        model, eps, encoder_hidden_states=y, negative_encoder_hidden_states=other, guidance_scale=3.0
    )
    assert (guided - plain).abs().max() > 1e-3


# -- scheduler ---------------------------------------------------------------------------------------------------------


def test_add_noise():
    sched = TarFlowScheduler(noise_level=0.3)
    x, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.allclose(sched.add_noise(x, eps), x + 0.3 * eps)
    assert torch.allclose(sched.add_noise(x, eps, 0.1), x + 0.1 * eps)
    t = torch.tensor([0.0, 0.2, 0.5])
    noisy = sched.add_noise(x, eps, t)
    for b in range(3):
        assert torch.allclose(noisy[b], x[b] + t[b] * eps[b])


def test_sample_noise_levels():
    sched = TarFlowScheduler(min_noise_level=0.05, max_noise_level=0.4)
    t = sched.sample_noise_levels(2000, generator=torch.Generator().manual_seed(1))
    assert t.shape == (2000,) and t.min() >= 0.05 and t.max() <= 0.4
    assert t.min() < 0.06 and t.max() > 0.39  # spread over the whole range
    assert torch.equal(t, sched.sample_noise_levels(2000, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(t, sched.sample_noise_levels(2000, generator=torch.Generator().manual_seed(2)))
    per_sample = sched.sample_noise_levels(2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert per_sample[0] == t[0]


def test_set_timesteps():
    sched = TarFlowScheduler(noise_level=0.3, min_noise_level=0.01)
    sched.set_timesteps(4)
    assert torch.allclose(sched.timesteps, torch.tensor([0.3, 0.2033333, 0.1066667, 0.01]))
    assert torch.allclose(sched.sigmas, torch.cat([sched.timesteps, torch.zeros(1)]))
    sched.set_timesteps(1, noise_level=0.5)
    assert sched.timesteps.tolist() == [0.5] and sched.sigmas.tolist() == [0.5, 0.0]
    sched.set_timesteps(0)
    assert len(sched.timesteps) == 0
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(-1)


def test_step():
    sched = TarFlowScheduler(noise_level=0.3, min_noise_level=0.01)
    x, grad = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sched.set_timesteps(3)
    for t in sched.timesteps:
        assert torch.equal(sched.step(torch.zeros_like(x), t, x).prev_sample, x)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(grad, 0.123, x)
    sched.set_timesteps(1)
    out = sched.step(grad, sched.timesteps[0], x)
    assert torch.allclose(out.prev_sample, x - 0.09 * grad)
    assert torch.allclose(out.pred_original_sample, out.prev_sample)


def test_euler_denoising_on_gaussian_data():
    # data x0 ~ N(m, s0^2): x_t ~ N(m, s0^2 + t^2), grad NLL = (x - m) / (s0^2 + t^2), E[x0 | x_t] is linear in x_t
    m, s0, T, t_min = 0.7, 0.5, 0.3, 0.01
    x_T = m + torch.randn(4, 8) * math.sqrt(s0**2 + T**2)
    posterior_mean = lambda x, t: m + s0**2 / (s0**2 + t**2) * (x - m)
    sched = TarFlowScheduler(noise_level=T, min_noise_level=t_min)
    sched.set_timesteps(1)
    one = sched.step((x_T - m) / (s0**2 + T**2), T, x_T).prev_sample
    assert torch.allclose(one, posterior_mean(x_T, T), atol=1e-6)  # one step is Tweedie's formula
    sched.set_timesteps(200)
    x, dist = x_T, (x_T - m).abs()
    for t in sched.timesteps:
        x = sched.step((x - m) / (s0**2 + float(t) ** 2), t, x).prev_sample
        assert ((x - m).abs() <= dist + 1e-7).all()  # every step moves toward the mean
        dist = (x - m).abs()
    # Euler follows the probability-flow ODE x_t - m ∝ sqrt(s0^2 + t^2); the last step is Tweedie at t_min
    x_ode = m + (x_T - m) * math.sqrt((s0**2 + t_min**2) / (s0**2 + T**2))
    assert torch.allclose(x, posterior_mean(x_ode, t_min), atol=1e-3)


# -- serialisation, errors, gradient checkpointing ---------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    model, x, y = make("gqa_gated_qknorm_postnorm_rms")
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = StarFlowTransformerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.num_kv_heads == 1 and loaded.config.norm_type == "rms_norm"
    with torch.no_grad():
        assert torch.equal(loaded(x, encoder_hidden_states=y).z, model(x, encoder_hidden_states=y).z)
    eps = torch.randn_like(x)
    assert torch.equal(
        sample_starflow(loaded, eps, encoder_hidden_states=y), sample_starflow(model, eps, encoder_hidden_states=y)
    )


def test_invalid_model_inputs():
    model, x, y = make("base")
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(2, 3, 4, 4), encoder_hidden_states=y)
    with pytest.raises(ValueError, match="noise"):
        sample_starflow(model, torch.randn(2, 5, 4, 4), encoder_hidden_states=y)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, encoder_hidden_states=torch.randn(2, 6, 12))  # max_text_length is 5
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x)
    with pytest.raises(ValueError, match="negative_encoder_hidden_states"):
        sample_starflow(model, x, encoder_hidden_states=y, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_starflow(model, x, encoder_hidden_states=y, negative_encoder_hidden_states=y, guidance_scale=-1.0)
    patched, x2, y2 = make("patch2_rect")
    with pytest.raises(ValueError, match="latents.*patch_size"):
        patched(x2[..., :7], encoder_hidden_states=y2)


def test_invalid_conversion_inputs(tmp_path):
    kwargs = dict(in_channels=4, img_size=4, patch_size=1, channels=32, num_blocks=2, layers_per_block=[1, 2])
    assert config_from_reference_kwargs(kwargs)["layers_per_block"] == [1, 2]
    with pytest.raises(ValueError, match="model_kwargs.*bogus_option"):
        config_from_reference_kwargs({**kwargs, "bogus_option": 1})
    with pytest.raises(ValueError, match="use_pretrained_lm"):
        config_from_reference_kwargs({**kwargs, "use_pretrained_lm": "gemma3_1b"})
    with pytest.raises(ValueError, match="layers_per_block"):
        config_from_reference_kwargs({**kwargs, "layers_per_block": [1, 2, 3]})
    weight = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="blocks.0.unknown_param"):
        convert_starflow_state_dict({"blocks.0.proj_in.weight": weight, "blocks.0.unknown_param": weight})
    with pytest.raises(ValueError, match="missing.pth"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="missing.yaml"):
        load_reference_config(str(tmp_path / "missing.yaml"), {})


def test_gradient_checkpointing_gives_same_gradients():
    model, x, y = make("gqa_gated_qknorm_postnorm_rms")
    model.train()
    params = list(model.parameters())

    def grads():
        xr = x.clone().requires_grad_(True)
        return torch.autograd.grad(model(xr, encoder_hidden_states=y).loss, params + [xr])

    reference = grads()
    calls = []

    def counting_checkpoint(module, *args):
        calls.append(module)
        return checkpoint(module.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(counting_checkpoint)
    checkpointed = grads()
    assert len(calls) == sum(model.config.layers_per_block)  # every layer went through the checkpoint function
    for a, b in zip(reference, checkpointed):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert any(g.abs().max() > 0 for g in reference[:-1])


def test_kv_cache_claims_the_slots_a_static_step_writes_and_keeps_its_length():
    cache = make_block().new_cache(2, 4, torch.float32, "cpu")
    slots = cache.claim_slots(0, 3)
    assert slots.tolist() == [0, 1, 2] and cache.length == 3
    assert cache.claim_slots(3, 3).tolist() == [3, 4, 5] and cache.length == 6 and cache.capacity == 8  # grew
    assert cache.claim_slots(3, 1).tolist() == [3] and cache.length == 4  # a Jacobi iteration rewinds to its window

"""Fast tests of AutoencoderFAE on the tiny preset (DINOv2 hidden 32, 32-px images, 4x4x4 latents)."""

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import Dinov2Config, Dinov2Model

from diffusers_starflow2.models.autoencoder_fae import AutoencoderFAE, fae_paper_config, fae_small_config
from diffusers_starflow2.testing_utils import fae_tiny_config


def make_model(**overrides) -> AutoencoderFAE:
    torch.manual_seed(0)
    return AutoencoderFAE(**{**fae_tiny_config(), **overrides}).eval()


def make_images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- shapes and input checks ------------------------------------------------------------------------------------


def test_encode_decode_shapes():
    model = make_model()
    x = make_images()
    with torch.no_grad():
        out = model.encode(x)
        dist = out.latent_dist
        assert isinstance(dist, DiagonalGaussianDistribution)
        assert dist.mean.shape == dist.logvar.shape == (2, 4, 4, 4)
        assert model.decode(dist.mode()).sample.shape == (2, 3, 32, 32)
        assert model(x).sample.shape == (2, 3, 32, 32)
        assert model.encode(x, return_dict=False)[0].mean.shape == (2, 4, 4, 4)
        assert model.decode(dist.mode(), return_dict=False)[0].shape == (2, 3, 32, 32)
        # any input size is resized to image_size, so the latent grid is fixed ...
        assert model.encode(make_images(2, 20, 48)).latent_dist.mean.shape == (2, 4, 4, 4)
        assert model.encode(make_images(1, 64, 64)).latent_dist.mean.shape == (1, 4, 4, 4)
        # ... while decoding works on any (rectangular) latent grid
        assert model.decode(torch.randn(1, 4, 4, 6)).sample.shape == (1, 3, 32, 48)


def test_slicing_matches_batched():
    model = make_model()
    x = make_images(3)
    with torch.no_grad():
        mean = model.encode(x).latent_dist.mean
        images = model.decode(mean).sample
        model.enable_slicing()
        torch.testing.assert_close(model.encode(x).latent_dist.mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(mean).sample, images, atol=1e-5, rtol=1e-5)


def test_wrong_channels_raise():
    model = make_model()
    with pytest.raises(ValueError, match="x must be"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="sample must be"):
        model(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="images must be"):
        model.encode_latents(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="images must be"):
        model.compute_loss(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="z must have shape"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="latents must have shape"):
        model.decode_latents(torch.zeros(1, 5, 4, 4))


def test_config_validation():
    with pytest.raises(ValueError, match="sample_size"):
        make_model(sample_size=64)
    with pytest.raises(ValueError, match="image_size"):
        make_model(image_size=36)
    with pytest.raises(ValueError, match="decoder_num_heads"):
        make_model(decoder_num_heads=3)


# -- sampling and scaling -----------------------------------------------------------------------------------------


def test_sampling_reproducible_and_mode_deterministic():
    model = make_model()
    x = make_images()
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        a = dist.sample(torch.Generator().manual_seed(0))
        b = dist.sample(torch.Generator().manual_seed(0))
        c = dist.sample(torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
        assert torch.equal(dist.mode(), model.encode(x).latent_dist.mode())
        s1 = model.encode_latents(x, generator=torch.Generator().manual_seed(3))
        s2 = model.encode_latents(x, generator=torch.Generator().manual_seed(3))
        s3 = model.encode_latents(x, generator=torch.Generator().manual_seed(4))
        assert torch.equal(s1, s2) and not torch.allclose(s1, s3)


def test_scaling_shift_round_trip():
    model = make_model(scaling_factor=1.7, shift_factor=0.3)
    x = make_images()
    with torch.no_grad():
        mode = model.encode(x).latent_dist.mode()
        latents = model.encode_latents(x, sample=False)
        torch.testing.assert_close(latents, (mode - 0.3) * 1.7)
        torch.testing.assert_close(model.decode_latents(latents), model.decode(mode).sample, atol=1e-5, rtol=1e-5)


# -- training -----------------------------------------------------------------------------------------------------


def test_dinov2_frozen_rest_trains():
    model = make_model().train()
    assert not model.dinov2.training  # frozen DINOv2 stays in eval mode
    assert not any(p.requires_grad for p in model.dinov2.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model.compute_loss(make_images(4), beta=1e-3, generator=torch.Generator().manual_seed(0))
    for term in (out.feature_loss, out.pixel_loss, out.kl_loss):
        assert term.ndim == 0 and torch.isfinite(term)
    out.loss.backward()
    assert all(p.grad is None for p in model.dinov2.parameters())
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("dinov2.") for k in changed)
    for prefix in (
        "encoder.attn.",
        "encoder.proj_out.",
        "decoder.proj_in.",
        "decoder.layers.0.",
        "pixel_decoder.layers.1.",
        "pixel_decoder.proj_out.",
    ):
        assert any(k.startswith(prefix) for k in changed), prefix


def test_pixel_from_target_only_trains_pixel_decoder():
    model = make_model().train()
    out = model.compute_loss(make_images(2), feature_weight=0.0, beta=0.0, pixel_from_target=True)
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is not None for p in model.pixel_decoder.parameters())


def test_loss_decreases():
    model = make_model().train()
    images = make_images(4, seed=7)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(30):
        out = model.compute_loss(images, beta=1e-4, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses


def test_gradient_checkpointing_same_loss_and_grads():
    model = make_model().train()
    images = make_images(2)
    loss = model.compute_loss(images, sample_posterior=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    loss_ckpt = model.compute_loss(images, sample_posterior=False).loss
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


# -- serialisation and DINOv2 loading ---------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = make_model(scaling_factor=0.8, shift_factor=-0.1)
    model.save_pretrained(tmp_path)
    loaded = AutoencoderFAE.from_pretrained(tmp_path)
    assert state_dicts_equal(model.state_dict(), loaded.state_dict())
    for key, value in model.config.items():
        if not key.startswith("_"):
            assert loaded.config[key] == (list(value) if isinstance(value, tuple) else value), key
    assert not any(p.requires_grad for p in loaded.dinov2.parameters())
    x = make_images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_latents(x, sample=False), model.encode_latents(x, sample=False))
        torch.testing.assert_close(loaded(x).sample, model(x).sample)


def test_from_dinov2_pretrained(tmp_path):
    torch.manual_seed(42)
    tiny_dino = fae_tiny_config()["dinov2_config"]
    dinov2 = Dinov2Model(Dinov2Config(**tiny_dino))
    dinov2.save_pretrained(tmp_path / "dinov2")
    rest = {k: v for k, v in fae_tiny_config().items() if k != "dinov2_config"}

    model = AutoencoderFAE.from_dinov2_pretrained(tmp_path / "dinov2", **rest)
    assert state_dicts_equal(model.dinov2.state_dict(), dinov2.state_dict())
    assert not any(p.requires_grad for p in model.dinov2.parameters())
    assert model.config.dinov2_config["hidden_size"] == 32

    fresh = make_model()
    assert not state_dicts_equal(fresh.dinov2.state_dict(), dinov2.state_dict())
    fresh.load_dinov2_weights(tmp_path / "dinov2")
    assert state_dicts_equal(fresh.dinov2.state_dict(), dinov2.state_dict())

    with pytest.raises(ValueError, match="dinov2_config"):
        AutoencoderFAE.from_dinov2_pretrained(tmp_path / "dinov2", dinov2_config=tiny_dino, **rest)
    other = make_model(dinov2_config={**tiny_dino, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="does not match"):
        other.load_dinov2_weights(tmp_path / "dinov2")


# -- presets --------------------------------------------------------------------------------------------------------


def test_preset_sizes():
    tiny = make_model()
    assert sum(p.numel() * p.element_size() for p in tiny.parameters()) < 1_000_000

    small = AutoencoderFAE(**fae_small_config())
    assert small.latent_grid == 8 and small.config.sample_size == 64

    with torch.device("meta"):  # no memory for the 1.1B-parameter DINOv2-g
        paper = AutoencoderFAE(**fae_paper_config())
    assert paper.latent_grid == 16 and paper.config.latent_channels == 32 and paper.config.sample_size == 256
    assert paper.dinov2.config.hidden_size == 1536 and paper.dinov2.config.use_swiglu_ffn
    assert sum(p.numel() for p in paper.dinov2.parameters()) == 1_136_480_768  # facebook/dinov2-giant

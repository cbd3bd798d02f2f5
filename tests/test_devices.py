"""Every tensor the engine creates takes its device from the model or the inputs: the forward pass of every model
and one decode step of every flow block run on the ``meta`` device (no data, so any tensor left on the CPU fails).

``benchmarks/gpu_check.sh`` runs this file and the CPU tests on CUDA when a GPU is available.
"""

import pytest
import torch

from diffusers_starflow2 import AutoregressiveFlowBlock, GuidanceSpec, StarFlowTransformerModel, TarFlowScheduler
from diffusers_starflow2.models.autoencoder_fae import AutoencoderFAE
from diffusers_starflow2.sampling import sample_autoregressive, sample_flow_block
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components, fae_tiny_config, tiny_starflow_config

# meta always (it has no data: any tensor created on the CPU fails the op that meets it); CUDA when there is one
DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_issue_example_flow_block(device):
    block = AutoregressiveFlowBlock(in_channels=4, channels=64, num_layers=1, head_dim=32, rope="2d").to(device)
    z, logdet = block(torch.randn(1, 16, 4, device=device), (4, 4))
    assert z.device.type == logdet.device.type == device and z.shape == (1, 16, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "rope, text_dim, use_sos", [("2d", 0, True), ("3d", 12, True), ("1d", 12, False), ("none", 12, True)]
)
def test_one_decode_step_of_every_flow_block_kind(rope, text_dim, use_sos, device):
    block = AutoregressiveFlowBlock(
        in_channels=4,
        channels=32,
        num_layers=1,
        head_dim=16,
        rope=rope,
        text_dim=text_dim,
        use_sos=use_sos,
        num_positions=16,
        cond_dim=8,
    ).to(device)
    B, L = 2, 3 if text_dim else 0
    rope_tables = block.rotary(4, 4, L, device)
    assert rope_tables is None or rope_tables.device.type == device
    cache = block.new_cache(B, L + 16, torch.float32, device)
    cond = torch.randn(B, 8, device=device)
    if text_dim:
        block.prefill(torch.randn(B, L, text_dim, device=device), rope_tables, cache, cond=cond)
    mu, sigma = block.decode_step(torch.randn(B, 1, 4, device=device), 0, L, rope_tables, cache, cond=cond)
    assert mu.device.type == sigma.device.type == device and mu.shape == (B, 1, 4) and cache.length == L + 1
    x = TarFlowScheduler().affine_step(torch.randn(B, 1, 4, device=device), mu, sigma)
    assert x.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_starflow_forward_and_sampling(device):
    model = StarFlowTransformerModel(**tiny_starflow_config()).to(device)
    x, y = torch.randn(2, 4, 8, 8, device=device), torch.randn(2, 5, 32, device=device)
    out = model(x, encoder_hidden_states=y)
    assert out.z.device.type == out.loss.device.type == device
    for block in model.blocks:  # whole reverse passes: every decode step, guided where the block reads text
        noise, text = torch.randn(2, 64, 4, device=device), torch.cat([y, y])
        tokens = sample_flow_block(block, noise, (8, 8), TarFlowScheduler(), GuidanceSpec(2.0), text=text)
        assert tokens.device.type == device
        if device != "meta":  # the same numbers as on the CPU
            on_cpu = sample_flow_block(
                block.cpu(), noise.cpu(), (8, 8), TarFlowScheduler(), GuidanceSpec(2.0), text=text.cpu()
            )
            assert torch.allclose(tokens.cpu(), on_cpu, atol=1e-4)
            block.to(device)


class StubVLMStream(torch.nn.Module):
    """A stand-in VLM stream on ``meta``: transformers' decoders make data-dependent mask decisions that meta tensors
    cannot answer, and the VLM's placement is transformers' business; the Pretzel's own tensors are what is tested."""

    uses_mrope = True

    def __init__(self, vlm):
        super().__init__()
        self.vlm, self.decoder = vlm, vlm.get_decoder()
        hidden = vlm.config.get_text_config().hidden_size
        self.embed, self.mix = torch.nn.Embedding(64, hidden), torch.nn.Linear(hidden, hidden)

    def embed_tokens(self, input_ids):
        return self.embed(input_ids)

    def forward(self, embeds, position_ids, cache, attention_mask=None):
        return self.mix(embeds), None


@pytest.mark.parametrize("device", DEVICES)
def test_pretzel_forward_and_image_sampling(device):
    components = build_tiny_starflow2_components()
    transformer = components["transformer"].to(device)
    vlm = StubVLMStream(components["vlm"]).to(device)
    B, T, N = 2, 5, transformer.num_latents
    ids = torch.randint(0, 50, (B, T + N), device=device)
    images = torch.randn(B, 4, 4, 4, device=device)
    levels = torch.full((B,), 0.3, device=device)
    # the teacher-forced pass, with positions given (assigning them reads the masks' values, which meta lacks)
    tokens, logdets = transformer.shallow_forward(images, levels)
    assert tokens.device.type == device and all(logdet.device.type == device for logdet in logdets)
    cache = transformer.new_cache(vlm, levels)
    cache.assign_positions = lambda lat, att: (
        torch.zeros(3, B, lat.shape[1], dtype=torch.long, device=device),
        torch.zeros(B, lat.shape[1], dtype=torch.long, device=device),
    )
    out = transformer.step(vlm, cache, ids[:, :T])
    assert out.hidden_states.device.type == out.flow_hidden_states.device.type == device
    # decode steps of the deep stream through the one sampling loop
    step = lambda inputs, index: transformer.latent_params(
        transformer.step(vlm, cache, latents=inputs).flow_hidden_states
    )
    x = sample_autoregressive(
        step,
        transformer.latent_params(cache.last_flow_hidden),
        torch.randn(B, 2, 4, device=device),
        TarFlowScheduler(),
        GuidanceSpec(),
    )
    assert x.device.type == device and x.shape == (B, 2, 4)
    # one decode step of every shallow block
    for block in transformer.shallow:
        flow_cache = block.new_cache(B, N, torch.float32, device)
        mu, _ = block.decode_step(
            torch.randn(B, 1, 4, device=device),
            0,
            0,
            block.rotary(*transformer.grid, 0, device),
            flow_cache,
            cond=transformer.noise_embedding(levels),
        )
        assert mu.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_fae_forward(device):
    vae = AutoencoderFAE(**fae_tiny_config()).to(device)
    latents = vae.encode_latents(torch.randn(1, 3, 32, 32, device=device), sample=False)
    assert latents.device.type == device
    assert vae.decode_latents(latents).device.type == device

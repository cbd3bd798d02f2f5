"""STARFlow2 at the paper's size, dry-run on the ``meta`` device (nothing is allocated): the shipped Qwen2.5-VL-7B
configuration, a teacher-forced training step with its backward, the text-to-image and edit pipelines to the end;
and loading with ``low_cpu_mem_usage=True`` without a second copy of the weights."""

import json
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch

from diffusers_starflow2 import StarFlow2EditPipeline, StarFlow2Pipeline, TarFlowScheduler
from diffusers_starflow2.models.vlm_stream import VLMStream, qwen2_5_vl_7b_config
from diffusers_starflow2.testing_utils import (
    QWEN2_5_VL_SPECIAL_TOKEN_IDS,
    build_paper_starflow2_components,
    build_tiny_starflow2_components,
    build_tiny_tokenizer,
)
from diffusers_starflow2.training.train_starflow2 import STAGE_GROUPS
from diffusers_starflow2.utils.sequence import encode_conversation, pad_layouts

# one Jacobi pass per window of the whole span: every flow block runs its full-size shapes a few times instead of
# once per position (exact decoding on `meta` takes minutes at this size; the tiny test below runs it)
ONE_PASS = dict(jacobi_block_size=256, jacobi_max_iterations=1, num_inference_steps=1)


@pytest.fixture(scope="module")
def paper():
    return build_paper_starflow2_components()


def test_qwen2_5_vl_7b_config_is_the_published_one():
    config = qwen2_5_vl_7b_config()
    text, vision = config.get_text_config(), config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (text.intermediate_size, text.vocab_size, text.rope_parameters["rope_theta"]) == (18944, 152064, 1e6)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert (vision.patch_size, vision.spatial_merge_size, vision.out_hidden_size) == (14, 2, 3584)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31]
    ids = (text.bos_token_id, text.eos_token_id, config.vision_start_token_id, config.vision_end_token_id)
    assert ids + (config.image_token_id,) == (151643, 151645, 151652, 151653, 151655)


def test_tokenizer_on_qwen_ids():
    tokenizer = build_tiny_tokenizer(special_token_ids=QWEN2_5_VL_SPECIAL_TOKEN_IDS)
    for token, i in QWEN2_5_VL_SPECIAL_TOKEN_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == i
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (151643, 151645)
    ids = tokenizer("a cat <|vision_start|><|image_pad|><|vision_end|>")["input_ids"]
    assert ids[-3:] == [151652, 151655, 151653] and max(ids[:-3]) < 512
    assert tokenizer.decode(ids) == "a cat <|vision_start|><|image_pad|><|vision_end|>"
    with pytest.raises(ValueError, match="collide"):
        build_tiny_tokenizer(special_token_ids={t: 300 + i for i, t in enumerate(QWEN2_5_VL_SPECIAL_TOKEN_IDS)})


def _batch(tokenizer, num_latents, stage):
    """A stage-1 (caption -> image) or stage-3 (image, question -> answer, and caption -> image) batch."""
    image = {"type": "image"}
    caption = [{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": [image]}]
    understanding = [
        {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "a circle"},
    ]
    conversations = [caption, caption] if stage == 1 else [understanding, caption]
    layouts = [encode_conversation(tokenizer, m, num_latents) for m in conversations]
    ids, latent_mask, attention_mask, assistant = pad_layouts(layouts, tokenizer.pad_token_id, side="right")
    text_mask = assistant & ~latent_mask
    text_mask[:, 1:] &= ~latent_mask[:, :-1]
    text_mask[1] = False
    scored = torch.tensor([True, True] if stage == 1 else [False, True])
    return ids, latent_mask, attention_mask, scored, (text_mask if stage == 3 else None)


@pytest.mark.parametrize("stage", [1, 3])
def test_paper_size_training_step_on_meta(paper, stage):
    vlm, transformer = paper["vlm"], paper["transformer"]
    vlm.requires_grad_(False)
    transformer.requires_grad_(False)
    for group in STAGE_GROUPS[stage]:
        getattr(transformer, group).requires_grad_(True)
    ids, latent_mask, attention_mask, scored, text_mask = _batch(paper["tokenizer"], transformer.num_latents, stage)
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    images = torch.randn(2, 32, 16, 16, device="meta")
    kwargs = dict(attention_mask=meta(attention_mask), image_loss_mask=meta(scored), text_loss_mask=meta(text_mask))
    if text_mask is not None:
        with pytest.raises(ValueError, match="num_text_targets"):
            transformer(VLMStream(vlm), meta(ids), meta(latent_mask), images, torch.rand(2, device="meta"), **kwargs)
        kwargs["num_text_targets"] = int(text_mask[:, 1:].sum())
    out = transformer(VLMStream(vlm), meta(ids), meta(latent_mask), images, torch.rand(2, device="meta"), **kwargs)
    out.loss.backward()
    assert out.loss.is_meta and out.image_nll.shape == (2,)
    if stage == 3:
        assert out.text_logits.shape == (kwargs["num_text_targets"], 152064)
    trained = [p for p in transformer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.is_meta and p.grad.shape == p.shape for p in trained)
    assert all(p.grad is None for p in vlm.parameters())
    assert all(p.is_meta for p in (*vlm.parameters(), *transformer.parameters()))  # nothing was allocated
    transformer.zero_grad(set_to_none=True)


def test_paper_size_pipelines_on_meta(paper):
    pipe = StarFlow2Pipeline(**paper)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a prompt", output_type="latent", **ONE_PASS).images
    assert latents.is_meta and latents.shape == (1, 32, 16, 16)
    edit = StarFlow2EditPipeline(**paper)
    edit.set_progress_bar_config(disable=True)
    out = edit(
        PIL.Image.new("RGB", (64, 64), "red"), "make it blue", image_guidance_scale=1.5, output_type="pt", **ONE_PASS
    )
    assert out.images.is_meta and out.images.shape == (1, 3, 256, 256)
    assert out.state.cache.vlm.layers[0].keys.is_meta


def test_tiny_pipeline_on_meta_decodes_exactly():
    components = build_tiny_starflow2_components()
    for name in ("vlm", "transformer", "vae"):
        components[name] = components[name].to("meta")
    pipe = StarFlow2Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle", "two squares"], num_inference_steps=2, output_type="pt").images
    assert images.is_meta and images.shape == (2, 3, 32, 32)


def test_layout_checks_run_where_values_exist():
    components = build_tiny_starflow2_components()
    transformer, vlm = components["transformer"], VLMStream(components["vlm"])
    N = transformer.num_latents
    ids = torch.zeros(1, N + 3, dtype=torch.long)
    latent_mask = torch.zeros(1, N + 3, dtype=torch.bool)
    latent_mask[0, 1 : N + 1] = True
    images, levels = torch.randn(1, 4, 4, 4), torch.full((1,), 0.1)
    with pytest.raises(ValueError, match="latent_mask marks"):
        transformer(vlm, ids, latent_mask, torch.randn(2, 4, 4, 4), levels)
    text_mask = torch.zeros_like(latent_mask)
    text_mask[0, -1] = True
    with pytest.raises(ValueError, match="num_text_targets=2 but text_loss_mask"):
        transformer(vlm, ids, latent_mask, images, levels, text_loss_mask=text_mask, num_text_targets=2)
    out = transformer(vlm, ids, latent_mask, images, levels, text_loss_mask=text_mask, num_text_targets=1)
    assert out.text_logits.shape[0] == 1
    scheduler = TarFlowScheduler()
    scheduler.set_timesteps(3, noise_level=0.3)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(torch.zeros(1), 0.2, torch.zeros(1))


LOAD = textwrap.dedent(
    """
    import json, re, sys
    import torch
    from diffusers_starflow2 import PretzelModel

    def hwm_kb():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak
    base = hwm_kb()
    if sys.argv[2] == "low_cpu_mem_usage":
        model = PretzelModel.from_pretrained(sys.argv[1], low_cpu_mem_usage=True)
    else:  # a naive load, the control: the model's own weights plus the loaded state dict
        from safetensors.torch import load_file
        model = PretzelModel.from_config(PretzelModel.load_config(sys.argv[1]))
        model.load_state_dict({k: v.clone() for k, v in load_file(sys.argv[1] + "/diffusion_pytorch_model.safetensors").items()})
    checksum = sum(float(p.double().sum()) for p in model.parameters())  # every weight is read: resident
    print(json.dumps({"peak_mib": (hwm_kb() - base) / 1024, "checksum": checksum}))
    """
)


def test_low_cpu_mem_usage_keeps_one_copy_of_the_weights(tmp_path):
    from diffusers_starflow2 import PretzelModel

    config = dict(
        latent_channels=16,
        sample_size=8,
        vlm_hidden_size=512,
        shallow_layers=2,
        shallow_channels=512,
        deep_layers=4,
        deep_channels=768,
        head_dim=64,
        vision_start_token_id=3,
    )
    model = PretzelModel(**config)
    size_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    model.save_pretrained(tmp_path)
    del model

    def peak(mode):
        out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path), mode], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    low, naive = peak("low_cpu_mem_usage"), peak("naive")
    assert low["checksum"] == pytest.approx(naive["checksum"])
    assert naive["peak_mib"] > 1.8 * size_mib  # the measurement sees a second copy when there is one
    assert low["peak_mib"] < 1.3 * size_mib, (low, size_mib)

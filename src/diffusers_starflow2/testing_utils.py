# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Randomly initialised models for tests, examples, the documentation's snippets and dry runs, built offline.

* tiny stand-ins for the STARFlow2 VLM (Qwen2.5-VL-7B-Instruct) and its tokenizer: the real model classes and the
  real special-token layout, deterministic, meaningless as language models;
* the tiny presets of the package's models (``pretzel_tiny_config``, ``fae_tiny_config``, ``tiny_starflow_config``);
* complete pipelines' components: a tiny STARFlow2, one at the paper's size for dry runs on the ``meta`` device,
  memory plans and GPU smoke tests, and a tiny STARFlow v1.

Nothing in the library imports this module (``starflow2 convert tiny`` writes a tiny pipeline folder with it).
"""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .models.autoencoder_fae import AutoencoderFAE
from .models.transformer_pretzel import PretzelModel
from .models.transformer_starflow import StarFlowTransformerModel
from .schedulers.scheduling_tarflow import TarFlowScheduler
from .utils.sequence import VISION_START

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The ids Qwen2.5-VL's own tokenizer gives these tokens (its config's bos/eos, vision and image ids among them).
QWEN2_5_VL_SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}

# Qwen2.5-VL's chat template restricted to text and images (no video, no `add_vision_id`): string or
# `[{"type": "text", "text": ...}, {"type": "image"}]` contents, Qwen's default system prompt, generation prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Fixed training corpus for the BPE merges. Byte-level BPE can encode any text regardless of this corpus; the
# corpus only decides which frequent character sequences get merged into single tokens.
_CORPUS = (
    "a photo of a cat sitting on a red chair. the quick brown fox jumps over the lazy dog. "
    "a painting of a house by the lake at sunset, with blue sky and white clouds. "
    "an image of a small green bird on a tree branch in the morning light. "
    "describe the image. what is in this picture? there is a dog, a cat and a horse in the field. "
    "a close up of a yellow flower in a garden, high quality, detailed, realistic. "
    "the man and the woman walk along the street in the city at night. "
    "you are a helpful assistant. user assistant system generate an image of "
    "one two three four five six seven eight nine ten black white orange purple pink gray "
    "0123456789 ,.;:!?'\"()[]{}<>-_+=*/\\|@#$%^&~` "
)


def build_tiny_tokenizer(vocab_size: int = 512, special_token_ids: dict | None = None) -> PreTrainedTokenizerFast:
    """
    Build a small byte-level BPE tokenizer with Qwen's special tokens and chat template.

    Args:
        vocab_size (`int`, defaults to 512):
            Target vocabulary size (special tokens and the 256 byte symbols included).
        special_token_ids (`dict`, *optional*):
            Ids to give the special tokens instead of 0..6, e.g. [`QWEN2_5_VL_SPECIAL_TOKEN_IDS`]: a small
            tokenizer whose special tokens sit where a real-size VLM's embedding table expects them (every other
            token keeps its small id).

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: a deterministic tokenizer that encodes arbitrary text, with
        `pad_token="<|endoftext|>"`, `eos_token="<|im_end|>"` and the vision tokens as special tokens.
    """
    if vocab_size <= 256 + len(QWEN_SPECIAL_TOKENS):
        raise ValueError(
            f"`vocab_size` must exceed the 256 byte symbols plus {len(QWEN_SPECIAL_TOKENS)} special tokens, "
            f"got {vocab_size}."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        # Seeding the full byte alphabet is what makes every input encodable (no unknown token needed).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS], trainer)
    if special_token_ids is not None:
        tokenizer = _move_special_tokens(tokenizer, special_token_ids)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=32768,
    )


def _move_special_tokens(tokenizer: Tokenizer, ids: dict) -> Tokenizer:
    """`tokenizer` with each special token at `ids[token]` (in the model's vocabulary and as an added token)."""
    if set(ids) != set(QWEN_SPECIAL_TOKENS) or len(set(ids.values())) != len(ids):
        raise ValueError(
            f"`special_token_ids` must give distinct ids to exactly {list(QWEN_SPECIAL_TOKENS)}, got {ids}."
        )
    state = json.loads(tokenizer.to_str())
    taken = {i for t, i in state["model"]["vocab"].items() if t not in ids}
    if taken & set(ids.values()):
        raise ValueError(f"`special_token_ids` {ids} collide with the ids of ordinary tokens (< {max(taken) + 1}).")
    state["model"]["vocab"] = {t: ids.get(t, i) for t, i in state["model"]["vocab"].items()}
    for added in state["added_tokens"]:
        added["id"] = ids[added["content"]]
    return Tokenizer.from_str(json.dumps(state))


def _text_config_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads) -> dict:
    """Decoder hyper-parameters shared by the tiny Qwen2.5-VL language model and the tiny plain causal LM."""
    if hidden_size % num_heads:
        raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
    if num_heads % num_kv_heads:
        raise ValueError(f"`num_heads` ({num_heads}) must be divisible by `num_kv_heads` ({num_kv_heads}).")
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
    }


def _mrope_section(head_dim: int) -> list[int]:
    """Split the head_dim // 2 rotary frequencies into (temporal, height, width) in Qwen's 16:24:24 proportion."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def _seeded(build, seed: int):
    """Run `build()` under a fixed seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(torch.float32).eval()


def build_tiny_qwen2_5_vl(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Qwen2_5_VLForConditionalGeneration:
    """
    Build a randomly initialised, tiny [`~transformers.Qwen2_5_VLForConditionalGeneration`] (float32, eval mode).

    The language model mirrors Qwen2.5-VL (M-RoPE with a `mrope_section` sized to the head dim, untied LM head); the
    vision tower is a one-block stub (patch 2, merge 2) that only exists because the class requires one. Special
    token ids in the config are taken from `tokenizer`.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerFast`]):
            Tokenizer from [`build_tiny_tokenizer`]; sets the vocabulary size and the vision token ids.
        hidden_size (`int`, defaults to 64): Width of the language model.
        num_layers (`int`, defaults to 2): Number of decoder layers.
        num_heads (`int`, defaults to 4): Number of attention heads.
        num_kv_heads (`int`, defaults to 2): Number of key/value heads (grouped-query attention).
        seed (`int`, defaults to 0): Seed for the weight initialisation.
    """
    text_config = _text_config_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads)
    text_config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": _mrope_section(hidden_size // num_heads),
    }
    vision_config = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 2,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 8,
        "fullatt_block_indexes": [0],
        "out_hidden_size": hidden_size,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    )
    return _seeded(lambda: Qwen2_5_VLForConditionalGeneration(config), seed)


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """
    Build a randomly initialised, tiny plain causal LM ([`~transformers.Qwen2ForCausalLM`], 1-D RoPE, float32,
    eval mode). Arguments as in [`build_tiny_qwen2_5_vl`].
    """
    config = Qwen2Config(**_text_config_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads))
    return _seeded(lambda: Qwen2ForCausalLM(config), seed)


# Tiny presets of the package's models


def fae_tiny_config() -> dict:
    """A < 1 MB model for tests: image 32, DINOv2 patch 8 -> 4x4x4 latents -> 32-px images."""
    dinov2 = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )
    return dict(
        dinov2_config=dinov2,
        image_size=32,
        sample_size=32,
        latent_channels=4,
        encoder_num_heads=2,
        decoder_dim=32,
        decoder_layers=2,
        decoder_num_heads=2,
        pixel_decoder_dim=32,
        pixel_decoder_layers=2,
        pixel_decoder_num_heads=2,
        out_patch_size=8,
    )


def tiny_starflow_config() -> dict:
    """A few-hundred-kB model for tests and examples."""
    return dict(
        in_channels=4,
        sample_size=8,
        patch_size=1,
        channels=32,
        layers_per_block=[1, 1, 2],
        head_dim=16,
        use_rope=True,
        use_sos=True,
        max_text_length=8,
        text_dim=32,
        cond_top_only=True,
        use_softplus=True,
        final_norm=True,
        soft_clip=4.0,
        seq_order="L2R",
    )


def pretzel_tiny_config(vlm_hidden_size: int = 64, vision_start_token_id: int = 3) -> dict:
    """A tiny Pretzel for tests: 4x4 grids of 4-channel latents."""
    return dict(
        latent_channels=4,
        sample_size=4,
        vlm_hidden_size=vlm_hidden_size,
        num_shallow_blocks=2,
        shallow_layers=1,
        shallow_channels=32,
        deep_layers=2,
        deep_channels=32,
        head_dim=16,
        noise_embed_dim=32,
        vision_start_token_id=vision_start_token_id,
    )


# Complete pipelines' components


def build_tiny_starflow2_components(seed: int = 0, perturb: float = 0.05) -> dict:
    """``vlm``, ``tokenizer``, ``transformer``, ``vae``, ``scheduler`` of a tiny STARFlow2.

    ``perturb`` adds N(0, perturb) noise to the zero-initialised Pretzel parameters (skips, adapter, output
    projections) so that every path of the model is exercised; use 0 for the true initialisation.
    """
    tokenizer = build_tiny_tokenizer()
    vlm = build_tiny_qwen2_5_vl(tokenizer, seed=seed)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(seed)
        transformer = PretzelModel(
            **pretzel_tiny_config(
                vlm.config.get_text_config().hidden_size, tokenizer.convert_tokens_to_ids(VISION_START)
            )
        )
        vae = AutoencoderFAE(**fae_tiny_config())
        if perturb:
            with torch.no_grad():
                for p in transformer.parameters():
                    p.add_(torch.randn_like(p) * perturb)
    return dict(
        vlm=vlm.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=TarFlowScheduler(),
    )


def build_paper_starflow2_components(device="meta", dtype: torch.dtype = torch.float32) -> dict:
    """``vlm``, ``tokenizer``, ``transformer``, ``vae``, ``scheduler`` of STARFlow2 at the paper's size: a
    Qwen2.5-VL-7B (:func:`~diffusers_starflow2.models.vlm_stream.qwen2_5_vl_7b_config`), the 3.7B-parameter Pretzel
    of :func:`~diffusers_starflow2.models.transformer_pretzel.pretzel_paper_config` and the DINOv2-g FAE of
    :func:`~diffusers_starflow2.models.autoencoder_fae.fae_paper_config`, built directly on ``device`` in ``dtype``
    with their own (random) initialisation.  On ``meta`` (the default) nothing is allocated: every call runs its
    shapes to the end.  The tokenizer is the tiny byte-level one with its special tokens at Qwen2.5-VL's ids (the
    real vocabulary is not shipped; any id below 152064 has an embedding row)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .models.autoencoder_fae import fae_paper_config
    from .models.transformer_pretzel import pretzel_paper_config
    from .models.vlm_stream import qwen2_5_vl_7b_config

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vlm = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_7b_config())
            transformer = PretzelModel(**pretzel_paper_config())
            vae = AutoencoderFAE(**fae_paper_config())
    finally:
        torch.set_default_dtype(previous)
    return dict(
        vlm=vlm.eval(),
        tokenizer=build_tiny_tokenizer(special_token_ids=QWEN2_5_VL_SPECIAL_TOKEN_IDS),
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=TarFlowScheduler(),
    )


TINY_T5_WORDS = "a an the photo painting of cat dog bird red blue green small big on in chair tree house sky".split()


def build_tiny_t5_tokenizer(max_length: int):
    """A word-level T5-style tokenizer over :data:`TINY_T5_WORDS`: pad=0, eos=1 appended to every text, unk=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>", *TINY_T5_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def build_tiny_starflow_components(seed: int = 0) -> dict:
    """``text_encoder``, ``tokenizer``, ``transformer``, ``vae``, ``scheduler`` of a tiny STARFlow v1 (T5 with 2 layers
    of width 32, an SD-style VAE with 8/16 channels, 16-px images, 4x4x4 latents)."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    config = tiny_starflow_config()
    tokenizer = build_tiny_t5_tokenizer(config["max_text_length"])
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        )
        transformer = StarFlowTransformerModel(**config)
        for block in transformer.blocks:  # the output projection starts at zero (an identity flow): perturb it
            torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    return dict(
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=TarFlowScheduler.from_preset("starflow"),
    )

"""Tiny, offline stand-ins for the STARFlow2 VLM (Qwen2.5-VL-7B-Instruct) and its tokenizer.

Everything here is built in-process from fixed inputs (no hub download), so tests, examples and the `make_tiny`
script get a deterministic tokenizer and randomly initialised models with the real model classes and the real
special-token layout. The models are meaningless as language models; they exist to exercise code paths.
"""

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

# Qwen's special tokens, in the order they get ids 0..6 in the tiny vocab. `<|video_pad|>` is never used by STARFlow2
# but gives the config's `video_token_id` a real row in the embedding table.
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

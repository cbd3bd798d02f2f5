import string

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

from diffusers_starflow2.models.cache_utils import copy_transformers_cache
from diffusers_starflow2.models.embeddings import position_ids
from diffusers_starflow2.models.vlm_stream import VLMStream
from diffusers_starflow2.testing_utils import (
    QWEN_SPECIAL_TOKENS,
    build_tiny_causal_lm,
    build_tiny_qwen2_5_vl,
    build_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def qwen_vl(tokenizer):
    return build_tiny_qwen2_5_vl(tokenizer)


@pytest.fixture(scope="module")
def causal_lm(tokenizer):
    return build_tiny_causal_lm(tokenizer)


@pytest.fixture(scope="module", params=["qwen_vl", "causal_lm"])
def vlm(request):
    return request.getfixturevalue(request.param)


def _layout(tokenizer, grids, n_text=4, seed=0):
    """Random text + one `<|vision_start|> image <|vision_end|>` span per grid: (segments, input_ids with pads)."""
    generator = torch.Generator().manual_seed(seed)
    first_plain_id = len(QWEN_SPECIAL_TOKENS)

    def text(n):
        return torch.randint(first_plain_id, len(tokenizer), (n,), generator=generator).tolist()

    vision_start, vision_end, image_pad = tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    )
    segments, ids = [("text", n_text + 1)], text(n_text) + [vision_start]
    for i, (grid_h, grid_w) in enumerate(grids):
        last = i == len(grids) - 1
        segments += [("image", grid_h, grid_w), ("text", 1 + n_text + (not last))]
        ids += [image_pad] * (grid_h * grid_w) + [vision_end] + text(n_text) + ([] if last else [vision_start])
    return segments, torch.tensor([ids])


def _positions(tokenizer, input_ids, grid, mrope=True):
    """``position_ids`` of a whole unpadded layout whose images all have ``grid``."""
    latent_mask = input_ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids, next_position, open_cells = position_ids(latent_mask, torch.ones_like(latent_mask), grid, mrope)
    assert open_cells == 0
    return ids, next_position


@torch.no_grad()
def test_text_logits_match_vlm(vlm):
    stream = VLMStream(vlm)
    input_ids = torch.randint(0, vlm.config.get_text_config().vocab_size, (2, 12))
    hidden, cache = stream(
        stream.embed_tokens(input_ids), torch.arange(12).expand(3, -1) if stream.uses_mrope else torch.arange(12)
    )
    assert hidden.shape == (2, 12, stream.hidden_size)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(stream.logits(hidden), vlm(input_ids=input_ids).logits, rtol=0, atol=1e-6)


@torch.no_grad()
def test_cached_incremental_pass_matches_full_pass(vlm, tokenizer):
    stream = VLMStream(vlm)
    _, input_ids = _layout(tokenizer, [(3, 4)])
    ids, _ = _positions(tokenizer, input_ids, (3, 4), stream.uses_mrope)
    # Image cells get random embeddings, as adapted latents would be; text gets its token embeddings.
    embeds = stream.embed_tokens(input_ids.expand(2, -1)).clone()
    image_cells = input_ids[0] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    embeds[:, image_cells] = torch.randn(2, int(image_cells.sum()), stream.hidden_size)

    full, _ = stream(embeds, ids)
    prefix = 7
    hidden, cache = stream(embeds[:, :prefix], ids[..., :prefix])
    steps = [hidden]
    for t in range(prefix, embeds.shape[1]):
        hidden, cache = stream(embeds[:, t : t + 1], ids[..., t : t + 1], cache=cache)
        steps.append(hidden)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("grids", [[(3, 4)], [(4, 3)], [(1, 5), (1, 5)]])
def test_mrope_position_ids_match_get_rope_index(qwen_vl, tokenizer, grids):
    _, input_ids = _layout(tokenizer, grids)
    merge = qwen_vl.config.vision_config.spatial_merge_size
    expected, _ = qwen_vl.model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == qwen_vl.config.image_token_id).int(),
        image_grid_thw=torch.tensor([[1, merge * h, merge * w] for h, w in grids]),
    )
    ids, next_position = _positions(tokenizer, input_ids, grids[0])
    assert torch.equal(ids[:, 0], expected[:, 0])
    assert int(next_position) == expected.max() + 1


def _pattern(pattern, grid=(3, 4)):
    """Latent mask of a text ("t") / image ("i", one whole grid) pattern."""
    cells = grid[0] * grid[1]
    return torch.tensor([m for p in pattern for m in ([True] * cells if p == "i" else [False])])


@pytest.mark.parametrize("mrope", [True, False])
def test_chunked_and_padded_position_ids_match_one_shot(mrope):
    grid = (3, 4)
    lat = _pattern("tttttttittittt", grid)  # 7 text, an image, 2 text, an image, 3 text
    one_shot, one_shot_next, _ = position_ids(lat[None], torch.ones(1, len(lat), dtype=torch.bool), grid, mrope)
    assert one_shot.shape == ((3, 1, 36) if mrope else (1, 36))
    # chunks that split images anywhere (5 cells, then the rest) continue exactly
    chunks, start, open_cells = [], None, 0
    for a, b in [(0, 4), (4, 12), (12, 17), (17, 22), (22, 36)]:
        ids, start, open_cells = position_ids(
            lat[None, a:b], torch.ones(1, b - a, dtype=torch.bool), grid, mrope, start, open_cells
        )
        chunks.append(ids)
    assert torch.equal(torch.cat(chunks, dim=-1), one_shot) and torch.equal(start, one_shot_next)
    # a left-padded second sample gets the same ids after its padding, which takes position 0 and advances nothing
    batch_lat = torch.stack([torch.cat([torch.zeros(3, dtype=torch.bool), lat]), torch.cat([lat[:3], lat])])
    real = torch.ones_like(batch_lat)
    real[0, :3] = False
    ids, _, _ = position_ids(batch_lat, real, grid, mrope)
    assert torch.equal(ids[..., 0, 3:], one_shot[..., 0, :]) and (ids[..., 0, :3] == 0).all()


def test_invalid_inputs_raise(qwen_vl):
    lat = _pattern("ti", (2, 2))
    with pytest.raises(ValueError, match="text token arrived inside an image span after 2 of 4"):
        position_ids(torch.cat([lat[:3], torch.tensor([False])])[None], torch.ones(1, 4, dtype=torch.bool), (2, 2))
    with pytest.raises(ValueError, match="same number of latents in an open span"):
        position_ids(torch.ones(2, 2, dtype=torch.bool), torch.tensor([[False, True], [True, True]]), (2, 2))
    with pytest.raises(ValueError, match="position_ids"):
        VLMStream(qwen_vl)(torch.zeros(1, 4, 64), torch.arange(4))


@torch.no_grad()
def test_stream_positions_reproduce_vlm_image_forward(qwen_vl, tokenizer):
    """Image embeddings at our positions give the logits of Qwen2.5-VL's own multimodal forward."""
    stream = VLMStream(qwen_vl)
    grids = [(3, 4)]
    _, input_ids = _layout(tokenizer, grids)
    vision = qwen_vl.config.vision_config
    grid_thw = torch.tensor([[1, 2 * h, 2 * w] for h, w in grids])
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), patch_dim)
    expected = qwen_vl(
        input_ids=input_ids,
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        mm_token_type_ids=(input_ids == qwen_vl.config.image_token_id).int(),
    ).logits

    image_embeds = torch.cat(qwen_vl.model.get_image_features(pixel_values, grid_thw).pooler_output)
    embeds = stream.embed_tokens(input_ids).clone()
    embeds[input_ids == qwen_vl.config.image_token_id] = image_embeds
    hidden, _ = stream(embeds, _positions(tokenizer, input_ids, grids[0])[0])
    torch.testing.assert_close(stream.logits(hidden), expected, rtol=0, atol=1e-6)


def test_tokenizer_round_trip(tokenizer, tmp_path):
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    text = "Hello, World! " + string.printable
    ids = tokenizer(text).input_ids
    assert loaded(text).input_ids == ids
    assert loaded.decode(ids) == text
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert loaded.convert_tokens_to_ids(token) == i
        assert token in loaded.all_special_tokens
    assert loaded(" <|vision_start|><|image_pad|><|vision_end|>").input_ids[-3:] == [3, 5, 4]
    assert (loaded.pad_token, loaded.eos_token) == ("<|endoftext|>", "<|im_end|>")

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red cat"}]}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a red cat<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tiny_qwen_vl_config(qwen_vl, tokenizer):
    config = qwen_vl.config
    assert config.get_text_config().vocab_size == len(tokenizer)
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert VLMStream(qwen_vl).uses_mrope and not VLMStream(build_tiny_causal_lm(tokenizer)).uses_mrope


@torch.no_grad()
def test_save_load_round_trip(vlm, tmp_path):
    vlm.save_pretrained(tmp_path)
    loaded = type(vlm).from_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, vlm.config.get_text_config().vocab_size, (1, 9))
    assert torch.equal(loaded(input_ids=input_ids).logits, vlm(input_ids=input_ids).logits)


def test_copy_transformers_cache_leaves_the_original_as_it_was():
    cache = DynamicCache()
    keys, values = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    cache.update(keys, values, 0)
    prefix = copy_transformers_cache(cache, lambda i, k, v: (k[..., :3, :], v[..., :3, :]))
    prefix.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 0)  # the copy grows on its own
    assert prefix.get_seq_length() == 4 and cache.get_seq_length() == 5
    assert torch.equal(cache.layers[0].keys, keys) and torch.equal(prefix.layers[0].keys[..., :3, :], keys[..., :3, :])
    moved = copy_transformers_cache(cache, lambda i, k, v: (k.double(), v.double()))
    assert moved.layers[0].dtype == torch.float64 and cache.layers[0].keys.dtype == torch.float32

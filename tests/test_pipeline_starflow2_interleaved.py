"""StarFlow2InterleavedPipeline: segment order, cache reuse (no re-encoding), understanding, streaming, bad inputs."""

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_starflow2 import StarFlow2Pipeline
from diffusers_starflow2.pipelines import IMAGE_PLACEHOLDER, StarFlow2InterleavedPipeline
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components
from diffusers_starflow2.utils.sequence import encode_conversation, pad_layouts, user_message


@pytest.fixture(scope="module")
def pipe():
    p = StarFlow2InterleavedPipeline(**build_tiny_starflow2_components(seed=0))
    p.set_progress_bar_config(disable=True)
    return p


def red_square():
    img = PIL.Image.new("RGB", (32, 32), (255, 255, 255))
    img.paste((220, 40, 40), (8, 8, 24, 24))
    return img


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_forced_images_come_in_the_order_asked(pipe):
    out = pipe(
        ["two shapes", IMAGE_PLACEHOLDER, " and another", IMAGE_PLACEHOLDER],
        max_new_tokens=0,
        generator=gen(),
        output_type="pt",
    )
    assert len(out.segments) == 2 and all(s.shape == (3, 32, 32) for s in out.segments)
    assert out.text == "" and len(out.images) == 2
    # the second image is conditioned on the first: it is not a copy of it
    assert not torch.allclose(out.segments[0], out.segments[1])


def test_free_generation_text_image_text_order(pipe, monkeypatch):
    """Force the LM to emit: two words, <|vision_start|>, one word, <|im_end|>."""
    tok = pipe.tokenizer
    words = tok(" hello", add_special_tokens=False)["input_ids"]
    script = iter(words + [tok.convert_tokens_to_ids("<|vision_start|>")] + words + [tok.eos_token_id])
    monkeypatch.setattr(pipe, "_next_token", lambda *a, **k: next(script))
    out = pipe("say something", max_new_tokens=20, generator=gen(), output_type="np")
    kinds = ["text" if isinstance(s, str) else "image" for s in out.segments]
    assert kinds == ["text", "image", "text"]
    assert out.segments[0] == out.segments[2] == " hello"


def count_positions(pipe):
    """Forward hooks counting (batch x positions) through the VLM decoder and the TARFlow stream."""
    counts = {"vlm": 0, "flow": 0}
    hooks = [
        pipe.vlm.get_decoder().register_forward_hook(
            lambda m, args, kwargs, out: counts.__setitem__(
                "vlm", counts["vlm"] + kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]
            ),
            with_kwargs=True,
        ),
        pipe.transformer.deep.layers[0].register_forward_hook(
            lambda m, args, out: counts.__setitem__("flow", counts["flow"] + out.shape[0] * out.shape[1])
        ),
    ]
    return counts, hooks


@pytest.mark.parametrize("guidance_scale, branches", [(0.0, 1), (2.0, 2)])
def test_every_position_passes_each_stream_once(pipe, monkeypatch, guidance_scale, branches):
    """text -> image -> text: positions through each stream == sequence length x guidance branches."""
    caches = []
    step = pipe.transformer.step

    def recording_step(vlm, cache, *args, **kwargs):
        if not caches or caches[-1] is not cache:
            caches.append(cache)
        return step(vlm, cache, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "step", recording_step)
    counts, hooks = count_positions(pipe)
    try:
        out = pipe(
            ["a red shape", IMAGE_PLACEHOLDER, " that was it"],
            max_new_tokens=3,
            temperature=1.0,
            guidance_scale=guidance_scale,
            num_inference_steps=0,
            generator=gen(),
            output_type="latent",
        )
    finally:
        for h in hooks:
            h.remove()
    assert len(caches) == 1, "one cache for the whole conversation"
    cache = caches[0]
    assert cache.batch_size == branches
    assert out.images, "an image was generated"
    n = pipe.transformer.num_latents
    assert cache.length > n + 2 + 3
    assert counts["vlm"] == cache.length * branches
    assert counts["flow"] == cache.length * branches


def test_denoising_does_not_touch_the_caches(pipe, monkeypatch):
    caches = []
    step = pipe.transformer.step
    monkeypatch.setattr(
        pipe.transformer, "step", lambda vlm, cache, *a, **k: (caches.append(cache), step(vlm, cache, *a, **k))[1]
    )
    pipe(
        ["a red shape", IMAGE_PLACEHOLDER, " done"],
        max_new_tokens=0,
        num_inference_steps=2,
        generator=gen(),
        output_type="latent",
    )
    main = caches[0]
    seq = encode_conversation(pipe.tokenizer, [user_message("a red shape")], pipe.transformer.num_latents, True)
    expected = len(seq) + 1 + pipe.transformer.num_latents + 1 + len(pipe.tokenizer(" done")["input_ids"])
    assert main.length == expected


def test_understanding_equals_greedy_teacher_forced_decoding(pipe, monkeypatch):
    generated = []
    original = pipe._next_token
    monkeypatch.setattr(pipe, "_next_token", lambda *a, **k: generated.append(original(*a, **k)) or generated[-1])
    image, question = red_square(), "What color is the shape?"
    out = pipe([image, question], max_new_tokens=6, temperature=0.0, guidance_scale=0.0, generator=gen(3))
    assert out.images == [] and isinstance(out.text, str)
    stop = {pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id}
    answer = [t for t in generated if t not in stop]
    assert answer, "the tiny model produced no token"

    # teacher-forced: one pass over prompt + answer, argmax at every answer position
    t = pipe.transformer
    n = t.num_latents
    layout = encode_conversation(pipe.tokenizer, [user_message(image, question)], n, add_generation_prompt=True)
    ids, latent_mask, attention_mask, _ = pad_layouts([layout], pipe.tokenizer.pad_token_id)
    ids = torch.cat([ids, torch.tensor([answer])], 1)
    latent_mask = torch.cat([latent_mask, torch.zeros(1, len(answer), dtype=torch.bool)], 1)
    tokens = pipe.encode_image(pipe.preprocess_image(image), pipe.scheduler.config.noise_level, gen(3))
    latents = torch.zeros(*ids.shape, t.config.latent_channels)
    latents[latent_mask] = tokens.reshape(-1, t.config.latent_channels)
    with torch.no_grad():
        cache = t.new_cache(pipe.vlm_stream, torch.full((1,), pipe.scheduler.config.noise_level), use_flow_cache=False)
        o = t.step(pipe.vlm_stream, cache, ids, latents, latent_mask)
        logits = t.text_logits(pipe.vlm_stream, o.hidden_states, o.flow_hidden_states)[0].float()
    banned = [pipe.tokenizer.convert_tokens_to_ids(x) for x in ("<|image_pad|>", "<|vision_end|>")]
    logits[:, banned] = -float("inf")
    L = len(layout)
    predicted = logits[L - 1 : L - 1 + len(generated)].argmax(-1).tolist()
    assert predicted == generated


def test_identical_seeds_identical_outputs(pipe):
    kwargs = dict(max_new_tokens=4, temperature=1.0, top_k=50, top_p=0.9, output_type="np")
    a = pipe(["a blue circle", IMAGE_PLACEHOLDER], generator=gen(7), **kwargs).segments
    b = pipe(["a blue circle", IMAGE_PLACEHOLDER], generator=gen(7), **kwargs).segments
    c = pipe(["a blue circle", IMAGE_PLACEHOLDER], generator=gen(8), **kwargs).segments
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == y if isinstance(x, str) else np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_stream_and_segment_callback_match_call(pipe):
    seen = []
    kwargs = dict(max_new_tokens=3, temperature=1.0, output_type="np")
    out = pipe(["hi", IMAGE_PLACEHOLDER], generator=gen(1), callback_on_segment=seen.append, **kwargs)
    streamed = list(pipe.stream(["hi", IMAGE_PLACEHOLDER], generator=gen(1), **kwargs))
    assert len(seen) == len(out.segments) == len(streamed)
    for a, b in zip(out.segments, streamed):
        assert a == b if isinstance(a, str) else np.array_equal(a, b)


def test_chat_messages_input(pipe):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": red_square()}, {"type": "text", "text": "Redraw it."}]},
        {"role": "assistant", "content": f"Sure: {IMAGE_PLACEHOLDER}"},
    ]
    out = pipe(messages, max_new_tokens=0, generator=gen(), output_type="latent")
    assert len(out.segments) == 1 and out.segments[0].shape == (4, 4, 4)


def test_loads_from_a_starflow2_pipeline_folder(tmp_path):
    StarFlow2Pipeline(**build_tiny_starflow2_components(seed=1)).save_pretrained(tmp_path)
    p = StarFlow2InterleavedPipeline.from_pretrained(tmp_path)
    p.set_progress_bar_config(disable=True)
    assert len(p(["x", IMAGE_PLACEHOLDER], max_new_tokens=0, output_type="latent").images) == 1


@pytest.mark.parametrize(
    "prompt, kwargs, name",
    [
        (["look", None], {}, "prompt"),
        (["look", 3], {}, "prompt"),
        ([np.zeros((32, 32, 4), dtype=np.uint8), "what?"], {}, "prompt"),
        ([torch.zeros(1, 32, 32), "what?"], {}, "prompt"),
        ("hi", {"max_new_tokens": -1}, "max_new_tokens"),
        (["a", IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER], {"max_images": 1}, "max_images"),
        ("hi", {"guidance_scale": -1.0}, "guidance_scale"),
        ("hi", {"output_type": "jpeg"}, "output_type"),
        ([IMAGE_PLACEHOLDER], {}, "prompt"),
        ([], {}, "prompt"),
    ],
)
def test_bad_inputs(pipe, prompt, kwargs, name):
    with pytest.raises(ValueError, match=name):
        pipe(prompt, max_new_tokens=kwargs.pop("max_new_tokens", 0), **kwargs)


def test_callback_steps_count_across_images_and_interrupt_ends_the_answer(pipe):
    S = 1 + len(pipe.transformer.shallow)  # the flow blocks of an image
    steps = []
    kwargs = dict(max_new_tokens=0, generator=gen(2), output_type="latent", num_inference_steps=1)
    out = pipe(
        ["two images", IMAGE_PLACEHOLDER, "and", IMAGE_PLACEHOLDER],
        callback_on_step_end=lambda p, step, t, kw: steps.append(step) or {},
        **kwargs,
    )
    assert len(out.segments) == 2 and steps == list(range(2 * (S + 1)))
    assert pipe.num_timesteps == S + 1

    def stop_in_first(p, step, t, kw):
        p._interrupt = step == 1  # the first image's second flow block
        return {}

    stopped = pipe(
        ["two images", IMAGE_PLACEHOLDER, "and", IMAGE_PLACEHOLDER], callback_on_step_end=stop_in_first, **kwargs
    )
    assert len(stopped.segments) == 1 and stopped.segments[0].shape == out.segments[0].shape


# -- conversations across calls ------------------------------------------------------------------------------------

FIRST = ["draw a red circle", IMAGE_PLACEHOLDER, " done"]
SECOND = ["what color is it?", IMAGE_PLACEHOLDER]


@pytest.fixture(scope="module")
def first_turn(pipe):
    return pipe(
        FIRST, max_new_tokens=0, guidance_scale=2.0, num_inference_steps=0, generator=gen(0), output_type="latent"
    )


def test_a_continued_turn_processes_only_its_new_positions(pipe, first_turn):
    state = first_turn.state
    held, held_bytes = state.num_positions, state.nbytes
    counts, hooks = count_positions(pipe)
    try:
        second = pipe(
            SECOND,
            state=state,
            max_new_tokens=3,
            temperature=1.0,
            guidance_scale=2.0,
            num_inference_steps=0,
            generator=gen(1),
            output_type="latent",
        )
    finally:
        for h in hooks:
            h.remove()
    new = second.state.num_positions - held
    n = pipe.transformer.num_latents
    assert new > n + 2, "the second turn holds its user turn and an image"
    assert counts["vlm"] == counts["flow"] == new * 2  # two guidance branches, nothing of the first turn again
    # the state continued is untouched, and the new one reports its larger memory
    assert state.num_positions == held and state.nbytes == held_bytes
    assert second.state.nbytes > held_bytes > 0

    # re-sending the history instead processes the whole conversation
    counts, hooks = count_positions(pipe)
    try:
        history = [
            {"role": "user", "content": FIRST[0]},
            {
                "role": "assistant",
                "content": [{"type": "image", "image": red_square()}, {"type": "text", "text": FIRST[2]}],
            },
            {"role": "user", "content": SECOND[0]},
            {"role": "assistant", "content": IMAGE_PLACEHOLDER},
        ]
        pipe(
            history, max_new_tokens=0, guidance_scale=2.0, num_inference_steps=0, generator=gen(1), output_type="latent"
        )
    finally:
        for h in hooks:
            h.remove()
    assert counts["vlm"] > (held + n) * 2  # the first image's span is pushed through again (after FAE encoding)


@torch.no_grad()
def test_continuation_equals_one_teacher_forced_pass_over_both_turns(pipe, monkeypatch):
    tok, t = pipe.tokenizer, pipe.transformer
    N, C = t.num_latents, t.config.latent_channels
    kwargs = dict(guidance_scale=0.0, num_inference_steps=0, output_type="latent")
    first = pipe(FIRST, max_new_tokens=0, generator=gen(0), **kwargs)

    logits, params, generated = [], [], []
    text_logits, latent_params, next_token = t.text_logits, t.latent_params, pipe._next_token
    # a copy: the sampler bans tokens in place
    monkeypatch.setattr(t, "text_logits", lambda *a: logits.append(text_logits(*a).clone()) or logits[-1].clone())
    monkeypatch.setattr(t, "latent_params", lambda g: params.append(latent_params(g)) or params[-1])
    monkeypatch.setattr(pipe, "_next_token", lambda *a, **k: generated.append(next_token(*a, **k)) or generated[-1])
    second = pipe(SECOND, state=first.state, max_new_tokens=4, max_images=1, generator=gen(5), **kwargs)
    monkeypatch.undo()
    stop = {tok.eos_token_id, tok.pad_token_id}
    answer = [i for i in generated if i not in stop]
    assert generated and logits

    # from scratch: the two-turn conversation rendered whole by the chat template, both images teacher-forced
    messages = [
        user_message(FIRST[0]),
        {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": FIRST[2]}]},
        user_message(SECOND[0]),
    ]
    layout = encode_conversation(tok, messages, N, add_generation_prompt=True, open_image=True)
    image1, image2 = first.state.image_tokens, second.state.image_tokens
    ids = layout.input_ids + [tok.pad_token_id] * N + [tok.convert_tokens_to_ids("<|vision_end|>")] + answer
    latent_mask = torch.tensor([layout.latent_mask + [True] * N + [False] * (1 + len(answer))])
    latents = torch.zeros(1, len(ids), C)
    latents[latent_mask] = torch.cat([image1, image2], 1).reshape(-1, C)
    cache = t.new_cache(pipe.vlm_stream, torch.full((1,), pipe.scheduler.config.noise_level), use_flow_cache=False)
    out = t.step(pipe.vlm_stream, cache, torch.tensor([ids]), latents, latent_mask)
    assert len(ids) == second.state.num_positions

    start = len(layout) - 1  # <|vision_start|> of the second image: its output predicts latent 0
    mu, sigma = t.latent_params(out.flow_hidden_states[:, start : start + N])
    torch.testing.assert_close(torch.cat([m for m, _ in params[:N]], 1), mu, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([s for _, s in params[:N]], 1), sigma, atol=1e-4, rtol=0)
    z = torch.randn(1, N, C, generator=gen(5))  # the second turn's first draw: its image noise
    torch.testing.assert_close(image2, mu + sigma * z, atol=1e-4, rtol=0)

    end = start + N + 1  # <|vision_end|>: its output predicts the first generated token
    expected = t.text_logits(pipe.vlm_stream, out.hidden_states, out.flow_hidden_states)[0, end : end + len(generated)]
    torch.testing.assert_close(torch.cat([x[0, -1:] for x in logits]).float(), expected.float(), atol=1e-4, rtol=0)


def test_a_state_continues_several_times_and_moves_with_the_pipeline(pipe, first_turn):
    kwargs = dict(max_new_tokens=2, temperature=1.0, guidance_scale=2.0, num_inference_steps=0, output_type="latent")
    a = pipe(SECOND, state=first_turn.state, generator=gen(3), **kwargs)
    b = pipe(SECOND, state=first_turn.state, generator=gen(3), **kwargs)
    moved = first_turn.state.to("cpu", torch.float64)  # as if the pipeline had been cast meanwhile
    assert moved.nbytes > first_turn.state.nbytes
    c = pipe(SECOND, state=moved, generator=gen(3), **kwargs)
    for x in (b, c):
        assert len(x.segments) == len(a.segments)
        for u, v in zip(a.segments, x.segments):
            assert u == v if isinstance(u, str) else torch.equal(u, v)
        assert x.state.num_positions == a.state.num_positions


def test_bad_states(pipe, first_turn):
    other = StarFlow2InterleavedPipeline(**build_tiny_starflow2_components(seed=1))
    other_state = other(FIRST, max_new_tokens=0, guidance_scale=0.0, num_inference_steps=0, output_type="latent").state
    context = pipe.vlm.config.get_text_config().max_position_embeddings
    cases = [
        (dict(state="state"), "`state` must be a StarFlow2ConversationState"),
        (dict(state=other_state, guidance_scale=0.0), "`state` was made by another model"),
        (dict(state=first_turn.state, image_guidance_scale=1.5), "`image_guidance_scale` needs 3"),
        (dict(state=first_turn.state, noise_level=0.1), "`noise_level` must be the conversation's"),
        (
            dict(state=first_turn.state, max_new_tokens=context - first_turn.state.num_positions),
            "the conversation `state` holds",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(SECOND, **{"max_new_tokens": 0, **kwargs})


# -- batched conversations ---------------------------------------------------------------------------------------


def batch_of_conversations():
    return [
        ["draw a red circle", IMAGE_PLACEHOLDER, " done"],
        [red_square(), "describe this image at length, then redraw it", IMAGE_PLACEHOLDER],
        [
            {"role": "user", "content": "a blue square please"},
            {"role": "assistant", "content": f"Sure: {IMAGE_PLACEHOLDER}"},
        ],
    ]


def recording_logits(pipe, monkeypatch):
    """(conversation row, text logits) of every sampled token."""
    seen, rows = [], []
    text_logits, next_token = pipe.transformer.text_logits, pipe._next_token
    monkeypatch.setattr(pipe.transformer, "text_logits", lambda *a: seen.append(text_logits(*a).clone()) or seen[-1])
    monkeypatch.setattr(pipe, "_next_token", lambda *a, row=0, **k: rows.append(row) or next_token(*a, row=row, **k))
    return seen, rows


def assert_batch_equals_alone(pipe, monkeypatch, conversations, seeds, continue_kwargs=None, states=None, **kwargs):
    """Each output of the batch equals its conversation run alone with its own generator (and state): the same
    segments (text identical, images within 1e-5), the same text logits at every sampled token, and a state that
    continues alike.  Returns the outputs run alone."""
    seen, rows = recording_logits(pipe, monkeypatch)
    alone = []
    for i, conversation in enumerate(conversations):
        start = len(seen)
        state = states[i] if states is not None else None
        alone.append((pipe(conversation, generator=gen(seeds[i]), state=state, **kwargs), seen[start:]))
    del seen[:], rows[:]
    batched = pipe(conversations, generator=[gen(s) for s in seeds], state=states, **kwargs)
    assert isinstance(batched, list) and len(batched) == len(conversations)
    for i, (out, logits) in enumerate(alone):
        b = batched[i]
        assert [type(x) for x in b.segments] == [type(x) for x in out.segments]
        for x, y in zip(b.segments, out.segments):
            if isinstance(x, str):
                assert x == y
            else:
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        mine = [x for x, r in zip(seen, rows) if r == i]
        assert len(mine) == len(logits)
        for x, y in zip(mine, logits):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        if out.state.image_tokens is None:
            assert b.state.image_tokens is None
        else:
            torch.testing.assert_close(b.state.image_tokens, out.state.image_tokens, atol=1e-5, rtol=0)
        if continue_kwargs is not None:  # each batched output's state continues as the state of the one alone
            after_alone = pipe(SECOND, state=out.state, generator=gen(9), **continue_kwargs)
            after_batch = pipe(SECOND, state=b.state, generator=gen(9), **continue_kwargs)
            torch.testing.assert_close(after_batch.images[0], after_alone.images[0], atol=1e-5, rtol=0)
            assert after_batch.text == after_alone.text
    monkeypatch.undo()
    return [out for out, _ in alone]


@pytest.mark.parametrize("guidance", [dict(guidance_scale=2.0), dict(guidance_scale=2.0, image_guidance_scale=1.5)])
def test_batched_conversations_equal_each_alone(pipe, monkeypatch, guidance):
    kwargs = dict(
        max_new_tokens=5, max_images=1, temperature=1.0, num_inference_steps=1, output_type="latent", **guidance
    )
    continue_kwargs = dict(max_new_tokens=2, num_inference_steps=0, output_type="latent", **guidance)
    alone = assert_batch_equals_alone(pipe, monkeypatch, batch_of_conversations(), range(3), continue_kwargs, **kwargs)
    assert all(out.text for out in alone), "every conversation sampled text"


@pytest.mark.parametrize("decoding", [{}, dict(jacobi_block_size=4, jacobi_tolerance=0.0)])
def test_a_batch_mixes_image_counts_given_images_and_prompt_lengths(pipe, monkeypatch, decoding):
    """0, 1 and 2 images asked, an image given inside an answer, prompts of different lengths: each conversation
    waits on padding positions while the others push text or draw images (Jacobi passes with tolerance 0 give the
    sequential result, also over idle rows)."""
    conversations = [
        ["a long request for words only, with no picture at all in the answer, just text"],
        ["two shapes", IMAGE_PLACEHOLDER, " and", IMAGE_PLACEHOLDER],
        [
            {"role": "user", "content": [{"type": "image", "image": red_square()}, {"type": "text", "text": "again"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Yours:"},
                    {"type": "image", "image": red_square()},
                    {"type": "text", "text": f" and mine: {IMAGE_PLACEHOLDER}"},
                ],
            },
        ],
    ]
    kwargs = dict(
        max_new_tokens=3,
        max_images=2,
        temperature=1.0,
        guidance_scale=2.0,
        num_inference_steps=1,
        output_type="latent",
        **decoding,
    )
    continue_kwargs = dict(max_new_tokens=2, guidance_scale=2.0, num_inference_steps=0, output_type="latent")
    alone = assert_batch_equals_alone(pipe, monkeypatch, conversations, [0, 1, 2], continue_kwargs, **kwargs)
    assert [len(out.images) for out in alone] == [0, 2, 1]


def test_a_batch_draws_freely_sampled_images_and_stops_each_conversation_on_its_own(pipe, monkeypatch):
    """``<|vision_start|>`` made likely: one conversation opens an image in its free text and draws it, next to
    conversations that write text only, one cut by a stop string, one by ``max_new_tokens``."""
    vs = pipe.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    text_logits = pipe.transformer.text_logits

    def favour_images(*args):
        logits = text_logits(*args).clone()
        logits[..., vs] += 4.0
        return logits

    conversations = [["tell me"], ["tell me"], ["say it"], ["an answer", IMAGE_PLACEHOLDER, " then text"]]
    seeds = [5, 0, 1, 3]
    kwargs = dict(
        max_new_tokens=6, max_images=1, temperature=1.0, stop="ray", num_inference_steps=1, output_type="latent"
    )
    with monkeypatch.context() as patched:
        patched.setattr(pipe.transformer, "text_logits", favour_images)
        alone = assert_batch_equals_alone(pipe, patched, conversations, seeds, **kwargs)
    kinds = [["text" if isinstance(s, str) else "image" for s in out.segments] for out in alone]
    assert kinds == [["image", "text"], ["text"], ["text"], ["image", "text"]]
    assert alone[1].text == " sky"  # cut before "ray"
    prompt = encode_conversation(pipe.tokenizer, [user_message("say it")], pipe.transformer.num_latents, True)
    assert alone[2].state.num_positions == len(prompt) + 6  # all of max_new_tokens


def test_a_batch_continues_a_list_of_states(pipe, monkeypatch, first_turn):
    """States of different lengths and guidance branches (one of three, continued with two) continue as one batch."""
    kwargs = dict(num_inference_steps=0, output_type="latent")
    states = [
        first_turn.state,
        pipe("a short one", max_new_tokens=4, temperature=1.0, generator=gen(4), **kwargs).state,
        pipe(
            [red_square(), "redraw", IMAGE_PLACEHOLDER], max_new_tokens=0, image_guidance_scale=1.5, generator=gen(5)
        ).state,
    ]
    assert len({s.num_positions for s in states}) == 3 and [s.num_branches for s in states] == [2, 2, 3]
    turns = [SECOND, ["and now?"], ["once more", IMAGE_PLACEHOLDER, " there"]]
    kwargs = dict(max_new_tokens=3, temperature=1.0, guidance_scale=2.0, num_inference_steps=1, output_type="latent")
    continue_kwargs = dict(max_new_tokens=2, guidance_scale=2.0, num_inference_steps=0, output_type="latent")
    assert_batch_equals_alone(pipe, monkeypatch, turns, [6, 7, 8], continue_kwargs, states, **kwargs)


def test_bad_batches(pipe, first_turn):
    cases = [
        ([["a"], ["b", IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER]], {"max_images": 1}, "`max_images`"),
        ([["a"], ["b"]], {"state": first_turn.state}, "`state` must be None or a list of 2 states"),
        ([["a"], ["b"]], {"state": [first_turn.state, None]}, "`state` must be None or a list of 2 states"),
        ([["a"], ["b"]], {"state": [first_turn.state, "state"]}, "`state` must be a StarFlow2ConversationState"),
        ([["a"], ["b"]], {"generator": [gen(0)]}, "`generator`"),
        ([["a"], ["b", 3]], {}, "`prompt` item 1"),
        ([["a"], ["b"]], {"callback_on_segment": print}, "`callback_on_segment` must be None"),
    ]
    for prompt, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(prompt, max_new_tokens=0, **kwargs)

"""Interleaved text -> image -> text: cache reuse versus re-encoding the generated image.

STARFlow2 appends every generated latent to both KV caches as it is sampled, so the text after an image continues
from the caches.  Composite systems (an LM plus a separate image generator) must instead re-encode each generated
image before the LM can continue.  The baseline here emulates that with the same model: after the image, the whole
sequence so far (prompt, image span, closing token) is run again from empty caches before text continues.

Prints a markdown table: positions processed per stream (x guidance branches) and wall time.

    python benchmarks/bench_interleaved.py [--model DIR] [--text_tokens 32] [--repeats 3]

With ``--conversation``: a 5-turn conversation with 3 images, each turn continuing the previous turn's ``state``
versus re-sending the whole history (the earlier images FAE-encoded again); per turn, positions through each stream,
seconds and what the state holds.

    python benchmarks/bench_interleaved.py --conversation [--model DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_starflow2 import GuidanceSpec
from diffusers_starflow2.pipelines import IMAGE_PLACEHOLDER, StarFlow2InterleavedPipeline
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components
from diffusers_starflow2.utils.sequence import VISION_END, VISION_START, encode_conversation, special_id, user_message


def run(pipe, prompt: str, text_tokens: int, reencode: bool, seed: int = 0):
    """One text -> image -> text generation; returns (positions through the VLM stream, seconds)."""
    t, tok = pipe.transformer, pipe.tokenizer
    counted = {"n": 0}
    hook = pipe.vlm.get_decoder().register_forward_hook(
        lambda m, a, kw, o: counted.__setitem__("n", counted["n"] + kw["inputs_embeds"].shape[:2].numel()),
        with_kwargs=True,
    )
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            layout = encode_conversation(
                tok, [user_message(prompt)], t.num_latents, add_generation_prompt=True, open_image=True
            )
            cache = pipe._new_cache(2, pipe.scheduler.config.noise_level)
            uncond = encode_conversation(tok, [user_message("")], t.num_latents, True, True)
            pipe._run_text(cache, [layout, uncond])
            noise = torch.randn(1, t.num_latents, t.config.latent_channels, generator=gen)
            tokens, _ = pipe.generate_image(cache, noise, GuidanceSpec(2.0), num_inference_steps=0)
            pipe._append_ids(cache, [special_id(tok, VISION_END)])
            if reencode:  # composite baseline: rebuild the context, image included, from scratch
                full = encode_conversation(tok, [user_message(prompt)], t.num_latents, True, True)
                full.input_ids += [0] * t.num_latents + [special_id(tok, VISION_END)]
                full.latent_mask += [True] * t.num_latents + [False]
                full_u = encode_conversation(tok, [user_message("")], t.num_latents, True, True)
                full_u.input_ids += [0] * t.num_latents + [special_id(tok, VISION_END)]
                full_u.latent_mask += [True] * t.num_latents + [False]
                cache = pipe._new_cache(2, pipe.scheduler.config.noise_level)
                pipe._run_text(cache, [full, full_u], torch.cat([tokens, tokens]))
            for _ in range(text_tokens):
                nxt = pipe._next_token(cache, [], None, [special_id(tok, VISION_START)], None)
                pipe._append_ids(cache, [nxt])
    finally:
        hook.remove()
    return counted["n"], time.perf_counter() - start


# A 5-turn conversation with 3 images: (user turn, free text tokens of the answer).
CONVERSATION = [
    (["draw a red circle on the left", IMAGE_PLACEHOLDER], 0),
    ("what color is the shape?", 8),
    (["make the circle blue", IMAGE_PLACEHOLDER], 0),
    ("where is the shape?", 8),
    (["now draw a green square at the top", IMAGE_PLACEHOLDER], 0),
]


def conversation(pipe, with_state: bool, seed: int = 0):
    """The turns of :data:`CONVERSATION`, each continuing the previous turn's state, or re-sending the whole history
    (earlier answers' text and images, the images FAE-encoded again) as a system without kept caches must.  Returns
    per turn ``(positions through the VLM stream, positions through the TARFlow stream, seconds, positions held,
    bytes held)``, all guidance branches counted."""
    counted = {"vlm": 0, "flow": 0}
    hooks = [
        pipe.vlm.get_decoder().register_forward_hook(
            lambda m, a, kw, o: counted.__setitem__("vlm", counted["vlm"] + kw["inputs_embeds"].shape[:2].numel()),
            with_kwargs=True,
        ),
        pipe.transformer.deep.layers[0].register_forward_hook(
            lambda m, a, o: counted.__setitem__("flow", counted["flow"] + o.shape[:2].numel())
        ),
    ]
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(guidance_scale=2.0, image_guidance_scale=1.5, generator=generator)
    rows, state, history = [], None, []
    try:
        for turn, text_tokens in CONVERSATION:
            counted.update(vlm=0, flow=0)
            start = time.perf_counter()
            if with_state:
                out = pipe(turn, state=state, max_new_tokens=text_tokens, **kwargs)
                state = out.state
            else:
                parts = [turn] if isinstance(turn, str) else turn
                user = [p for p in parts if p != IMAGE_PLACEHOLDER]
                messages = history + [{"role": "user", "content": " ".join(user)}]
                if IMAGE_PLACEHOLDER in parts:
                    messages.append({"role": "assistant", "content": IMAGE_PLACEHOLDER})
                out = pipe(messages, max_new_tokens=text_tokens, **kwargs)
                answer = [
                    {"type": "text", "text": s} if isinstance(s, str) else {"type": "image", "image": s}
                    for s in out.segments
                ]
                history = messages[:-1] if IMAGE_PLACEHOLDER in parts else messages
                history = history + [{"role": "assistant", "content": answer}]
                state = out.state
            seconds = time.perf_counter() - start
            rows.append((counted["vlm"], counted["flow"], seconds, state.num_positions, state.nbytes))
    finally:
        for h in hooks:
            h.remove()
    return rows


def conversation_table(pipe, repeats: int) -> None:
    conversation(pipe, True)  # warm-up
    results = {}
    for name, with_state in (("state", True), ("re-send", False)):
        runs = [conversation(pipe, with_state, seed=s) for s in range(repeats)]
        results[name] = [
            (*runs[0][k][:2], sorted(r[k][2] for r in runs)[len(runs) // 2], *runs[0][k][3:])
            for k in range(len(CONVERSATION))
        ]
    print(
        f"{len(CONVERSATION)}-turn conversation, 3 images ({pipe.transformer.num_latents} latents each), text+image "
        f"guidance (3 branches), default denoising; median seconds of {repeats}"
    )
    print(
        "| turn | user | VLM positions: state / re-send | TARFlow positions: state / re-send "
        "| seconds: state / re-send | held by the state (positions, KiB) |"
    )
    print("|---|---|---|---|---|---|")
    for k, (turn, _) in enumerate(CONVERSATION):
        a, b = results["state"][k], results["re-send"][k]
        user = turn if isinstance(turn, str) else " ".join(turn)
        print(
            f"| {k + 1} | {user} | {a[0]} / {b[0]} | {a[1]} / {b[1]} | {a[2]:.3f} / {b[2]:.3f} "
            f"| {a[3]}, {a[4] / 1024:.0f} |"
        )
    total = [sum(r[i] for r in results[n]) for n in ("state", "re-send") for i in (0, 2)]
    print(f"| all | | {total[0]} / {total[2]} | | {total[1]:.3f} / {total[3]:.3f} | |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="pipeline folder (default: a random tiny STARFlow2)")
    parser.add_argument("--text_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--conversation",
        action="store_true",
        help="measure the 5-turn conversation (state vs re-sending the history) instead",
    )
    args = parser.parse_args(argv)
    pipe = (
        StarFlow2InterleavedPipeline.from_pretrained(args.model)
        if args.model
        else StarFlow2InterleavedPipeline(**build_tiny_starflow2_components())
    )
    pipe.set_progress_bar_config(disable=True)
    if args.conversation:
        return conversation_table(pipe, args.repeats)
    prompt = "draw a red circle on the left and then describe it"
    rows = []
    for name, reencode in (("STARFlow2 (cache reuse)", False), ("re-encode image (composite baseline)", True)):
        run(pipe, prompt, 2, reencode)  # warm-up
        results = [run(pipe, prompt, args.text_tokens, reencode, seed=s) for s in range(args.repeats)]
        positions = results[0][0]
        seconds = sorted(r[1] for r in results)[len(results) // 2]
        rows.append((name, positions, seconds))
    print(
        f"model: {args.model or 'random tiny STARFlow2'}, {pipe.transformer.num_latents} latents/image, "
        f"{args.text_tokens} text tokens after the image, CFG (2 branches), median of {args.repeats}"
    )
    print("| method | positions through the VLM stream (x branches) | seconds |")
    print("|---|---|---|")
    for name, positions, seconds in rows:
        print(f"| {name} | {positions} | {seconds:.3f} |")


if __name__ == "__main__":
    main()

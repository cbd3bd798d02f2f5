"""Interleaved text -> image -> text: cache reuse versus re-encoding the generated image.

STARFlow2 appends every generated latent to both KV caches as it is sampled, so the text after an image continues
from the caches.  Composite systems (an LM plus a separate image generator) must instead re-encode each generated
image before the LM can continue.  The baseline here emulates that with the same model: after the image, the whole
sequence so far (prompt, image span, closing token) is run again from empty caches before text continues.

Prints a markdown table: positions processed per stream (x guidance branches) and wall time.

    python benchmarks/bench_interleaved.py [--model DIR] [--text_tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_starflow2 import GuidanceSpec
from diffusers_starflow2.pipelines import StarFlow2InterleavedPipeline
from diffusers_starflow2.utils.sequence import VISION_END, VISION_START, encode_conversation, special_id, user_message
from diffusers_starflow2.utils.tiny_pipeline import build_tiny_starflow2_components


def run(pipe, prompt: str, text_tokens: int, reencode: bool, seed: int = 0):
    """One text -> image -> text generation; returns (positions through the VLM stream, seconds)."""
    t, tok = pipe.transformer, pipe.tokenizer
    counted = {"n": 0}
    hook = pipe.vlm.get_decoder().register_forward_hook(
        lambda m, a, kw, o: counted.__setitem__("n", counted["n"] + kw["inputs_embeds"].shape[:2].numel()),
        with_kwargs=True)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            layout = encode_conversation(tok, [user_message(prompt)], t.num_latents, add_generation_prompt=True,
                                         open_image=True)
            cache = pipe._new_cache(2, pipe.scheduler.config.noise_level)
            uncond = encode_conversation(tok, [user_message("")], t.num_latents, True, True)
            pipe._run_text(cache, [layout, uncond])
            noise = torch.randn(1, t.num_latents, t.config.latent_channels, generator=gen)
            tokens, _ = pipe.generate_image(cache, noise, GuidanceSpec(2.0), num_denoising_steps=0)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="pipeline folder (default: a random tiny STARFlow2)")
    parser.add_argument("--text_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    pipe = (StarFlow2InterleavedPipeline.from_pretrained(args.model) if args.model
            else StarFlow2InterleavedPipeline(**build_tiny_starflow2_components()))
    pipe.set_progress_bar_config(disable=True)
    prompt = "draw a red circle on the left and then describe it"
    rows = []
    for name, reencode in (("STARFlow2 (cache reuse)", False), ("re-encode image (composite baseline)", True)):
        run(pipe, prompt, 2, reencode)  # warm-up
        results = [run(pipe, prompt, args.text_tokens, reencode, seed=s) for s in range(args.repeats)]
        positions = results[0][0]
        seconds = sorted(r[1] for r in results)[len(results) // 2]
        rows.append((name, positions, seconds))
    print(f"model: {args.model or 'random tiny STARFlow2'}, {pipe.transformer.num_latents} latents/image, "
          f"{args.text_tokens} text tokens after the image, CFG (2 branches), median of {args.repeats}")
    print("| method | positions through the VLM stream (x branches) | seconds |")
    print("|---|---|---|")
    for name, positions, seconds in rows:
        print(f"| {name} | {positions} | {seconds:.3f} |")


if __name__ == "__main__":
    main()

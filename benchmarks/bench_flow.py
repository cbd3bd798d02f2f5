"""Speed and memory of the flow core: ``StarFlowTransformerModel.sample`` (CFG batched) and forward + backward.

The model is a scaled-down STARFlow-3B shape: width 256, two shallow blocks of 2 layers and a 6-layer deep block,
head_dim 64, 16x16x4 latents (256 tokens), 32 text tokens of width 256, softplus scales, soft clip, final norm, SOS,
L2R.  Sampling uses a batch of 2 images with classifier-free guidance (both branches in one batch of 4 through the
deep block), one token per step through the pre-allocated KV cache (the prefix is never recomputed and nothing is
concatenated per step).

Reported: generated image tokens per second (batch x 256 / time of one ``sample`` call), flow steps per second
(tokens x non-identity blocks), and the peak resident memory of the process during the call (VmHWM reset before it).

    python benchmarks/bench_flow.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_kb, reset_peak, rss_kb  # noqa: E402

from diffusers_starflow2 import StarFlowTransformerModel  # noqa: E402
from diffusers_starflow2.sampling import sample_starflow  # noqa: E402


def scaled_3b_config() -> dict:
    return dict(in_channels=4, sample_size=16, patch_size=1, channels=256, layers_per_block=[2, 2, 6], head_dim=64,
                use_rope=True, use_sos=True, max_text_length=32, text_dim=256, cond_top_only=True, use_softplus=True,
                final_norm=True, soft_clip=4.0, seq_order="L2R")


def measure(fn, repeats: int):
    fn()  # warm-up
    times, peaks = [], []
    base = rss_kb()
    for _ in range(repeats):
        ok = reset_peak()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        peaks.append(peak_kb(ok))
    return statistics.median(times), max(peaks) / 1024, (max(peaks) - base) / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train_batch", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = StarFlowTransformerModel(**scaled_3b_config()).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial flows (the output projections start at zero)
            p.add_(torch.randn_like(p) * 0.02)
    cfg = model.config
    n_tokens = cfg.sample_size ** 2
    blocks = sum(1 for b in model.blocks if not b.is_identity)
    params = sum(p.numel() for p in model.parameters())

    B = 2
    noise = torch.randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    y, y_null = torch.randn(B, cfg.max_text_length, cfg.text_dim), torch.zeros(B, cfg.max_text_length, cfg.text_dim)
    rows = []
    for guidance in (2.0, 0.0):
        t, peak, extra = measure(lambda: sample_starflow(model, noise, y, y_null, guidance_scale=guidance), args.repeats)
        rows.append((f"sample, batch {B}, " + (f"CFG {guidance} (deep batch {2 * B})" if guidance else "no CFG"),
                     t, B * n_tokens / t, B * n_tokens * blocks / t, peak, extra))

    TB = args.train_batch
    x = torch.randn(TB, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    yt = torch.randn(TB, cfg.max_text_length, cfg.text_dim)
    model.train()

    def train_step():
        model.zero_grad(set_to_none=True)
        model(x, yt).loss.backward()

    t, peak, extra = measure(train_step, args.repeats)
    rows.append((f"forward + backward, batch {TB}", t, TB * n_tokens / t, TB * n_tokens * blocks / t, peak, extra))

    print(f"scaled-down 3B shape: {params / 1e6:.1f}M parameters, layers {list(cfg.layers_per_block)}, width "
          f"{cfg.channels}, {n_tokens} tokens/image, {cfg.max_text_length} text tokens; torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("| run | seconds | image tokens/s | flow steps/s | peak RSS MB | +RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, t, tok, steps, peak, extra in rows:
        print(f"| {name} | {t:.3f} | {tok:.0f} | {steps:.0f} | {peak:.0f} | {extra:.0f} |")


if __name__ == "__main__":
    main()

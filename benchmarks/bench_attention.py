"""The attention of one decode step: the flow blocks' own kernel against diffusers' dispatcher.

A decode step attends from a few new queries over the filled slots of a KV cache.  The flow blocks run it with
:func:`~diffusers_starflow2.models.attention.cached_attention` (two batched matrix products and a softmax, the query
heads sharing a key head stacked as rows); compiled steps call it as the operator
``torch.ops.diffusers_starflow2.cached_attention``, which on a CPU runs the package's C++ kernel
(``models/cached_attention_cpu.cpp``, loaded here as compiled CPU steps load it); the full-sequence passes go
through diffusers' ``dispatch_attention_fn`` (torch SDPA by default).  This times the three on the shapes of a
decode step (batch 2 with two guidance branches = 4 rows, head_dim 64) for one query and for a Jacobi window, over
a few cache lengths, in ``--dtype``, and prints the max abs difference of the operator and the dispatcher to the
Python body.

    python benchmarks/bench_attention.py [--threads 1] [--heads 8] [--kv-heads 8] [--dtype float32]
        [--repeats 2000] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from diffusers_starflow2.models.attention import attention_mask, cached_attention, decode_rows_mask
from diffusers_starflow2.utils.cpu_kernels import load_cpu_kernels


def timed(fn, repeats: int, device: torch.device) -> float:
    """Mean time of ``repeats`` calls after a warm-up, in microseconds."""
    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.heads % args.kv_heads:
        raise SystemExit("bench_attention.py: --heads must be a multiple of --kv-heads")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kernel = device.type == "cpu" and load_cpu_kernels()
    B, H, H_kv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    print(f"{args.dtype}, {H} heads over {H_kv} key heads, batch {B}; the operator on {args.device}: ", end="")
    print("the C++ kernel" if kernel else "the Python body")
    print("| queries | cache | Python body (us) | operator (us) | dispatcher (us) | operator diff | dispatcher diff |")
    print("|---|---|---|---|---|---|---|")
    for T in (1, 16):
        for S in (64, 256, 1024):
            times, diffs = compare(B, H, H_kv, D, T, S, args.repeats, device, getattr(torch, args.dtype))
            print(
                f"| {T} | {S} | "
                + " | ".join(f"{t:.1f}" for t in times)
                + " | "
                + " | ".join(f"{d:.1e}" for d in diffs)
                + " |"
            )


def compare(B: int, H: int, H_kv: int, D: int, T: int, S: int, repeats: int, device: torch.device, dtype):
    """Times (us) of the Python body, the operator and the dispatcher for ``T`` new queries over ``S`` cached
    slots, and the max abs differences of the last two to the first."""
    G = H // H_kv
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H_kv, S, D, generator=g).to(device, dtype) for _ in range(2))
    mask = attention_mask(torch.arange(S - T, S, device=device), S)  # (T, S): the new queries are the last T
    additive = decode_rows_mask(mask, dtype, H_kv, G)  # (G T, S)
    filled = torch.tensor(S)
    # the decode step's layout: (B H_kv, G T, D) scaled queries
    rows = ((q * D**-0.5).reshape(B * H_kv, G * T, D), k.flatten(0, 1), v.flatten(0, 1), None if T == 1 else additive)

    def own():
        return cached_attention(*rows)

    def operator():
        return torch.ops.diffusers_starflow2.cached_attention(*rows, filled)

    def dispatched():  # (B, T, H, D), the key heads repeated, as the full-sequence path calls it
        kr, vr = (t.repeat_interleave(G, dim=1) for t in (k, v)) if G > 1 else (k, v)
        mask_4d = None if T == 1 else mask[None, None]
        return dispatch_attention_fn(
            q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), attn_mask=mask_4d, scale=D**-0.5
        )

    expected = own().float()
    diffs = [(operator().float() - expected).abs().max().item()]
    diffs.append((dispatched().transpose(1, 2).float() - expected.view(B, H, T, D)).abs().max().item())
    return [timed(fn, repeats, device) for fn in (own, operator, dispatched)], diffs


if __name__ == "__main__":
    main()

"""Decoding speed of the flow core, side by side with the reference implementation (apple/ml-starflow).

The job (issue 12): a STARFlow (v1) stack of width 256 with blocks of [2, 2, 6] layers (two shallow, one deep),
head_dim 64, 16x16x4 latents (256 tokens), 16 text tokens of width 128, softplus scales, soft clip 4, final norm, SOS,
L2R; batch 2 with classifier-free guidance 3.0 (both branches in one batch of 4 through the deep block).  The model is
built with the reference constructor's keyword arguments, its weights are perturbed (the output projections start at
zero) and converted with ``convert_starflow_state_dict``, so both implementations run identical weights on identical
noise.

Variants, timed in one process in alternating order (one run of each per round, median over the rounds):

* ``reference sequential`` / ``reference Jacobi``: ``transformer_flow.Model.reverse`` of a checkout given by
  ``--reference-src`` (called, never copied; it needs ``einops``, ``tqdm`` and a one-process gloo group for the
  ``all_reduce`` of its Jacobi loop);
* ``ours exact``: :func:`~diffusers_starflow2.sampling.sample_starflow`, sequential decoding;
* ``ours Jacobi``: the same with ``jacobi_block_size`` / ``jacobi_tolerance``;
* ``ours compiled`` / ``ours compiled Jacobi``: exact / Jacobi decoding after
  ``model.compile_decode_step(--compile-mode)`` (the compile time of the first exact call is printed separately;
  the Jacobi windows' graphs are compiled in the warm-up).

Max abs differences are against the reference's sequential output when the reference runs, else against ours exact.

    python benchmarks/bench_flow.py [--reference-src DIR] [--rounds 3] [--threads 2] [--jacobi-block-size 32]
        [--jacobi-tolerance 1e-3] [--no-compile] [--compile-mode max-autotune] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from diffusers_starflow2 import StarFlowTransformerModel
from diffusers_starflow2.loaders.single_file_starflow import config_from_reference_kwargs, convert_starflow_state_dict
from diffusers_starflow2.sampling import sample_starflow

JOB = dict(
    in_channels=4,
    img_size=16,
    patch_size=1,
    channels=256,
    num_blocks=3,
    layers_per_block=[2, 2, 6],
    head_dim=64,
    rope=1,
    sos=1,
    txt_size=16,
    txt_dim=128,
    cond_top_only=1,
    use_softplus=1,
    use_final_norm=1,
    soft_clip=4.0,
    seq_order="L2R",
)
BATCH, GUIDANCE = 2, 3.0


def load_reference(src: str):
    """``transformer_flow.Model`` of the checkout ``src`` with the job's configuration (a gloo group of one process
    for the ``all_reduce`` of its Jacobi loop)."""
    sys.path.insert(0, os.path.abspath(src))
    import transformer_flow  # noqa: E402  (the reference's module, imported from the checkout)

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    return transformer_flow.Model(**JOB).eval()


def count_passes(model) -> list:
    """Count, per block, the calls of ``decode_step`` over more than one token (Jacobi passes); a list the caller
    resets."""
    counts = [0] * len(model.blocks)
    for b, block in enumerate(model.blocks):

        def counting(inputs, *args, _step=block.decode_step, _b=b, **kwargs):
            counts[_b] += inputs.shape[1] > 1
            return _step(inputs, *args, **kwargs)

        block.decode_step = counting
    return counts


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)  # GPU work is asynchronous
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-src", default=None, help="a checkout of apple/ml-starflow (optional)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jacobi-block-size", type=int, default=32)
    parser.add_argument("--jacobi-tolerance", type=float, default=1e-3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the compiled variant")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    model = StarFlowTransformerModel(**config_from_reference_kwargs(JOB)).eval()
    reference = load_reference(args.reference_src) if args.reference_src else None
    source = reference if reference is not None else model
    with torch.no_grad():
        for p in source.parameters():  # non-trivial flows (the output projections start at zero)
            p.add_(torch.randn_like(p) * 0.02)
    if reference is not None:  # identical weights: the reference's, converted
        model.load_state_dict(convert_starflow_state_dict(reference.state_dict()))
        reference.to(device)
    model.to(device)

    L, D, side = JOB["txt_size"], JOB["txt_dim"], JOB["img_size"]
    noise = torch.randn(BATCH, JOB["in_channels"], side, side, device=device)
    y, y_null = torch.randn(BATCH, L, D, device=device), torch.zeros(BATCH, L, D, device=device)
    jacobi = dict(jacobi_block_size=args.jacobi_block_size, jacobi_tolerance=args.jacobi_tolerance)

    variants = {}
    if reference is not None:
        y_ref = torch.cat([y, y_null])
        variants["reference sequential"] = lambda: reference.reverse(noise, y_ref, GUIDANCE)
        variants["reference Jacobi"] = lambda: reference.reverse(
            noise,
            y_ref,
            GUIDANCE,
            jacobi=True,
            jacobi_block_size=args.jacobi_block_size,
            jacobi_th=args.jacobi_tolerance,
        )
    variants["ours exact"] = lambda: sample_starflow(model, noise, y, y_null, GUIDANCE)
    variants["ours Jacobi"] = lambda: sample_starflow(model, noise, y, y_null, GUIDANCE, **jacobi)
    compiled = None
    if not args.no_compile:
        import copy

        compiled = copy.deepcopy(model)  # before count_passes wraps the model's decode steps
        compiled.compile_decode_step(args.compile_mode, dynamic=False)  # frozen weights, inductor's GEMM kernels
        with torch.no_grad():
            compile_s, _ = timed(lambda: sample_starflow(compiled, noise, y, y_null, GUIDANCE))
        variants["ours compiled"] = lambda: sample_starflow(compiled, noise, y, y_null, GUIDANCE)
        variants["ours compiled Jacobi"] = lambda: sample_starflow(compiled, noise, y, y_null, GUIDANCE, **jacobi)

    passes = count_passes(model)

    with torch.no_grad():
        outputs = {name: fn() for name, fn in variants.items()}  # warm-up, and the outputs compared below
        passes[:] = [0] * len(passes)
        outputs["ours Jacobi"] = variants["ours Jacobi"]()  # counted alone
        counted = list(passes)
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(timed(fn)[0])
    base_name = "reference sequential" if reference is not None else "ours exact"
    base_t = statistics.median(times[base_name])
    print(
        f"job: width 256, layers [2, 2, 6], head_dim 64, 16x16x4 latents, {L} text tokens x {D}, batch {BATCH}, "
        f"CFG {GUIDANCE}; torch {torch.__version__}, {args.device}, {args.threads} thread(s), median of "
        f"{args.rounds} alternating rounds; Jacobi block {args.jacobi_block_size}, tolerance {args.jacobi_tolerance}"
    )
    if compiled is not None:
        print(f"compile (first call of the compiled model, traced and compiled): {compile_s:.1f} s")
    n_tokens = side * side
    per_block = [c / -(-n_tokens // args.jacobi_block_size) for c in reversed(counted) if c]
    print(
        f"ours Jacobi: passes per block of {args.jacobi_block_size} tokens (mean over a run; deep block first, "
        f"then the shallow blocks): {', '.join(f'{p:.2f}' for p in per_block)}"
    )
    print(f"| variant | seconds | vs {base_name} | max abs diff to {base_name} |")
    print("|---|---|---|---|")
    for name in variants:
        t = statistics.median(times[name])
        diff = (outputs[name].float() - outputs[base_name].float()).abs().max().item()
        print(f"| {name} | {t:.3f} | {base_t / t:.2f}x | {diff:.2g} |")


if __name__ == "__main__":
    main()

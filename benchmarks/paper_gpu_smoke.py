"""STARFlow2 at the paper's size on one GPU: one 256-px text-to-image call with guidance and one stage-1 training
step with gradient checkpointing, random weights, each with its seconds and peak memory beside plan_memory.py's
prediction of the same row.

    python benchmarks/paper_gpu_smoke.py [--device cuda] [--preset paper] [--no-plan]
    python benchmarks/paper_gpu_smoke.py --dry-run     # the same code on the tiny preset on this CPU

The components are ``build_paper_starflow2_components`` built directly on the device in bf16 (the shipped
Qwen2.5-VL-7B configuration, the 3.7B Pretzel, the DINOv2-g FAE: no weights are public).  Sampling: the pipeline's
defaults (the scheduler's denoising steps, exact decoding), ``guidance_scale=2.0``, batch 1, ``output_type="pt"``.
Training: ``train_starflow2.py``'s stage-1 setup with ``--mixed_precision bf16 --gradient_checkpointing`` (the
Pretzel's trainable parameters fp32, AdamW), batch ``--train_batch_size``, the second of two steps timed.  Peak
memory on CUDA is ``torch.cuda.max_memory_allocated`` (what the caching allocator handed out; the CUDA context and
the allocator's reserve come on top); on the CPU (``--dry-run``) it is the peak resident memory over the resident
memory before the build.  The prediction comes from ``plan_memory.py --plan`` (fake tensors on this machine's CPU;
minutes at the paper's size; ``--no-plan`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_kb, reset_peak, rss_kb  # noqa: E402


def predicted(row: dict):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_memory.py")
    proc = subprocess.run([sys.executable, script, "--plan", json.dumps(row)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_gib"]


class Peak:
    """Peak memory of a block, in GiB: the CUDA allocator's, or the process's resident memory on the CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.ok = reset_peak()
        self.t0 = time.perf_counter()

    def stop(self, base_kb: int):
        if self.cuda:
            self.torch.cuda.synchronize()
        seconds = time.perf_counter() - self.t0
        if self.cuda:
            return seconds, self.torch.cuda.max_memory_allocated() / 2**30
        return seconds, (peak_kb(self.ok) - base_kb) / 2**20


def build(preset: str, device: str, dtype):
    if preset == "paper":
        from diffusers_starflow2.testing_utils import build_paper_starflow2_components

        return build_paper_starflow2_components(device, dtype)
    from plan_memory import build_components

    components = build_components(preset)
    for name in ("vlm", "transformer", "vae"):
        components[name].to(device, dtype)
    return components


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="paper", choices=("paper", "tiny", "embedded", "mid"))
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--no-plan", action="store_true", help="do not run plan_memory.py's prediction")
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset on the CPU (no GPU needed)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.preset = "cpu", "tiny"
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device (use --dry-run on a CPU)")
    if args.train_batch_size < 1:
        parser.error(f"--train_batch_size: {args.train_batch_size}; accepted: an integer >= 1")
    from plan_memory import sample_fn, training_setup, training_step_fn

    from diffusers_starflow2 import StarFlow2Pipeline  # noqa: F401  (import errors surface before the build)

    peak = Peak(args.device)
    rows = []

    # one text-to-image call with guidance, bf16 weights
    base = rss_kb()
    components = build(args.preset, args.device, torch.bfloat16)
    call, kv = sample_fn(components, 1, guidance=True)
    peak.start()
    call()
    seconds, gib = peak.stop(base)
    row = dict(preset=args.preset, mode="sample", dtype="bf16", batch_size=1, guidance=True)
    rows.append(("text-to-image, guidance 2.0, batch 1, bf16", seconds, gib, row))
    del components, call
    if peak.cuda:
        torch.cuda.empty_cache()

    # one stage-1 step, bf16 mixed precision, gradient checkpointing
    base = rss_kb()
    components = build(args.preset, args.device, torch.float32 if args.preset != "paper" else torch.bfloat16)
    train_args, weight_dtype = training_setup(components, 1, checkpointing=True, mixed=True)
    step, *_ = training_step_fn(components, train_args, weight_dtype, args.train_batch_size, device=args.device)
    step(0)  # allocates the AdamW state
    peak.start()
    step(1)
    seconds, gib = peak.stop(base)
    row = dict(
        preset=args.preset,
        mode="stage1",
        dtype="bf16-mixed",
        batch_size=args.train_batch_size,
        strategy="ddp",
        gradient_checkpointing=True,
    )
    rows.append((f"stage-1 step, batch {args.train_batch_size}, bf16 mixed, checkpointing", seconds, gib, row))

    print(f"| {args.preset} on {args.device} | seconds | peak GiB (measured) | peak GiB (plan_memory.py) |")
    print("|---|---|---|---|")
    for name, seconds, gib, row in rows:
        plan = None if args.no_plan else predicted(row)
        print(f"| {name} | {seconds:.2f} | {gib:.3f} | {'-' if plan is None else f'{plan:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()

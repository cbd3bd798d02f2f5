"""Training throughput of training/train_starflow2.py's step: samples per second and peak memory per stage, with and
without gradient checkpointing.

    python benchmarks/bench_training.py [--configs tiny,mid] [--stages 1,2,3] [--batch_size 4] [--repeats 3]
        [--checkpointing off,on] [--vlm_grad auto,always]

The configurations are those of ``bench_pipeline.py`` (random weights, built offline): ``tiny`` (16 latents, 32-px
images) and ``mid`` (256 latents, 128-px images, VLM 4 x 512, deep stream 8 x 512). Each (configuration, stage,
checkpointing) setting runs in its own subprocess, which sets the stage's trainable parameters exactly as the script
does (``configure_trainable``), builds batches with its ``BatchBuilder`` (FAE encoding, noising, chat layouts) and
times whole optimiser steps (batch building, forward, backward, AdamW) on synthetic examples: stage 1 captions,
stage 2 understanding questions, stage 3 a caption / understanding / edit mixture. ``samples/s`` is the batch size
over the median step time; ``peak RSS`` is the high-water mark of the process during the timed steps (reset before
each one, see ``memory.py``), ``+RSS`` that peak minus the RSS after the warm-up step.

``--vlm_grad always`` runs the VLM stream (visual adapter and VLM) of every step with autograd
(``vlm_requires_grad=True``), as every step did before ``PretzelModel.vlm_stream_needs_grad``; ``auto`` (the
package's behaviour) lets the model decide from the graph: stage 1 from initialisation runs the VLM stream without
autograd.  The ``VLM autograd`` column says what the timed steps did.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_kb, reset_peak, rss_kb  # noqa: E402


def worker(config: str, stage: int, checkpointing: bool, vlm_grad: str, batch_size: int, repeats: int) -> dict:
    import torch
    from bench_pipeline import build_pipeline
    from plan_memory import examples, training_setup

    from diffusers_starflow2.models.vlm_stream import VLMStream
    from diffusers_starflow2.training import train_starflow2 as train
    from diffusers_starflow2.training.batches import BatchBuilder

    pipe = build_pipeline(config)
    transformer, vlm = pipe.transformer, pipe.vlm
    components = {"transformer": transformer, "vlm": vlm, "vae": pipe.vae}
    args, _ = training_setup(components, stage, checkpointing, mixed=False, caption_dropout=0.1)
    trainer = train.PretzelTrainer(transformer, vlm, train_vlm=False)
    params = train.trainable_parameters(trainer)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    build = BatchBuilder(args, pipe.tokenizer, pipe.vae, pipe.scheduler, transformer.num_latents, torch.float32)
    image_size = transformer.config.sample_size * pipe.vae.config.out_patch_size

    forced = {"vlm_requires_grad": True} if vlm_grad == "always" else {}
    vlm_autograd = []

    def step(i):
        batch = build(examples(stage, batch_size, image_size, i), "cpu")
        keys = ("latent_mask", "image_loss_mask", "text_loss_mask", "images")
        decided = transformer.vlm_stream_needs_grad(VLMStream(vlm), *(batch.get(k) for k in keys))
        vlm_autograd.append(bool(forced) or decided)
        out = trainer(**batch, **forced)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up (allocates the optimizer state)
    base = rss_kb()
    times, peaks = [], []
    for i in range(1, repeats + 1):
        ok = reset_peak()
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
        peaks.append(peak_kb(ok))
    seconds = statistics.median(times)
    return {
        "config": config,
        "stage": stage,
        "checkpointing": checkpointing,
        "vlm_grad": vlm_grad,
        "vlm_autograd": "yes" if all(vlm_autograd[1:]) else "no" if not any(vlm_autograd[1:]) else "mixed",
        "batch_size": batch_size,
        "trainable": sum(p.numel() for p in params),
        "seconds": seconds,
        "samples_per_s": batch_size / seconds,
        "peak_mb": max(peaks) / 1024,
        "extra_mb": (max(peaks) - base) / 1024,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpointing", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--vlm_grad", default="auto", help="comma-separated: auto, always (see above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        config, stage, checkpointing, vlm_grad = args.worker.split(":")
        print(json.dumps(worker(config, int(stage), checkpointing == "on", vlm_grad, args.batch_size, args.repeats)))
        return
    rows = []
    settings = [
        (config, int(stage), checkpointing, vlm_grad)
        for config in args.configs.split(",")
        for stage in args.stages.split(",")
        for checkpointing in args.checkpointing.split(",")
        for vlm_grad in args.vlm_grad.split(",")
    ]
    for _, _, checkpointing, vlm_grad in settings:
        if checkpointing not in ("off", "on") or vlm_grad not in ("auto", "always"):
            parser.error(
                f"--checkpointing takes off/on and --vlm_grad auto/always; got {checkpointing!r}, {vlm_grad!r}"
            )
    for config, stage, checkpointing, vlm_grad in settings:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{config}:{stage}:{checkpointing}:{vlm_grad}"]
        cmd += ["--batch_size", str(args.batch_size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{config} stage {stage} checkpointing={checkpointing} vlm_grad={vlm_grad}: "
            f"{r['samples_per_s']:.2f} samples/s, peak {r['peak_mb']:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    print(
        "| config | stage | trainable params | gradient checkpointing | VLM autograd | batch | s/step | samples/s "
        "| peak RSS MB | +RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['stage']} | {r['trainable'] / 1e6:.2f}M | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['vlm_autograd']} ({r['vlm_grad']}) | {r['batch_size']} | {r['seconds']:.3f} "
            f"| {r['samples_per_s']:.2f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()

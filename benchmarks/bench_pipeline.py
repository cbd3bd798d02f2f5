"""The STARFlow2 pipelines (text -> image, edit, interleaved): seconds per image, images per second, peak memory
and the weight-read floor, with and without guidance and denoising, per weight dtype and batch size.

    python benchmarks/bench_pipeline.py [--quick] [--configs tiny,mid] [--threads 1] [--repeats 3]
        [--jacobi-block-size K] [--compile] [--compile-cache DIR] [--pipeline text2image,edit,interleaved]
        [--weights float32,bfloat16,int8] [--batch 1,4,16] [--cfg both|on|off] [--steps 0,1] [--device cpu]

Configurations (random weights, built offline):

* ``tiny``: ``build_tiny_starflow2_components`` (4x4x4 latents, 32-px images, 2x64 VLM, 2x32 deep stream).
* ``embedded``: the model shipped in the package (``diffusers_starflow2.cli.DEFAULT_MODEL``, trained; 16 latents).
* ``mid``: 16x16x16 latents (256 positions per image) -> 128-px images (the Pretzel's zero-initialised parameters
  perturbed, so that the VLM stream reaches the latents); VLM: tiny Qwen2.5-VL with 4 layers x 512
  (8 heads, 4 KV heads); Pretzel: deep stream 8 layers x 512, two shallow flows of 2 layers x 256; FAE: DINOv2
  2x64 on 128 px with patch 8 (16x16 grid), 2-layer x 128 feature and pixel decoders, 8-px output patches.

``--pipeline edit`` times ``StarFlow2EditPipeline`` (built with ``from_pipe``) editing a fixed random image with
the instruction below: with guidance on it runs three branches (text ``w``, image guidance 1.5), off one;
``interleaved`` times ``StarFlow2InterleavedPipeline`` drawing the image a one-turn conversation asks for, then one
text token.  ``--batch`` sends that many prompts per call (per-image figures divide by it).  ``--weights``:
``bfloat16`` casts the VLM and the Pretzel, ``int8`` quantises their linears weight-only with torchao, as
``from_pretrained(..., **diffusers_starflow2.utils.quantization.weights_kwargs(w))`` does for a saved pipeline; for
text-to-image the worker also prints the max abs difference of the first timed call's latents to the same call with
the float32 weights (kept from before quantising, eager).  The sampling calls pass only the options they use, so the
script also runs against an older checkout of the package (``PYTHONPATH=<checkout>/src``) for before/after figures.

Each (configuration, guidance) pair runs in its own subprocess, which builds the pipeline, warms up, then times
``num_inference_steps`` 0 and 1 (the difference is the cost of one Tweedie denoising step: a teacher-forced pass of
the image through the Pretzel plus its backward).  Times are medians over the repeats with intra-op threads fixed by
``--threads``; besides wall time the CPU time of the subprocess is reported, which is far less sensitive to other
jobs on a shared machine (with one thread, CPU time ~ wall time on an idle machine), so the denoising cost and
``positions/s`` (latent positions sampled per CPU second, ``N / CPU s``; guidance runs two branches per position)
use it.

``--compile`` takes the fast path, ``pipe.transformer.compile_decode_step(vlm=pipe.vlm)`` (inductor, ``max-autotune``:
the shallow flows' decode steps and the whole one-position Pretzel step of an image span - adapter, VLM layers on
static buffers, TARFlow stream, affine parameters - as one graph) before the warm-up call, whose time is reported as
the compile time (inductor's FX graph cache, ``TORCHINDUCTOR_CACHE_DIR``, keeps what one worker compiled for the
next); every timed call is then made again with an eager copy of the transformer, right after, so that the two are
compared under the same load (peak memory is the compiled call's; the max abs pixel difference of the two is
printed).  ``--compile-cache DIR`` (an empty or new folder) makes ``DIR/inductor`` the workers' inductor cache and
loads / saves torch's cache artifacts in ``DIR`` (:mod:`diffusers_starflow2.utils.compile_utils`); the first row then
runs twice more, each in a new process: on the same inductor cache (a second process on the same machine) and on the
artifacts alone, with an empty inductor cache (another machine), so the table shows a cold and two warm compiles
with the FX graph cache's hits and misses.

Memory is the resident set size (RSS) of the subprocess, which covers torch's CPU allocations (``tracemalloc`` would
only see Python objects).  Before every timed call the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``,
Linux >= 4.0), so ``peak RSS`` is the high-water mark of the call alone; where the reset is unavailable it is
``getrusage`` ``ru_maxrss`` (peak since the subprocess started).  ``+RSS`` is that peak minus the RSS right after the
pipeline was built (before any call): the memory generation needs on top of weights and runtime, including what the
allocator keeps from earlier calls.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_kb, reset_peak, rss_kb  # noqa: E402

PROMPT = "a red circle on the left of a blue square"
EDIT_PROMPT = "make the circle blue"
INTERLEAVED_PROMPT = "draw a red circle on the left"
WEIGHTS = ("float32", "bfloat16", "int8")  # diffusers_starflow2.utils.quantization.WEIGHTS


# --------------------------------------------------------------------------------------------------------------
# Worker (one configuration and guidance setting per process)
# --------------------------------------------------------------------------------------------------------------


def build_pipeline(config: str):
    import torch

    from diffusers_starflow2 import AutoencoderFAE, PretzelModel, StarFlow2Pipeline, TarFlowScheduler
    from diffusers_starflow2.testing_utils import (
        build_tiny_qwen2_5_vl,
        build_tiny_starflow2_components,
        build_tiny_tokenizer,
    )
    from diffusers_starflow2.utils.sequence import VISION_START

    if config == "tiny":
        pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))
    elif config == "mid":
        tokenizer = build_tiny_tokenizer()
        vlm = build_tiny_qwen2_5_vl(tokenizer, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4)
        torch.manual_seed(0)
        transformer = PretzelModel(
            latent_channels=16,
            sample_size=16,
            vlm_hidden_size=512,
            num_shallow_blocks=2,
            shallow_layers=2,
            shallow_channels=256,
            deep_layers=8,
            deep_channels=512,
            head_dim=64,
            noise_embed_dim=128,
            vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        )
        dinov2 = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=4,
            image_size=128,
            patch_size=8,
            num_channels=3,
        )
        vae = AutoencoderFAE(
            dinov2_config=dinov2,
            image_size=128,
            sample_size=128,
            latent_channels=16,
            encoder_num_heads=4,
            decoder_dim=128,
            decoder_layers=2,
            decoder_num_heads=4,
            pixel_decoder_dim=128,
            pixel_decoder_layers=2,
            pixel_decoder_num_heads=4,
            out_patch_size=8,
        )
        with torch.no_grad():  # the zero-initialised skips, adapter and output projections: every path counts
            for p in transformer.parameters():
                if not p.any():
                    p.add_(torch.randn_like(p) * 0.02)
        pipe = StarFlow2Pipeline(
            vlm=vlm.eval(),
            tokenizer=tokenizer,
            transformer=transformer.eval(),
            vae=vae.eval(),
            scheduler=TarFlowScheduler(),
        )
    elif config == "embedded":
        from diffusers_starflow2.cli import DEFAULT_MODEL

        pipe = StarFlow2Pipeline.from_pretrained(DEFAULT_MODEL)
    else:
        raise ValueError(f"unknown configuration {config!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    pipe = build_pipeline(args.config)
    if args.device != "cpu":
        pipe.to(args.device)
    gc.collect()
    built = rss_kb()  # weights + runtime, before any call
    params = sum(p.numel() for name in ("vlm", "transformer", "vae") for p in getattr(pipe, name).parameters())

    options = dict(jacobi_block_size=args.jacobi_block_size) if args.jacobi_block_size else {}
    float32_models = None  # the VLM and transformer before quantising: the latents' reference
    if args.weights != "float32":
        from diffusers_starflow2.utils.quantization import quantize_components

        if args.pipeline == "text2image":
            float32_models = copy.deepcopy(pipe.vlm), copy.deepcopy(pipe.transformer)
        quantize_components(pipe, args.weights)
    B = args.batch
    if args.pipeline == "edit":
        import numpy as np

        from diffusers_starflow2 import StarFlow2EditPipeline

        pipe = StarFlow2EditPipeline.from_pipe(pipe)
        image = np.random.default_rng(0).random((pipe.image_size, pipe.image_size, 3)).astype(np.float32)
        inputs = dict(
            image=[image] * B if B > 1 else image,
            prompt=[EDIT_PROMPT] * B if B > 1 else EDIT_PROMPT,
            image_guidance_scale=1.5 if args.guidance > 0 else 1.0,
        )
    elif args.pipeline == "interleaved":
        from diffusers_starflow2 import StarFlow2InterleavedPipeline
        from diffusers_starflow2.pipelines import IMAGE_PLACEHOLDER

        pipe = StarFlow2InterleavedPipeline.from_pipe(pipe)
        # one image the answer must draw right away, and the one text token after it
        conversation = [INTERLEAVED_PROMPT, IMAGE_PLACEHOLDER]
        inputs = dict(prompt=[conversation] * B if B > 1 else conversation, max_new_tokens=1, max_images=1)
    else:
        inputs = dict(prompt=[PROMPT] * B if B > 1 else PROMPT)

    def call(seed: int, steps: int, output_type: str = "np"):
        generator = [torch.Generator().manual_seed(seed + i) for i in range(B)]
        return pipe(
            **inputs,
            guidance_scale=args.guidance,
            num_inference_steps=steps,
            output_type=output_type,
            generator=generator if B > 1 else generator[0],
            **options,
        )

    compile_seconds, eager, graph_cache = None, None, None
    if args.compile:
        from torch._dynamo.utils import counters

        from diffusers_starflow2.utils.compile_utils import load_compile_cache, save_compile_cache

        eager = copy.deepcopy(pipe.transformer)  # timed in turn with the compiled one
        start = time.perf_counter()
        loaded = load_compile_cache(args.compile_cache) if args.compile_cache else None
        prepack = {"options": {"cpp.weight_prepack": True}} if args.weight_prepack else {}
        pipe.transformer.compile_decode_step(vlm=pipe.vlm, **prepack)  # the documented fast path
        call(0, 1)
        compile_seconds = time.perf_counter() - start
        if args.compile_cache:
            save_compile_cache(args.compile_cache)
        # inductor's FX graph cache: graphs found (hit), compiled (miss) or not cacheable (bypass)
        graph_cache = {k: counters["inductor"][f"fxgraph_cache_{k}"] for k in ("hit", "miss", "bypass")}
        graph_cache["loaded"] = loaded
    elif args.warmup:
        call(0, 1)
    results = {}
    for steps in args.steps:
        wall, cpu, peaks, eager_cpu, diffs, probes = [], [], [], [], [], []
        for seed in range(args.repeats):
            gc.collect()
            reset_ok = reset_peak()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = call(seed, steps)
            synchronize(args.device)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            peaks.append(peak_kb(reset_ok))
            probes.append(read_bandwidth(args.threads, args.device))  # the machine's rate at the moment of the call
            if eager is not None:  # the same call with the eager transformer, right after
                compiled, pipe.transformer = pipe.transformer, eager
                start_cpu = time.process_time()
                expected = call(seed, steps)
                eager_cpu.append(time.process_time() - start_cpu)
                pipe.transformer = compiled
                diffs.append(max_image_diff(out, expected))
        results[steps] = dict(
            seconds=statistics.median(wall),
            cpu_seconds=statistics.median(cpu),
            peak_mb=max(peaks) / 1024,
            delta_mb=(max(peaks) - built) / 1024,
            per_call_peak=reset_ok,
            eager_cpu_seconds=statistics.median(eager_cpu) if eager_cpu else None,
            bandwidth=statistics.median(probes),
            max_diff=max(diffs) if diffs else None,
        )
    latent_diff = None
    if float32_models is not None:  # quality measured, not assumed: the same call's latents with float32 weights
        latents = call(0, args.steps[0], "latent").images.float()
        quantised, (pipe.vlm, pipe.transformer) = (pipe.vlm, pipe.transformer), float32_models
        latent_diff = (latents - call(0, args.steps[0], "latent").images.float()).abs().max().item()
        pipe.vlm, pipe.transformer = quantised
    print(
        json.dumps(
            dict(
                config=args.config,
                latent_diff=latent_diff,
                guidance=args.guidance,
                params=params,
                positions=pipe.transformer.num_latents,
                image_size=pipe.image_size,
                pipeline=args.pipeline,
                batch=B,
                weights=args.weights,
                compile_seconds=compile_seconds,
                graph_cache=graph_cache,
                weight_bytes=weight_bytes(pipe),
                results=results,
            )
        )
    )


def max_image_diff(out, expected) -> float:
    """Max abs difference of two calls' images (pixels in [0, 1]; a batch, or the images of each conversation)."""
    import numpy as np

    def images(o):
        o = o if isinstance(o, list) else [o]
        return np.concatenate([np.asarray(x.images, dtype=np.float32).reshape(-1) for x in o])

    return float(np.abs(images(out) - images(expected)).max())


def weight_bytes(pipe) -> dict:
    """Bytes of weights an image reads: at every latent position the VLM's decoder layers and the Pretzel's deep
    stream with the projections around it, and the shallow flows' layers once per latent and flow."""
    transformer = pipe.transformer

    try:
        from diffusers_starflow2.utils.quantization import stored_nbytes
    except ImportError:  # an older checkout: plain tensors only

        def stored_nbytes(p):
            return p.numel() * p.element_size()

    def size(*modules) -> int:
        return sum(stored_nbytes(p) for m in modules for p in m.parameters())

    deep = transformer.deep
    per_position = size(
        pipe.vlm.get_decoder().layers, deep.layers, deep.proj_in, deep.proj_txt, deep.proj_out, transformer.adapter
    ) + size(transformer.skip_v)
    per_image = transformer.num_latents * (per_position + size(*(block.layers for block in transformer.shallow)))
    return dict(per_position=per_position, per_image=per_image)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):  # GPU work is asynchronous
        torch.cuda.synchronize()


def read_bandwidth(threads: int = 1, device: str = "cpu") -> float:
    """GB/s ``threads`` CPU threads (or the GPU) read: ``torch.sum`` over 256 MB (1 GB on a GPU), best of 5."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones((256 if device.startswith("cuda") else 64) * 1024 * 1024, device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best / 1e9


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace, config: str, guidance: float, inductor_cache=None, **overrides) -> dict:
    """One worker subprocess; ``overrides`` replace ``args`` fields (``pipeline``, ``batch``, ``weights``,
    ``repeats``, ``steps``).  With ``--compile-cache DIR`` the worker's inductor cache is ``inductor_cache``
    (default ``DIR/inductor``, kept from worker to worker as on one machine)."""
    opts = dict(pipeline=args.pipeline, batch=1, weights="float32", repeats=args.repeats, steps=args.steps, warmup=True)
    opts.update(overrides)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--config",
        config,
        "--guidance",
        str(guidance),
        "--repeats",
        str(opts["repeats"]),
        "--threads",
        str(args.threads),
        "--pipeline",
        opts["pipeline"],
        "--batch",
        str(opts["batch"]),
        "--weights",
        opts["weights"],
        "--steps",
        ",".join(map(str, opts["steps"])),
        "--device",
        args.device,
    ]
    cmd += ["--warmup"] if opts["warmup"] else []
    cmd += ["--jacobi-block-size", str(args.jacobi_block_size)] if args.jacobi_block_size else []
    cmd += ["--compile"] if args.compile else []
    cmd += ["--weight-prepack"] if args.weight_prepack else []
    env = dict(os.environ)
    if args.compile_cache:
        cmd += ["--compile-cache", args.compile_cache]
        env["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache or os.path.join(args.compile_cache, "inductor")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pipeline_line(name: str) -> str:
    if name == "edit":
        return f"StarFlow2EditPipeline: a random image, instruction {EDIT_PROMPT!r} (image guidance 1.5 with CFG)"
    if name == "interleaved":
        return f"StarFlow2InterleavedPipeline: [{INTERLEAVED_PROMPT!r}, <image>], one text token after the image"
    return f"StarFlow2Pipeline: prompt {PROMPT!r}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid, embedded")
    parser.add_argument("--guidance", type=float, default=2.0, help="guidance scale of the CFG-on rows")
    parser.add_argument("--cfg", choices=("both", "on", "off"), default="both", help="rows with CFG on, off or both")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per setting (default tiny 5, mid 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="one timed call per setting, no warm-up for mid")
    parser.add_argument(
        "--jacobi-block-size",
        type=int,
        default=None,
        help="Jacobi decoding with this window (default tolerance 1e-3); default exact decoding",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the fast path first: pipe.transformer.compile_decode_step(vlm=pipe.vlm)",
    )
    parser.add_argument(
        "--weight-prepack",
        action="store_true",
        help="with --compile on a CPU: options={'cpp.weight_prepack': True} (oneDNN-packed weights and inductor's "
        "C++ GEMM template; not kept by the FX graph cache)",
    )
    parser.add_argument(
        "--compile-cache",
        default=None,
        help="an empty or new folder for the compiled graphs (with --compile): the workers' inductor cache "
        "(DIR/inductor) and torch's cache artifacts (loaded before compiling, saved after); the first row then runs "
        "twice more, warm: on the same inductor cache, and on the artifacts alone (an empty inductor cache)",
    )
    parser.add_argument(
        "--pipeline", default="text2image", help="comma-separated: text2image, edit, interleaved (one row set each)"
    )
    parser.add_argument("--batch", default="1", help="comma-separated images per call (e.g. 1,4,16)")
    parser.add_argument("--weights", default="float32", help=f"comma-separated weight dtypes of {WEIGHTS}")
    parser.add_argument("--steps", default="0,1", help="comma-separated denoising steps timed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the floor then reads the GPU's bandwidth)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = [int(x) for x in str(args.steps).split(",")]
    if args.worker:
        args.batch = int(args.batch)
        return worker(args)
    pipelines, weights = args.pipeline.split(","), args.weights.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    for name in pipelines:
        if name not in ("text2image", "edit", "interleaved"):
            print(f"bench_pipeline.py: unknown pipeline {name!r} (text2image, edit, interleaved)", file=sys.stderr)
            sys.exit(2)
    for dtype in weights:
        if dtype not in WEIGHTS:
            print(f"bench_pipeline.py: unknown weights {dtype!r} ({', '.join(WEIGHTS)})", file=sys.stderr)
            sys.exit(2)
    cache = args.compile_cache
    if cache and os.path.exists(cache) and (not os.path.isdir(cache) or os.listdir(cache)):
        print(
            f"bench_pipeline.py: --compile-cache {cache!r} is not an empty folder (a cold start needs an empty or "
            "new folder)",
            file=sys.stderr,
        )
        sys.exit(2)

    start = time.perf_counter()
    rows = []
    guidances = {"both": (args.guidance, 0.0), "on": (args.guidance,), "off": (0.0,)}[args.cfg]
    for config in args.configs.split(","):
        repeats = args.repeats or (1 if args.quick else 2 if config == "mid" else 5)
        warmup = not (args.quick and config == "mid")
        for name in pipelines:
            for dtype in weights:
                for batch in batches:
                    for guidance in guidances:
                        print(
                            f"running {config} {name} {dtype} batch {batch}, guidance {guidance} ...", file=sys.stderr
                        )
                        row = run_worker(
                            args,
                            config,
                            guidance,
                            pipeline=name,
                            batch=batch,
                            weights=dtype,
                            repeats=repeats,
                            warmup=warmup,
                        )
                        rows.append(row)
    warm = {}
    if args.compile and args.compile_cache:  # the first row again in new processes: same machine, another machine
        first = rows[0]
        empty = os.path.join(args.compile_cache, "inductor-empty")  # a new folder: as on another machine
        for where, inductor_cache in (("the same inductor cache", None), ("the artifacts alone", empty)):
            print(f"running the first row again on {where} ...", file=sys.stderr)
            warm[where] = run_worker(
                args,
                first["config"],
                first["guidance"],
                inductor_cache=inductor_cache,
                pipeline=first["pipeline"],
                batch=first["batch"],
                weights=first["weights"],
                repeats=1,
                steps=[0],
            )

    per_call = all(res["per_call_peak"] for r in rows for res in r["results"].values())
    print()
    for name in pipelines:
        print(pipeline_line(name))
    print(
        f"{args.device}, {args.threads} thread(s), random weights; "
        f"peak RSS {'per call (VmHWM reset)' if per_call else 'since process start (ru_maxrss)'}; "
        f"{f'Jacobi decoding, window {args.jacobi_block_size}' if args.jacobi_block_size else 'exact decoding'}"
        f"{', compiled (pipe.transformer.compile_decode_step(vlm=pipe.vlm))' if args.compile else ''}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
        f"total benchmark time {time.perf_counter() - start:.0f} s\n"
    )
    print(
        "| config | pipeline | weights | batch | params | image | CFG | denoise steps | s/image (wall) | CPU s/image | "
        "images/s (wall) | peak RSS MB | +RSS MB | positions/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for steps, res in r["results"].items():
            cfg = f"on (w={r['guidance']:g})" if r["guidance"] > 0 else "off"
            B = r["batch"]
            print(
                f"| {r['config']} | {r['pipeline']} | {r['weights']} | {B} | {r['params'] / 1e6:.1f}M | "
                f"{r['image_size']}px, {r['positions']} latents | {cfg} | {steps} | {res['seconds'] / B:.3f} | "
                f"{res['cpu_seconds'] / B:.3f} | {B / res['seconds']:.3f} | {res['peak_mb']:.0f} | "
                f"{res['delta_mb']:.0f} | {B * r['positions'] / res['cpu_seconds']:.0f} |"
            )
    if args.compile:
        print("\n| config | pipeline | weights | batch | CFG | compile + first call (s) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            cfg = "on" if r["guidance"] > 0 else "off"
            print(
                f"| {r['config']} | {r['pipeline']} | {r['weights']} | {r['batch']} | {cfg} | "
                f"{r['compile_seconds']:.1f} |"
            )
        if warm:
            print(f"\nCompile + first call of the first row, one new process each (--compile-cache {cache}):\n")
            print(
                "| start | compile + first call (s) | artifacts loaded | FX graphs found | compiled | not cacheable |"
            )
            print("|---|---|---|---|---|---|")
            starts = {"cold (empty folder)": rows[0], **{f"warm: {k}": v for k, v in warm.items()}}
            for name, row in starts.items():
                c = row["graph_cache"]
                print(
                    f"| {name} | {row['compile_seconds']:.1f} | {'yes' if c['loaded'] else 'no'} | {c['hit']} | "
                    f"{c['miss']} | {c['bypass']} |"
                )
        print("\nEager and compiled, each call made with both in turn (median CPU s/image):\n")
        print(
            "| config | pipeline | weights | batch | CFG | denoise steps | eager | compiled | eager / compiled | "
            "max abs pixel diff |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            for steps, res in r["results"].items():
                e, c = res["eager_cpu_seconds"] / r["batch"], res["cpu_seconds"] / r["batch"]
                cfg = "on" if r["guidance"] > 0 else "off"
                print(
                    f"| {r['config']} | {r['pipeline']} | {r['weights']} | {r['batch']} | {cfg} | {steps} | "
                    f"{e:.3f} | {c:.3f} | {e / c:.2f}x | {res['max_diff']:.1e} |"
                )
    bandwidth = read_bandwidth(args.threads, args.device)
    print(
        f"\nWeight reads (as stored: float32, bfloat16 or int8 plus scales) against the read bandwidth of "
        f"{args.threads} thread(s) ({args.device}), {bandwidth:.1f} GB/s (torch.sum over 256 MB or 1 GB): the floor "
        "of an image bound by reading weights (a batch shares each read); on a shared machine whose rate moves, the "
        "last columns put each image beside the floor at the rate probed right after each of its timed calls\n"
    )
    print(
        "| config | pipeline | weights | batch | CFG | weights read per position (MB) | per image (GB) | "
        "floor (s/image) | s/image (wall) / floor | CPU s/image / floor | probe at the calls (GB/s) | "
        "CPU s/image / floor at the calls |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w, B = r["weight_bytes"], r["batch"]
        floor = w["per_image"] / 1e9 / bandwidth / B
        first = r["results"][min(r["results"], key=int)]
        print(
            f"| {r['config']} | {r['pipeline']} | {r['weights']} | {B} | {'on' if r['guidance'] > 0 else 'off'} | "
            f"{w['per_position'] / 1e6:.1f} | {w['per_image'] / 1e9 / B:.2f} | {floor:.2f} | "
            f"{first['seconds'] / B / floor:.2f}x | {first['cpu_seconds'] / B / floor:.2f}x | "
            f"{first['bandwidth']:.1f} | {first['cpu_seconds'] / B / (floor * bandwidth / first['bandwidth']):.2f}x |"
        )
    quality = [r for r in rows if r.get("latent_diff") is not None]
    if quality:
        print(
            f"\nQuality of the weight dtypes: the latents of the first timed call (seed 0, {args.steps[0]} denoising "
            "steps) against the same call with the float32 weights (eager)\n"
        )
        print("| config | pipeline | weights | batch | CFG | max abs latent diff to float32 |")
        print("|---|---|---|---|---|---|")
        for r in quality:
            print(
                f"| {r['config']} | {r['pipeline']} | {r['weights']} | {r['batch']} | "
                f"{'on' if r['guidance'] > 0 else 'off'} | {r['latent_diff']:.3g} |"
            )
    if len(args.steps) > 1 and 0 in args.steps and 1 in args.steps:
        print("\n| config | pipeline | CFG | one denoising step (CPU s) | share of a 1-step image |")
        print("|---|---|---|---|---|")
        for r in rows:
            t0, t1 = r["results"]["0"]["cpu_seconds"], r["results"]["1"]["cpu_seconds"]
            cfg = "on" if r["guidance"] > 0 else "off"
            print(f"| {r['config']} | {r['pipeline']} | {cfg} | {t1 - t0:.3f} | {(t1 - t0) / t1:.0%} |")


if __name__ == "__main__":
    main()

"""Memory plan per GPU of STARFlow2 sampling and training: weights, gradients, AdamW state, KV cache per image,
activation peak and total, from the real step run on fake tensors with torch's memory trackers.

    python benchmarks/plan_memory.py [--presets tiny,embedded,paper] [--modes sample,stage1,stage2,stage3]
        [--strategies ddp,fsdp] [--num_gpus 1,8] [--train_batch_size 4] [--json] [--validate PRESET]

Presets: ``tiny`` (``build_tiny_starflow2_components``), ``embedded`` (the trained model shipped in the package),
``mid`` (``bench_pipeline.py``'s 256-latent configuration) and ``paper`` (``build_paper_starflow2_components``: the
shipped Qwen2.5-VL-7B configuration, the 3.7B Pretzel of ``pretzel_paper_config``, the DINOv2-g FAE).

Rows.  ``sample``: one ``StarFlow2Pipeline`` text-to-image call (the scheduler's default denoising steps, exact
decoding, ``output_type="pt"``: the FAE decode included) in fp32 and bf16 (all weights cast), batch 1 and 4,
guidance off (``guidance_scale=0``) and on (2.0, two branches), one GPU.  ``stage1/2/3``: two optimiser steps of
``training/train_starflow2.py`` (its ``configure_trainable`` and ``PretzelTrainer``, the ``BatchBuilder`` of
``training.batches``: FAE encoding and noising inside the step; AdamW; ``--mixed_precision bf16``: the frozen VLM and FAE in bf16, the Pretzel's
parameters, gradients and AdamW state in fp32, the forward under bf16 autocast), with gradient checkpointing off and
on (the VLM's too where gradient runs through it), per GPU ``--train_batch_size`` examples:

* ``ddp``: the step of one process; accelerate wraps the model in ``DistributedDataParallel`` only over several
  processes, whose reducer then keeps its gradient buckets (``gradient_as_bucket_view=False``, accelerate's default:
  one more copy of the trainable gradients).  The reducer allocates them in C++ outside the dispatcher, where no
  fake tensor or tracker sees them, so that one term is added by size (``ddp_buckets_gib``).
* ``fsdp``: torch FSDP2 ``fully_shard`` as ``training/accelerate_configs/fsdp.yaml`` does it (each
  ``FlowTransformerLayer``, then the whole Pretzel; bf16 parameters in compute, ``reshard_after_forward``), over a
  fake process group of ``num_gpus`` ranks; the frozen VLM and FAE replicated.

How.  Every component is built on ``meta`` and materialised as fake tensors (``FakeTensorMode``: shapes, dtypes and
devices, no storage), and the real call runs under ``torch.distributed._tools.mem_tracker.MemTracker``
(``fsdp2_mem_tracker.FSDPMemTracker`` for the FSDP rows, as torchtitan's estimator does), which attributes every
live tensor to parameters, buffers, gradients, optimiser state or activations and keeps the peak of their sum.  The
columns are that peak's breakdown: ``weights`` = parameters + buffers, ``activations`` = everything else live at the
peak (activations, temporaries, inputs, collectives' buffers), ``peak`` = the tracked total per GPU (plus
``ddp_buckets``).  Allocator caching and fragmentation, CUDA context (~0.5-1 GiB) and library workspaces are not
included: leave 10-20 % headroom.  ``KV cache / image`` is what one generated image adds to both streams' caches
(all guidance branches).  Where the model decides from weight values whether the VLM stream needs autograd (stage
1), the decision is made on the preset's real weights before they become fake (the paper preset: its
initialisation, ``skip_v`` and the adapter's output projection zero), as training would make it.

Fake tensors make the CPU execute nothing: the fake step runs on CPU tensors (bf16 autocast is CPU autocast, whose
op lists match CUDA's for matmuls, attention and convolutions), and the same numbers hold for a GPU's caching
allocator up to the caveats above.  ``--validate PRESET`` runs one training row and one sampling row of PRESET for
real on this CPU (fp32, one process) and compares the prediction with the measured peak resident memory of the
process during the second call or step minus its resident memory before the components were built, the libraries
imported (``memory.py``), with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that every freed tensor goes back to the
operating system and the resident memory follows the live tensors, as a GPU allocator's allocated-bytes counter does
(with the default ``malloc`` the freed memory it keeps adds about a quarter on the ``mid`` preset), printing both; it exits 1 when
they differ by more than 15 %.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_kb, reset_peak, rss_kb  # noqa: E402

GIB = 2**30
PROMPT = "a red circle on the left of a blue square"
PRESETS = ("tiny", "embedded", "mid", "paper")
MODES = ("sample", "stage1", "stage2", "stage3")


@dataclass
class Row:
    """One setting of the plan (what a worker process runs)."""

    preset: str
    mode: str
    dtype: str  # "fp32" / "bf16" (weights of a sampling call) or "bf16-mixed" (training)
    batch_size: int
    num_gpus: int = 1
    strategy: str = "single"  # sampling: one GPU; training: "ddp" / "fsdp"
    gradient_checkpointing: bool = False
    guidance: bool = False


def plan_rows(
    presets, modes, strategies, num_gpus, train_batch_size, checkpointing=(False, True), sample_dtypes=("fp32", "bf16")
) -> list:
    rows = []
    for preset in presets:
        for mode in modes:
            if mode == "sample":
                for dtype in sample_dtypes:
                    for batch in (1, 4):
                        for guidance in (False, True):
                            rows.append(Row(preset, mode, dtype, batch, guidance=guidance))
                continue
            for strategy in strategies:
                for n in num_gpus:
                    for ckpt in checkpointing:
                        rows.append(Row(preset, mode, "bf16-mixed", train_batch_size, n, strategy, ckpt))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------------------------


def build_components(preset: str) -> dict:
    """The preset's pipeline components: real weights (tiny, embedded, mid) or on ``meta`` (paper)."""
    if preset == "paper":
        from diffusers_starflow2.testing_utils import build_paper_starflow2_components

        return build_paper_starflow2_components("meta")
    from bench_pipeline import build_pipeline

    return dict(build_pipeline(preset).components)


def to_meta(components: dict, dtype=None) -> None:
    """The models of ``components`` on ``meta`` (``dtype``: every floating weight cast first)."""
    for name in ("vlm", "transformer", "vae"):
        if dtype is not None:
            components[name].to(dtype)
        components[name].to("meta")


def materialise_fake(components: dict, fake_mode) -> None:
    """The (``meta``) models of ``components`` as fake CPU tensors, under ``fake_mode``."""
    import torch

    with fake_mode:
        for name in ("vlm", "transformer", "vae"):
            module = components[name]
            module.to_empty(device="cpu")
            # tensors the modules keep outside their parameters and buffers (e.g. rotary tables) follow them
            for sub in module.modules():
                for key, value in list(vars(sub).items()):
                    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                        if value.device.type == "meta":
                            setattr(sub, key, torch.empty_like(value, device="cpu"))


class _NoHook:
    def remove(self):
        pass


def frozen_aware(tracker_cls):
    """``tracker_cls`` (MemTracker or FSDPMemTracker) for these models.  The trackers install a gradient hook on
    every parameter a forward passes, which torch refuses for a frozen one (that never gets a gradient: nothing to
    track).  And they keep per-module statistics that take a second top-level call of a module for a new training
    iteration and refuse it; the pipelines and the Pretzel call their sub-modules (flows, stream, VLM layers) once
    per position or step: the module's statistics start again.  Only the global peak is read here, so the peak is
    kept without the per-module peaks (whose update walks every tracked module at every operator: minutes at the
    paper's size)."""

    class Tracker(tracker_cls):
        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                name = self._mod_tracker.get_known_fqn(module)
                if set(self._mod_tracker.parents) - {name} == {"Global"}:
                    del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

        def track_replicated(self, *modules):
            """FSDPMemTracker's ``track_external`` does nothing: the weights of modules outside FSDP (the frozen,
            replicated VLM and FAE) are counted with the (sharded) weights here."""
            from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType

            for module in modules:
                for t in (*module.parameters(), *module.buffers()):
                    self._update_and_maybe_create_winfos(t, _FSDPRefType.SHARDED_PARAM)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for param in module.parameters():
                if not param.requires_grad and self._param_to_grad_hook_handles.get(param, None) is None:
                    self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return Tracker


def breakdown(snapshot: dict) -> dict:
    """MemTracker / FSDPMemTracker snapshot of one device -> the plan's columns, in bytes."""
    get = lambda *names: sum(v for k, v in snapshot.items() if str(k).rsplit(".", 1)[-1] in names)  # noqa: E731
    weights = get("PARAM", "BUFFER", "SHARDED_PARAM", "UNSHARDED_PARAM")
    grads = get("GRAD", "SHARDED_GRAD", "UNSHARDED_GRAD")
    opt = get("OPT")
    total = snapshot["Total"]
    return dict(weights=weights, grads=grads, optimizer=opt, activations=total - weights - grads - opt, total=total)


# ----------------------------------------------------------------------------------------------------------------
# The steps (run for real, or on fake tensors under a tracker)
# ----------------------------------------------------------------------------------------------------------------


def training_setup(components: dict, stage: int, checkpointing: bool, mixed: bool, caption_dropout: float = 0.0):
    """What ``train_starflow2.main`` sets up before its loop (one process), minus the data and accelerate: returns
    the parsed training arguments and the weight dtype.  ``bench_training.py`` times its steps on the same set-up."""
    import torch

    from diffusers_starflow2.training import train_starflow2 as train
    from diffusers_starflow2.training.args import parse_args

    args = ["--stage", str(stage), "--pretrained_model_name_or_path", "-", "--output_dir", "-"]
    args = parse_args(args + ["--max_train_steps", "1", "--caption_dropout", str(caption_dropout)])
    transformer, vlm, vae = components["transformer"], components["vlm"], components["vae"]
    weight_dtype = torch.bfloat16 if mixed else torch.float32
    vlm.to(weight_dtype)
    vae.to(weight_dtype).eval().requires_grad_(False)
    train.configure_trainable(args, transformer, vlm)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
        if stage >= 2:
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    transformer.train()
    vlm.train(checkpointing and stage >= 2)
    return args, weight_dtype


def vlm_grad_decision(components: dict, batch: dict) -> bool:
    """The model's own decision (``vlm_stream_needs_grad``) on this batch, from real weight values: the preset's
    (on ``meta``, the paper preset: its initialisation, which zeroes ``skip_v`` and the adapter's output)."""
    import torch

    from diffusers_starflow2.models.vlm_stream import VLMStream

    transformer = components["transformer"]
    swapped = []
    for module in (transformer.adapter.proj_out, transformer.skip_v):
        if module.weight.is_meta:  # PretzelModel.__init__ zero-initialises both
            swapped.append((module, module.weight))
            module.weight = torch.nn.Parameter(torch.zeros(module.weight.shape), module.weight.requires_grad)
    try:
        keys = ("latent_mask", "image_loss_mask", "text_loss_mask")
        return transformer.vlm_stream_needs_grad(VLMStream(components["vlm"]), *(batch.get(k) for k in keys))
    finally:
        for module, weight in swapped:
            module.weight = weight


def examples(stage: int, batch_size: int, image_size: int, step: int):
    """A synthetic batch of the stage's example kinds (captions; understanding; captions, understanding and edits),
    the same for every ``step`` seed; ``bench_training.py`` times steps on it."""
    import torch

    gen = torch.Generator().manual_seed(step)
    image = lambda: torch.rand(3, image_size, image_size, generator=gen) * 2 - 1  # noqa: E731
    kinds = {1: ["caption"], 2: ["understanding"], 3: ["caption", "understanding", "edit"]}[stage]
    out = []
    for i in range(batch_size):
        kind = kinds[i % len(kinds)]
        ex = {
            "caption": {"image": image(), "text": "a red circle on the left of a blue square"},
            "understanding": {"image": image(), "prompt": "what color is the shape?", "response": "red"},
            "edit": {"source_image": image(), "instruction": "make it blue", "target_image": image()},
        }[kind]
        out.append({"kind": kind, **ex, "position": step * batch_size + i, "source": kind})
    return out


def training_step_fn(components, args, weight_dtype, batch_size, fake_mode=None, fsdp_mesh=None, device="cpu"):
    """``step(i)``: one optimiser step of the training script on a synthetic batch of ``batch_size`` examples.  With
    ``fake_mode`` the (``meta``) components are materialised as fake tensors (sharded first over ``fsdp_mesh``), and
    ``step`` must run under ``fake_mode``."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from diffusers_starflow2.training import train_starflow2 as train
    from diffusers_starflow2.training.batches import BatchBuilder

    transformer, vlm, vae = components["transformer"], components["vlm"], components["vae"]
    N = transformer.num_latents
    image_size = transformer.config.sample_size * vae.config.out_patch_size
    tokenizer, scheduler = components["tokenizer"], components["scheduler"]
    # the layouts of the batches, with values (the model's layout decisions and num_text_targets read them), built
    # before the models go fake; in the step the builder then encodes the images as the training script does
    layout = BatchBuilder(args, tokenizer, LayoutOnly(transformer), scheduler, N, weight_dtype)
    layouts = [layout(examples(args.stage, batch_size, image_size, i), "cpu") for i in range(2)]
    text_targets = [None if b["text_loss_mask"] is None else int(b["text_loss_mask"][:, 1:].sum()) for b in layouts]
    decision = vlm_grad_decision(components, layouts[0])
    if fake_mode is not None:
        to_meta(components)
        if fsdp_mesh is not None:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            from diffusers_starflow2.models.flow_block import FlowTransformerLayer

            policy = MixedPrecisionPolicy(param_dtype=weight_dtype, reduce_dtype=weight_dtype)
            for module in transformer.modules():
                if isinstance(module, FlowTransformerLayer):
                    fully_shard(module, mesh=fsdp_mesh, mp_policy=policy)
            fully_shard(transformer, mesh=fsdp_mesh, mp_policy=policy)
        materialise_fake(components, fake_mode)
    build = BatchBuilder(args, tokenizer, vae, scheduler, N, weight_dtype)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        trainer = train.PretzelTrainer(transformer, vlm, train_vlm=False)
        optimizer = torch.optim.AdamW(train.trainable_parameters(trainer), lr=1e-4)
    bf16 = weight_dtype == torch.bfloat16
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    keys = ("input_ids", "latent_mask", "attention_mask", "image_loss_mask", "text_loss_mask")

    def step(i):
        # the builder draws caption dropout and noise levels on the host: it runs with the fake mode unset (its FAE
        # encoding, of fake weights, still gives fake latents; the tracker does not count it, a no-grad pass small
        # next to the step's; the latents count from the forward on)
        with unset_fake_temporarily() if fake_mode is not None else contextlib.nullcontext():
            batch = build(examples(args.stage, batch_size, image_size, i), device)
        batch.update(
            {k: None if layouts[i][k] is None else layouts[i][k].to(device) for k in keys}
        )  # the same tensors, with their values
        with autocast:
            out = trainer(**batch, num_text_targets=text_targets[i], vlm_requires_grad=decision)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, trainer, optimizer, decision


class LayoutOnly:
    """A stand-in FAE for a ``BatchBuilder`` run that only needs the layout: zero latents of the right shape."""

    def __init__(self, transformer):
        self.shape = (
            transformer.config.latent_channels,
            transformer.config.sample_size,
            transformer.config.sample_size,
        )

    def encode_latents(self, pixels, **kwargs):
        import torch

        return torch.zeros(pixels.shape[0], *self.shape)


def sample_fn(components, batch_size: int, guidance: bool):
    """``call()``: one text-to-image call; also records the KV cache one image adds (``kv["per_image"]``)."""
    from diffusers_starflow2 import StarFlow2Pipeline

    pipe = StarFlow2Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    kv = {}
    generate = pipe.generate_image

    def generate_image(cache, *args, **kwargs):
        before = cache.nbytes
        out = generate(cache, *args, **kwargs)
        kv["per_image"] = (cache.nbytes - before) / batch_size
        return out

    pipe.generate_image = generate_image

    def call():
        pipe(PROMPT, num_images_per_prompt=batch_size, guidance_scale=2.0 if guidance else 0.0, output_type="pt")

    return call, kv


# ----------------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------------


def plan_worker(row: Row) -> dict:
    """The row's prediction: its real call on fake tensors under the trackers."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.set_num_threads(1)
    start = time.perf_counter()
    components = build_components(row.preset)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    result = dict(asdict(row), kv_cache_per_image_gib=None, vlm_autograd=None, ddp_buckets_gib=0.0)
    if row.mode == "sample":
        to_meta(components, {"fp32": torch.float32, "bf16": torch.bfloat16}[row.dtype])
        materialise_fake(components, fake_mode)
        call, kv = sample_fn(components, row.batch_size, row.guidance)
        with fake_mode:
            tracker = frozen_aware(MemTracker)()
            tracker.track_external(*(components[n] for n in ("vlm", "transformer", "vae")))
            with tracker:
                call()
        result["kv_cache_per_image_gib"] = kv["per_image"] / GIB
    else:
        stage = int(row.mode[-1])
        mixed = row.dtype == "bf16-mixed"
        args, weight_dtype = training_setup(components, stage, row.gradient_checkpointing, mixed)
        mesh = None
        if row.strategy == "fsdp":
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", rank=0, world_size=row.num_gpus, store=FakeStore())
            mesh = init_device_mesh("cpu", (row.num_gpus,))
        step, trainer, optimizer, decision = training_step_fn(
            components, args, weight_dtype, row.batch_size, fake_mode, mesh
        )
        with fake_mode:
            if mesh is not None:
                from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

                tracker = frozen_aware(FSDPMemTracker)(components["transformer"], optimizer)
                tracker.track_replicated(components["vlm"], components["vae"])
            else:
                tracker = frozen_aware(MemTracker)()
                tracker.track_external(*(components[n] for n in ("vlm", "transformer", "vae")), optimizer)
            with tracker:
                for i in range(2):  # the second step holds the optimiser state from its start
                    step(i)
        result["vlm_autograd"] = decision
        if row.strategy == "ddp" and row.num_gpus > 1:
            trainable = trainer.transformer.parameters()
            result["ddp_buckets_gib"] = sum(p.numel() * 4 for p in trainable if p.requires_grad) / GIB
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    parts = breakdown(snapshot)
    result.update({f"{k}_gib": v / GIB for k, v in parts.items() if k != "total"})
    result["peak_gib"] = parts["total"] / GIB + result["ddp_buckets_gib"]
    result["seconds"] = time.perf_counter() - start
    return result


def measure_worker(row: Row, track: bool = False) -> dict:
    """The row run for real on this CPU (one process): the measured peak RSS over the RSS before the build; with
    ``track`` instead the same trackers' peak on the real tensors (what the fake pass must reproduce)."""
    import bench_pipeline  # noqa: F401  (the libraries are imported before the baseline: not the plan's)
    import torch
    import transformers  # noqa: F401
    from torch.distributed._tools.mem_tracker import MemTracker

    import diffusers_starflow2.training.train_starflow2  # noqa: F401

    torch.set_num_threads(1)
    gc.collect()
    base = rss_kb()
    components = build_components(row.preset)
    tracker = frozen_aware(MemTracker)() if track else contextlib.nullcontext()
    if row.mode == "sample":
        if row.dtype == "bf16":
            for name in ("vlm", "transformer", "vae"):
                components[name].to(torch.bfloat16)
        call, _ = sample_fn(components, row.batch_size, row.guidance)
        runs = [call, call]  # the first warms up lazily built state of the libraries
        external = ()
    else:
        stage = int(row.mode[-1])
        args, weight_dtype = training_setup(components, stage, row.gradient_checkpointing, row.dtype == "bf16-mixed")
        step, _, optimizer, _ = training_step_fn(components, args, weight_dtype, row.batch_size)
        runs = [lambda: step(0), lambda: step(1)]
        external = (optimizer,)
    if track:
        tracker.track_external(*(components[n] for n in ("vlm", "transformer", "vae")), *external)
        with tracker:
            for run in runs:
                run()
        return {"tracked_gib": breakdown(tracker.get_tracker_snapshot("peak")[torch.device("cpu")])["total"] / GIB}
    runs[0]()
    gc.collect()
    ok = reset_peak()
    runs[1]()
    return {"measured_gib": (peak_kb(ok) - base) / 2**20}


def run_worker(kind: str, row: Row) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--{kind}", json.dumps(asdict(row))]
    env = dict(os.environ)
    if kind == "measure":  # freed tensors go back to the OS: the RSS follows the live tensors (see the docstring)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker for {row} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list) -> None:
    print(
        "| preset | mode | dtype | batch | GPUs | strategy | grad ckpt | guidance | VLM autograd | weights | grads "
        "| AdamW | KV cache / image | activations | peak / GPU (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        train = r["mode"] != "sample"
        flags = [
            r["preset"],
            r["mode"],
            r["dtype"],
            str(r["batch_size"]),
            str(r["num_gpus"]),
            r["strategy"],
            ("on" if r["gradient_checkpointing"] else "off") if train else "-",
            "-" if train else ("on" if r["guidance"] else "off"),
            "-" if r["vlm_autograd"] is None else ("yes" if r["vlm_autograd"] else "no"),
        ]
        act = r["activations_gib"] + r["ddp_buckets_gib"]
        values = [r["weights_gib"], r["grads_gib"], r["optimizer_gib"], r["kv_cache_per_image_gib"], act]
        print("| " + " | ".join(flags + [fmt(v) for v in values] + [f"**{r['peak_gib']:.3f}**"]) + " |")


def validate(preset: str) -> bool:
    ok = True
    rows = [
        Row(preset, "stage1", "fp32", 4, strategy="ddp"),
        Row(preset, "stage1", "fp32", 4, strategy="ddp", gradient_checkpointing=True),
        Row(preset, "sample", "fp32", 1, guidance=True),
    ]
    print(f"| row ({preset}, fp32, one process) | predicted GiB | measured GiB (peak RSS - RSS before build) | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        predicted = run_worker("plan", row)["peak_gib"]
        measured = run_worker("measure", row)["measured_gib"]
        ratio = predicted / measured
        ok &= abs(ratio - 1) <= 0.15
        name = f"{row.mode} batch {row.batch_size}" + (
            f", grad ckpt {'on' if row.gradient_checkpointing else 'off'}" if row.mode != "sample" else ", guidance"
        )
        print(f"| {name} | {predicted:.3f} | {measured:.3f} | {ratio:.2f} |", flush=True)
    print("validation:", "within 15 %" if ok else "OFF BY MORE THAN 15 %")
    return ok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,embedded,paper")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--num_gpus", default="1,8")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing of the training rows")
    parser.add_argument("--sample_dtypes", default="fp32,bf16")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    parser.add_argument("--validate", metavar="PRESET", help="compare with a real run of PRESET on this CPU")
    for kind in ("plan", "measure", "track"):
        parser.add_argument(f"--{kind}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.plan or args.measure or args.track:
        row = Row(**json.loads(args.plan or args.measure or args.track))
        if args.measure or args.track:
            print(json.dumps(measure_worker(row, track=bool(args.track))))
        else:
            print(json.dumps(plan_worker(row)))
        return
    if args.validate:
        if args.validate not in PRESETS:
            parser.error(f"--validate: unknown preset {args.validate!r}; accepted: {', '.join(PRESETS)}")
        sys.exit(0 if validate(args.validate) else 1)

    def listed(name, value, accepted, cast=str):
        items = [cast(v) for v in value.split(",") if v]
        bad = [v for v in items if v not in accepted]
        if not items or bad:
            parser.error(f"--{name}: {value!r}; accepted: comma-separated {', '.join(map(str, accepted))}")
        return items

    try:
        num_gpus = [int(v) for v in args.num_gpus.split(",")]
    except ValueError:
        num_gpus = [0]
    if any(n < 1 for n in num_gpus):
        parser.error(f"--num_gpus: {args.num_gpus!r}; accepted: comma-separated integers >= 1")
    if args.train_batch_size < 1:
        parser.error(f"--train_batch_size: {args.train_batch_size}; accepted: an integer >= 1")
    rows = plan_rows(
        listed("presets", args.presets, PRESETS),
        listed("modes", args.modes, MODES),
        listed("strategies", args.strategies, ("ddp", "fsdp")),
        num_gpus,
        args.train_batch_size,
        [v == "on" for v in listed("checkpointing", args.checkpointing, ("off", "on"))],
        listed("sample_dtypes", args.sample_dtypes, ("fp32", "bf16")),
    )
    results = []
    for i, row in enumerate(rows):
        results.append(run_worker("plan", row))
        print(f"[{i + 1}/{len(rows)}] {row} ({results[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(results)


if __name__ == "__main__":
    main()

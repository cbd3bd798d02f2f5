#!/usr/bin/env python
# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Train STARFlow2 (paper §3.3) with accelerate.

Stage 1  text -> image: shallow + deep flow and the noise embedding learn the NLL of generated images; the VLM,
         the FAE, the visual adapter and the (zero) skip projections stay frozen.
Stage 2  image -> text: only the visual adapter learns, from the next-token loss of assistant responses through the
         frozen VLM.
Stage 3  everything of the Pretzel (flows, noise embedding, adapter, skips) on a weighted mixture of understanding,
         generation, editing and interleaved data with ``L = L_flow + λ·L_text``.

Run it on one process (``python training/train_starflow2.py ...``) or on many with ``accelerate launch`` (DDP; FSDP
and DeepSpeed on GPUs, see ``training/accelerate_configs``)::

    accelerate launch training/train_starflow2.py --stage 1 --pretrained_model_name_or_path PIPE \\
        --dataset_name my_images --output_dir runs/lora --rank 16 --max_train_steps 1000 --recipe paper \\
        --validation_prompt "a red circle" --validation_steps 200 --use_ema --checkpointing_steps 200 \\
        --checkpoints_total_limit 2 --report_to tensorboard

The options follow diffusers' example scripts (``--dataset_name``/``--image_column``/``--caption_column``,
``--validation_prompt``, ``--use_ema``, ``--checkpoints_total_limit``, ``--report_to``, ``--push_to_hub``, ``--rank``);
``--recipe paper``, ``--image_loss_reweight`` and ``--distill_from_vlm_vision`` follow the paper and iTARFlow.

Every sample's randomness (caption dropout, noise level, FAE posterior sample, flow noise) comes from generators
seeded by ``(--seed, position of the sample in the data stream)``, and the stream itself is a fixed function of
``--seed``: a run resumed from ``output_dir/checkpoint-N`` reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from huggingface_hub import create_repo, upload_folder
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..utils.io import publish_into, remove_stale_staging, write_text_atomic
from .args import ArgumentError, check_args, check_mixture, parse_args
from .batches import BatchBuilder, ExampleReader, SampleStream, check_texts, collate_examples, open_data, vision_teacher
from .checkpointing import resolve_checkpoint, resume, run_signature, save_checkpoint, save_final, trim_log
from .lora import add_lora_adapters

logger = logging.getLogger("train_starflow2")

# Parameter groups of PretzelModel trained in each stage (noise_proj is a parameter-free sinusoidal embedding).
STAGE_GROUPS = {
    1: ("shallow", "deep", "noise_embed"),
    2: ("adapter",),
    3: ("shallow", "deep", "noise_embed", "adapter", "skip_v", "skip_t"),
}


# ----------------------------------------------------------------------------------------------------------------
# What trains
# ----------------------------------------------------------------------------------------------------------------


class PretzelTrainer(nn.Module):
    """What accelerate wraps: the Pretzel and, with ``--lora_vlm``, the VLM (so that its LoRA weights are
    synchronised too).  A frozen VLM stays outside (not a submodule: no DDP/FSDP wrapping of frozen weights)."""

    def __init__(self, transformer: nn.Module, vlm: nn.Module, train_vlm: bool):
        super().__init__()
        self.transformer = transformer
        if train_vlm:
            self.vlm = vlm
        else:
            self.__dict__["frozen_vlm"] = vlm

    def forward(self, teacher_logits: Optional[torch.Tensor] = None, distill_weight: float = 1.0, **inputs):
        from diffusers_starflow2.models.vlm_stream import VLMStream

        vlm = self._modules.get("vlm") or self.__dict__["frozen_vlm"]
        # a plain dict: accelerate's mixed-precision output conversion rebuilds mappings as type(out)({...}), which
        # PretzelOutput (all fields required) does not support
        out = dict(self.transformer(VLMStream(vlm), **inputs))
        student = out.pop("text_logits", None)
        if teacher_logits is not None and student is not None:
            out["distill_kl"] = distillation_kl(student, teacher_logits)
            out["loss"] = out["loss"] + distill_weight * out["distill_kl"]
        return out


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between next-token distributions."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


def configure_trainable(args, transformer, vlm) -> None:
    """Freeze everything, then unfreeze the stage's groups or add the LoRA adapters."""
    for model in (transformer, vlm):
        model.requires_grad_(False)
    if args.lora_rank is None:
        for group in STAGE_GROUPS[args.stage]:
            getattr(transformer, group).requires_grad_(True)
        return
    add_lora_adapters(args, transformer, vlm)


def trainable_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_lr_scheduler(args, optimizer, num_processes: int):
    # accelerate steps a prepared scheduler once per process and step: the horizon counts every process
    warmup, total = args.lr_warmup_steps * num_processes, args.max_train_steps * num_processes
    if args.lr_scheduler == "cosine_with_min_lr":
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr=args.min_learning_rate)
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def log_validation(args, pipe, accelerator, step: int, output_dir: Path, tag: str) -> List[Path]:
    """Sample ``--num_validation_images`` per ``--validation_prompt`` with the pipeline, save them under
    ``output_dir/validation/`` and send them to the trackers."""
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    folder = output_dir / "validation"
    paths, images = [], []
    # sampling must not consume the training's random state (resumed runs validate at other times)
    with (
        torch.random.fork_rng(devices=[]),
        torch.no_grad(),
        accelerator.autocast(),
        publish_into(folder, last=None) as staging,
    ):
        for p_index, prompt in enumerate(args.validation_prompts):
            generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_validation_images)]
            out = pipe(prompt, num_images_per_prompt=args.num_validation_images, generator=generators).images
            for i, image in enumerate(out):
                name = f"{tag}_prompt{p_index}_{i}.png"
                image.save(os.path.join(staging, name), format="PNG")
                paths.append(folder / name)
                images.append((prompt, image))
    pipe.transformer.train(was_training)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image.convert("RGB")) for _, image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {
                    "validation": [
                        wandb.Image(image, caption=f"{i}: {prompt}") for i, (prompt, image) in enumerate(images)
                    ]
                },
                step=step,
            )
    logger.info(f"validation images at step {step}: {', '.join(str(p) for p in paths)}")
    return paths


def check_distributed_setup(accelerator) -> None:
    """Refuse an FSDP launch that accelerate quietly turned into something else.

    accelerate shards with FSDP only on GPUs and other accelerators; launched with an FSDP config on CPU it sets up
    plain data parallel (``MULTI_CPU``), every process holding every weight, which is not what was asked for.
    """
    from accelerate.utils import DistributedType

    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1", "yes")
    if fsdp_requested and accelerator.distributed_type != DistributedType.FSDP:
        import accelerate

        raise ArgumentError(
            f"the accelerate config asks for FSDP (distributed_type: FSDP), but accelerate {accelerate.__version__} "
            f"set up {accelerator.distributed_type.value} on {accelerator.device.type}: accelerate shards with FSDP "
            "on GPUs and other accelerators only, and on CPU falls back to data parallel with every weight "
            "replicated. On CPU launch data parallel instead (ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ...)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------


def start_accelerator(args, output_dir: Path):
    """The run's ``Accelerator`` (trackers, mixed precision, DDP), its output folder cleaned of staging folders a
    killed run left, and the global seed set."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.stage == 3)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_distributed_setup(accelerator)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_staging(output_dir):
            logger.warning(f"removed {path}, left over by a killed run")
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    if accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        logger.warning(
            "running ONE process although the launcher prepared a distributed run: `accelerate launch "
            "--cpu --num_processes N` needs --mpirun_hostfile; for N CPU processes use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`"
        )
    return accelerator


@dataclass
class Run:
    """Everything the loop touches: the pipeline (validation samples with it), the training scheduler (its noise
    levels), the wrapped trainer, its trainable parameters and their EMA, optimiser, LR schedule and data."""

    pipe: object
    scheduler: object
    trainer: nn.Module
    params: List[nn.Parameter]
    ema: Optional[object]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: DataLoader
    build_batch: BatchBuilder


def build_run(args, accelerator) -> Run:
    """Load the pipeline and the data, freeze what the stage does not train, and prepare it all with accelerate."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.training_utils import EMAModel, cast_training_params

    from diffusers_starflow2 import StarFlow2Pipeline, TarFlowScheduler

    datasets, mixture_sampler = open_data(args)
    pipe = StarFlow2Pipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)  # validation sampling inside the training's progress bar
    vlm, tokenizer, transformer, vae = pipe.vlm, pipe.tokenizer, pipe.transformer, pipe.vae
    check_texts(args, datasets, tokenizer)
    t0 = pipe.scheduler.config.min_noise_level if args.noise_level_min is None else args.noise_level_min
    t1 = pipe.scheduler.config.max_noise_level if args.noise_level_max is None else args.noise_level_max
    if t0 > t1:
        raise ArgumentError(f"--noise_level_min ({t0}) must be <= --noise_level_max ({t1})")
    if args.image_loss_reweight == "inverse" and t0 <= 0:
        raise ArgumentError("--image_loss_reweight inverse needs --noise_level_min > 0")
    scheduler = TarFlowScheduler.from_config(pipe.scheduler.config, min_noise_level=t0, max_noise_level=t1)
    if args.stage == 1 and any(bool(getattr(transformer, s).weight.any()) for s in ("skip_v", "skip_t")):
        logger.warning("stage 1 expects zero skip projections; this model's are not zero (they stay frozen)")

    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    for frozen in (vlm, vae):  # frozen weights in the compute dtype (trainable ones are cast back to fp32 below)
        frozen.to(accelerator.device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    vae.eval().requires_grad_(False)
    transformer.to(accelerator.device)
    configure_trainable(args, transformer, vlm)
    cast_training_params([transformer, vlm], dtype=torch.float32)
    vlm_needs_grad = args.stage >= 2 or args.lora_vlm  # the text loss runs through the VLM
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        if vlm_needs_grad:
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    transformer.train()
    vlm.train(args.gradient_checkpointing and vlm_needs_grad)  # transformers checkpoints only in train mode
    trainer = PretzelTrainer(transformer, vlm, train_vlm=args.lora_vlm)
    params = trainable_parameters(trainer)
    if not params:
        raise ArgumentError("nothing to train (check --stage / --lora_target_modules)")
    ema = EMAModel(params, decay=args.ema_decay) if args.use_ema else None

    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)

    # a fixed stream of samples, sharded over processes by accelerate
    image_size = transformer.config.sample_size * vae.config.out_patch_size
    reader = ExampleReader(datasets, VaeImageProcessor(vae_scale_factor=vae.config.out_patch_size), image_size)
    total = args.max_train_steps * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    stream = SampleStream(total, args.seed, {n: len(d) for n, d in datasets.items()}, mixture_sampler)
    dataloader = DataLoader(
        reader,
        batch_size=args.train_batch_size,
        sampler=stream,
        collate_fn=collate_examples,
        num_workers=args.num_workers,
    )
    trainer, optimizer, dataloader, lr_scheduler = accelerator.prepare(trainer, optimizer, dataloader, lr_scheduler)
    build_batch = BatchBuilder(
        args, tokenizer, vae, scheduler, transformer.num_latents, weight_dtype, teacher=vision_teacher(args, vlm)
    )
    return Run(pipe, scheduler, trainer, params, ema, optimizer, lr_scheduler, dataloader, build_batch)


# ----------------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------------

# What one micro-batch adds to the running sums that a step's log averages (see step_logs).
SUM_FIELDS = ("loss", "batches", "bits_per_dim", "images", "text_ce", "text_batches", "distill_kl")


def train_step(args, accelerator, run: Run, examples: List[dict]) -> torch.Tensor:
    """Forward, backward and (at the end of an accumulation) optimiser step of one micro-batch; returns its
    ``SUM_FIELDS`` as a float64 tensor."""
    text_weight = args.text_loss_weight if args.stage == 3 else 1.0
    with accelerator.accumulate(run.trainer):
        inputs = run.build_batch(examples, accelerator.device)
        out = run.trainer(**inputs, text_loss_weight=text_weight, distill_weight=args.distill_weight)
        accelerator.backward(out["loss"])
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    scored = inputs["image_loss_mask"]
    has_text = inputs["text_loss_mask"] is not None and bool(inputs["text_loss_mask"][:, 1:].any())
    return torch.tensor(
        [
            out["loss"].item(),
            1,
            out["bits_per_dim"][scored].sum().item(),
            scored.sum().item(),
            out["text_loss"].item() if has_text else 0.0,
            float(has_text),
            out["distill_kl"].item() if "distill_kl" in out else 0.0,
        ],
        dtype=torch.float64,
        device=accelerator.device,
    )


def step_logs(accelerator, run: Run, sums: torch.Tensor, step: int) -> dict:
    """The log row of an optimiser step: the ``SUM_FIELDS`` of all its micro-batches on all processes, averaged."""
    total = dict(zip(SUM_FIELDS, accelerator.reduce(sums, reduction="sum").tolist()))
    logs = {"step": step, "loss": total["loss"] / total["batches"], "lr": run.lr_scheduler.get_last_lr()[0]}
    if total["images"]:
        logs["bits_per_dim"] = total["bits_per_dim"] / total["images"]
    if total["text_batches"]:
        logs["text_ce"] = total["text_ce"] / total["text_batches"]
        if run.build_batch.teacher is not None:
            logs["distill_kl"] = total["distill_kl"] / total["text_batches"]
    return logs


def validate(args, run: Run, accelerator, step: int, output_dir: Path, tag: str) -> List[Path]:
    """:func:`log_validation` with the EMA weights standing in for the trained ones while sampling."""
    if run.ema is not None:
        run.ema.store(run.params)
        run.ema.copy_to(run.params)
    try:
        return log_validation(args, run.pipe, accelerator, step, output_dir, tag)
    finally:
        if run.ema is not None:
            run.ema.restore(run.params)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    """Train; returns ``{"global_step", "history": [per-step logs], "output_dir"}``."""
    from tqdm.auto import tqdm

    check_args(args)
    # before anything is written: a missing or incomplete checkpoint is refused with the run's files untouched
    resume_path = resolve_checkpoint(args) if args.resume_from_checkpoint else None
    check_mixture(args)  # fail on a bad spec before loading any model
    output_dir = Path(args.output_dir)
    accelerator = start_accelerator(args, output_dir)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_repo(repo_id=args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
    run = build_run(args, accelerator)

    signature = run_signature(args, accelerator.num_processes)
    global_step = 0
    if args.resume_from_checkpoint:
        if resume_path is None:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run")
        else:
            global_step = resume(accelerator, run.ema, resume_path, signature)
    log_path = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        trim_log(log_path, global_step)
    if args.report_to != "none":
        accelerator.init_trackers(
            args.tracker_project_name,
            config={  # never the token
                k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"
            },
        )

    history: List[dict] = []
    batches = (
        accelerator.skip_first_batches(run.dataloader, global_step * args.gradient_accumulation_steps)
        if global_step
        else run.dataloader
    )
    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc=f"stage {args.stage}",
        disable=not accelerator.is_local_main_process,
    )
    sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=accelerator.device)
    for examples in batches if global_step < args.max_train_steps else ():
        sums += train_step(args, accelerator, run, examples)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if run.ema is not None:
            run.ema.step(run.params)
        logs = step_logs(accelerator, run, sums, global_step)
        sums.zero_()
        history.append(logs)
        progress.update(1)
        progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "step"})
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(logs) + "\n")
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                progress.write(
                    " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
                )
        if args.report_to != "none":
            accelerator.log({k: v for k, v in logs.items() if k != "step"}, step=global_step)
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args, run.trainer, run.ema, output_dir, global_step, signature)
        if (
            args.validation_steps
            and global_step % args.validation_steps == 0
            and global_step < args.max_train_steps
            and accelerator.is_main_process
        ):
            validate(args, run, accelerator, global_step, output_dir, f"step-{global_step}")
        if global_step >= args.max_train_steps:
            break
    progress.close()

    # the final weights (EMA runs: the EMA weights, also for the final validation), samples and upload
    accelerator.wait_for_everyone()
    if run.ema is not None:
        run.ema.copy_to(run.params)
    state_dict = accelerator.get_state_dict(run.trainer)  # gathered on every backend (DDP, FSDP, DeepSpeed)
    if accelerator.is_main_process:
        save_final(args, accelerator.unwrap_model(run.trainer), state_dict, run.scheduler, output_dir)
        images = (
            log_validation(args, run.pipe, accelerator, global_step, output_dir, "final")
            if args.validation_prompts
            else []
        )
        if args.push_to_hub:
            write_model_card(args, repo_id, output_dir, images)
            upload_folder(
                repo_id=repo_id,
                folder_path=str(output_dir),
                commit_message="End of training",
                token=args.hub_token,
                ignore_patterns=["checkpoint-*", "logs/*", ".*"],
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "history": history, "output_dir": str(output_dir)}


def write_model_card(args, repo_id: str, output_dir: Path, images: List[Path]) -> None:
    """``output_dir/README.md``: diffusers' model card (base model, stage, data, sample images, tags)."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    lora = args.lora_rank is not None
    data = args.dataset_name or args.train_data_dir or args.mixture
    task = {
        1: "text-to-image generation",
        2: "image understanding (the visual adapter)",
        3: "joint understanding, generation, editing and interleaved generation",
    }[args.stage]
    lines = [
        f"# {'LoRA of ' if lora else ''}STARFlow2 — stage {args.stage} ({task})",
        "",
        f"Trained from `{args.pretrained_model_name_or_path}` on `{data}` for {args.max_train_steps} steps "
        f"with `training/train_starflow2.py` of diffusers-starflow2.",
        "",
    ]
    if lora:
        lines += [
            "```python",
            "from diffusers_starflow2 import StarFlow2Pipeline",
            "",
            f'pipe = StarFlow2Pipeline.from_pretrained("{args.pretrained_model_name_or_path}")',
            f'pipe.load_lora_weights("{repo_id}")',
            "```",
            "",
        ]
    if images:
        lines += ["## Samples", ""] + [f"![{p.name}](./{p.relative_to(output_dir).as_posix()})" for p in images]
    widget = (
        [
            {"text": args.validation_prompts[0], "output": {"url": p.relative_to(output_dir).as_posix()}}
            for p in images[:1]
        ]
        if images
        else None
    )
    card = load_or_create_model_card(
        repo_id_or_path=repo_id,
        from_training=True,
        license="apache-2.0",
        base_model=args.pretrained_model_name_or_path,
        prompt=args.validation_prompts[0] if args.validation_prompts else None,
        model_description="\n".join(lines),
        widget=widget,
        inference=True,
    )
    tags = ["starflow2", "normalizing-flow", "text-to-image", "diffusers-training", "diffusers"]
    card = populate_model_card(card, tags=tags + (["lora"] if lora else []))
    write_text_atomic(output_dir / "README.md", str(card))


def cli(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        main(args)
    except ArgumentError as e:
        print(f"train_starflow2.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

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
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from huggingface_hub import create_repo, upload_folder
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ..utils import validation
from ..utils.hub import pipeline_source
from ..utils.io import publish_into, remove_stale_staging, replace_path, write_json_atomic, write_text_atomic
from .data import MixtureSampler, mixture, open_dataset, open_hub_caption_dataset, parse_mixture

logger = logging.getLogger("train_starflow2")

# Parameter groups of PretzelModel trained in each stage (noise_proj is a parameter-free sinusoidal embedding).
STAGE_GROUPS = {
    1: ("shallow", "deep", "noise_embed"),
    2: ("adapter",),
    3: ("shallow", "deep", "noise_embed", "adapter", "skip_v", "skip_t"),
}
STAGE_DATA_KIND = {1: "caption", 2: "understanding"}
DEEP_LORA_LINEARS = ("to_qkv", "to_out", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")
VLM_LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EMA_WEIGHT_NAME = "ema.safetensors"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


# The optimiser of the paper's appendix C (shared by all stages): AdamW(0.9, 0.95), eps 1e-8, weight decay 1e-4,
# cosine decay to a minimum learning rate of 1e-6, bf16 mixed precision. The per-stage peak learning rates did not
# survive in our copy of the paper's text, so --learning_rate stays the user's.
PAPER_RECIPE = dict(
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_epsilon=1e-8,
    adam_weight_decay=1e-4,
    lr_scheduler="cosine_with_min_lr",
    min_learning_rate=1e-6,
    mixed_precision="bf16",
)
DEFAULTS = dict(
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    adam_weight_decay=1e-2,
    lr_scheduler="constant",
    min_learning_rate=0.0,
    mixed_precision="no",
)
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "cosine_with_min_lr",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    p.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="a STARFlow2 pipeline folder or a Hugging Face Hub repo id",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--train_data_dir",
        help="stage 1: caption folder, stage 2: understanding folder (metadata.jsonl, "
        "every row and image checked when the folder is indexed)",
    )
    p.add_argument(
        "--dataset_name",
        help="stage 1: a 🤗 datasets dataset (a Hub id or a local folder, e.g. an "
        "imagefolder with metadata.jsonl) with an image and a caption column",
    )
    p.add_argument("--dataset_config_name", default=None, help="the dataset's config (--dataset_name)")
    p.add_argument("--image_column", default="image", help="--dataset_name: the column of the images")
    p.add_argument("--caption_column", default="text", help="--dataset_name: the column of the captions")
    p.add_argument("--cache_dir", default=None, help="where 🤗 datasets caches --dataset_name")
    p.add_argument(
        "--mixture",
        help='stage 3: "understanding=DIR:0.3,generation=DIR:0.4,editing=DIR:0.2,interleaved=DIR:0.1" '
        "(optionally chat_edit=DIR:w)",
    )
    p.add_argument(
        "--interleaved_layout",
        choices=("user_first", "assistant"),
        default="user_first",
        help="interleaved documents: first segment as the user turn and the rest as the assistant turn "
        "(default), or the whole document as one assistant turn",
    )
    p.add_argument("--max_train_steps", type=int, required=True)
    p.add_argument("--train_batch_size", type=int, default=4, help="per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument(
        "--recipe",
        choices=("default", "paper"),
        default="default",
        help="'paper': the optimiser of the paper's appendix C as defaults: AdamW betas (0.9, 0.95), eps "
        "1e-8, weight decay 1e-4, cosine to --min_learning_rate 1e-6, bf16 (flags given explicitly "
        "win)",
    )
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument(
        "--lr_scheduler", choices=LR_SCHEDULERS, default=None, help="default: constant ('paper': cosine_with_min_lr)"
    )
    p.add_argument(
        "--min_learning_rate",
        type=float,
        default=None,
        help="cosine_with_min_lr: the final learning rate (default 0, 'paper': 1e-6)",
    )
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=None, help="default 0.9")
    p.add_argument("--adam_beta2", type=float, default=None, help="default 0.999 ('paper': 0.95)")
    p.add_argument("--adam_weight_decay", type=float, default=None, help="default 1e-2 ('paper': 1e-4)")
    p.add_argument("--adam_epsilon", type=float, default=None, help="default 1e-8")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default=None, help="default no ('paper': bf16)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--noise_level_min", type=float, default=None, help="t0 (default: the scheduler's)")
    p.add_argument("--noise_level_max", type=float, default=None, help="t1 (default: the scheduler's)")
    p.add_argument(
        "--image_loss_reweight",
        default="linear",
        choices=("none", "inverse", "linear"),
        help="multi-noise weighting of the per-image NLL over noise levels t ~ U[t0, t1]:\n"
        "'linear' (default) multiplies it by t (iTARFlow's --reweight t, used by all its recipes: mean of t * NLL);\n"
        "'inverse' weights it by 1/t (normalised), drawing t with density ∝ 1/t on [t0, t1];\n"
        "'none': the plain mean",
    )
    p.add_argument(
        "--latent_sample",
        choices=("sample", "mean"),
        default="sample",
        help="FAE latents: a posterior sample (default) or the posterior mean",
    )
    p.add_argument(
        "--caption_dropout",
        type=float,
        default=0.1,
        help="probability of replacing a caption or edit instruction by '' (classifier-free guidance)",
    )
    p.add_argument("--text_loss_weight", type=float, default=1.0, help="λ of stage 3")
    p.add_argument(
        "--distill_from_vlm_vision",
        action="store_true",
        help="stage 2: add KL(VLM with its own vision tower || VLM through the visual adapter) over the "
        "response tokens (skipped with a warning when the VLM has no vision tower)",
    )
    p.add_argument("--distill_weight", type=float, default=1.0, help="weight of the distillation KL")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument(
        "--report_to",
        choices=("none", "tensorboard", "wandb", "all"),
        default="none",
        help="accelerate trackers (logs under OUTPUT_DIR/logs)",
    )
    p.add_argument("--tracker_project_name", default="starflow2")
    p.add_argument(
        "--validation_prompt",
        "--validation_prompts",
        dest="validation_prompts",
        nargs="+",
        default=None,
        help="prompts sampled with the pipeline every --validation_steps and at the end (images under "
        "OUTPUT_DIR/validation/ and sent to the trackers)",
    )
    p.add_argument("--num_validation_images", type=int, default=4, help="images per validation prompt")
    p.add_argument("--validation_steps", type=int, default=None, help="default: only at the end of training")
    p.add_argument(
        "--use_ema",
        action="store_true",
        help="keep an EMA of the trained weights (diffusers EMAModel), used for validation and the final save",
    )
    p.add_argument("--ema_decay", type=float, default=0.9999)
    p.add_argument("--checkpointing_steps", type=int, default=None)
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    p.add_argument(
        "--rank",
        "--lora_rank",
        dest="lora_rank",
        type=int,
        default=None,
        help="train a LoRA of this rank instead of full weights",
    )
    p.add_argument("--lora_alpha", type=float, default=None, help="default: the rank")
    p.add_argument(
        "--lora_target_modules",
        default=None,
        help="comma-separated module names (suffixes) of the Pretzel; default: stage 1 the deep stream's "
        "attention/MLP linears, stage 2 the adapter's linears, stage 3 both plus skip_v/skip_t",
    )
    p.add_argument("--lora_vlm", action="store_true", help="also train a LoRA on the VLM's attention projections")
    p.add_argument("--save_fused", action="store_true", help="LoRA runs: also write a pipeline with fused weights")
    p.add_argument("--push_to_hub", action="store_true", help="upload OUTPUT_DIR (with a model card) at the end")
    p.add_argument("--hub_model_id", default=None, help="default: the name of OUTPUT_DIR")
    p.add_argument("--hub_token", default=None)
    args = p.parse_args(argv)
    preset = PAPER_RECIPE if args.recipe == "paper" else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


class ArgumentError(ValueError):
    """A bad command-line argument (the message names it)."""


def check_flags(args: argparse.Namespace, check, names: Sequence[str], **bounds) -> None:
    """The shared number check ``check`` (:mod:`~diffusers_starflow2.utils.validation`) of each ``--name``, its
    refusal an :class:`ArgumentError` naming the flag as typed (a flag left out, None, is not checked)."""
    for name in names:
        if getattr(args, name) is None:
            continue
        try:
            check(getattr(args, name), f"--{name}", **bounds)
        except ValueError as e:
            raise ArgumentError(str(e).replace(f"`--{name}`", f"--{name}", 1)) from None


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`ArgumentError` naming the offending argument, its value and what is accepted."""
    try:  # a pipeline folder or a Hub repo id (loaded through the Hugging Face cache)
        pipeline_source(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    if args.stage == 3:
        if not args.mixture:
            raise ArgumentError(
                "--stage 3 needs --mixture 'understanding=DIR:w,generation=DIR:w,editing=DIR:w,"
                "interleaved=DIR:w' (stage-3 training runs on a mixture)"
            )
        for flag in ("train_data_dir", "dataset_name"):
            if getattr(args, flag):
                raise ArgumentError(f"--{flag} is for stages 1 and 2; stage 3 reads --mixture")
    else:
        if args.mixture:
            raise ArgumentError(f"--mixture is for stage 3; stage {args.stage} reads --train_data_dir")
        if args.dataset_name and args.train_data_dir:
            raise ArgumentError("give one of --dataset_name and --train_data_dir, not both")
        if args.dataset_name and args.stage != 1:
            raise ArgumentError(
                f"--dataset_name is for stage 1 (image and caption columns); stage {args.stage} reads --train_data_dir"
            )
        if not (args.train_data_dir or args.dataset_name):
            raise ArgumentError(
                f"--stage {args.stage} needs --train_data_dir (a {STAGE_DATA_KIND[args.stage]} "
                "folder)" + (" or --dataset_name" if args.stage == 1 else "")
            )
        if args.train_data_dir and not Path(args.train_data_dir).is_dir():
            raise ArgumentError(f"--train_data_dir {args.train_data_dir!r} is not a folder")
    check_flags(
        args,
        validation.check_integer,
        (
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "num_validation_images",
        ),
        minimum=1,
    )
    optional_counts = ("checkpointing_steps", "checkpoints_total_limit", "validation_steps", "lora_rank")
    check_flags(args, validation.check_integer, optional_counts, minimum=1)
    check_flags(args, validation.check_integer, ("lr_warmup_steps", "num_workers"), minimum=0)
    positive = ("learning_rate", "lora_alpha", "adam_epsilon")
    check_flags(args, validation.check_number, positive, minimum=0, exclusive_minimum=True)
    non_negative = (
        "max_grad_norm",
        "adam_weight_decay",
        "text_loss_weight",
        "distill_weight",
        "min_learning_rate",
        "noise_level_min",
        "noise_level_max",
    )
    check_flags(args, validation.check_number, non_negative, minimum=0)
    check_flags(args, validation.check_number, ("caption_dropout",), minimum=0, maximum=1)
    check_flags(
        args, validation.check_number, ("adam_beta1", "adam_beta2"), minimum=0, maximum=1, exclusive_maximum=True
    )
    check_flags(
        args,
        validation.check_number,
        ("ema_decay",),
        minimum=0,
        maximum=1,
        exclusive_minimum=True,
        exclusive_maximum=True,
    )
    if args.min_learning_rate > args.learning_rate:
        raise ArgumentError(
            f"--min_learning_rate ({args.min_learning_rate}) must be <= --learning_rate ({args.learning_rate})"
        )
    if args.lora_rank is None:
        for flag in ("lora_alpha", "lora_target_modules", "lora_vlm", "save_fused"):
            if getattr(args, flag) not in (None, False):
                raise ArgumentError(f"--{flag} needs --rank (--lora_rank)")
    if args.distill_from_vlm_vision and args.stage != 2:
        raise ArgumentError(
            f"--distill_from_vlm_vision is for stage 2 (the adapter learns understanding); got --stage {args.stage}"
        )
    if args.validation_prompts is not None and not all(p.strip() for p in args.validation_prompts):
        raise ArgumentError(f"--validation_prompt must be non-empty text; got {args.validation_prompts!r}")
    if args.validation_prompts and args.stage == 2:
        raise ArgumentError("--validation_prompt samples images; stage 2 does not train image generation")
    if args.validation_steps is not None and not args.validation_prompts:
        raise ArgumentError("--validation_steps needs --validation_prompt")
    if args.hub_model_id is not None and not args.push_to_hub:
        raise ArgumentError(f"--hub_model_id {args.hub_model_id!r} needs --push_to_hub")
    if args.hub_model_id is not None and not re.fullmatch(r"([\w.-]+/)?[\w.-]+", args.hub_model_id):
        raise ArgumentError(f"--hub_model_id {args.hub_model_id!r} is not a repository id ('name' or 'owner/name')")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise ArgumentError(
            "--hub_token with --report_to wandb would expose the token to wandb's run logs; log in "
            "with `hf auth login` instead"
        )
    if args.report_to != "none":
        import importlib.util

        needed = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ()}[args.report_to]
        for package in needed:
            if importlib.util.find_spec(package) is None:
                raise ArgumentError(
                    f"--report_to {args.report_to} needs the {package} package "
                    f"(pip install {package}); accepted: none, tensorboard, wandb, all"
                )


# ----------------------------------------------------------------------------------------------------------------
# Data: a step-indexed stream of samples
# ----------------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, position: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for one sample (or one batch: ``stream`` separates uses)."""
    return int(np.random.SeedSequence([seed, position, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SampleStream(Sampler):
    """Keys ``(position, dataset name, index)`` for positions ``0 .. total-1``, a fixed function of ``seed``.

    One dataset: epochs of seeded permutations.  A mixture: :meth:`MixtureSampler.indices` (weighted, reshuffled
    per pass).  Every prefix is the same for any ``total``, so a run can be continued with more steps.  The
    DataLoader iterates the sampler in the main process; accelerate shards its batches over processes.
    """

    def __init__(self, total: int, seed: int, sizes: Dict[str, int], mixture_sampler: Optional[MixtureSampler] = None):
        self.total, self.seed, self.sizes, self.mixture = total, seed, sizes, mixture_sampler

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        if self.mixture is not None:
            stream = self.mixture.indices()
            for position in range(self.total):
                name, index = next(stream)
                yield position, name, index
            return
        ((name, size),) = self.sizes.items()
        order = None
        for position in range(self.total):
            epoch, k = divmod(position, size)
            if k == 0:
                order = np.random.default_rng([self.seed, epoch]).permutation(size)
            yield position, name, int(order[k])


class ExampleReader(Dataset):
    """``(position, name, index)`` -> the example of ``datasets[name]`` with images as ``(3, H, W)`` tensors in
    [-1, 1] (the pipelines' image processor, resized to the model's image size)."""

    def __init__(self, datasets: Dict[str, Dataset], image_processor, image_size: int):
        self.datasets, self.image_processor, self.image_size = datasets, image_processor, image_size

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())

    def to_tensor(self, image) -> torch.Tensor:
        return self.image_processor.preprocess(image, height=self.image_size, width=self.image_size)[0]

    def __getitem__(self, key) -> dict:
        position, name, index = key
        ex = dict(self.datasets[name][index])
        for k in ("image", "source_image", "target_image"):
            if k in ex:
                ex[k] = self.to_tensor(ex[k])
        if "segments" in ex:
            ex["segments"] = [s if isinstance(s, str) else self.to_tensor(s) for s in ex["segments"]]
        ex.update(position=position, source=name)
        return ex


def collate_examples(examples: List[dict]) -> List[dict]:
    return examples


def conversation(example: dict, drop_text: bool, interleaved_layout: str):
    """The chat messages of an example (the pipelines' layouts), its images in sequence order, whether the flow
    loss scores each image, and whether the text loss applies.

    generation: user caption -> assistant image; understanding: user [image, prompt] -> assistant response;
    editing: user [source, instruction] -> assistant [target]; interleaved: segments (see ``--interleaved_layout``);
    chat editing: user prompt -> assistant [source] -> user instruction -> assistant [target] (:func:`chat_edit`).
    """
    from diffusers_starflow2.utils.sequence import user_message

    image_part = {"type": "image"}
    kind = example["kind"]
    if kind == "caption":
        text = "" if drop_text else example["text"]
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": [image_part]}]
        return messages, [example["image"]], [True], False
    if kind == "understanding":
        messages = [
            user_message(example["image"], example["prompt"]),
            {"role": "assistant", "content": example["response"]},
        ]
        return messages, [example["image"]], [False], True
    if kind == "edit":
        instruction = "" if drop_text else example["instruction"]
        messages = [user_message(example["source_image"], instruction), {"role": "assistant", "content": [image_part]}]
        return messages, [example["source_image"], example["target_image"]], [False, True], False
    if kind == "interleaved":
        segments = example["segments"]
        split = 1 if interleaved_layout == "user_first" and len(segments) > 1 else 0
        reply = [{"type": "text", "text": s} if isinstance(s, str) else image_part for s in segments[split:]]
        messages = ([user_message(*segments[:split])] if split else []) + [{"role": "assistant", "content": reply}]
        images = [s for s in segments if not isinstance(s, str)]
        scored = [i >= split for i, s in enumerate(segments) if not isinstance(s, str)]  # assistant images only
        return messages, images, scored, True
    if kind == "chat_edit":
        return chat_edit(example, drop_text)
    raise ValueError(f"unknown example kind {kind!r}")


def chat_edit(example: dict, drop_text: bool):
    """An edit inside a chat, laid out as :class:`StarFlow2InterleavedPipeline` lays out a continued conversation
    (``pipe([prompt, "<image>"])`` then ``pipe([instruction, "<image>"], state=...)`` renders the same tokens).

    Only the target is scored: the source stands for the image the assistant drew in the earlier turn, in context.
    Dropping the text empties both user turns, which is the unconditional branch of a chat's guidance: there the
    earlier answer stays in context and only the requests are gone."""
    prompt, instruction = ("", "") if drop_text else (example["prompt"], example["instruction"])
    image_part = {"type": "image"}
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": [image_part]},
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": [image_part]},
    ]
    return messages, [example["source_image"], example["target_image"]], [False, True], False


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


class BatchBuilder:
    """Examples -> the keyword arguments of :meth:`PretzelModel.forward` (right-padded layouts, noisy FAE latents)."""

    def __init__(self, args, tokenizer, vae, scheduler, num_latents: int, weight_dtype: torch.dtype, teacher=None):
        self.args, self.tokenizer, self.vae, self.scheduler = args, tokenizer, vae, scheduler
        self.num_latents, self.weight_dtype = num_latents, weight_dtype
        self.use_flow, self.use_text = args.stage in (1, 3), args.stage in (2, 3)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.teacher = teacher  # the VLM with its own vision tower (--distill_from_vlm_vision)
        if teacher is not None:
            from transformers import Qwen2VLImageProcessorPil

            vision = teacher.config.vision_config
            factor = vision.patch_size * vision.spatial_merge_size
            # keep the training image size (the processor's default minimum would upsample small images)
            self.teacher_processor = Qwen2VLImageProcessorPil(
                patch_size=vision.patch_size,
                temporal_patch_size=vision.temporal_patch_size,
                merge_size=vision.spatial_merge_size,
                size={"shortest_edge": factor * factor, "longest_edge": 16384 * factor * factor},
            )

    def noise_levels(self, generators: List[torch.Generator]) -> torch.Tensor:
        t = self.scheduler.sample_noise_levels(len(generators), generator=generators)  # U[t0, t1]
        if self.args.image_loss_reweight == "inverse":  # density ∝ 1/t: t = t0 (t1/t0)^u
            t0, t1 = self.scheduler.config.min_noise_level, self.scheduler.config.max_noise_level
            u = (t - t0) / (t1 - t0) if t1 > t0 else torch.zeros_like(t)
            t = t0 * (t1 / t0) ** u
        return t

    @torch.no_grad()
    def __call__(self, examples: List[dict], device) -> dict:
        from diffusers_starflow2.utils.sequence import encode_conversation, pad_layouts

        args, N = self.args, self.num_latents
        gens = [torch.Generator().manual_seed(sample_seed(args.seed, ex["position"])) for ex in examples]
        layouts, images, scored, owners, text_on = [], [], [], [], []
        for b, (ex, g) in enumerate(zip(examples, gens)):
            drop = bool(torch.rand((), generator=g) < args.caption_dropout)
            messages, ims, sc, txt = conversation(ex, drop, args.interleaved_layout)
            layout = encode_conversation(self.tokenizer, messages, N)
            if sum(layout.latent_mask) != len(ims) * N:
                raise ValueError(
                    f"the chat template rendered {sum(layout.latent_mask) // N} image spans for "
                    f"{len(ims)} images ({ex['kind']} example {ex['source']}[{ex['position']}])"
                )
            layouts.append(layout)
            images += ims
            scored += [s and self.use_flow for s in sc]
            owners += [b] * len(ims)
            text_on.append(txt and self.use_text)
        ids, latent_mask, attention_mask, assistant = pad_layouts(layouts, self.pad_id, side="right")

        # text targets: assistant tokens that follow a text position (<|vision_end|> after a latent is forced)
        text_mask = assistant & ~latent_mask
        text_mask[:, 1:] &= ~latent_mask[:, :-1]
        text_mask &= torch.tensor(text_on)[:, None]

        t = self.noise_levels(gens)  # (B,)
        owner_index = torch.tensor(owners, dtype=torch.long)
        extra = {}
        if self.args.image_loss_reweight == "linear":  # iTARFlow's --reweight t: the loss of each image times its t
            extra["image_loss_weight"] = t[owner_index].to(device)
        if self.teacher is not None:
            extra["teacher_logits"] = self.teacher_logits(examples, images, text_mask, device)
        pixels = torch.stack(images).to(device=device, dtype=self.weight_dtype)
        batch_gen = torch.Generator().manual_seed(sample_seed(args.seed, examples[0]["position"], stream=1))
        latents = self.vae.encode_latents(pixels, generator=batch_gen, sample=args.latent_sample == "sample").float()
        eps = torch.stack([torch.randn(latents.shape[1:], generator=gens[b]) for b in owners]).to(device)
        noisy = self.scheduler.add_noise(latents, eps, t.to(device)[owner_index.to(device)])
        return dict(
            input_ids=ids.to(device),
            latent_mask=latent_mask.to(device),
            images=noisy,
            noise_level=t.to(device),
            attention_mask=attention_mask.to(device),
            image_loss_mask=torch.tensor(scored, dtype=torch.bool, device=device),
            text_loss_mask=text_mask.to(device) if self.use_text else None,
            **extra,
        )

    def teacher_logits(self, examples: List[dict], images: List[torch.Tensor], text_mask: torch.Tensor, device):
        """``(P, V)`` logits of the VLM seeing each image through its own vision tower, at the positions the text
        loss scores (the same tokens, in the same order, as the student's: only the image spans differ in length)."""
        from diffusers_starflow2.utils.sequence import encode_conversation, pad_layouts

        pixels = [((im.float() + 1) / 2).clamp(0, 1) for im in images]
        vision = self.teacher_processor(images=pixels, do_rescale=False, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = self.teacher.config.vision_config.spatial_merge_size
        tokens = (grid.prod(-1) // merge**2).tolist()
        if len(set(tokens)) != 1 or len(images) != len(examples):
            raise ValueError("--distill_from_vlm_vision: one image per understanding example of one size expected")
        layouts = [
            encode_conversation(self.tokenizer, conversation(ex, False, self.args.interleaved_layout)[0], tokens[0])
            for ex in examples
        ]
        ids, latent_mask, attention_mask, assistant = pad_layouts(layouts, self.pad_id, side="right")
        teacher_mask = assistant & ~latent_mask
        teacher_mask[:, 1:] &= ~latent_mask[:, :-1]
        selected = teacher_mask[:, 1:]
        if int(selected.sum()) != int(text_mask[:, 1:].sum()):
            raise ValueError("--distill_from_vlm_vision: the teacher and the student score different tokens")
        logits = self.teacher(
            input_ids=ids.to(device),
            attention_mask=attention_mask.long().to(device),
            pixel_values=vision["pixel_values"].to(device, self.weight_dtype),
            image_grid_thw=grid.to(device),
        ).logits
        return logits[:, :-1][selected.to(device)].float()


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


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------


def default_lora_targets(transformer: nn.Module, stage: int) -> List[str]:
    """Full module names of the default LoRA targets of a stage (see ``--lora_target_modules``)."""
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        deep = name.startswith("deep.layers.") and name.rsplit(".", 1)[-1] in DEEP_LORA_LINEARS
        adapter = name.startswith("adapter.")
        skip = name in ("skip_v", "skip_t")
        if (stage == 1 and deep) or (stage == 2 and adapter) or (stage == 3 and (deep or adapter or skip)):
            names.append(name)
    return names


def vlm_lora_targets(vlm: nn.Module) -> List[str]:
    """Full names of the attention projections of the VLM's language model (never its vision tower)."""
    decoder = {id(m) for m in vlm.get_decoder().modules()}
    return [n for n, m in vlm.named_modules() if id(m) in decoder and n.rsplit(".", 1)[-1] in VLM_LORA_LINEARS]


def configure_trainable(args, transformer, vlm) -> None:
    """Freeze everything, then unfreeze the stage's groups or add the LoRA adapters."""
    from peft import LoraConfig

    for model in (transformer, vlm):
        model.requires_grad_(False)
    if args.lora_rank is None:
        for group in STAGE_GROUPS[args.stage]:
            getattr(transformer, group).requires_grad_(True)
        return
    alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_rank
    if args.lora_target_modules:
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
        names = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()} | {
            n for n, _ in transformer.named_modules()
        }
        unknown = [t for t in targets if t not in names]
        if unknown or not targets:
            raise ArgumentError(f"--lora_target_modules: no module of the Pretzel is called {unknown or targets}")
    else:
        targets = default_lora_targets(transformer, args.stage)
    transformer.add_adapter(
        LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    )
    if args.lora_vlm:
        vlm.add_adapter(
            LoraConfig(
                r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=vlm_lora_targets(vlm)
            )
        )


def trainable_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


# what accelerate's save_state writes for this script's one model, optimizer and LR scheduler (process 0's RNG states)
CHECKPOINT_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")
CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the ``checkpoint-N`` folder ``path`` cannot be resumed, naming the file, or None when it is complete.

    Reads only headers: ``training_state.json`` (written last) parses to a state with its ``global_step``, the
    weights and the other files accelerate writes are there, every safetensors file's header matches its length,
    and every torch-saved ``.bin`` is a whole zip archive (a truncated one has lost its directory)."""
    import zipfile

    from safetensors import safe_open

    state_file = path / "training_state.json"
    if not state_file.is_file():
        return "no training_state.json: empty, or written by a killed run"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"training_state.json is not valid JSON ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "training_state.json holds no integer 'global_step'"
    if not any((path / name).is_file() for name in CHECKPOINT_WEIGHTS):
        return f"the model weights are missing ({' or '.join(CHECKPOINT_WEIGHTS)})"
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    if "ema" in state and not (path / EMA_WEIGHT_NAME).is_file():
        return f"{EMA_WEIGHT_NAME} is missing"
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix == ".bin":
                with zipfile.ZipFile(file):
                    pass
        except Exception as e:  # safetensors raises its own error type; a torch file is refused as a bad zip
            return (
                f"{file.name} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            )
    return None


def list_checkpoints(output_dir: Path, warn: bool = True) -> List[Path]:
    """The complete ``checkpoint-N`` folders of a run (:func:`checkpoint_problem`), oldest first; incomplete ones
    are skipped, with a warning."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        if not (path.is_dir() and CHECKPOINT_RE.search(path.name)):
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            found.append(path)
        elif warn:
            logger.warning(f"skipping {path}: not a complete checkpoint ({problem})")
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.search(p.name).group(1)))


def resolve_checkpoint(args) -> Optional[Path]:
    """The complete checkpoint folder of ``--resume_from_checkpoint``: a ``checkpoint-N`` folder or its name in
    ``--output_dir``, refused with the file at fault when incomplete; for ``latest`` the newest complete one (newer
    incomplete ones are skipped with a warning), ``None`` when the run has no checkpoint at all.  A run whose
    checkpoints are all incomplete is refused: starting it anew would write over them."""
    flag = f"--resume_from_checkpoint {args.resume_from_checkpoint!r}"
    if args.resume_from_checkpoint == "latest":
        output_dir = Path(args.output_dir)
        found = list_checkpoints(output_dir)
        if found:
            return found[-1]
        broken = sorted(
            (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_RE.search(p.name)),
            key=lambda p: int(CHECKPOINT_RE.search(p.name).group(1)),
        )
        if broken:
            raise ArgumentError(
                f"{flag}: no complete checkpoint in {str(output_dir)!r}; the newest, {str(broken[-1])!r}, is not "
                f"complete ({checkpoint_problem(broken[-1])}): resume from a complete copy or move it away"
            )
        return None
    for path in (Path(args.resume_from_checkpoint), Path(args.output_dir) / args.resume_from_checkpoint):
        if path.is_dir():
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ArgumentError(f"{flag}: {str(path)!r} is not a complete checkpoint ({problem})")
            return path
    raise ArgumentError(
        f"{flag}: no such checkpoint folder (accepted: a checkpoint-N folder, its name inside --output_dir, or "
        "'latest')"
    )


def lora_layers(args, trainer: "PretzelTrainer", state_dict: Optional[dict] = None) -> dict:
    """The keyword arguments of ``save_lora_weights`` for the trained adapters (fp32, on the CPU)."""
    from peft import get_peft_model_state_dict

    part = (
        lambda prefix: (
            None
            if state_dict is None
            else {  # noqa: E731
                k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)
            }
        )
    )
    layers = {
        "transformer_lora_layers": get_peft_model_state_dict(trainer.transformer, state_dict=part("transformer.")),
        "transformer_lora_adapter_metadata": trainer.transformer.peft_config["default"].to_dict(),
    }
    if args.lora_vlm:
        layers.update(
            vlm_lora_layers=get_peft_model_state_dict(trainer.vlm, state_dict=part("vlm.")),
            vlm_lora_adapter_metadata=trainer.vlm.peft_config["default"].to_dict(),
        )
    return {
        k: ({n: t.detach().float().cpu().contiguous() for n, t in v.items()} if k.endswith("_layers") else v)
        for k, v in layers.items()
    }


def write_lora_file(args, trainer: "PretzelTrainer", folder: Path, state_dict: Optional[dict] = None) -> None:
    """``folder/pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights(folder)``."""
    from diffusers_starflow2.loaders import StarFlow2LoraLoaderMixin

    with publish_into(folder, last=LORA_WEIGHT_NAME) as staging:
        StarFlow2LoraLoaderMixin.save_lora_weights(staging, **lora_layers(args, trainer, state_dict))


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def open_data(args):
    """``{name: dataset}`` and the mixture sampler (stage 3) of the run."""
    if args.stage == 3:
        try:
            sampler = mixture(args.mixture, seed=args.seed)
        except ValueError as e:
            raise ArgumentError(f"--mixture: {e}") from None
        return sampler.datasets, sampler
    kind = STAGE_DATA_KIND[args.stage]
    if args.dataset_name:
        try:
            return {
                kind: open_hub_caption_dataset(
                    args.dataset_name, args.dataset_config_name, args.image_column, args.caption_column, args.cache_dir
                )
            }, None
        except (ValueError, FileNotFoundError) as e:
            message = str(e) if str(e).startswith("--") else f"--dataset_name {args.dataset_name!r}: {e}"
            raise ArgumentError(message) from None
    try:
        return {kind: open_dataset(args.train_data_dir, kind)}, None
    except ValueError as e:
        raise ArgumentError(
            f"--train_data_dir {args.train_data_dir!r} (stage {args.stage} reads {kind} rows): {e}"
        ) from None


def check_texts(args, datasets: Dict[str, Dataset], tokenizer) -> None:
    """Every text of the training data as the model will see it (adjacent text segments joined) and every
    ``--validation_prompt`` get the pipelines' special-token check
    (:func:`~diffusers_starflow2.utils.validation.check_special_tokens`), before anything trains: a caption holding
    ``<|im_end|>`` would train the model on a control token the pipelines refuse."""
    source = (
        "--mixture: " if args.stage == 3 else "" if args.dataset_name else f"--train_data_dir {args.train_data_dir!r}: "
    )
    for dataset in datasets.values():
        for where, key, pieces in dataset.texts():
            try:
                validation.check_special_tokens(pieces, key, tokenizer)
            except ValueError as e:
                raise ArgumentError(f"{source}{where}: {e}") from None
    for prompt in args.validation_prompts or []:
        try:
            validation.check_special_tokens(prompt, "--validation_prompt", tokenizer)
        except ValueError as e:
            raise ArgumentError(str(e)) from None


def vision_teacher(args, vlm):
    """The VLM as its own teacher for ``--distill_from_vlm_vision``, or ``None`` (with a warning) without a vision
    tower."""
    if not args.distill_from_vlm_vision:
        return None
    if getattr(getattr(vlm, "model", None), "visual", None) is None:
        logger.warning(
            f"--distill_from_vlm_vision: the VLM ({type(vlm).__name__}) has no vision tower; training "
            "stage 2 without distillation"
        )
        return None
    return vlm


def make_lr_scheduler(args, optimizer, num_processes: int):
    # accelerate steps a prepared scheduler once per process and step: the horizon counts every process
    warmup, total = args.lr_warmup_steps * num_processes, args.max_train_steps * num_processes
    if args.lr_scheduler == "cosine_with_min_lr":
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr=args.min_learning_rate)
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def trim_log(log_path: Path, last_step: int) -> None:
    """Keep the rows of ``train_log.jsonl`` up to ``last_step``: a resumed run rewrites what came after."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # the torn last line of a killed run
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
    write_text_atomic(log_path, "".join(line + "\n" for line in kept))


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


def main(args: argparse.Namespace) -> dict:
    """Train; returns ``{"global_step", "history": [per-step logs], "output_dir"}``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.training_utils import EMAModel, cast_training_params
    from tqdm.auto import tqdm

    from diffusers_starflow2 import StarFlow2Pipeline, TarFlowScheduler

    check_args(args)
    # before anything is written: a missing or incomplete checkpoint is refused with the run's files untouched
    resume_path = resolve_checkpoint(args) if args.resume_from_checkpoint else None
    if args.stage == 3:  # fail on a bad spec before loading any model
        try:
            entries = parse_mixture(args.mixture)
        except ValueError as e:
            raise ArgumentError(str(e)) from None
        for entry in entries:
            if not Path(entry.path).is_dir():
                raise ArgumentError(f"--mixture: folder {entry.path!r} of {entry.name!r} does not exist")
    output_dir = Path(args.output_dir)
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
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_repo(repo_id=args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id

    # -- components ---------------------------------------------------------------------------------------------
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

    # -- data: a fixed stream of samples, sharded over processes by accelerate ------------------------------------
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

    # -- resume ---------------------------------------------------------------------------------------------------
    run_signature = dict(
        stage=args.stage,
        seed=args.seed,
        train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
        lora_rank=args.lora_rank,
        lora_vlm=args.lora_vlm,
        use_ema=args.use_ema,
    )
    global_step = 0
    if args.resume_from_checkpoint:
        path = resume_path
        if path is None:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run")
        else:
            state = json.loads((path / "training_state.json").read_text())
            mismatch = {k: (state.get(k), v) for k, v in run_signature.items() if state.get(k) != v}
            if mismatch:
                raise ArgumentError(
                    f"--resume_from_checkpoint {str(path)!r} was written by a different setup "
                    f"(checkpoint vs now): {mismatch}"
                )
            try:
                accelerator.load_state(str(path))
                if ema is not None:
                    load_ema(ema, path, state)
            except ArgumentError:
                raise
            except Exception as e:  # a file whose header was whole but whose data is not, or another model's
                first = str(e).splitlines()[0] if str(e) else ""
                raise ArgumentError(
                    f"--resume_from_checkpoint {str(path)!r} cannot be loaded ({type(e).__name__}: {first})"
                ) from None
            global_step = state["global_step"]
            logger.info(f"resumed from {path} at step {global_step}")
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

    def validate(step: int, tag: str) -> List[Path]:
        # the EMA weights stand in for the trained ones while sampling
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        try:
            return log_validation(args, pipe, accelerator, step, output_dir, tag)
        finally:
            if ema is not None:
                ema.restore(params)

    # -- loop -----------------------------------------------------------------------------------------------------
    history: List[dict] = []
    batches = (
        accelerator.skip_first_batches(dataloader, global_step * args.gradient_accumulation_steps)
        if global_step
        else dataloader
    )
    progress = tqdm(
        total=args.max_train_steps,
        initial=global_step,
        desc=f"stage {args.stage}",
        disable=not accelerator.is_local_main_process,
    )
    # loss, micro-batches, bits/dim sum, scored images, text CE sum, batches with text, distillation KL sum
    sums = torch.zeros(7, dtype=torch.float64, device=accelerator.device)
    text_weight = args.text_loss_weight if args.stage == 3 else 1.0
    for examples in batches if global_step < args.max_train_steps else ():
        with accelerator.accumulate(trainer):
            inputs = build_batch(examples, accelerator.device)
            out = trainer(**inputs, text_loss_weight=text_weight, distill_weight=args.distill_weight)
            accelerator.backward(out["loss"])
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        scored = inputs["image_loss_mask"]
        has_text = inputs["text_loss_mask"] is not None and bool(inputs["text_loss_mask"][:, 1:].any())
        sums += torch.tensor(
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
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(params)
        total_sums = accelerator.reduce(sums, reduction="sum").tolist()
        sums.zero_()
        logs = {"step": global_step, "loss": total_sums[0] / total_sums[1], "lr": lr_scheduler.get_last_lr()[0]}
        if total_sums[3]:
            logs["bits_per_dim"] = total_sums[2] / total_sums[3]
        if total_sums[5]:
            logs["text_ce"] = total_sums[4] / total_sums[5]
            if build_batch.teacher is not None:
                logs["distill_kl"] = total_sums[6] / total_sums[5]
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
            save_checkpoint(accelerator, args, trainer, ema, output_dir, global_step, run_signature)
        if (
            args.validation_steps
            and global_step % args.validation_steps == 0
            and global_step < args.max_train_steps
            and accelerator.is_main_process
        ):
            validate(global_step, f"step-{global_step}")
        if global_step >= args.max_train_steps:
            break
    progress.close()

    # -- final weights --------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # the final save (and the final validation) hold the EMA weights
    state_dict = accelerator.get_state_dict(trainer)  # gathered on every backend (DDP, FSDP, DeepSpeed)
    if accelerator.is_main_process:
        save_final(args, accelerator.unwrap_model(trainer), state_dict, scheduler, output_dir)
        images = (
            log_validation(args, pipe, accelerator, global_step, output_dir, "final") if args.validation_prompts else []
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


def save_checkpoint(accelerator, args, trainer, ema, output_dir: Path, step: int, run_signature: dict) -> None:
    """``accelerator.save_state`` (model, optimizer, LR scheduler, every process's RNG states) into
    ``checkpoint-{step}``, written to a temporary folder first; LoRA runs add ``pytorch_lora_weights.safetensors``
    so that ``pipe.load_lora_weights(checkpoint)`` works, EMA runs ``ema.safetensors``."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    state_dict = accelerator.get_state_dict(trainer) if args.lora_rank is not None else None
    accelerator.wait_for_everyone()  # every process has written its RNG states
    if accelerator.is_main_process:
        if args.lora_rank is not None:
            write_lora_file(args, accelerator.unwrap_model(trainer), tmp, state_dict)
        extra = {}
        if ema is not None:
            extra["ema"] = save_ema(ema, tmp)
        write_json_atomic(tmp / "training_state.json", {"global_step": step, **run_signature, **extra})
        replace_path(tmp, final)
        if args.checkpoints_total_limit:
            for old in list_checkpoints(output_dir, warn=False)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def save_ema(ema, folder: Path) -> dict:
    """The EMA's weights as safetensors (accelerate would pickle a registered object); returns its other state."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(folder / EMA_WEIGHT_NAME))
    return state


def load_ema(ema, folder: Path, training_state: dict) -> None:
    from safetensors.torch import load_file

    if "ema" not in training_state or not (folder / EMA_WEIGHT_NAME).is_file():
        raise ArgumentError(f"--resume_from_checkpoint {str(folder)!r} holds no EMA state ({EMA_WEIGHT_NAME})")
    shadow = load_file(str(folder / EMA_WEIGHT_NAME))
    device = ema.shadow_params[0].device
    ema.load_state_dict(
        {**training_state["ema"], "shadow_params": [shadow[str(i)].to(device) for i in range(len(shadow))]}
    )


def save_final(args, trainer: PretzelTrainer, state_dict: dict, scheduler, output_dir: Path) -> None:
    """Full runs: the pipeline folder (frozen components reloaded from the source folder, so they are bit-exact).
    LoRA runs: ``pytorch_lora_weights.safetensors`` (+ a fused pipeline with ``--save_fused``)."""
    from diffusers_starflow2 import PretzelModel, StarFlow2Pipeline
    from diffusers_starflow2.loaders import StarFlow2LoraLoaderMixin

    write_json_atomic(output_dir / "training_args.json", vars(args))
    if args.lora_rank is None:
        transformer_state = {k[len("transformer.") :]: v for k, v in state_dict.items() if k.startswith("transformer.")}
        transformer = PretzelModel.from_config(trainer.transformer.config)
        transformer.load_state_dict({k: v.float() for k, v in transformer_state.items()})
        pipe = StarFlow2Pipeline.from_pretrained(
            args.pretrained_model_name_or_path, transformer=transformer, scheduler=scheduler
        )
        save_pipeline_into(pipe, output_dir)
        logger.info(f"saved the pipeline to {output_dir}")
        return

    write_lora_file(args, trainer, output_dir, state_dict)
    logger.info(f"saved {output_dir / LORA_WEIGHT_NAME}")
    if args.save_fused:
        from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora

        pipe = StarFlow2Pipeline.from_pretrained(args.pretrained_model_name_or_path, scheduler=scheduler)
        lora, metadata = StarFlow2LoraLoaderMixin.lora_state_dict(str(output_dir), return_lora_metadata=True)
        StarFlow2LoraLoaderMixin.load_lora_into_transformer(
            lora, pipe.transformer, adapter_name="trained", metadata=metadata
        )
        pipe.transformer.fuse_lora()
        pipe.transformer.unload_lora()
        if args.lora_vlm:
            StarFlow2LoraLoaderMixin.load_lora_into_vlm(lora, pipe.vlm, adapter_name="trained", metadata=metadata)
            fuse_text_encoder_lora(pipe.vlm)
            _remove_text_encoder_monkey_patch(pipe.vlm)
        save_pipeline_into(pipe, output_dir)
        logger.info(f"saved the fused pipeline to {output_dir}")


def save_pipeline_into(pipe, output_dir: Path) -> None:
    """``pipe.save_pretrained`` into the run folder (next to its checkpoints and logs), ``model_index.json`` last."""
    with publish_into(output_dir, last="model_index.json") as staging:
        pipe.save_pretrained(staging, safe_serialization=True)


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

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The command line of ``training/train_starflow2.py``: :func:`parse_args` (argparse, the ``--recipe`` presets) and
:func:`check_args`, which refuses a bad flag with an :class:`ArgumentError` naming it before any model is loaded."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional, Sequence

from ..utils import validation
from ..utils.hub import pipeline_source
from .data import parse_mixture

# The data each of stages 1 and 2 reads from --train_data_dir (stage 3 reads --mixture).
STAGE_DATA_KIND = {1: "caption", 2: "understanding"}

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
    p = argparse.ArgumentParser(
        description="Train STARFlow2 (paper §3.3) with accelerate.", formatter_class=argparse.RawTextHelpFormatter
    )
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


def check_mixture(args: argparse.Namespace) -> None:
    """Stage 3: a malformed ``--mixture`` or a folder of it that does not exist, refused before any model loads."""
    if args.stage != 3:
        return
    try:
        entries = parse_mixture(args.mixture)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    for entry in entries:
        if not Path(entry.path).is_dir():
            raise ArgumentError(f"--mixture: folder {entry.path!r} of {entry.name!r} does not exist")

#!/usr/bin/env python
# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Train STARFlow2 (paper §3.3) with accelerate.

Stage 1  text -> image: shallow + deep flow and the noise embedding learn the NLL of generated images; the VLM,
         the FAE, the visual adapter and the (zero) skip projections stay frozen.
Stage 2  image -> text: only the visual adapter learns, from the next-token loss of assistant responses through the
         frozen VLM.
Stage 3  everything of the Pretzel (flows, noise embedding, adapter, skips) on a weighted mixture of understanding,
         generation, editing and interleaved data with ``L = L_flow + λ·L_text``.

Run it on one process (``python training/train_starflow2.py ...``) or on many with ``accelerate launch`` (DDP, FSDP,
DeepSpeed: whatever the accelerate config says)::

    accelerate launch training/train_starflow2.py --stage 1 --pretrained_model_name_or_path PIPE \\
        --train_data_dir world/caption --output_dir runs/stage1 --max_train_steps 10000 --train_batch_size 16

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
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import MixtureSampler, mixture, open_dataset, parse_mixture

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
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="a STARFlow2 pipeline folder")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--train_data_dir", help="stage 1: caption folder, stage 2: understanding folder (metadata.jsonl)")
    p.add_argument("--mixture", help='stage 3: "understanding=DIR:0.3,generation=DIR:0.4,editing=DIR:0.2,'
                                     'interleaved=DIR:0.1"')
    p.add_argument("--interleaved_layout", choices=("user_first", "assistant"), default="user_first",
                   help="interleaved documents: first segment as the user turn and the rest as the assistant turn "
                        "(default), or the whole document as one assistant turn")
    p.add_argument("--max_train_steps", type=int, required=True)
    p.add_argument("--train_batch_size", type=int, default=4, help="per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", default="constant", help="a diffusers get_scheduler name")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--noise_level_min", type=float, default=None, help="t0 (default: the scheduler's)")
    p.add_argument("--noise_level_max", type=float, default=None, help="t1 (default: the scheduler's)")
    p.add_argument("--image_loss_reweight", nargs="?", const="inverse", default="none", choices=("none", "inverse"),
                   help="'inverse' weights the per-image NLL by 1/t (normalised): t is drawn with density ∝ 1/t on "
                        "[t0, t1], which is that weighting of the uniform-t objective in expectation")
    p.add_argument("--latent_sample", choices=("sample", "mean"), default="sample",
                   help="FAE latents: a posterior sample (default) or the posterior mean")
    p.add_argument("--caption_dropout", type=float, default=0.1, help="probability of replacing a caption or edit "
                                                                        "instruction by '' (classifier-free guidance)")
    p.add_argument("--text_loss_weight", type=float, default=1.0, help="λ of stage 3")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--report_to", choices=("none", "tensorboard"), default="none")
    p.add_argument("--checkpointing_steps", type=int, default=None)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    p.add_argument("--lora_rank", type=int, default=None, help="train a LoRA of this rank instead of full weights")
    p.add_argument("--lora_alpha", type=float, default=None, help="default: the rank")
    p.add_argument("--lora_target_modules", default=None,
                   help="comma-separated module names (suffixes) of the Pretzel; default: stage 1 the deep stream's "
                        "attention/MLP linears, stage 2 the adapter's linears, stage 3 both plus skip_v/skip_t")
    p.add_argument("--lora_vlm", action="store_true", help="also train a LoRA on the VLM's attention projections")
    p.add_argument("--save_fused", action="store_true", help="LoRA runs: also write a pipeline with fused weights")
    return p.parse_args(argv)


class ArgumentError(ValueError):
    """A bad command-line argument (the message names it)."""


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`ArgumentError` naming the offending argument."""
    pretrained = Path(args.pretrained_model_name_or_path)
    if not (pretrained / "model_index.json").is_file():
        raise ArgumentError(f"--pretrained_model_name_or_path {str(pretrained)!r} is not a pipeline folder "
                         "(no model_index.json)")
    if args.stage == 3:
        if not args.mixture:
            raise ArgumentError("--stage 3 needs --mixture 'understanding=DIR:w,generation=DIR:w,editing=DIR:w,"
                             "interleaved=DIR:w' (stage-3 training runs on a mixture)")
        if args.train_data_dir:
            raise ArgumentError("--train_data_dir is for stages 1 and 2; stage 3 reads --mixture")
    else:
        if args.mixture:
            raise ArgumentError(f"--mixture is for stage 3; stage {args.stage} reads --train_data_dir")
        if not args.train_data_dir:
            raise ArgumentError(f"--stage {args.stage} needs --train_data_dir (a {STAGE_DATA_KIND[args.stage]} folder)")
        if not Path(args.train_data_dir).is_dir():
            raise ArgumentError(f"--train_data_dir {args.train_data_dir!r} is not a folder")
    positive = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name} must be >= 1; got {getattr(args, name)}")
    for name in ("checkpointing_steps", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ArgumentError(f"--{name} must be >= 1; got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise ArgumentError(f"--learning_rate must be > 0; got {args.learning_rate}")
    if args.lr_warmup_steps < 0 or args.num_workers < 0 or args.max_grad_norm < 0:
        raise ArgumentError("--lr_warmup_steps, --num_workers and --max_grad_norm must be >= 0")
    if not 0 <= args.caption_dropout <= 1:
        raise ArgumentError(f"--caption_dropout must be in [0, 1]; got {args.caption_dropout}")
    if args.text_loss_weight < 0:
        raise ArgumentError(f"--text_loss_weight must be >= 0; got {args.text_loss_weight}")
    for name in ("noise_level_min", "noise_level_max"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            raise ArgumentError(f"--{name} must be >= 0; got {getattr(args, name)}")
    if args.lora_rank is not None and args.lora_rank <= 0:
        raise ArgumentError(f"--lora_rank must be a positive integer; got {args.lora_rank}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ArgumentError(f"--lora_alpha must be > 0; got {args.lora_alpha}")
    if args.lora_rank is None:
        for flag in ("lora_alpha", "lora_target_modules", "lora_vlm", "save_fused"):
            if getattr(args, flag) not in (None, False):
                raise ArgumentError(f"--{flag} needs --lora_rank")
    if args.report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ArgumentError("--report_to tensorboard needs the tensorboard package (pip install tensorboard)")
    if args.resume_from_checkpoint not in (None, "latest"):
        if resolve_checkpoint(args) is None:
            raise ArgumentError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: no such checkpoint folder")


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
        (name, size), = self.sizes.items()
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
    editing: user [source, instruction] -> assistant [target]; interleaved: segments (see ``--interleaved_layout``).
    """
    from diffusers_starflow2.utils.sequence import user_message

    image_part = {"type": "image"}
    kind = example["kind"]
    if kind == "caption":
        text = "" if drop_text else example["text"]
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": [image_part]}]
        return messages, [example["image"]], [True], False
    if kind == "understanding":
        messages = [user_message(example["image"], example["prompt"]),
                    {"role": "assistant", "content": example["response"]}]
        return messages, [example["image"]], [False], True
    if kind == "edit":
        instruction = "" if drop_text else example["instruction"]
        messages = [user_message(example["source_image"], instruction),
                    {"role": "assistant", "content": [image_part]}]
        return messages, [example["source_image"], example["target_image"]], [False, True], False
    if kind == "interleaved":
        segments = example["segments"]
        split = 1 if interleaved_layout == "user_first" and len(segments) > 1 else 0
        reply = [{"type": "text", "text": s} if isinstance(s, str) else image_part for s in segments[split:]]
        messages = ([user_message(*segments[:split])] if split else []) + [{"role": "assistant", "content": reply}]
        images = [s for s in segments if not isinstance(s, str)]
        scored = [i >= split for i, s in enumerate(segments) if not isinstance(s, str)]  # assistant images only
        return messages, images, scored, True
    raise ValueError(f"unknown example kind {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


class BatchBuilder:
    """Examples -> the keyword arguments of :meth:`PretzelModel.forward` (right-padded layouts, noisy FAE latents)."""

    def __init__(self, args, tokenizer, vae, scheduler, num_latents: int, weight_dtype: torch.dtype):
        self.args, self.tokenizer, self.vae, self.scheduler = args, tokenizer, vae, scheduler
        self.num_latents, self.weight_dtype = num_latents, weight_dtype
        self.use_flow, self.use_text = args.stage in (1, 3), args.stage in (2, 3)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

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
                raise ValueError(f"the chat template rendered {sum(layout.latent_mask) // N} image spans for "
                                 f"{len(ims)} images ({ex['kind']} example {ex['source']}[{ex['position']}])")
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
        pixels = torch.stack(images).to(device=device, dtype=self.weight_dtype)
        batch_gen = torch.Generator().manual_seed(sample_seed(args.seed, examples[0]["position"], stream=1))
        latents = self.vae.encode_latents(pixels, generator=batch_gen, sample=args.latent_sample == "sample").float()
        eps = torch.stack([torch.randn(latents.shape[1:], generator=gens[b]) for b in owners]).to(device)
        noisy = self.scheduler.add_noise(latents, eps, t.to(device)[torch.tensor(owners, device=device)])
        return dict(input_ids=ids.to(device), latent_mask=latent_mask.to(device), images=noisy,
                    noise_level=t.to(device), attention_mask=attention_mask.to(device),
                    image_loss_mask=torch.tensor(scored, dtype=torch.bool, device=device),
                    text_loss_mask=text_mask.to(device) if self.use_text else None)


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

    def forward(self, **inputs):
        from diffusers_starflow2.models.vlm_stream import VLMStream

        vlm = self._modules.get("vlm") or self.__dict__["frozen_vlm"]
        # a plain dict: accelerate's mixed-precision output conversion rebuilds mappings as type(out)({...}), which
        # PretzelOutput (all fields required) does not support
        return dict(self.transformer(VLMStream(vlm), **inputs))


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
        names = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()} | {n for n, _ in
                                                                                   transformer.named_modules()}
        unknown = [t for t in targets if t not in names]
        if unknown or not targets:
            raise ArgumentError(f"--lora_target_modules: no module of the Pretzel is called {unknown or targets}")
    else:
        targets = default_lora_targets(transformer, args.stage)
    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=targets))
    if args.lora_vlm:
        vlm.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                   target_modules=vlm_lora_targets(vlm)))


def trainable_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: Path) -> List[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_RE.search(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.search(p.name).group(1)))


def resolve_checkpoint(args) -> Optional[Path]:
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(Path(args.output_dir))
        return found[-1] if found else None
    for path in (Path(args.resume_from_checkpoint), Path(args.output_dir) / args.resume_from_checkpoint):
        if (path / "training_state.json").is_file():
            return path
    return None


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it (folders: rename the old one away first, then delete it)."""
    if dst.is_dir():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def save_pipeline_atomically(pipe, output_dir: Path) -> None:
    """``pipe.save_pretrained`` into a temporary folder next to ``output_dir``'s entries, then move the components
    in, ``model_index.json`` last (a folder is a loadable pipeline exactly when that file is present)."""
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline-", dir=output_dir))
    try:
        pipe.save_pretrained(tmp)
        (output_dir / "model_index.json").unlink(missing_ok=True)
        for entry in sorted(tmp.iterdir()):
            if entry.name != "model_index.json":
                replace_path(entry, output_dir / entry.name)
        os.replace(tmp / "model_index.json", output_dir / "model_index.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomically(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
    try:
        return {kind: open_dataset(args.train_data_dir, kind)}, None
    except ValueError as e:
        raise ArgumentError(f"--train_data_dir {args.train_data_dir!r} (stage {args.stage} reads {kind} rows): {e}") \
            from None


def main(args: argparse.Namespace) -> dict:
    """Train; returns ``{"global_step", "history": [per-step logs], "output_dir"}``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    from diffusers_starflow2 import StarFlow2Pipeline, TarFlowScheduler

    check_args(args)
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
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.stage == 3)])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    if accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        logger.warning("running ONE process although the launcher prepared a distributed run: `accelerate launch "
                       "--cpu --num_processes N` needs --mpirun_hostfile; for N CPU processes use "
                       "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`")

    # -- components ---------------------------------------------------------------------------------------------
    datasets, mixture_sampler = open_data(args)
    pipe = StarFlow2Pipeline.from_pretrained(args.pretrained_model_name_or_path)
    vlm, tokenizer, transformer, vae = pipe.vlm, pipe.tokenizer, pipe.transformer, pipe.vae
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

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    # -- data: a fixed stream of samples, sharded over processes by accelerate ------------------------------------
    image_size = transformer.config.sample_size * vae.config.out_patch_size
    reader = ExampleReader(datasets, VaeImageProcessor(vae_scale_factor=vae.config.out_patch_size), image_size)
    total = (args.max_train_steps * args.gradient_accumulation_steps * args.train_batch_size
             * accelerator.num_processes)
    stream = SampleStream(total, args.seed, {n: len(d) for n, d in datasets.items()}, mixture_sampler)
    dataloader = DataLoader(reader, batch_size=args.train_batch_size, sampler=stream, collate_fn=collate_examples,
                            num_workers=args.num_workers)
    trainer, optimizer, dataloader, lr_scheduler = accelerator.prepare(trainer, optimizer, dataloader, lr_scheduler)
    build_batch = BatchBuilder(args, tokenizer, vae, scheduler, transformer.num_latents, weight_dtype)

    # -- resume ---------------------------------------------------------------------------------------------------
    run_signature = dict(stage=args.stage, seed=args.seed, train_batch_size=args.train_batch_size,
                         gradient_accumulation_steps=args.gradient_accumulation_steps,
                         num_processes=accelerator.num_processes, lora_rank=args.lora_rank, lora_vlm=args.lora_vlm)
    global_step = 0
    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args)
        if path is None:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run")
        else:
            state = json.loads((path / "training_state.json").read_text())
            mismatch = {k: (state[k], v) for k, v in run_signature.items() if state.get(k) != v}
            if mismatch:
                raise ArgumentError(f"--resume_from_checkpoint {str(path)!r} was written by a different setup "
                                 f"(checkpoint vs now): {mismatch}")
            accelerator.load_state(str(path))
            global_step = state["global_step"]
            logger.info(f"resumed from {path} at step {global_step}")
    if args.report_to != "none":
        accelerator.init_trackers("starflow2", config={k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool))})

    # -- loop -----------------------------------------------------------------------------------------------------
    history: List[dict] = []
    log_path = output_dir / "train_log.jsonl"
    batches = accelerator.skip_first_batches(dataloader, global_step * args.gradient_accumulation_steps) \
        if global_step else dataloader
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc=f"stage {args.stage}",
                    disable=not accelerator.is_local_main_process)
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # loss, micro, bpd, images, text, n_text
    text_weight = args.text_loss_weight if args.stage == 3 else 1.0
    for examples in batches if global_step < args.max_train_steps else ():
        with accelerator.accumulate(trainer):
            inputs = build_batch(examples, accelerator.device)
            out = trainer(**inputs, text_loss_weight=text_weight)
            accelerator.backward(out["loss"])
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        scored = inputs["image_loss_mask"]
        has_text = inputs["text_loss_mask"] is not None and bool(inputs["text_loss_mask"][:, 1:].any())
        sums += torch.tensor([out["loss"].item(), 1, out["bits_per_dim"][scored].sum().item(), scored.sum().item(),
                              out["text_loss"].item() if has_text else 0.0, float(has_text)],
                             dtype=torch.float64, device=accelerator.device)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        total_sums = accelerator.reduce(sums, reduction="sum").tolist()
        sums.zero_()
        logs = {"step": global_step, "loss": total_sums[0] / total_sums[1], "lr": lr_scheduler.get_last_lr()[0]}
        if total_sums[3]:
            logs["bits_per_dim"] = total_sums[2] / total_sums[3]
        if total_sums[5]:
            logs["text_ce"] = total_sums[4] / total_sums[5]
        history.append(logs)
        progress.update(1)
        progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "step"})
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(logs) + "\n")
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                progress.write(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in logs.items()))
        if args.report_to != "none":
            accelerator.log({k: v for k, v in logs.items() if k != "step"}, step=global_step)
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args, output_dir, global_step, run_signature)
        if global_step >= args.max_train_steps:
            break
    progress.close()

    # -- final weights --------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(trainer)  # gathered on every backend (DDP, FSDP, DeepSpeed)
    if accelerator.is_main_process:
        save_final(args, accelerator.unwrap_model(trainer), state_dict, scheduler, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "history": history, "output_dir": str(output_dir)}


def save_checkpoint(accelerator, args, output_dir: Path, step: int, run_signature: dict) -> None:
    """``accelerator.save_state`` (model, optimizer, LR scheduler, every process's RNG states) into
    ``checkpoint-{step}``, written to a temporary folder first."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG states
    if accelerator.is_main_process:
        write_json_atomically(tmp / "training_state.json", {"global_step": step, **run_signature})
        replace_path(tmp, final)
        if args.checkpoints_total_limit:
            for old in list_checkpoints(output_dir)[:-args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def save_final(args, trainer: PretzelTrainer, state_dict: dict, scheduler, output_dir: Path) -> None:
    """Full runs: the pipeline folder (frozen components reloaded from the source folder, so they are bit-exact).
    LoRA runs: ``pytorch_lora_weights.safetensors`` (+ a fused pipeline with ``--save_fused``)."""
    from diffusers_starflow2 import PretzelModel, StarFlow2Pipeline
    from diffusers_starflow2.loaders import StarFlow2LoraLoaderMixin

    part = lambda prefix: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}  # noqa: E731
    transformer_state = part("transformer.")
    write_json_atomically(output_dir / "training_args.json", vars(args))
    if args.lora_rank is None:
        transformer = PretzelModel.from_config(trainer.transformer.config)
        transformer.load_state_dict({k: v.float() for k, v in transformer_state.items()})
        pipe = StarFlow2Pipeline.from_pretrained(args.pretrained_model_name_or_path, transformer=transformer,
                                                 scheduler=scheduler)
        save_pipeline_atomically(pipe, output_dir)
        logger.info(f"saved the pipeline to {output_dir}")
        return

    from peft import get_peft_model_state_dict

    layers = {"transformer_lora_layers": get_peft_model_state_dict(trainer.transformer, state_dict=transformer_state),
              "transformer_lora_adapter_metadata": trainer.transformer.peft_config["default"].to_dict()}
    if args.lora_vlm:
        layers.update(vlm_lora_layers=get_peft_model_state_dict(trainer.vlm, state_dict=part("vlm.")),
                      vlm_lora_adapter_metadata=trainer.vlm.peft_config["default"].to_dict())
    layers = {k: ({n: t.detach().float().cpu() for n, t in v.items()} if k.endswith("_layers") else v)
              for k, v in layers.items()}
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        StarFlow2LoraLoaderMixin.save_lora_weights(tmp, **layers)
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, output_dir / LORA_WEIGHT_NAME)
    logger.info(f"saved {output_dir / LORA_WEIGHT_NAME}")
    if args.save_fused:
        from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora

        pipe = StarFlow2Pipeline.from_pretrained(args.pretrained_model_name_or_path, scheduler=scheduler)
        lora, metadata = StarFlow2LoraLoaderMixin.lora_state_dict(str(output_dir), return_lora_metadata=True)
        StarFlow2LoraLoaderMixin.load_lora_into_transformer(lora, pipe.transformer, adapter_name="trained",
                                                            metadata=metadata)
        pipe.transformer.fuse_lora()
        pipe.transformer.unload_lora()
        if args.lora_vlm:
            StarFlow2LoraLoaderMixin.load_lora_into_vlm(lora, pipe.vlm, adapter_name="trained", metadata=metadata)
            fuse_text_encoder_lora(pipe.vlm)
            _remove_text_encoder_monkey_patch(pipe.vlm)
        save_pipeline_atomically(pipe, output_dir)
        logger.info(f"saved the fused pipeline to {output_dir}")


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

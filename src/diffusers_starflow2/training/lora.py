# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""LoRA runs of ``training/train_starflow2.py`` (``--rank``): which linears get an adapter (:func:`add_lora_adapters`)
and how the trained adapters are written, as the files that
:class:`~diffusers_starflow2.loaders.StarFlow2LoraLoaderMixin` loads (:func:`write_lora_file`) and as a pipeline with
the adapters fused by that mixin (:func:`save_fused_pipeline`, ``--save_fused``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.training_utils import _collate_lora_metadata
from torch import nn

from ..utils.io import publish_into
from .args import ArgumentError

DEEP_LORA_LINEARS = ("to_qkv", "to_out", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")
VLM_LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


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


def add_lora_adapters(args, transformer: nn.Module, vlm: nn.Module) -> None:
    """Gaussian-initialised LoRA adapters of rank ``--rank`` on the Pretzel (``--lora_target_modules`` or the stage's
    default targets) and, with ``--lora_vlm``, on the VLM's attention projections."""
    from peft import LoraConfig

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


def lora_layers(args, trainer: nn.Module, state_dict: Optional[dict] = None) -> dict:
    """The keyword arguments of ``save_lora_weights`` for the trained adapters of ``trainer`` (a ``PretzelTrainer``;
    ``state_dict``, when given, its gathered state dict), fp32 on the CPU."""
    from peft import get_peft_model_state_dict

    def part(prefix: str) -> Optional[dict]:
        return (
            None if state_dict is None else {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        )

    modules = {"transformer": trainer.transformer, "vlm": trainer.vlm if args.lora_vlm else None}
    layers = {
        f"{name}_lora_layers": get_peft_model_state_dict(module, state_dict=part(f"{name}."))
        for name, module in modules.items()
        if module is not None
    }
    layers = {k: {n: t.detach().float().cpu().contiguous() for n, t in v.items()} for k, v in layers.items()}
    return {**layers, **_collate_lora_metadata(modules)}


def write_lora_file(args, trainer: nn.Module, folder: Path, state_dict: Optional[dict] = None) -> None:
    """``folder/pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights(folder)``."""
    from diffusers_starflow2.loaders import StarFlow2LoraLoaderMixin

    with publish_into(folder, last=LORA_WEIGHT_NAME_SAFE) as staging:
        StarFlow2LoraLoaderMixin.save_lora_weights(staging, **lora_layers(args, trainer, state_dict))


def fused_pipeline(args, scheduler, lora_folder: Path):
    """The source pipeline with the LoRA of ``lora_folder`` fused into its weights and the adapters removed."""
    from diffusers_starflow2 import StarFlow2Pipeline

    pipe = StarFlow2Pipeline.from_pretrained(args.pretrained_model_name_or_path, scheduler=scheduler)
    pipe.load_lora_weights(str(lora_folder), adapter_name="trained")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe

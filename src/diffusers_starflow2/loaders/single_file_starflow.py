# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Reading original STARFlow checkpoints and configs (``transformer_flow.Model`` of the reference code).

Used by ``conversion/convert_starflow_to_diffusers.py`` and by the tests; nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import re
import shlex
from typing import Any, Dict, List, Mapping, Tuple

import torch

# Reference constructor arguments -> StarFlowTransformerModel config keys (None: derived, see below).
_KWARG_TO_CONFIG = {
    "in_channels": "in_channels",
    "img_size": "sample_size",
    "patch_size": "patch_size",
    "channels": "channels",
    "num_blocks": None,
    "layers_per_block": "layers_per_block",
    "head_dim": "head_dim",
    "num_heads": "num_heads",
    "num_kv_heads": "num_kv_heads",
    "rope": "use_rope",
    "pt_seq_len": "pt_seq_len",
    "sos": "use_sos",
    "txt_size": "max_text_length",
    "txt_dim": "text_dim",
    "cond_top_only": "cond_top_only",
    "use_softplus": "use_softplus",
    "use_swiglu": "gated_mlp",
    "use_bias": "use_bias",
    "use_qk_norm": "qk_norm",
    "use_post_norm": "post_norm",
    "use_final_norm": "final_norm",
    "hf_style_rope": "hf_style_rope",
    "norm_type": "norm_type",
    "soft_clip": "soft_clip",
    "seq_order": "seq_order",
    "top_block_channels": "top_block_channels",
}
# The reference constructor's defaults for the arguments above.
_REFERENCE_DEFAULTS = {
    "head_dim": 64,
    "num_heads": None,
    "num_kv_heads": None,
    "rope": False,
    "pt_seq_len": None,
    "sos": False,
    "txt_size": 0,
    "txt_dim": 0,
    "cond_top_only": False,
    "use_softplus": False,
    "use_swiglu": False,
    "use_bias": True,
    "use_qk_norm": False,
    "use_post_norm": False,
    "use_final_norm": False,
    "hf_style_rope": False,
    "norm_type": "layer_norm",
    "soft_clip": 0.0,
    "seq_order": "R2L",
    "top_block_channels": None,
}
# Accepted only at these values: training-time switches (no effect on the weights' meaning) or features
# (pretrained-LM deep block, learnable denoiser, video) that this implementation does not provide.
_MUST_BE_DEFAULT = {
    "use_pretrained_lm": (None,),
    "use_mm_attn": (False, 0),
    "learnable_self_denoiser": (False, 0),
    "conditional_denoiser": (False, 0),
    "noise_embed_denoiser": (False, 0),
    "temporal_causal": (0, False),
    "shallow_block_local": (False, 0),
    "denoiser_window": (None,),
    "local_attn_window": (None,),
}
_TRAINING_ONLY = {"use_checkpoint", "use_checkpoint_mlp"}

# Buffers of the reference that carry no information (deprecated mask / RoPE tables / unused statistics).
_DROPPED_KEYS = re.compile(r"^(var|blocks\.\d+\.attn_mask|feat_rope(_gen)?\.(freqs_cos|freqs_sin))$")
_RENAMES = [
    (r"\.attn_blocks\.(\d+)\.attention\.qkv\.", r".layers.\1.attn.to_qkv."),
    (r"\.attn_blocks\.(\d+)\.attention\.proj\.", r".layers.\1.attn.to_out."),
    (r"\.attn_blocks\.(\d+)\.attention\.query_norm\.", r".layers.\1.attn.norm_q."),
    (r"\.attn_blocks\.(\d+)\.attention\.key_norm\.", r".layers.\1.attn.norm_k."),
    (r"\.attn_blocks\.(\d+)\.attention\.post_norm\.", r".layers.\1.attn.norm_post."),
    (r"\.attn_blocks\.(\d+)\.attention\.norm\.", r".layers.\1.attn.norm."),
    (r"\.attn_blocks\.(\d+)\.mlp\.main\.0\.", r".layers.\1.mlp.fc1."),
    (r"\.attn_blocks\.(\d+)\.mlp\.main\.2\.", r".layers.\1.mlp.fc2."),
    (r"\.attn_blocks\.(\d+)\.mlp\.post_norm\.", r".layers.\1.mlp.norm_post."),
    (r"\.attn_blocks\.(\d+)\.mlp\.(norm|gate_proj|up_proj|down_proj)\.", r".layers.\1.mlp.\2."),
]
_BLOCK_KEYS = re.compile(
    r"^blocks\.\d+\.(sos_embed|pos_embed|proj_in\.(weight|bias)|proj_out\.(weight|bias)|"
    r"proj_txt\.(weight|bias)|proj_cond\.(weight|bias)|final_norm\.weight|layers\.\d+\..+)$"
)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def key_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], name: str = "") -> List[str]:
    """What keeps ``state`` from loading strictly into a model whose state dict is ``expected``: missing,
    unexpected and mis-shaped keys, one line each (prefixed with ``name``); empty when it loads."""
    prefix = f"{name}: " if name else ""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: weights {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    return (
        ([f"{prefix}{len(missing)} missing keys: {missing}"] if missing else [])
        + ([f"{prefix}{len(unexpected)} unexpected keys: {unexpected}"] if unexpected else [])
        + ([f"{prefix}{len(shapes)} shape mismatches: {shapes}"] if shapes else [])
    )


def load_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """Load a reference state dict from ``.pth``/``.pt``/``.bin`` (``weights_only``) or ``.safetensors``.

    Nested training checkpoints (``{"model": ...}``, ``{"state_dict": ...}``) and ``module.`` / ``_orig_mod.``
    prefixes (DDP, torch.compile) are unwrapped.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r} is empty")
    state = _read_checkpoint(path)
    if not isinstance(state, Mapping):
        raise ValueError(
            f"checkpoint {path!r} holds a {type(state).__name__}, not a state dict (a mapping of "
            f"parameter names to tensors)"
        )
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = [k for k in ("model", "state_dict", "module", "ema") if isinstance(state.get(k), Mapping)]
        if not inner:
            raise ValueError(f"checkpoint {path!r} holds no tensors at its top level and no 'model'/'state_dict'")
        state = state[inner[0]]
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _read_checkpoint(path: str) -> Any:
    """The payload of a checkpoint file; a truncated or foreign file is a ``ValueError`` naming it."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch/pickle/zip/safetensors each raise their own kinds
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"checkpoint {path!r} cannot be read (truncated, or not a .pth/.safetensors checkpoint): {detail}"
        ) from None


def convert_starflow_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename reference keys to :class:`StarFlowTransformerModel` keys.

    Known-unused buffers are dropped; any other key that has no counterpart raises ``ValueError`` listing them.
    """
    converted, unmapped, duplicates = {}, [], []
    for key, value in state.items():
        if _DROPPED_KEYS.match(key):
            continue
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        if not _BLOCK_KEYS.match(new):
            unmapped.append(key)
        elif new in converted:  # the same tensor under the reference and our naming
            duplicates.append(key)
        else:
            converted[new] = value
    if unmapped:
        raise ValueError(f"{len(unmapped)} checkpoint keys have no counterpart: {sorted(unmapped)}")
    if duplicates:
        raise ValueError(f"checkpoint keys map onto the same parameter twice: {sorted(duplicates)}")
    return converted


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def config_from_reference_kwargs(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """:class:`StarFlowTransformerModel` config from the reference ``Model(**kwargs)`` keyword arguments."""
    unknown = sorted(set(kwargs) - set(_KWARG_TO_CONFIG) - set(_MUST_BE_DEFAULT) - _TRAINING_ONLY)
    if unknown:
        raise ValueError(f"unknown model_kwargs keys: {unknown}; accepted: {sorted(_KWARG_TO_CONFIG)}")
    for key, allowed in _MUST_BE_DEFAULT.items():
        if key in kwargs and kwargs[key] not in allowed:
            raise ValueError(f"model_kwargs[{key!r}]={kwargs[key]!r} is not supported (accepted: {allowed})")
    for key in ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "layers_per_block"):
        if key not in kwargs:
            raise ValueError(f"model_kwargs is missing the required key {key!r}")
    args = {**_REFERENCE_DEFAULTS, **kwargs}
    check_reference_values(args)
    layers = [int(n) for n in args["layers_per_block"]]
    if len(layers) == 1:
        layers = layers * int(args["num_blocks"])
    if len(layers) != int(args["num_blocks"]):
        raise ValueError(f"layers_per_block {layers} does not have num_blocks={args['num_blocks']} entries")
    config = {cfg: args[k] for k, cfg in _KWARG_TO_CONFIG.items() if cfg is not None}
    config["layers_per_block"] = layers
    for key in (
        "use_rope",
        "use_sos",
        "cond_top_only",
        "use_softplus",
        "gated_mlp",
        "use_bias",
        "qk_norm",
        "post_norm",
        "final_norm",
        "hf_style_rope",
    ):
        config[key] = bool(config[key])
    config["soft_clip"] = float(config["soft_clip"])
    return config


_POSITIVE_INTS = ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "head_dim")
_OPTIONAL_POSITIVE_INTS = ("num_heads", "num_kv_heads", "pt_seq_len", "top_block_channels")
_CHOICES = {"norm_type": ("layer_norm", "rms_norm"), "seq_order": ("R2L", "L2R")}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_reference_values(args: Mapping[str, Any]) -> None:
    """Values the model can be built from: positive sizes, known choices, a finite soft clip."""
    for key in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
        value = args.get(key)
        if (value is not None or key in _POSITIVE_INTS) and not (_is_int(value) and value > 0):
            raise ValueError(f"config value {key}={value!r} must be a positive integer")
    for key in ("txt_size", "txt_dim"):
        if not (_is_int(args.get(key)) and args[key] >= 0):
            raise ValueError(f"config value {key}={args.get(key)!r} must be an integer >= 0")
    layers = args["layers_per_block"]
    layers = [layers] if _is_int(layers) else layers
    if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(n) and n > 0 for n in layers):
        raise ValueError(f"config value layers_per_block={args['layers_per_block']!r} must be positive integers")
    for key, choices in _CHOICES.items():
        if args.get(key) not in choices:
            raise ValueError(f"config value {key}={args.get(key)!r} must be one of {list(choices)}")
    soft_clip = args.get("soft_clip")
    if not (
        isinstance(soft_clip, numbers.Real)
        and not isinstance(soft_clip, bool)
        and math.isfinite(soft_clip)
        and soft_clip >= 0
    ):
        raise ValueError(f"config value soft_clip={soft_clip!r} must be a finite number >= 0")
    if args["img_size"] % args["patch_size"]:
        raise ValueError(
            f"config value img_size={args['img_size']} is not a multiple of patch_size={args['patch_size']}"
        )


# Arguments of the reference training script (train.py) that a training YAML may hold; only some reach the model.
_TRAIN_ARGUMENTS = frozenset(
    """
    model_config_path train_seed data logdir dataset wds mix_aspect img_size vid_size fps_cond no_flip caption_column
    secondary_dataset secondary_img_size secondary_vid_size vae vae_decoder_factor channel_size finetuned_vae text
    txt_size sos seq_order patch_size channels top_block_channels blocks layers_per_block rope pt_seq_len adaln nvp
    use_softplus cond_top_only head_dim num_heads num_kv_heads use_swiglu use_qk_norm use_post_norm use_final_norm
    use_bias norm_type use_pretrained_lm use_mm_attn soft_clip learnable_self_denoiser conditional_denoiser
    noise_embed_denoiser temporal_causal shallow_block_local denoiser_window local_attn_window noise_std noise_type
    cond_noise_level batch_size secondary_batch_size secondary_ratio acc fp8 use_8bit_adam epochs epoch_length lr
    min_lr drop_label drop_image last_frame_cond video_to_video resume_path resume_epoch warmup_steps fsdp
    fsdp_text_encoder gradient_checkpoint gradient_checkpoint_mlp compile latent_norm_regularization loss_scaling
    grad_clip grad_skip dry_run wandb_name save_every sample_freq cfg num_samples sample_batch_size
""".split()
)


def _unknown_key_message(path: str, key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path!r}: unknown argument {key!r}{hint}; not an argument of the reference training script"


# Defaults of the reference training script for the arguments that reach the model.
_TRAIN_DEFAULTS = {
    "channel_size": 3,
    "img_size": 32,
    "txt_size": 0,
    "sos": 0,
    "seq_order": "R2L",
    "patch_size": 4,
    "channels": 512,
    "top_block_channels": None,
    "blocks": 4,
    "layers_per_block": [8],
    "rope": 0,
    "pt_seq_len": None,
    "use_softplus": 0,
    "cond_top_only": 0,
    "head_dim": 64,
    "num_heads": None,
    "num_kv_heads": None,
    "use_swiglu": 0,
    "use_qk_norm": 0,
    "use_post_norm": 0,
    "use_final_norm": 0,
    "use_bias": 1,
    "norm_type": "layer_norm",
    "use_pretrained_lm": None,
    "use_mm_attn": 0,
    "soft_clip": 0.0,
    "learnable_self_denoiser": 0,
    "conditional_denoiser": 0,
    "noise_embed_denoiser": 0,
    "temporal_causal": 0,
    "shallow_block_local": 0,
    "denoiser_window": None,
    "local_attn_window": None,
    "vae": None,
}


def _parse_yaml_value(value: Any) -> Any:
    # The reference YAML passes every value through an argparse command line: "2 2 24" is a list of ints.
    if isinstance(value, str):
        parts = shlex.split(value)
        if len(parts) > 1:
            return [_parse_yaml_value(p) for p in parts]
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def kwargs_from_training_yaml(path: str, text_dim: int) -> Dict[str, Any]:
    """Reference constructor kwargs from a training YAML (``arguments: [{key: value}, ...]``).

    Arguments absent from the YAML take the training script's defaults; the latent size is the image size over the
    VAE's downsampling factor (8 for the SD / SDXL VAEs); ``text_dim`` is the text encoder's width.
    """
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"{path!r} is not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path!r} is not a text file") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("arguments"), list):
        raise ValueError(f"{path!r} is not a reference training config (no 'arguments' list)")
    args = dict(_TRAIN_DEFAULTS)
    for item in data["arguments"]:
        if not isinstance(item, Mapping):
            raise ValueError(f"{path!r}: every entry of 'arguments' must be 'key: value'; got {item!r}")
        for key, value in item.items():
            if key not in _TRAIN_ARGUMENTS:
                raise ValueError(_unknown_key_message(path, key, _TRAIN_ARGUMENTS))
            args[key] = _parse_yaml_value(value)
    if args.get("vid_size") is not None:
        raise ValueError("video configs (vid_size) are not supported")
    for key in ("channel_size", "img_size", "patch_size", "channels", "blocks"):
        if not (_is_int(args[key]) and args[key] > 0):
            raise ValueError(f"{path!r}: {key}={args[key]!r} must be a positive integer")
    layers = args["layers_per_block"]
    layers = [layers] if isinstance(layers, int) else list(layers)
    vae = args["vae"]
    downsample = 1 if vae is None else (16 if "Wan" in str(vae) else 8)
    kwargs = dict(
        in_channels=args["channel_size"],
        img_size=args["img_size"] // downsample,
        patch_size=args["patch_size"],
        channels=args["channels"],
        num_blocks=args["blocks"] if len(layers) == 1 else len(layers),
        layers_per_block=layers,
        rope=args["rope"],
        pt_seq_len=args["pt_seq_len"],
        head_dim=args["head_dim"],
        num_heads=args["num_heads"],
        num_kv_heads=args["num_kv_heads"],
        use_swiglu=args["use_swiglu"],
        use_bias=args["use_bias"],
        use_qk_norm=args["use_qk_norm"],
        use_post_norm=args["use_post_norm"],
        norm_type=args["norm_type"],
        txt_size=args["txt_size"],
        txt_dim=text_dim,
        sos=args["sos"],
        cond_top_only=args["cond_top_only"],
        use_softplus=args["use_softplus"],
        use_final_norm=args["use_final_norm"],
        soft_clip=args["soft_clip"],
        seq_order=args["seq_order"],
        top_block_channels=args["top_block_channels"],
    )
    for key in _MUST_BE_DEFAULT:
        kwargs[key] = args[key]
    return kwargs


def text_dim_from_state_dict(state: Mapping[str, torch.Tensor]) -> int:
    dims = {v.shape[1] for k, v in state.items() if k.endswith("proj_txt.weight")}
    if len(dims) > 1:
        raise ValueError(f"inconsistent proj_txt widths in the checkpoint: {sorted(dims)}")
    return dims.pop() if dims else 0


def load_reference_config(path: str, state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(model config, reference kwargs)`` from a fixture-style JSON (``model_kwargs``) or a training YAML."""
    if not os.path.isfile(path):
        raise ValueError(f"config {path!r} does not exist")
    if path.endswith((".yaml", ".yml")):
        kwargs = kwargs_from_training_yaml(path, text_dim_from_state_dict(state))
    else:
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path!r} is not valid JSON: {err}") from None
        kwargs = data.get("model_kwargs", data) if isinstance(data, Mapping) else None
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"{path!r} must hold a JSON object with 'model_kwargs'")
    return config_from_reference_kwargs(kwargs), dict(kwargs)

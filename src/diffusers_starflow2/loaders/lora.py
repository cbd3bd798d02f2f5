# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""LoRA for the STARFlow2 pipelines: :class:`StarFlow2LoraLoaderMixin`.

A STARFlow2 LoRA file (``pytorch_lora_weights.safetensors``, written by ``training/train_starflow2.py`` or
:meth:`StarFlow2LoraLoaderMixin.save_lora_weights`) holds peft-format LoRA weights of the Pretzel under the prefix
``transformer.`` and, optionally, of the VLM's language model under ``vlm.``; the safetensors metadata keeps each
adapter's ``LoraConfig`` so that rank, alpha and target modules are restored exactly.

Usage (the mixin is a base class of the STARFlow2 pipelines)::

    pipe.load_lora_weights("path/to/run", adapter_name="shapes")
    pipe.set_adapters(["shapes"], adapter_weights=[0.7])
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Union

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict, _load_lora_into_text_encoder
from diffusers.utils import logging
from diffusers.utils.peft_utils import get_adapter_name
from huggingface_hub.utils import validate_hf_hub_args

logger = logging.get_logger(__name__)

TRANSFORMER_NAME = "transformer"
VLM_NAME = "vlm"


def _adapter_names(model) -> set:
    return set(getattr(model, "peft_config", None) or {}) if model is not None else set()


class StarFlow2LoraLoaderMixin(LoraBaseMixin):
    r"""Load, save, fuse and switch LoRA adapters of the :class:`PretzelModel` (``transformer``) and, optionally,
    of the VLM (``vlm``, a transformers model handled through its peft integration).

    ``set_adapters``, ``disable_lora``, ``enable_lora``, ``delete_adapters``, ``get_active_adapters`` and
    ``unload_lora_weights`` come from :class:`~diffusers.loaders.lora_base.LoraBaseMixin`.
    """

    _lora_loadable_modules = [TRANSFORMER_NAME, VLM_NAME]
    transformer_name = TRANSFORMER_NAME
    vlm_name = VLM_NAME

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]], **kwargs
    ):
        r"""The LoRA state dict (keys ``transformer.*`` / ``vlm.*``) of a folder, file, hub id or dict.

        Args:
            pretrained_model_name_or_path_or_dict: a folder holding ``pytorch_lora_weights.safetensors`` (or the
                file named by ``weight_name``), a hub repository id, or a state dict.
            weight_name, subfolder, use_safetensors, cache_dir, force_download, proxies, local_files_only, token,
                revision: as in diffusers.
            return_lora_metadata: also return the adapter metadata (``LoraConfig`` fields per prefix).
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        allow_pickle = use_safetensors is None
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=True if use_safetensors is None else use_safetensors,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=allow_pickle,
        )
        if any("dora_scale" in k for k in state_dict):
            logger.warning("DoRA weights are not supported by STARFlow2; dropping the 'dora_scale' entries.")
            state_dict = {k: v for k, v in state_dict.items() if "dora_scale" not in k}
        prefixes = (f"{cls.transformer_name}.", f"{cls.vlm_name}.")
        stray = [k for k in state_dict if not k.startswith(prefixes)]
        if stray:
            raise ValueError(
                f"Invalid STARFlow2 LoRA checkpoint: every key must start with {' or '.join(prefixes)}; "
                f"got e.g. {stray[0]!r} ({len(stray)} such keys)"
            )
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
        adapter_name: Optional[str] = None,
        hotswap: bool = False,
        **kwargs,
    ):
        r"""Load a STARFlow2 LoRA into ``self.transformer`` (and ``self.vlm`` if the file has ``vlm.`` weights).

        Args:
            pretrained_model_name_or_path_or_dict: see :meth:`lora_state_dict`.
            adapter_name: name of the adapter (default ``default_<n>``, the same name in both components).
            hotswap: replace the weights of the already loaded adapter ``adapter_name`` in place (transformer only).
            low_cpu_mem_usage, and the loading kwargs of :meth:`lora_state_dict`.
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: it is empty or has parameter names without 'lora'.")
        transformer, vlm = getattr(self, self.transformer_name, None), getattr(self, self.vlm_name, None)
        if adapter_name is None:  # one fresh name shared by both components
            taken, n = _adapter_names(transformer) | _adapter_names(vlm), 0
            while f"default_{n}" in taken:
                n += 1
            adapter_name = f"default_{n}"
        has = {
            name: any(k.startswith(f"{name}.") for k in state_dict) for name in (self.transformer_name, self.vlm_name)
        }
        if has[self.transformer_name]:
            self.load_lora_into_transformer(
                state_dict,
                transformer=transformer,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )
        if has[self.vlm_name]:
            if vlm is None:
                raise ValueError("The LoRA file has VLM weights but the pipeline has no `vlm` component.")
            self.load_lora_into_vlm(
                state_dict,
                vlm=vlm,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict,
        transformer,
        adapter_name=None,
        _pipeline=None,
        low_cpu_mem_usage=False,
        hotswap: bool = False,
        metadata=None,
    ):
        """Load the ``transformer.*`` entries of ``state_dict`` into a :class:`PretzelModel` (peft injection)."""
        logger.info(f"Loading {cls.transformer_name}.")
        transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
            prefix=cls.transformer_name,
        )

    @classmethod
    def load_lora_into_vlm(
        cls,
        state_dict,
        vlm,
        adapter_name=None,
        _pipeline=None,
        low_cpu_mem_usage=False,
        hotswap: bool = False,
        metadata=None,
        lora_scale: float = 1.0,
    ):
        """Load the ``vlm.*`` entries of ``state_dict`` into the transformers VLM (its peft integration)."""
        if hotswap:
            raise ValueError("Hotswapping is not supported for VLM LoRA adapters; pass hotswap=False.")
        if adapter_name is None:
            adapter_name = get_adapter_name(vlm)
        _load_lora_into_text_encoder(
            state_dict=state_dict,
            network_alphas=None,
            text_encoder=vlm,
            prefix=cls.vlm_name,
            text_encoder_name=cls.vlm_name,
            lora_scale=lora_scale,
            adapter_name=adapter_name,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            metadata=metadata,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: Union[str, os.PathLike],
        transformer_lora_layers: Optional[Dict[str, Union[torch.nn.Module, torch.Tensor]]] = None,
        vlm_lora_layers: Optional[Dict[str, Union[torch.nn.Module, torch.Tensor]]] = None,
        is_main_process: bool = True,
        weight_name: Optional[str] = None,
        save_function: Optional[Callable] = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: Optional[dict] = None,
        vlm_lora_adapter_metadata: Optional[dict] = None,
    ):
        r"""Write LoRA weights (peft-format state dicts, e.g. ``peft.get_peft_model_state_dict(model)``) and their
        ``LoraConfig`` dicts (``model.peft_config[name].to_dict()``) to ``save_directory/weight_name``
        (default ``pytorch_lora_weights.safetensors``)."""
        lora_layers, lora_metadata = {}, {}
        if transformer_lora_layers:
            lora_layers[cls.transformer_name] = transformer_lora_layers
            lora_metadata[cls.transformer_name] = transformer_lora_adapter_metadata
        if vlm_lora_layers:
            lora_layers[cls.vlm_name] = vlm_lora_layers
            lora_metadata[cls.vlm_name] = vlm_lora_adapter_metadata
        if not lora_layers:
            raise ValueError("Pass at least one of `transformer_lora_layers` or `vlm_lora_layers`.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=lora_layers,
            lora_metadata=lora_metadata,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: List[str] = [TRANSFORMER_NAME, VLM_NAME],
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: Optional[List[str]] = None,
        **kwargs,
    ):
        r"""Merge the active LoRA weights (times ``lora_scale``) into the base weights of ``components``."""
        super().fuse_lora(
            components=components, lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs
        )

    def unfuse_lora(self, components: List[str] = [TRANSFORMER_NAME, VLM_NAME], **kwargs):
        r"""Undo :meth:`fuse_lora` on ``components``."""
        super().unfuse_lora(components=components, **kwargs)

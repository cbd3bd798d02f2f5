# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Noise, callbacks and output conversion shared by the STARFlow pipelines.

The input checks are in :mod:`diffusers_starflow2.utils.validation`; every one raises a ``ValueError`` whose message
starts with the offending argument's name in backticks, so callers and tests can tell which input was wrong.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..utils.hub import StarFlowHubMixin
from ..utils.io import atomic_output_dir
from ..utils.validation import check_callable, check_latents, check_names, check_output_type

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

Generator = Union[torch.Generator, List[torch.Generator], None]


def resolve_callback_tensor_inputs(
    callback_on_step_end: Optional[Callable], callback_on_step_end_tensor_inputs: Sequence[str], allowed: Sequence[str]
) -> List[str]:
    """The tensor names to pass to ``callback_on_step_end``, checked against the pipeline's ``_callback_tensor_inputs``.

    A :class:`~diffusers.callbacks.PipelineCallback` or :class:`~diffusers.callbacks.MultiPipelineCallbacks` brings
    its own ``tensor_inputs``.
    """
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
    check_callable(callback_on_step_end, "callback_on_step_end")
    callback_on_step_end_tensor_inputs = check_names(
        callback_on_step_end_tensor_inputs or [], "callback_on_step_end_tensor_inputs"
    )
    unknown = [k for k in callback_on_step_end_tensor_inputs if k not in allowed]
    if unknown:
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` must be a subset of {list(allowed)}; got unknown {unknown}"
        )
    return list(callback_on_step_end_tensor_inputs or [])


def resolve_num_inference_steps(num_inference_steps: Optional[int], kwargs: dict, method: str) -> Optional[int]:
    """``num_inference_steps``, or the value given under its former name ``num_denoising_steps`` (accepted with a
    ``FutureWarning`` until 0.2.0).  Other keyword arguments in ``kwargs`` are refused as Python refuses an unknown
    keyword (``method`` names the function)."""
    if "num_denoising_steps" in kwargs:
        former = kwargs.pop("num_denoising_steps")
        if num_inference_steps is not None:
            raise ValueError(
                "`num_denoising_steps` is the former name of `num_inference_steps`; pass only `num_inference_steps`"
            )
        warnings.warn(
            "`num_denoising_steps` is deprecated and will be removed in diffusers-starflow2 0.2.0; pass the same "
            "value as `num_inference_steps`",
            FutureWarning,
            stacklevel=4,  # the caller of a pipeline method (under torch.no_grad)
        )
        num_inference_steps = former
    if kwargs:
        raise TypeError(f"{method}() got an unexpected keyword argument {next(iter(kwargs))!r}")
    return num_inference_steps


def progress_per_token(progress_bar) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A sampling loop's per-token callback that only advances ``progress_bar`` (the tokens stay as made)."""

    def on_token(i: int, x_i: torch.Tensor) -> torch.Tensor:
        progress_bar.update()
        return x_i

    return on_token


def prepare_noise(
    shape: Tuple[int, ...],
    generator: Generator,
    device,
    dtype: torch.dtype = torch.float32,
    latents: Optional[torch.Tensor] = None,
    name: str = "latents",
) -> torch.Tensor:
    """Standard-normal noise of ``shape`` (one generator per sample when ``generator`` is a list), or the
    user-supplied ``latents`` after checking their shape."""
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return check_latents(latents, shape, name, device).to(device=device, dtype=dtype)


def postprocess_images(
    images: torch.Tensor, output_type: str = "pil", image_processor: Optional[VaeImageProcessor] = None
):
    """Decoded images ``(B, 3, H, W)`` in ``[-1, 1]`` -> list of PIL images, ``(B, H, W, 3)`` numpy array in
    ``[0, 1]`` or ``(B, 3, H, W)`` tensor in ``[0, 1]``; ``"latent"`` returns the input unchanged."""
    check_output_type(output_type)
    image_processor = image_processor or VaeImageProcessor()
    return image_processor.postprocess(images, output_type=output_type)


def _carry_over(old: str, new: str) -> None:
    """Copy the entries of an existing folder ``old`` that the new save did not write (a README, say) into ``new``.

    Copied, not moved: until the final rename, the old folder stays complete.
    """
    if not os.path.isdir(old):
        return
    for name in os.listdir(old):
        source, target = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(target):
            continue
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target, follow_symlinks=False)


def _holds_working_directory(path: str) -> bool:
    cwd = os.getcwd()
    return cwd == path or cwd.startswith(path.rstrip(os.sep) + os.sep)


def ends_call(method: Callable) -> Callable:
    """End a pipeline call's work (:meth:`FlowPipelineMixin._end_call`: offload hooks freed, the step callback
    detached) however the call ends: returned, raised or interrupted."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self._end_call()

    return call


class AtomicSaveMixin:
    """``save_pretrained`` that never leaves a partial pipeline folder at ``save_directory``.

    The pipeline is written into a staging folder next to ``save_directory`` and renamed into place when complete
    (with ``push_to_hub``, the upload also runs before the rename).  A process killed midway leaves the old folder
    (or none) at ``save_directory`` and at most a hidden ``.<name>.tmp-*`` folder beside it.  Files of an existing
    folder that the save does not write are kept, as with diffusers.  Saving into the current working directory
    (or a folder holding it) cannot rename that folder away and is written in place.
    """

    def save_pretrained(self, save_directory, *args, **kwargs):
        target = os.path.abspath(os.fspath(save_directory))
        if _holds_working_directory(target):
            return super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("push_to_hub"):  # diffusers names the repo after the folder it saves into: the staging one
            kwargs.setdefault("repo_id", os.path.basename(target))
        with atomic_output_dir(target, overwrite=True, name="save_directory") as staging:
            super().save_pretrained(staging, *args, **kwargs)
            _carry_over(target, staging)


class FlowPipelineMixin(AtomicSaveMixin, StarFlowHubMixin):
    """The call contract every STARFlow pipeline shares (with an atomic ``save_pretrained`` and a ``push_to_hub``
    that writes a model card).

    * ``callback_on_step_end(pipe, step, noise_level, callback_kwargs)`` runs once per flow block of an image (in
      sampling order) and once per denoising step; ``step`` counts both, in call order, across all images of the
      call.  ``callback_kwargs["latents"]`` holds the image's whole latents once the step is done (each pipeline
      documents their layout); returning ``{"latents": new}`` (same shape) makes ``new`` the latents every later
      step starts from.  The progress bar counts latent positions, which are finer than these steps.
    * ``guidance_scale``, ``num_timesteps`` (steps of one image: flow blocks plus denoising steps) and
      ``interrupt`` describe the running call; setting ``pipe._interrupt = True`` in a callback stops the call
      cleanly: the remaining steps are skipped and what was made is returned (set from elsewhere during a flow
      block, it also stops the block: positions not sampled yet keep their noise).
    """

    _guidance_scale: float = 0.0
    _num_timesteps: int = 0
    _interrupt: bool = False
    _step_callback: Optional[Callable] = None
    _step_callback_inputs: Sequence[str] = ()
    _step_index: int = 0

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _begin_call(
        self,
        guidance_scale: float,
        num_timesteps: int,
        callback_on_step_end: Optional[Callable],
        callback_tensor_inputs: Sequence[str],
    ) -> None:
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, num_timesteps, False
        self._step_callback, self._step_callback_inputs = callback_on_step_end, list(callback_tensor_inputs)
        self._step_index = 0

    def _end_call(self) -> None:
        # the call's callback and interruption end with it (a later denoise_latents must not see them)
        self._step_callback, self._interrupt = None, False
        self.maybe_free_model_hooks()

    def _onload(self, *modules: torch.nn.Module) -> None:
        """Fire the ``enable_model_cpu_offload`` hooks of ``modules``, in order, where they are not on the execution
        device yet.  Sampling runs models through methods other than ``forward`` (a Pretzel step, a flow block's
        decode step), which accelerate's hooks do not see; a hook moves its model in and the previous model of
        ``model_cpu_offload_seq`` out, so models used together are onloaded last-first."""
        device = self._execution_device
        for module in modules:
            hook = getattr(module, "_hf_hook", None)
            param = next(module.parameters(), None) if hook is not None else None
            if param is not None and param.device != device:
                hook.pre_forward(module)

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        raise ValueError(
            "enable_sequential_cpu_offload() cannot run the STARFlow pipelines: sampling reads "
            "parameters outside module forward calls (start tokens, position embeddings, KV-cache "
            "shapes), which sequential offload keeps on the `meta` device; use "
            "enable_model_cpu_offload() instead"
        )

    def enable_group_offload(self, *args, **kwargs):
        raise ValueError(
            "enable_group_offload() cannot run the STARFlow pipelines: sampling runs the transformer and the text "
            "model once per latent position through decode steps, not through forward, which the offload hooks "
            "never see; use enable_model_cpu_offload(), or group-offload only the autoencoder "
            "(`pipe.vae.enable_group_offload(...)`) with the other models on the device"
        )

    def _step_end(self, noise_level: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Count one step and run ``callback_on_step_end`` on it; returns ``latents`` or their replacement."""
        step, self._step_index = self._step_index, self._step_index + 1
        if self._step_callback is None:
            return latents
        kwargs = {name: value for name, value in {"latents": latents}.items() if name in self._step_callback_inputs}
        outputs = self._step_callback(self, step, noise_level, kwargs) or {}
        replaced = outputs.get("latents", latents)
        if replaced is not latents and (not isinstance(replaced, torch.Tensor) or replaced.shape != latents.shape):
            raise ValueError(
                f"`callback_on_step_end` must return `latents` of the shape it was given {tuple(latents.shape)}; got "
                f"{tuple(replaced.shape) if isinstance(replaced, torch.Tensor) else type(replaced).__name__}"
            )
        return replaced

    # -- diffusers' memory switches ------------------------------------------------------------------------------------
    # Each one either does what it says or refuses with the reason: none is accepted and then ignored.

    def enable_attention_slicing(self, slice_size: Union[str, int, None] = "auto"):
        """Refused (``ValueError``), except ``None`` (= :meth:`disable_attention_slicing`).

        Slicing splits an attention matrix over heads to hold less of it at once.  The STARFlow models compute
        attention with PyTorch's fused ``scaled_dot_product_attention`` kernels, which never hold the whole matrix,
        and sample an image one position at a time against a KV cache (one query row per position), so there is
        no matrix to slice.
        """
        if slice_size is None:
            return
        raise ValueError(
            f"`enable_attention_slicing({slice_size!r})` does not apply to {type(self).__name__}: its models compute "
            "attention with torch's fused scaled_dot_product_attention (no full attention matrix is held) and sample "
            "one position at a time against a KV cache; to use less memory, use enable_model_cpu_offload() or the "
            "transformer's enable_layerwise_casting()"
        )

    def disable_attention_slicing(self):
        """Attention is never sliced (see :meth:`enable_attention_slicing`): nothing to undo."""

    def enable_xformers_memory_efficient_attention(self, attention_op: Optional[Callable] = None):
        """Refused (``ValueError``): the STARFlow models' attention has no xFormers processor to switch to; its
        full-sequence passes choose their kernel through diffusers' dispatcher (``set_attention_backend``)."""
        raise ValueError(
            f"`enable_xformers_memory_efficient_attention()` does not apply to {type(self).__name__}: its models' "
            "attention has no xFormers processor; choose the kernel of the full-sequence passes (prompt prefill, "
            "likelihood, FAE) with pipe.transformer.set_attention_backend(...): diffusers' attention backends, e.g. "
            "'flash', '_native_efficient', or 'xformers' where installed"
        )

    def disable_xformers_memory_efficient_attention(self):
        """xFormers is never used (see :meth:`enable_xformers_memory_efficient_attention`): nothing to undo."""

    def enable_vae_slicing(self):
        """Decode (and encode) one image of a batch at a time: ``pipe.vae.enable_slicing()``, as older diffusers
        pipelines offered it."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self):
        """Decode in overlapping tiles: ``pipe.vae.enable_tiling()`` (STARFlow's ``AutoencoderKL``); the FAE of
        STARFlow2 refuses it with a ``ValueError`` (see :meth:`AutoencoderFAE.enable_tiling`)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        self.vae.disable_tiling()

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Input validation, noise and output conversion shared by the STARFlow pipelines.

Every ``check_*`` function raises a ``ValueError`` whose message starts with the offending argument's name in
backticks, e.g. ``"`height` and `width` must be ..."``, so callers and tests can tell which input was wrong.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..utils.hub import StarFlowHubMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

Generator = Union[torch.Generator, List[torch.Generator], None]


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}; got {output_type!r}")


def check_guidance_scale(guidance_scale: float) -> None:
    if not guidance_scale >= 0:  # also rejects NaN
        raise ValueError(f"`guidance_scale` must be >= 0; got {guidance_scale}")


def check_generator(generator: Generator, batch_size: int) -> None:
    """A list of generators needs one generator per generated image (``batch_size * num_images_per_prompt``)."""
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"`generator` is a list of {len(generator)} generators, but {batch_size} images are "
                         f"generated (batch size * num_images_per_prompt); pass one generator per image")


def check_image_size(height: int, width: int, multiple: int) -> None:
    """``height`` and ``width`` must be positive multiples of ``multiple`` (VAE factor times patch size)."""
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
            and height % multiple == 0 and width % multiple == 0):
        raise ValueError(f"`height` and `width` must be positive multiples of {multiple}; got {height} and {width}")


def check_prompt(prompt: Union[str, Sequence[str]], name: str = "prompt", allow_empty: bool = False) -> List[str]:
    """Validate a prompt (a string or a non-empty list of strings) and return it as a list.

    ``allow_empty`` accepts ``""`` items (e.g. negative prompts, where ``""`` is the unconditional prompt).
    """
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"`{name}` must be a string or a non-empty list of strings; got {type(prompt).__name__}")
    if not allow_empty and any(not p.strip() for p in prompts):
        raise ValueError(f"`{name}` must not contain empty strings; got {prompt!r}")
    return list(prompts)


def resolve_callback_tensor_inputs(callback_on_step_end: Optional[Callable],
                                   callback_on_step_end_tensor_inputs: Sequence[str],
                                   allowed: Sequence[str]) -> List[str]:
    """The tensor names to pass to ``callback_on_step_end``, checked against the pipeline's ``_callback_tensor_inputs``.

    A :class:`~diffusers.callbacks.PipelineCallback` or :class:`~diffusers.callbacks.MultiPipelineCallbacks` brings
    its own ``tensor_inputs``.
    """
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise ValueError(f"`callback_on_step_end` must be callable; got {type(callback_on_step_end).__name__}")
    unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in allowed]
    if unknown:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a subset of {list(allowed)}; got unknown "
                         f"{unknown}")
    return list(callback_on_step_end_tensor_inputs or [])


def prepare_noise(shape: Tuple[int, ...], generator: Generator, device, dtype: torch.dtype = torch.float32,
                  latents: Optional[torch.Tensor] = None, name: str = "latents") -> torch.Tensor:
    """Standard-normal noise of ``shape`` (one generator per sample when ``generator`` is a list), or the
    user-supplied ``latents`` after checking their shape."""
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}; got {tuple(latents.shape)}")
    return latents.to(device=device, dtype=dtype)


def postprocess_images(images: torch.Tensor, output_type: str = "pil",
                       image_processor: Optional[VaeImageProcessor] = None):
    """Decoded images ``(B, 3, H, W)`` in ``[-1, 1]`` -> list of PIL images, ``(B, H, W, 3)`` numpy array in
    ``[0, 1]`` or ``(B, 3, H, W)`` tensor in ``[0, 1]``; ``"latent"`` returns the input unchanged."""
    check_output_type(output_type)
    image_processor = image_processor or VaeImageProcessor()
    return image_processor.postprocess(images, output_type=output_type)


class FlowPipelineMixin(StarFlowHubMixin):
    """The call contract every STARFlow pipeline shares (and, from :class:`StarFlowHubMixin`, ``push_to_hub`` with
    a model card).

    * ``callback_on_step_end(pipe, step, noise_level, callback_kwargs)`` runs once per latent position while an
      image is sampled and once per denoising step; ``step`` counts both, in call order, across all images of the
      call.  ``callback_kwargs["latents"]`` is what the step just made (the latent(s) of the position, or the whole
      latents after a denoising step); returning ``{"latents": new}`` replaces it.
    * ``guidance_scale``, ``num_timesteps`` (steps of one image: latent positions plus denoising steps) and
      ``interrupt`` describe the running call; setting ``pipe._interrupt = True`` in a callback stops the call
      cleanly: positions not sampled yet keep their noise, the remaining denoising steps are skipped, and what was
      made is returned.
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

    def _begin_call(self, guidance_scale: float, num_timesteps: int, callback_on_step_end: Optional[Callable],
                    callback_tensor_inputs: Sequence[str]) -> None:
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
        raise ValueError("enable_sequential_cpu_offload() cannot run the STARFlow pipelines: sampling reads "
                         "parameters outside module forward calls (start tokens, position embeddings, KV-cache "
                         "shapes), which sequential offload keeps on the `meta` device; use "
                         "enable_model_cpu_offload() instead")

    def _step_end(self, noise_level: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Count one step and run ``callback_on_step_end`` on it; returns ``latents`` or their replacement."""
        step, self._step_index = self._step_index, self._step_index + 1
        if self._step_callback is None:
            return latents
        kwargs = {name: value for name, value in {"latents": latents}.items() if name in self._step_callback_inputs}
        outputs = self._step_callback(self, step, noise_level, kwargs) or {}
        return outputs.get("latents", latents)

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Noise, callbacks and output conversion shared by the STARFlow pipelines.

The input checks are in :mod:`diffusers_starflow2.utils.validation`; every one raises a ``ValueError`` whose message
starts with the offending argument's name in backticks, so callers and tests can tell which input was wrong.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

# the checks live in one module; they are re-exported here for the pipelines
from ..utils.validation import (  # noqa: F401
    check_generator,
    check_guidance_scale,
    check_image_size,
    check_latents,
    check_names,
    check_output_type,
    check_prompt,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

Generator = Union[torch.Generator, List[torch.Generator], None]


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
    callback_on_step_end_tensor_inputs = check_names(callback_on_step_end_tensor_inputs or [],
                                                     "callback_on_step_end_tensor_inputs")
    unknown = [k for k in callback_on_step_end_tensor_inputs if k not in allowed]
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
    return check_latents(latents, shape, name).to(device=device, dtype=dtype)


def postprocess_images(images: torch.Tensor, output_type: str = "pil",
                       image_processor: Optional[VaeImageProcessor] = None):
    """Decoded images ``(B, 3, H, W)`` in ``[-1, 1]`` -> list of PIL images, ``(B, H, W, 3)`` numpy array in
    ``[0, 1]`` or ``(B, 3, H, W)`` tensor in ``[0, 1]``; ``"latent"`` returns the input unchanged."""
    check_output_type(output_type)
    image_processor = image_processor or VaeImageProcessor()
    return image_processor.postprocess(images, output_type=output_type)

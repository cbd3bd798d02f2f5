# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Noise, callbacks and output conversion shared by the STARFlow pipelines.

The input checks are in :mod:`diffusers_starflow2.utils.validation`; every one raises a ``ValueError`` whose message
starts with the offending argument's name in backticks, so callers and tests can tell which input was wrong.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..utils.io import atomic_output_dir

# the checks live in one module; they are re-exported here for the pipelines
from ..utils.validation import (  # noqa: F401
    check_callable,
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
    check_callable(callback_on_step_end, "callback_on_step_end")
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

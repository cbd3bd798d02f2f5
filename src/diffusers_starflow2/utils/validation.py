# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Checking what users pass to the pipelines and the command line.

Every check raises a ``ValueError`` whose message starts with the argument's name in backticks, then says what was
given and what is accepted, e.g. ``"`guidance_scale` must be a finite number >= 0; got inf"``.  Checks that
normalise their input (numpy scalars, devices, dtypes) return the normalised value, so a caller never works on
anything but what was checked.

This module holds the generic checks (numbers, flags, choices, devices, dtypes, seeds, generators, finite tensors);
prompts, chat messages and context budgets are checked in :mod:`~diffusers_starflow2.utils.chat`, images in
:mod:`~diffusers_starflow2.utils.image_processing`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from .torch_utils import has_values, is_fake

# Largest guidance scale and noise level: far beyond any useful value, and small enough that the float32 arithmetic of
# sampling cannot overflow into an error (larger useless values still end in NaN, which is caught after sampling).
MAX_SCALE = 1e6
# Most images one call may generate, and most denoising steps: beyond them a typo (1e9) would run for days or exhaust
# memory instead of failing.
MAX_IMAGES_PER_CALL = 1024
MAX_DENOISING_STEPS = 1000
# Largest Jacobi window: far beyond any image's latent positions (a window longer than the image is the image).
MAX_JACOBI_BLOCK_SIZE = 2**20
# Floating dtypes a model's activations and caches may take (float8 and the like are storage formats only).
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

NON_FINITE_HINT = (
    "likely causes: weights holding NaN/inf (a broken checkpoint or LoRA file), a guidance scale or "
    "noise level too large for this model, a noise level of 0 with denoising steps, or non-finite "
    "`latents` / callback outputs"
)


class NonFiniteError(ValueError):
    """Sampling produced NaN or inf: raised instead of returning a black image or empty text."""


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- numbers ---------------------------------------------------------------------------------------------------------


def _range_text(minimum, maximum, exclusive_minimum: bool, exclusive_maximum: bool = False) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if exclusive_maximum else '<='} {maximum}")
    return " and ".join(parts)


def _plain_number(value: Any) -> Any:
    # numpy scalars behave like Python numbers; 0-d arrays and tensors do not (they broadcast), so they are refused.
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def check_number(
    value: Any,
    name: str,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    exclusive_minimum: bool = False,
    allow_none: bool = False,
    exclusive_maximum: bool = False,
) -> Optional[float]:
    """A finite real number (int, float or numpy scalar; not bool) in range, returned as ``float``."""
    if value is None and allow_none:
        return None
    value = _plain_number(value)
    bounds = _range_text(minimum, maximum, exclusive_minimum, exclusive_maximum)
    accepted = "a finite number" + (f" {bounds}" if bounds else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be {accepted}; got {_describe(value)}")
    too_low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    too_high = maximum is not None and (value >= maximum if exclusive_maximum else value > maximum)
    if too_low or too_high:
        raise ValueError(f"`{name}` must be {accepted}; got {value}")
    return float(value)


def check_integer(
    value: Any, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None, allow_none: bool = False
) -> Optional[int]:
    """An integer (int or numpy integer; not bool, not a float such as ``2.0``) in range, returned as ``int``."""
    if value is None and allow_none:
        return None
    value = _plain_number(value)
    bounds = _range_text(minimum, maximum, False)
    accepted = "an integer" + (f" {bounds}" if bounds else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be {accepted}; got {_describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be {accepted}; got {value}")
    return int(value)


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed ``torch.Generator.manual_seed`` takes without wrapping around: 0 <= seed < 2**64."""
    return check_integer(seed, name, minimum=0, maximum=2**64 - 1)


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False; got {_describe(value)}")
    return bool(value)


def check_callable(value: Any, name: str) -> None:
    """``None`` or something callable."""
    if value is not None and not callable(value):
        raise ValueError(f"`{name}` must be callable or None; got {type(value).__name__}")


def check_names(value: Any, name: str) -> List[str]:
    """A list/tuple of strings (e.g. tensor names), returned as a list."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"`{name}` must be a list of strings; got {_describe(value)}")
    return list(value)


def check_choice(value: Any, name: str, choices: Sequence) -> Any:
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"`{name}` must be one of {list(choices)}; got {_describe(value)}")
    return value


def check_guidance_scale(guidance_scale: Any, name: str = "guidance_scale", minimum: float = 0) -> float:
    """A guidance weight in ``[minimum, MAX_SCALE]`` (0 disables text guidance, 1 image guidance)."""
    return check_number(guidance_scale, name, minimum=minimum, maximum=MAX_SCALE)


def check_inference_steps(steps: Any, name: str = "num_inference_steps") -> int:
    return check_integer(steps, name, minimum=0, maximum=MAX_DENOISING_STEPS)


def check_images_per_prompt(
    num_images_per_prompt: Any, num_prompts: int = 1, name: str = "num_images_per_prompt"
) -> int:
    """At least 1, and at most MAX_IMAGES_PER_CALL images in all (``num_prompts`` times this)."""
    return check_integer(num_images_per_prompt, name, minimum=1, maximum=max(MAX_IMAGES_PER_CALL // num_prompts, 1))


def check_batch_size(batch_size: int, name: str = "num_images_per_prompt") -> None:
    """All images of one call within MAX_IMAGES_PER_CALL: those generated (prompts x ``num_images_per_prompt``) or,
    with ``name="image"``, those given (e.g. to score with ``log_likelihood``)."""
    if batch_size > MAX_IMAGES_PER_CALL:
        what = (
            "`num_images_per_prompt` times the number of prompts/images"
            if name == "num_images_per_prompt"
            else f"the number of images in `{name}`"
        )
        raise ValueError(f"{what} is {batch_size}; one call takes at most {MAX_IMAGES_PER_CALL} images")


def check_noise_level(noise_level: Any, name: str = "noise_level") -> float:
    """The noise level (a standard deviation) of the flow's samples, in ``[0, MAX_SCALE]``."""
    return check_number(noise_level, name, minimum=0, maximum=MAX_SCALE)


def check_output_type(output_type: Any, choices: Sequence[str] = ("pil", "np", "pt", "latent")) -> str:
    return check_choice(output_type, "output_type", choices)


def check_jacobi(
    jacobi_block_size: Any = None, jacobi_tolerance: Any = 1e-3, jacobi_max_iterations: Any = None
) -> dict:
    """The decoding mode of a call: ``jacobi_block_size`` None (exact sequential decoding) or an integer window in
    ``[1, MAX_JACOBI_BLOCK_SIZE]``, ``jacobi_tolerance`` a finite number in ``[0, MAX_SCALE]``,
    ``jacobi_max_iterations`` None (the window size) or an integer >= 1.  Returns them as Python numbers, by name."""
    return dict(
        jacobi_block_size=check_integer(
            jacobi_block_size, "jacobi_block_size", minimum=1, maximum=MAX_JACOBI_BLOCK_SIZE, allow_none=True
        ),
        jacobi_tolerance=check_number(jacobi_tolerance, "jacobi_tolerance", minimum=0, maximum=MAX_SCALE),
        jacobi_max_iterations=check_integer(
            jacobi_max_iterations, "jacobi_max_iterations", minimum=1, maximum=MAX_JACOBI_BLOCK_SIZE, allow_none=True
        ),
    )


# -- devices and dtypes ----------------------------------------------------------------------------------------------


def _usable_devices() -> List[str]:
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count() if accelerator is not None else 0
    return ["cpu", "meta"] + [f"{accelerator.type}:{i}" for i in range(count)]


def check_device(device: Any, name: str = "device", allow_none: bool = True) -> Optional[torch.device]:
    """A device this build and machine can use (``cpu``, ``meta``, or an index of the build's accelerator: a
    string, a ``torch.device`` or an accelerator index), returned as a ``torch.device``."""
    if device is None and allow_none:
        return None
    accepted = f"a device of this machine ({', '.join(_usable_devices())})" + (" or None" if allow_none else "")
    if isinstance(device, (bool, np.bool_)) or not isinstance(device, (str, torch.device, numbers.Integral)):
        raise ValueError(f"`{name}` must be {accepted}; got {type(device).__name__} {_describe(device)}")
    try:
        parsed = torch.device(int(device) if isinstance(device, numbers.Integral) else device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"`{name}` must be {accepted}; got {_describe(device)}") from None
    if parsed.type not in ("cpu", "meta"):
        usable = _usable_devices()
        if f"{parsed.type}:{parsed.index or 0}" not in usable:
            raise ValueError(f"`{name}` must be {accepted}; got {_describe(device)}, which this machine does not have")
    return parsed


def check_dtype(dtype: Any, name: str = "dtype", allow_none: bool = True) -> Optional[torch.dtype]:
    """A compute dtype (:data:`COMPUTE_DTYPES`) or None."""
    if dtype is None and allow_none:
        return None
    if not isinstance(dtype, torch.dtype) or dtype not in COMPUTE_DTYPES:
        accepted = ", ".join(str(d) for d in COMPUTE_DTYPES) + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be a floating-point torch.dtype ({accepted}); got {_describe(dtype)}")
    return dtype


def check_tensor_values(tensor: torch.Tensor, name: str, device: Any = None, where: str = "") -> torch.Tensor:
    """A given tensor whose values can be read: not on the ``meta`` device (nor a fake tensor), unless ``device``
    (where it will be used) is ``meta`` too, as in a dry run of a model built on ``meta``, or it is a fake tensor
    (a ``FakeTensorMode`` dry run, e.g. a memory plan)."""
    dry_run = torch.device(device if device is not None else "cpu").type == "meta" or is_fake(tensor)
    if not has_values(tensor) and not dry_run:
        raise ValueError(
            f"`{name}`{where} is a tensor on the {tensor.device.type} device, which holds no values; pass it on "
            f"a device of this machine ({', '.join(d for d in _usable_devices() if d != 'meta')})"
        )
    return tensor


# -- generators ------------------------------------------------------------------------------------------------------


def check_generator(generator: Any, batch_size: int, name: str = "generator") -> None:
    """``None``, a ``torch.Generator``, or a list of one generator per generated image."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        hint = " (to seed, pass torch.Generator().manual_seed(seed))" if isinstance(generator, numbers.Number) else ""
        raise ValueError(
            f"`{name}` must be None, a torch.Generator or a list of torch.Generators; got "
            f"{type(generator).__name__}{hint}"
        )
    if len(generator) != batch_size:
        raise ValueError(
            f"`{name}` is a list of {len(generator)} generators, but {batch_size} images are "
            f"generated (batch size * num_images_per_prompt); pass one generator per image"
        )


# -- tensors ---------------------------------------------------------------------------------------------------------


def check_finite(tensor: torch.Tensor, name: str, where: str = "") -> torch.Tensor:
    """``tensor``, refused if it holds NaN/inf (checked where it has values: not on ``meta``)."""
    if has_values(tensor) and not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}`{where} holds NaN or inf values")
    return tensor


def check_latents(
    latents: Any, shape: Sequence[Optional[int]], name: str = "latents", device: Any = None
) -> torch.Tensor:
    """User-supplied noise or latents: a finite floating-point ``torch.Tensor`` (or numpy array) of exactly
    ``shape`` (a ``None`` entry takes any size >= 1, e.g. the batch), holding values unless ``device`` is ``meta``
    (:func:`check_tensor_values`)."""
    if isinstance(latents, np.ndarray) and np.issubdtype(latents.dtype, np.floating):
        latents = torch.from_numpy(latents)
    layout = "(" + ", ".join("B" if d is None else str(d) for d in shape) + ")"
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        kind = f"{type(latents).__name__}" + (f" of {latents.dtype}" if hasattr(latents, "dtype") else "")
        raise ValueError(f"`{name}` must be a floating-point torch.Tensor of shape {layout}; got {kind}")
    if latents.ndim != len(shape) or any(
        (size < 1) if want is None else (size != want) for size, want in zip(latents.shape, shape)
    ):
        raise ValueError(f"`{name}` must have shape {layout}; got {tuple(latents.shape)}")
    check_tensor_values(latents, name, device)
    return check_finite(latents, name)


def check_finite_output(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` if sampled ``what`` holds NaN/inf (never decode them into a black image);
    checked where the tensor has values (not on ``meta``)."""
    if has_values(tensor) and not torch.isfinite(tensor).all():
        raise NonFiniteError(f"sampling produced NaN or inf {what}; {NON_FINITE_HINT}")


def check_finite_state_dict(state: dict, name: str = "checkpoint") -> None:
    """Every floating-point tensor of ``state`` is finite; the message lists the first offending keys."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"`{name}` holds NaN or inf in {len(bad)} tensors ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})"
        )

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Checking what users pass to the pipelines and the command line.

Every check raises a ``ValueError`` whose message starts with the argument's name in backticks, then says what was
given and what is accepted, e.g. ``"`guidance_scale` must be a finite number >= 0; got inf"``.  Checks that
normalise their input (numpy scalars, image forms, a single prompt) return the normalised value, so a caller never
works on anything but what was checked.

Special tokens of the tokenizer (``<|im_end|>``, ``<|image_pad|>``, ``</s>``, ...) typed inside a prompt are
refused rather than escaped: the chat template renders the prompt as text that is tokenized as a whole, so a typed
control token would become the real one (ending a turn early, or opening an image slot with no image).  They are
looked for in the text as the model sees it: segments that are rendered next to each other (the text items of one
message, the text parts of a forced answer, the rows of training data) are joined first, so a token split across
two segments (``"what <|im_"`` + ``"end|>"``) is refused like a whole one (:func:`check_special_tokens`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch

from .torch_utils import has_values, is_fake

# Largest input image, in pixels (a 4096 x 4096 image).  Bigger ones are refused before they are decoded or resized:
# every image is resized to the model's (small) image size anyway, and decoding a huge file costs gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
# Positions that the chat template adds around a prompt (role headers, turn ends, <|vision_start|>), kept free of
# prompt tokens when the token limit is derived from the model's context.
CHAT_TEMPLATE_RESERVE = 32
CHAT_ROLES = ("system", "user", "assistant")
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
# PIL modes whose conversion to RGB would clip values (16/32-bit integer, float): refused instead of misread.
_HIGH_DEPTH_MODES = ("I", "F")

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


# -- text ------------------------------------------------------------------------------------------------------------


def special_tokens(tokenizer) -> List[str]:
    """The tokenizer's special tokens that are matched inside plain text (longest first)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return sorted((t for t in tokens if t), key=len, reverse=True)


def joined_texts(parts: Sequence[Any]) -> List[List[str]]:
    """The runs of adjacent strings of ``parts`` (anything else, an image, ends a run): the pieces of text that are
    rendered next to each other, each run then read as one text."""
    runs, run = [], []
    for part in parts:
        if isinstance(part, str):
            run.append(part)
        else:
            runs, run = runs + ([run] if run else []), []
    return runs + ([run] if run else [])


def check_special_tokens(pieces: Union[str, Sequence[str]], name: str, tokenizer, where: str = "") -> None:
    """Refuse the tokenizer's special tokens in the text as the model sees it: ``pieces``, one text or the adjacent
    segments that are rendered as one text, joined (so a token split across segments is found too).  The one
    special-token check of the pipelines' prompts and of the training data."""
    pieces = [pieces] if isinstance(pieces, str) else list(pieces)
    text = "".join(pieces)
    typed = [t for t in special_tokens(tokenizer) if t in text]
    if not typed:
        return
    token = typed[0]
    whole = any(token in p for p in pieces)
    across = "" if whole or len(pieces) == 1 else f" where its segments {' + '.join(_describe(p) for p in pieces)} join"
    raise ValueError(
        f"`{name}`{where} contains the tokenizer's special token {token!r}{across}, which would act as a control "
        f"token; special tokens are not accepted in text (remove or rephrase it)"
    )


def check_text(text: Any, name: str, tokenizer=None, allow_empty: bool = False, where: str = "") -> str:
    """A string, not blank (unless ``allow_empty``), without the tokenizer's special tokens typed in it
    (:func:`check_special_tokens`).

    ``where`` locates the text inside the argument (e.g. ``" item 1"``) in messages.
    """
    if not isinstance(text, str):
        raise ValueError(f"`{name}`{where} must be a string; got {type(text).__name__} {_describe(text)}")
    if not allow_empty and not text.strip():
        raise ValueError(f"`{name}`{where} must not be empty or blank; got {text!r}")
    if tokenizer is not None:
        check_special_tokens(text, name, tokenizer, where)
    return text


def check_prompt(
    prompt: Any,
    name: str = "prompt",
    allow_empty: bool = False,
    tokenizer=None,
    max_items: Optional[int] = MAX_IMAGES_PER_CALL,
) -> List[str]:
    """A string or a non-empty list/tuple of at most ``max_items`` strings, returned as a list (each item checked by
    :func:`check_text`).  ``allow_empty`` accepts ``""`` items (negative prompts: ``""`` is the unconditional one).
    """
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt:
        prompts = list(prompt)
    else:
        raise ValueError(
            f"`{name}` must be a string or a non-empty list of strings; got {type(prompt).__name__} {_describe(prompt)}"
        )
    if max_items is not None and len(prompts) > max_items:
        raise ValueError(f"`{name}` is a list of {len(prompts)} prompts; one call takes at most {max_items}")
    for i, text in enumerate(prompts):
        check_text(text, name, tokenizer, allow_empty, "" if isinstance(prompt, str) else f" item {i}")
    return prompts


def count_tokens(tokenizer, text: str, add_special_tokens: bool = False) -> int:
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def model_context_length(vlm, tokenizer=None) -> int:
    """Positions the VLM can attend over: its ``max_position_embeddings`` (or the tokenizer's limit)."""
    config = vlm.config.get_text_config() if hasattr(vlm.config, "get_text_config") else vlm.config
    length = getattr(config, "max_position_embeddings", None)
    if not length and tokenizer is not None:
        length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length and length < 10**9 else 32768


def prompt_token_limit(context_length: int, num_latents: int) -> int:
    """Most tokens a prompt may have when one image of ``num_latents`` positions follows it in the context."""
    return max(context_length - num_latents - CHAT_TEMPLATE_RESERVE, 1)


def check_stop(stop: Any, name: str = "stop") -> List[str]:
    """``None``, a non-empty string, or a list/tuple of non-empty strings -> a list."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(
            f"`{name}` must be None, a non-empty string or a list of non-empty strings; got {_describe(stop)}"
        )
    return list(items)


# -- chat messages ---------------------------------------------------------------------------------------------------


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is meant as chat messages (a list of dicts) rather than segments."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _check_content_item(item: Any, name: str, where: str) -> None:
    if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
        raise ValueError(
            f"`{name}`{where} must be {{'type': 'text', 'text': str}} or {{'type': 'image', 'image': "
            f"image}}; got {_describe(item)}"
        )
    if item["type"] == "text":
        check_text(item.get("text"), name, allow_empty=True, where=f"{where} text")
    elif item.get("image") is None:
        raise ValueError(f"`{name}`{where} is an image item without an 'image'")


def check_messages(messages: Any, name: str = "prompt") -> list:
    """Chat messages: dicts ``{"role": one of CHAT_ROLES, "content": str | [content items]}``, content non-empty."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"`{name}` must be a non-empty list of chat messages; got {_describe(messages)}")
    for i, message in enumerate(messages):
        where = f" message {i}"
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ValueError(
                f"`{name}`{where} must be a dict with 'role' and 'content' (no other keys); got {_describe(message)}"
            )
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"`{name}`{where} role must be one of {list(CHAT_ROLES)}; got {_describe(message['role'])}"
            )
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)) or not content:
            raise ValueError(
                f"`{name}`{where} content must be a string or a non-empty list of content items; got "
                f"{_describe(content)}"
            )
        for j, item in enumerate(content):
            _check_content_item(item, name, f"{where} content item {j}")
    return list(messages)


def check_conversation(
    messages: Sequence[dict],
    images: Sequence,
    answer: Sequence,
    placeholder: str,
    tokenizer,
    image_positions: int,
    name: str = "prompt",
) -> int:
    """Check a parsed interleaved prompt and return the positions it takes in the context.

    ``messages`` are rendered chat messages (text items), ``images`` the images inside them, ``answer`` the forced
    beginning of the answer (strings, ``placeholder`` for an image to generate, or images).
    """
    # what the template renders as one text: the text items of a message side by side, the answer's forced text
    # between its images (and the images to generate)
    runs = [r for m in messages for r in joined_texts([i["text"] if i["type"] == "text" else i for i in m["content"]])]
    runs += joined_texts([None if isinstance(p, str) and p == placeholder else p for p in answer])
    for run in runs:
        for text in run:
            check_text(text, name, allow_empty=True)
        check_special_tokens(run, name, tokenizer)
    texts = [text for run in runs for text in run]
    answer_images = [p for p in answer if not isinstance(p, str) or p == placeholder]
    for image in list(images) + [p for p in answer_images if not isinstance(p, str)]:
        check_single_image(image, name)
    return (
        sum(count_tokens(tokenizer, t) for t in texts)
        + CHAT_TEMPLATE_RESERVE * len(messages)
        + (len(images) + len(answer_images)) * image_positions
    )


def check_context_budget(
    prompt_positions: int,
    max_new_tokens: int,
    max_images: int,
    image_positions: int,
    context_length: int,
    held_positions: int = 0,
    name: str = "prompt",
) -> None:
    """The longest sequence a call may build (``held_positions`` of a conversation continued from a ``state``, the
    prompt, new tokens, new images) fits in the model's context; ``name`` is the text of the guidance branch checked
    (``"negative_prompt"`` for the branches whose user turn it is)."""
    needed = held_positions + prompt_positions + max_new_tokens + max_images * image_positions
    if needed > context_length:
        held = f"the conversation `state` holds {held_positions}, " if held_positions else ""
        raise ValueError(
            f"`{name}` needs up to {needed} positions ({held}{prompt_positions} for the prompt, "
            f"max_new_tokens={max_new_tokens}, max_images={max_images} of {image_positions} positions "
            f"each), more than the model's context of {context_length}; shorten `{name}`, lower "
            f"`max_new_tokens` / `max_images`" + (" or start a new conversation" if held else "")
        )


def check_conversation_state(state: Any, state_type: type, transformer: Any, num_branches: int) -> None:
    """A conversation ``state`` to continue: a ``state_type`` made with ``transformer`` (its caches hold that
    model's keys and values), holding the guidance branches the call needs (a later turn may use fewer branches
    than the first, not more)."""
    if not isinstance(state, state_type):
        raise ValueError(
            f"`state` must be a {state_type.__name__} (the `state` of a previous output); got {type(state).__name__}"
        )
    if state.model is None or state.model() is not transformer:
        raise ValueError(
            "`state` was made by another model (its caches hold another transformer's keys and "
            "values); continue a conversation with a pipeline sharing the transformer that started it"
        )
    if num_branches > state.num_branches:
        name = "image_guidance_scale" if num_branches == 3 else "guidance_scale"
        raise ValueError(
            f"`{name}` needs {num_branches} guidance branches but `state` holds {state.num_branches}; "
            f"use the guidance of every later turn already in the first turn"
        )


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


# -- images ----------------------------------------------------------------------------------------------------------

IMAGE_FORMS = (
    "a PIL image, a numpy array (H, W, 3) / (B, H, W, 3) of uint8 or of floats in [0, 1], a torch "
    "tensor (3, H, W) / (B, 3, H, W) of uint8 or of floats in [0, 1] or [-1, 1], or a non-empty list "
    "of one of these"
)


def check_image_pixels(height: int, width: int, name: str, max_pixels: int = MAX_IMAGE_PIXELS, where: str = "") -> None:
    if height < 1 or width < 1 or height * width > max_pixels:
        raise ValueError(
            f"`{name}`{where} is {width}x{height} pixels; images must have between 1 and {max_pixels:,} pixels"
        )


def _pil_to_rgb(image: PIL.Image.Image, name: str, where: str = "") -> PIL.Image.Image:
    check_image_pixels(image.height, image.width, name, where=where)
    if image.mode.split(";")[0] in _HIGH_DEPTH_MODES:
        raise ValueError(
            f"`{name}`{where} is a PIL image in mode {image.mode!r}, whose values converting to RGB would "
            f"clip; convert it to 8-bit RGB first"
        )
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as err:  # modes PIL cannot convert, or a file whose pixel data is broken
        raise ValueError(f"`{name}`{where} (a PIL image in mode {image.mode!r}) cannot be read as RGB: {err}") from None
    return rgb


def _pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _array_to_tensor(image: Union[np.ndarray, torch.Tensor], name: str, where: str = "") -> torch.Tensor:
    """numpy ``(.., H, W, 3)`` / torch ``(.., 3, H, W)`` of uint8 or floats -> ``(B, 3, H, W)`` float32 in [0, 1]."""
    is_numpy = isinstance(image, np.ndarray)
    layout = "(H, W, 3) or (B, H, W, 3)" if is_numpy else "(3, H, W) or (B, 3, H, W)"
    channel_dim = -1 if is_numpy else -3
    if image.ndim not in (3, 4) or image.shape[channel_dim] != 3:
        other = " (numpy images are channels-last)" if is_numpy else " (torch images are channels-first)"
        raise ValueError(f"`{name}`{where} must be an RGB image of shape {layout}{other}; got {tuple(image.shape)}")
    if not (
        image.dtype in (np.uint8, torch.uint8)
        or (np.issubdtype(image.dtype, np.floating) if is_numpy else image.is_floating_point())
    ):
        raise ValueError(f"`{name}`{where} must hold uint8 or floating-point values; got {image.dtype}")
    if not is_numpy:
        check_tensor_values(image, name, where=where)  # its values are read here, whatever the model's device
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if is_numpy else image.detach().cpu()
    if is_numpy:
        tensor = tensor.movedim(-1, -3)
    tensor = tensor if tensor.ndim == 4 else tensor[None]
    if tensor.shape[0] < 1:
        raise ValueError(f"`{name}`{where} is an empty batch of shape {tuple(image.shape)}")
    check_image_pixels(tensor.shape[-2], tensor.shape[-1], name, where=where)
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    tensor = check_finite(tensor.float(), name, where)
    low, high = float(tensor.min()), float(tensor.max())
    if high > 1 or low < (0 if is_numpy else -1):
        accepted = "[0, 1] (or uint8 in [0, 255])" if is_numpy else "[0, 1] or [-1, 1] (or uint8 in [0, 255])"
        raise ValueError(f"`{name}`{where} float values must lie in {accepted}; got values in [{low:.4g}, {high:.4g}]")
    # diffusers' convention for float tensors: any negative value means the image is in [-1, 1]
    return (tensor + 1) / 2 if low < 0 else tensor


def image_items(image: Any, name: str = "image") -> List[Union[PIL.Image.Image, torch.Tensor]]:
    """Any accepted image form -> one item per image: an RGB PIL image, or a ``(1, 3, H, W)`` float32 tensor in
    ``[0, 1]`` for arrays and tensors.

    Accepted: see :data:`IMAGE_FORMS`.  A list holds items of one kind; uint8 values are divided by 255, float
    tensors with a negative value are read as ``[-1, 1]``.  Sizes may differ between images.  PIL images stay PIL
    images so that resizing them keeps PIL's filter.
    """
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if len(items) > MAX_IMAGES_PER_CALL:
        raise ValueError(f"`{name}` is a list of {len(items)} images; one call takes at most {MAX_IMAGES_PER_CALL}")
    kinds = {PIL.Image.Image if isinstance(i, PIL.Image.Image) else type(i) for i in items}
    if not items or len(kinds) != 1 or not kinds <= {PIL.Image.Image, np.ndarray, torch.Tensor}:
        got = type(image).__name__ + (
            f" of {sorted(k.__name__ for k in kinds)}" if isinstance(image, (list, tuple)) else ""
        )
        raise ValueError(f"`{name}` must be {IMAGE_FORMS}; got {got}")
    out = []
    for i, item in enumerate(items):
        where = f" item {i}" if isinstance(image, (list, tuple)) else ""
        if isinstance(item, PIL.Image.Image):
            out.append(_pil_to_rgb(item, name, where))
        else:
            out += list(_array_to_tensor(item, name, where).split(1))
    check_batch_size(len(out), name)  # batches inside the list count image by image
    return out


def image_to_tensors(image: Any, name: str = "image") -> List[torch.Tensor]:
    """Any accepted image form -> a list of ``(1, 3, H, W)`` float32 tensors in ``[0, 1]``, one per image."""
    return [_pil_to_tensor(i) if isinstance(i, PIL.Image.Image) else i for i in image_items(image, name)]


def check_single_image(image: Any, name: str) -> torch.Tensor:
    """Exactly one image (one slot of a conversation) -> ``(1, 3, H, W)`` in ``[0, 1]``."""
    images = image_to_tensors(image, name)
    if len(images) != 1:
        raise ValueError(f"`{name}` must be one image here; got a batch of {len(images)}")
    return images[0]


def check_image_size(height: Any, width: Any, multiple: int) -> None:
    """``height`` and ``width`` must be positive integer multiples of ``multiple`` (VAE factor times patch size)."""
    for name, value in (("height", height), ("width", width)):
        value = check_integer(value, name, minimum=multiple)
        if value % multiple:
            raise ValueError(f"`{name}` must be a positive multiple of {multiple}; got {value}")
    check_image_pixels(height, width, "height", where=f" x `width` ({height} x {width})")

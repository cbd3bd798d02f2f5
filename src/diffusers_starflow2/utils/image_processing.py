# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Checking and decoding input images: the forms a pipeline accepts (:data:`IMAGE_FORMS`), their size before they
are decoded (:func:`check_image_pixels`), their conversion to RGB tensors (:func:`image_items`,
:func:`image_to_tensors`) and the output size of text-to-image calls (:func:`check_image_size`).

Resizing and normalising to the model's range stay with diffusers' ``VaeImageProcessor``; what is here refuses, with
a ``ValueError`` naming the argument, what that processor would misread (high-depth PIL modes, non-finite or
out-of-range arrays, images too large to decode).
"""

from __future__ import annotations

from typing import Any, List, Union

import numpy as np
import PIL.Image
import torch

from .validation import (
    MAX_IMAGES_PER_CALL,
    check_batch_size,
    check_finite,
    check_integer,
    check_tensor_values,
)

# Largest input image, in pixels (a 4096 x 4096 image).  Bigger ones are refused before they are decoded or resized:
# every image is resized to the model's (small) image size anyway, and decoding a huge file costs gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
# PIL modes whose conversion to RGB would clip values (16/32-bit integer, float): refused instead of misread.
_HIGH_DEPTH_MODES = ("I", "F")


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

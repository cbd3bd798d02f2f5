# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Small torch helpers shared by the models, the pipelines and the benchmarks, and the oneDNN-packed linear path of
CPU decode steps (:func:`packed_weights`, :func:`packed_linear`)."""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake


def has_values(*tensors: torch.Tensor) -> bool:
    """Whether Python may read the values of ``tensors``: none is on the ``meta`` device or a ``FakeTensorMode``
    tensor.  Checks that read values (and the device synchronisation they cost) run only then, so that a model
    built on ``meta`` (``accelerate.init_empty_weights``) or traced for a memory plan runs its shapes to the end."""
    return not any(t.device.type == "meta" or is_fake(t) for t in tensors if isinstance(t, torch.Tensor))


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype ``module``'s layers compute in, as diffusers defines a model's ``dtype``: the ``compute_dtype`` of
    layerwise casting (``enable_layerwise_casting``; the weights are then stored in another dtype, e.g. float8) where a
    layer of ``module`` has it, otherwise the dtype of its floating-point parameters.  It walks every submodule: call
    it once per pass, not per position (a sampling loop takes the dtype from its KV cache)."""
    from diffusers.models.modeling_utils import get_parameter_dtype

    return get_parameter_dtype(module)


class _EmptyFloat32ListFilter:
    """Drops diffusers' ``ModelMixin.to()`` warning "There are modules in X that should be kept in float32: []".

    diffusers (0.42 and its main branch) warns on every cast to a dtype, also for a model that keeps no module in
    float32 (it reads ``_keep_in_fp32_modules or []`` and then tests for None), so ``pipe.to(torch.bfloat16)`` would
    print one such warning per model naming nothing to act on.  The warning of a model that does keep modules in
    float32 (a non-empty list) still shows.
    """

    def filter(self, record) -> bool:
        return "that should be kept in float32: []." not in record.getMessage()


def quiet_empty_float32_warning() -> None:
    """Install :class:`_EmptyFloat32ListFilter` on diffusers' modeling logger (once)."""
    from diffusers.utils import logging

    logger = logging.get_logger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFloat32ListFilter) for f in logger.filters):
        logger.addFilter(_EmptyFloat32ListFilter())


# --------------------------------------------------------------------------------------------------------------
# oneDNN-packed weights for the linears of CPU decode steps
# --------------------------------------------------------------------------------------------------------------

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# A oneDNN call costs ~13 us more than an MKL one (measured): it pays off from 256 x 512 weights (2x at 256 x 1024)
_MIN_PACKED_WEIGHT = 1 << 17
# The instance attribute a linear holds while a packed_weights() context routes it: its packed weight (None until
# its first packed call)
_PACKED = "_onednn_packed_weight"


@contextlib.contextmanager
def packed_weights(*modules: nn.Module):
    """Within this context the plain ``nn.Linear`` layers inside ``modules`` (of at least ``_MIN_PACKED_WEIGHT``
    entries) run on oneDNN-packed weights where :func:`packed_linear` allows it: each keeps the packed weight it
    makes at its first call, so one packing per layer and context.  The sampling functions open it around a
    sampling call, during which weights do not change (a packing kept longer could miss an in-place ``.data``
    update such as a LoRA fusion).

    All its state lives on the layers themselves, for the context's duration: the packed weight and an instance
    ``forward`` that routes the layer's calls through :func:`packed_linear`, so that layers called directly (code
    this package does not own, such as the frozen VLM's transformers layers) are packed too; both are removed on
    exit.  Layers that already have an instance ``forward`` (an accelerate offload hook, or an enclosing context of
    this kind) are left alone."""
    routed = dict.fromkeys(
        layer
        for module in modules
        for layer in module.modules()
        if type(layer) is nn.Linear and "forward" not in layer.__dict__ and layer.weight.numel() >= _MIN_PACKED_WEIGHT
    )
    for layer in routed:
        layer.__dict__[_PACKED] = None
        layer.forward = types.MethodType(_routed_forward, layer)
    try:
        yield
    finally:
        for layer in routed:
            del layer.forward
            del layer.__dict__[_PACKED]


def _packable(linear: nn.Module, x: torch.Tensor) -> bool:
    return not (
        torch.compiler.is_compiling()  # a compiled graph packs weights itself
        or not _ONEDNN
        or _PACKED not in linear.__dict__  # not routed by an open packed_weights() context
        or type(linear) is not nn.Linear
        or x.device.type != "cpu"
        or linear.weight.dtype != torch.float32
        or type(linear.weight.data) is not torch.Tensor  # a quantised tensor subclass (torchao) says float32 too
        or x.dtype != torch.float32
        or "_diffusers_hook" in linear.__dict__  # diffusers' layerwise casting / group offload: the call casts or
        or "_hf_hook" in linear.__dict__  # moves the weight (accelerate's offload hooks too)
        or torch.is_grad_enabled()
        or is_fake(x)  # a FakeTensorMode dry run (memory plan): oneDNN has no fake kernel
    )


def _packed_call(linear: nn.Linear, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    packed = linear.__dict__[_PACKED]
    if packed is None:
        packed = linear.__dict__[_PACKED] = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 4)
    return torch.ops.mkldnn._linear_pointwise(
        x, packed, linear.bias, activation, [], "none" if activation == "gelu" else ""
    )


def _routed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # the forward of a linear routed by packed_weights(): never the module call itself, which would come back here
    return _packed_call(self, x) if _packable(self, x) else F.linear(x, self.weight, self.bias)


def packed_linear(linear: nn.Module, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``linear(x)`` (then ``gelu`` when ``activation="gelu"``, fused into the packed call) for the decode path.

    For a plain ``nn.Linear`` that an open :func:`packed_weights` context routes, on CPU in float32 inference, this
    runs oneDNN with the weight reordered once into its blocked layout and the activation fused: for the few rows of
    a decode step that is ~1.7x faster than the strided MKL ``addmm`` (for weights of at least
    ``_MIN_PACKED_WEIGHT`` entries).  Otherwise (other devices and dtypes, autograd, adapters such as LoRA layers, a
    compiled graph, which packs weights itself) it is the plain module call.
    """
    if not _packable(linear, x):
        out = linear(x)
        return F.gelu(out) if activation == "gelu" else out
    return _packed_call(linear, x, activation)

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Small torch helpers shared by the models, the pipelines and the benchmarks."""

from __future__ import annotations

import torch
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

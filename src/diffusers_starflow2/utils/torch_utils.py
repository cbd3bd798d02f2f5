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

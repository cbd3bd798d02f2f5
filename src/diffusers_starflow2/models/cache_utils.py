# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Key/value caches of the flow blocks and of the Pretzel model.

:class:`FlowKVCache` holds the pre-allocated keys and values of one
:class:`~diffusers_starflow2.models.flow_block.AutoregressiveFlowBlock`, one buffer per layer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class FlowKVCache:
    """Pre-allocated keys and values of one flow block, one buffer per layer.

    Two ways to write: ``update`` appends the new keys/values of one layer at the current length and returns
    everything up to them (the Pretzel's stream, teacher-forced passes); the static-shape decode path of
    :meth:`AutoregressiveFlowBlock.decode_step` writes at given positions with ``index_copy_`` and attends under a
    mask (compiled: over the whole buffer, so that its shapes never change from token to token).  Keys are stored
    after RoPE, which is exact because the rotation of a key depends only on its own position.  Each layer owns its
    buffer: a compiled step that writes into a view of one stacked buffer copies the whole cache at every step.  A CFG
    pair is the batch ``[conditional; unconditional]``; ``select_batch`` keeps some rows (e.g. drops the
    unconditional branch).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, num_kv_heads, max(max_length, 1), head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        """The keys' and values' dtype: the one the layers that write this cache compute in (a decode step casts its
        inputs to it, so that no weight's storage dtype, e.g. float8 under layerwise casting, decides it)."""
        return self.keys[0].dtype if self.keys else torch.float32

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions: buffers too short grow to the next power of two, so that caches of
        any length (forks of a conversation, stacked batches) share a few capacities, and so a few graphs of a
        compiled step, whose shapes are the buffers'."""
        if length <= self.capacity:
            return
        new_cap = 1 << (length - 1).bit_length()
        for buffers in (self.keys, self.values):
            for i, buf in enumerate(buffers):
                pad = list(buf.shape)
                pad[2] = new_cap - buf.shape[2]
                buffers[i] = torch.cat([buf, buf.new_zeros(pad)], dim=2)

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # key, value: (B, H_kv, T_new, D)
        end = self.length + key.shape[2]
        self.reserve(end)
        keys, values = self.keys[layer], self.values[layer]
        if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
            # Differentiable pass over a cached context (e.g. denoising): keep the buffer out of the autograd graph,
            # since in-place writes of later layers would invalidate tensors saved for backward.
            k_all = torch.cat([keys[:, :, : self.length], key], dim=2)
            v_all = torch.cat([values[:, :, : self.length], value], dim=2)
            keys[:, :, self.length : end] = key.detach()
            values[:, :, self.length : end] = value.detach()
            return k_all, v_all
        keys[:, :, self.length : end] = key
        values[:, :, self.length : end] = value
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, num_positions: int) -> None:
        self.length += num_positions

    def crop(self, length: int) -> None:
        """Forget every position at or after ``length``."""
        self.length = min(self.length, length)

    def fork(self, length: int) -> "FlowKVCache":
        """An independent cache holding a copy of the first ``length`` positions."""
        other = FlowKVCache.__new__(FlowKVCache)
        other.keys = [k[:, :, :length].clone() for k in self.keys]
        other.values = [v[:, :, :length].clone() for v in self.values]
        other.length = length
        return other

    def select_batch(self, index: torch.Tensor) -> None:
        self.keys, self.values = [k[index] for k in self.keys], [v[index] for v in self.values]

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "FlowKVCache":
        """A copy on ``device`` in ``dtype`` (this cache is not modified)."""
        other = FlowKVCache.__new__(FlowKVCache)
        other.keys = [k.to(device=device, dtype=dtype) for k in self.keys]
        other.values = [v.to(device=device, dtype=dtype) for v in self.values]
        other.length = self.length
        return other

    @property
    def nbytes(self) -> int:
        """Bytes of the positions held (the room pre-allocated for positions to come is not counted)."""
        return sum(t[:, :, : self.length].nelement() * t.element_size() for t in (*self.keys, *self.values))

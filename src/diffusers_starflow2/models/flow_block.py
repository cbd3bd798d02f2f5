# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The autoregressive flow block shared by every STARFlow / STARFlow2 model.

One block is a causal Transformer that reads the tokens of a latent grid in a fixed scan order and predicts, for
each token, the affine parameters ``(mu, sigma)`` of the *next* token.  Forward (data -> noise) is one parallel
pass: ``z_i = (x_i - mu_i) / sigma_i`` with ``log|det| = -sum log sigma``.  Reverse (noise -> data) runs one token at a
time through a key/value cache, ``x_i = mu_i + sigma_i * z_i``: the block exposes the per-position primitives
(:meth:`~AutoregressiveFlowBlock.prefill`, :meth:`~AutoregressiveFlowBlock.decode_step`) and
:mod:`diffusers_starflow2.sampling` runs the loop.

The arithmetic is the TARFlow / STARFlow one (including RoPE position layout, soft clipping and the softplus
offset), so converted reference checkpoints reproduce the reference outputs.  The inverse-affine step and the
guidance rule are not written here: they belong to :class:`~diffusers_starflow2.TarFlowScheduler`.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from ..utils.torch_utils import compute_dtype, is_fake

LOG_2PI = math.log(2 * math.pi)
# softplus(a + INV_SOFTPLUS_1) == 1 at a == 0, so a zero-initialised output projection starts as the identity map.
INV_SOFTPLUS_1 = 0.541324854612918
ROPE_THETA = 10000
# Number of rotary frequencies given to the text axis of 3-axis positions (the reference's fixed split).
TEXT_AXIS_FREQS = 8


# --------------------------------------------------------------------------------------------------------------
# The flow's negative log-likelihood (the one formula every model, pipeline and training script uses)
# --------------------------------------------------------------------------------------------------------------


def flow_nll(z: torch.Tensor, logdets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample NLL per dimension without the Gaussian constant: ``1/2 mean(z^2) - sum_blocks mean(logdet)``.

    ``z (B, ...)`` is the data mapped to noise; ``logdets`` one ``(B, ...)`` tensor per flow step (an affine step
    contributes ``-log sigma`` per dimension).  Returns ``(B,)`` float32.
    """
    per_sample = 0.5 * z.float().pow(2).flatten(1).mean(1)
    for logdet in logdets:
        per_sample = per_sample - logdet.reshape(logdet.shape[0], -1).mean(1)
    return per_sample


def bits_per_dim(nll: torch.Tensor) -> torch.Tensor:
    """:func:`flow_nll` (nats/dim, no constant) -> bits/dim of the flow's density."""
    return (nll + 0.5 * LOG_2PI) / math.log(2)


def refuse_group_offload(model: nn.Module) -> None:
    """The ``ValueError`` of ``enable_group_offload()`` on a model whose flow blocks sample autoregressively."""
    raise ValueError(
        f"enable_group_offload() cannot offload {type(model).__name__}: sampling runs its layers once per latent "
        "position through decode steps, not through forward, so the offload hooks would not bring them in (and "
        "would move every weight once per position); use the pipeline's enable_model_cpu_offload(), or offload "
        "only the autoencoder (`pipe.vae.enable_group_offload(...)`) with this model on the device"
    )


# --------------------------------------------------------------------------------------------------------------
# Normalisation and rotary embeddings
# --------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a unit offset (``y = x / rms(x) * (1 + w)``, ``w`` zero-initialised), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1 + self.weight.float())).type_as(x)


def make_norm(norm_type: str, dim: int) -> nn.Module:
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim)
    if norm_type == "rms_norm":
        return RMSNorm(dim)
    if norm_type == "none":
        return nn.Identity()
    raise ValueError(f"norm_type must be one of 'layer_norm', 'rms_norm', 'none'; got {norm_type!r}")


def rope_positions(
    height: int, width: int, text_length: int, pt_seq_len: float, mode: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """Positions of ``text_length`` text tokens followed by a ``height x width`` grid in raster order.

    ``mode="1d"``: one index per token, text first.  ``"2d"``: (row, col) of the grid scaled so that the grid's
    geometric-mean side equals ``pt_seq_len`` (no text).  ``"3d"``: (row, col, text) - text tokens sit at the grid
    origin and walk the third axis over ``[0, pt_seq_len)``; grid tokens have text coordinate 0.
    Returns ``(T, n_axes)`` float positions on ``device``.
    """
    if mode == "1d":
        return torch.arange(text_length + height * width, device=device).float().unsqueeze(-1)
    mean_side = math.sqrt(height * width)
    rows = torch.arange(height, device=device) / mean_side * pt_seq_len
    cols = torch.arange(width, device=device) / mean_side * pt_seq_len
    rows, cols = (p.reshape(-1) for p in torch.meshgrid(rows, cols, indexing="ij"))
    if mode == "2d":
        return torch.stack([rows, cols], dim=-1)
    if mode != "3d":
        raise ValueError(f"rope mode must be '1d', '2d' or '3d'; got {mode!r}")
    text_pos = torch.arange(text_length, device=device) / max(text_length, 1) * pt_seq_len
    zeros = torch.zeros(text_length, device=device)
    axes = [torch.cat([zeros, rows]), torch.cat([zeros, cols]), torch.cat([text_pos, torch.zeros_like(rows)])]
    return torch.stack(axes, dim=-1)


def rope_angles(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotation angles ``(..., T, head_dim)`` for ``(..., T, n_axes)`` positions (each angle repeated for its pair),
    on the positions' device.

    One axis: the standard language-model RoPE.  Two axes: half the frequencies per grid axis.  Three axes: the
    text axis takes ``TEXT_AXIS_FREQS`` frequencies and the two grid axes share the rest.
    """
    device = positions.device

    def inv_freq(dim: int) -> torch.Tensor:
        return 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))

    half = head_dim // 2
    if positions.shape[-1] == 1:
        angles = positions[..., 0:1] * inv_freq(head_dim)
    else:
        grid_dim = half - TEXT_AXIS_FREQS if positions.shape[-1] == 3 else half
        parts = [positions[..., 0:1] * inv_freq(grid_dim), positions[..., 1:2] * inv_freq(grid_dim)]
        if positions.shape[-1] == 3:
            text_freq = 1.0 / (
                ROPE_THETA ** (torch.arange(0, TEXT_AXIS_FREQS, device=device).float() / TEXT_AXIS_FREQS)
            )
            parts.append(positions[..., 2:3] * text_freq)
        angles = torch.cat(parts, dim=-1)
    return angles.repeat_interleave(2, dim=-1)


def rope_tables(angles: torch.Tensor) -> torch.Tensor:
    """``(2, ..., T, D)``: cosines and sines of ``angles (..., T, D)``, computed once and shared by all layers."""
    return torch.stack([angles.cos(), angles.sin()])


_PAIR_SIGN = torch.tensor([-1.0, 1.0])


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...); flip + sign, no concatenation
    pairs = x.unflatten(-1, (-1, 2)).flip(-1)
    return (pairs * _PAIR_SIGN.to(device=x.device, dtype=x.dtype)).flatten(-2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, hf_style: bool = False) -> torch.Tensor:
    """Rotate ``x (..., T, D)`` by ``rope = rope_tables(angles)``; ``hf_style`` pairs channel ``i`` with ``i + D/2``."""
    cos, sin = rope[0], rope[1]
    if hf_style:  # regroup halves into adjacent pairs, rotate, and restore the layout
        x = x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
        out = x * cos + _rotate_pairs(x) * sin
        return out.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    return x * cos + _rotate_pairs(x) * sin


# --------------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Transformer layer
# --------------------------------------------------------------------------------------------------------------


def cached_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Attention of scaled queries ``q (R, Q, D)`` over cached keys and values ``(R, S, D)``, one row ``R`` per
    sample and key head (the query heads sharing a key head stacked as ``Q = G T`` queries), under the additive
    ``attn_mask`` broadcastable to ``(R, Q, S)`` (None: every slot); returns ``(R, Q, D)``.

    Written out: for a few queries over a short cache, two matrix products and a softmax cost less than the fused
    kernels, which tile for long query blocks.
    """
    keys_t = keys.transpose(1, 2)  # (R, D, S)
    scores = torch.bmm(q, keys_t) if attn_mask is None else torch.baddbmm(attn_mask, q, keys_t)  # (R, Q, S)
    return torch.bmm(scores.softmax(-1, dtype=torch.float32).to(values.dtype), values)


# The same attention as one opaque operator for compiled decode steps: inductor keeps it a single call (it would
# otherwise fuse the two matrix products with their neighbours into scalar loops, an order of magnitude slower at
# decode sizes).  The graph's buffers have a fixed size; ``filled`` (a 0-dim int64 CPU tensor, so that it never
# specialises the graph) cuts them to the slots written so far, which is all a query may see: the cache is read no
# further than it is full.  Defined with the plain operator registry rather than ``torch.library.custom_op``, whose
# autograd wrapper adds several microseconds to every call; decoding never needs gradients.
_LIBRARY = torch.library.Library("diffusers_starflow2", "DEF")
_LIBRARY.define("cached_attention(Tensor q, Tensor keys, Tensor values, Tensor? attn_mask, Tensor filled) -> Tensor")


@torch.library.impl(_LIBRARY, "cached_attention", "CompositeExplicitAutograd")
def _cached_attention_op(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    filled: torch.Tensor,
) -> torch.Tensor:
    n = int(filled)
    attn_mask = attn_mask[..., :n] if attn_mask is not None else None
    return cached_attention(q, keys[:, :n], values[:, :n], attn_mask)  # a new tensor: no input is aliased


@torch.library.register_fake("diffusers_starflow2::cached_attention")
def _(q, keys, values, attn_mask, filled):
    return q.new_empty(q.shape)  # contiguous, as the real output


def static_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    filled: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`cached_attention` of a static-shape decode step over whole cache buffers ``(R, S, D)``: in a compiled
    graph the opaque operator (inductor would fuse it into slow scalar loops), which reads the ``filled`` slots only."""
    if torch.compiler.is_compiling():
        return torch.ops.diffusers_starflow2.cached_attention(q, keys, values, attn_mask, filled)
    return cached_attention(q, keys, values, attn_mask)


def static_decode_mask(
    positions: torch.Tensor,
    num_slots: int,
    key_padding_mask: Optional[torch.Tensor],
    dtype: torch.dtype,
    num_kv_heads: int,
    groups: int,
) -> torch.Tensor:
    """Additive mask of queries at cache slots ``positions (T,)`` over ``S`` slots, causal, with padded keys hidden
    (``key_padding_mask (B, >= S)``, True = real; a padded query still sees itself), in the row layout of
    :func:`cached_attention` for ``num_kv_heads`` key heads of ``groups`` query heads each: ``(G T, S)``, or
    ``(B H_kv, G T, S)`` with padding."""
    key_positions = torch.arange(num_slots, device=positions.device)
    allowed = key_positions <= positions[:, None]  # (T, S)
    if key_padding_mask is not None:
        allowed = (allowed & key_padding_mask[:, None, None, :num_slots].bool()) | (
            key_positions == positions[:, None]
        )  # (B, 1, T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill_(~allowed, float("-inf"))
    if mask.ndim == 4:
        return mask.repeat(1, num_kv_heads, groups, 1).flatten(0, 1)
    return mask.repeat(groups, 1) if groups > 1 else mask


class FlowAttnProcessor:
    """The full-sequence attention of a :class:`FlowAttention` (training, likelihood, prompts), through diffusers'
    :func:`~diffusers.models.attention_dispatch.dispatch_attention_fn`: ``set_attention_backend(...)`` on a model
    sets :attr:`_attention_backend` here (None: diffusers' active backend, by default torch's SDPA).  Masks are
    boolean ``(B or 1, 1, T, T_k)`` (True = attend), so backends that take no mask (flash) run only unmasked calls:
    bidirectional or plainly causal ones without padding.  The decode steps keep their own kernel
    (:func:`cached_attention`)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "FlowAttention", x, rope, cache, layer_idx, key_padding_mask) -> torch.Tensor:
        # the arguments of FlowAttention.forward: x: (B, T, C); rope: rope_tables of the new positions, (2, T, head_dim) or per-sample (2, B, 1, T, head_dim);
        # key_padding_mask: (B, T_k) True = attend
        B, T, _ = x.shape
        q, k, v = packed_linear(attn.to_qkv, attn.norm(x)).split(attn.split_sizes, dim=-1)
        q = q.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if rope is not None:
            q = apply_rope(q, rope, attn.hf_style_rope).to(x.dtype)
            k = apply_rope(k, rope, attn.hf_style_rope).to(x.dtype)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, H_kv, T_k, D)
        if attn.num_kv_heads != attn.num_heads:
            k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
            v = v.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)

        T_k = k.shape[2]
        mask, is_causal = None, attn.causal
        if attn.causal and T == 1 and key_padding_mask is None:
            is_causal = False  # one new query may see every cached key: no mask at all
        elif attn.causal and (T < T_k or key_padding_mask is not None):
            # queries are the last T of T_k positions
            mask = torch.ones(1, 1, T, T_k, dtype=torch.bool, device=x.device).tril(diagonal=T_k - T)
            is_causal = False
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :].bool()  # (B, 1, 1, T_k)
            mask = pad if mask is None else mask & pad
            # a padded query would see no key at all (NaN); let every query see itself, real ones never see padding
            own = torch.ones(T, T_k, dtype=torch.bool, device=x.device).tril(T_k - T).triu(T_k - T)
            mask = mask | own
            is_causal = False
        out = dispatch_attention_fn(
            q.transpose(1, 2),  # (B, T, H, D): the dispatcher's layout
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            scale=attn.head_dim**-0.5,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn._project_out(out)  # (B, T, H, D) -> (B, T, C)


class FlowAttention(nn.Module, AttentionModuleMixin):
    """Pre-norm causal self-attention with grouped-query heads, optional QK-norm and post-norm; its full-sequence
    attention runs through :attr:`processor` (a :class:`FlowAttnProcessor`)."""

    _default_processor_cls = FlowAttnProcessor
    _available_processors = [FlowAttnProcessor]

    def __init__(
        self,
        dim: int,
        head_dim: int,
        num_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        norm_type: str = "layer_norm",
        qk_norm: bool = False,
        post_norm: bool = False,
        bias: bool = True,
        hf_style_rope: bool = False,
        causal: bool = True,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = num_heads or dim // head_dim
        self.num_kv_heads = num_kv_heads or self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.hf_style_rope = hf_style_rope
        self.causal = causal
        self.norm = make_norm(norm_type, dim)
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.to_qkv = nn.Linear(dim, q_size + 2 * kv_size, bias=bias)
        self.to_out = nn.Linear(q_size, dim, bias=bias)
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        self.norm_post = RMSNorm(dim) if post_norm else None
        self.processor = FlowAttnProcessor()

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        cache: Optional[FlowKVCache] = None,
        layer_idx: int = 0,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention of ``x (B, T, C)``: over the whole sequence (training, likelihood, a prompt appended to
        ``cache``) through :attr:`processor`, which calls diffusers' attention dispatcher; with the static decode
        tuple ``(keys, values, positions, filled)`` as ``cache``, :meth:`forward_static`."""
        if isinstance(cache, tuple):
            return self.forward_static(x, rope, *cache, attn_mask=key_padding_mask)
        return self.processor(self, x, rope, cache, layer_idx, key_padding_mask)

    def set_processor(self, processor: FlowAttnProcessor) -> None:
        """Only a :class:`FlowAttnProcessor` computes this attention (diffusers' processors expect other
        arguments); its kernel is chosen with ``set_attention_backend(...)``."""
        if not isinstance(processor, FlowAttnProcessor):
            raise ValueError(
                f"FlowAttention takes a FlowAttnProcessor; got {type(processor).__name__}. Choose the attention "
                "kernel with set_attention_backend(...)"
            )
        super().set_processor(processor)

    def set_attention_slice(self, slice_size: Optional[int]) -> None:
        raise ValueError(
            f"attention slicing (slice_size={slice_size!r}) is not available for the flow attention; choose a "
            "memory-efficient kernel with set_attention_backend(...) (e.g. '_native_efficient', 'flash')"
        )

    def forward_static(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        filled: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The decode path: shapes depend on ``x`` and the buffers only, never on how much of the cache is filled.

        ``x (B, T, C)`` sits at sequence ``positions (T,)``; its keys/values are written there into this layer's
        buffers ``keys``/``values (B, H_kv, S, D)`` and the queries attend over all ``S`` slots under the additive
        ``attn_mask`` of :meth:`AutoregressiveFlowBlock.decode_mask` (``-inf`` at future, unwritten and padded slots;
        None: no mask).
        ``rope (2, T, 1, D)``.  ``filled`` (compiled steps, a 0-dim int64 CPU tensor): the slots written after this
        step, the only ones attention reads.
        """
        B, T, _ = x.shape
        H, H_kv = self.num_heads, self.num_kv_heads
        qkv = packed_linear(self.to_qkv, self.norm(x)).view(B, T, H + 2 * H_kv, self.head_dim)
        qk, v = qkv.split([H + H_kv, H_kv], dim=2)  # (B, T, H + H_kv, D), (B, T, H_kv, D)
        if self.norm_q is not None:
            q, k = qk.split([H, H_kv], dim=2)
            qk = torch.cat([self.norm_q(q), self.norm_k(k)], dim=2)
        if rope is not None:  # queries and keys rotate together: one set of kernels for both
            qk = apply_rope(qk, rope, self.hf_style_rope).to(x.dtype)
        q, k = qk.transpose(1, 2).split([H, H_kv], dim=1)  # (B, H, T, D), (B, H_kv, T, D)
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v.transpose(1, 2))
        G = H // H_kv
        q = q.reshape(B * H_kv, G * T, self.head_dim) * self.head_dim**-0.5
        keys, values = keys.flatten(0, 1), values.flatten(0, 1)  # (B H_kv, S, D), views
        out = static_attention(q, keys, values, attn_mask, filled)
        return self._project_out(out.view(B, H, T, self.head_dim).transpose(1, 2))

    def _project_out(self, out: torch.Tensor) -> torch.Tensor:
        # out: (B, T, H, D) -> (B, T, C)
        out = packed_linear(self.to_out, out.flatten(2))
        return self.norm_post(out) if self.norm_post is not None else out


@contextlib.contextmanager
def packed_weights(*modules: nn.Module):
    """Within this context :func:`packed_linear` keeps the oneDNN-packed weights it makes (one packing per layer and
    context); the sampling functions enter it for the duration of a sampling call, during which weights do not
    change (a packing kept longer could miss an in-place ``.data`` update such as a LoRA fusion).

    The plain ``nn.Linear`` layers inside ``modules`` (code this package does not own, such as the frozen VLM's
    transformers layers, which call their linears directly) run through :func:`packed_linear` too while the context
    is open: their ``forward`` is replaced on the instance and restored on exit (layers that already have an
    instance ``forward``, e.g. an accelerate offload hook, are left alone)."""
    global _PACKED_WEIGHTS
    outer = _PACKED_WEIGHTS
    _PACKED_WEIGHTS = {} if outer is None else outer
    routed = [
        layer
        for module in modules
        for layer in module.modules()
        if type(layer) is nn.Linear and "forward" not in layer.__dict__ and layer.weight.numel() >= _MIN_PACKED_WEIGHT
    ]
    for layer in routed:
        layer.forward = types.MethodType(_routed_forward, layer)
    try:
        yield
    finally:
        for layer in routed:
            del layer.forward
        _PACKED_WEIGHTS = outer


def _packable(linear: nn.Module, x: torch.Tensor) -> bool:
    return not (
        _PACKED_WEIGHTS is None
        or not _ONEDNN
        or type(linear) is not nn.Linear
        or x.device.type != "cpu"
        or linear.weight.dtype != torch.float32
        or type(linear.weight.data) is not torch.Tensor  # a quantised tensor subclass (torchao) says float32 too
        or x.dtype != torch.float32
        or "_diffusers_hook" in linear.__dict__  # diffusers' layerwise casting / group offload: the call casts or
        or "_hf_hook" in linear.__dict__  # moves the weight (accelerate's offload hooks too)
        or linear.weight.numel() < _MIN_PACKED_WEIGHT
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or is_fake(x)  # a FakeTensorMode dry run (memory plan): oneDNN has no fake kernel
    )


def _packed_call(linear: nn.Linear, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    packed = _PACKED_WEIGHTS.get(linear)
    if packed is None:
        packed = _PACKED_WEIGHTS[linear] = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 4)
    return torch.ops.mkldnn._linear_pointwise(
        x, packed, linear.bias, activation, [], "none" if activation == "gelu" else ""
    )


def _routed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # the forward of a linear routed by packed_weights(): never the module call itself, which would come back here
    return _packed_call(self, x) if _packable(self, x) else F.linear(x, self.weight, self.bias)


def packed_linear(linear: nn.Module, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``linear(x)`` (then ``gelu`` when ``activation="gelu"``) for the decode path.

    Inside :func:`packed_weights`, for a plain ``nn.Linear`` on CPU in float32 inference, this runs oneDNN with the
    weight reordered once into its blocked layout and the activation fused: for the few rows of a decode step that is
    ~1.7x faster than the strided MKL ``addmm`` (for weights of at least ``_MIN_PACKED_WEIGHT`` entries).  Otherwise
    (other devices and dtypes, autograd, adapters such as LoRA layers, a compiled graph, which packs weights itself)
    it is the plain module call.
    """
    if not _packable(linear, x):
        out = linear(x)
        return F.gelu(out) if activation == "gelu" else out
    return _packed_call(linear, x, activation)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# A oneDNN call costs ~13 us more than an MKL one (measured): it pays off from 256 x 512 weights (2x at 256 x 1024)
_MIN_PACKED_WEIGHT = 1 << 17
# nn.Linear -> its packed weight, while a packed_weights() context is open (None: no packing)
_PACKED_WEIGHTS: Optional[Dict[nn.Module, torch.Tensor]] = None


class FlowFeedForward(nn.Module):
    """Pre-norm MLP: ``Linear-GELU-Linear`` or the gated form ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(
        self,
        dim: int,
        expansion: float = 4.0,
        gated: bool = False,
        norm_type: str = "layer_norm",
        post_norm: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        hidden = int(dim * expansion)
        self.norm = make_norm(norm_type, dim)
        self.gated = gated
        if gated:
            self.gate_proj = nn.Linear(dim, hidden, bias=bias)
            self.up_proj = nn.Linear(dim, hidden, bias=bias)
            self.down_proj = nn.Linear(hidden, dim, bias=bias)
        else:
            self.fc1 = nn.Linear(dim, hidden, bias=bias)
            self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.norm_post = RMSNorm(dim) if post_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.gated:
            x = self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        else:
            x = packed_linear(self.fc2, packed_linear(self.fc1, x, "gelu"))
        return self.norm_post(x) if self.norm_post is not None else x


class FlowTransformerLayer(nn.Module):
    """``x + attn(x)`` then ``x + mlp(x)``."""

    def __init__(
        self,
        dim: int,
        head_dim: int,
        expansion: float = 4.0,
        num_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        norm_type: str = "layer_norm",
        gated_mlp: bool = False,
        qk_norm: bool = False,
        post_norm: bool = False,
        bias: bool = True,
        hf_style_rope: bool = False,
        causal: bool = True,
    ):
        super().__init__()
        self.attn = FlowAttention(
            dim, head_dim, num_heads, num_kv_heads, norm_type, qk_norm, post_norm, bias, hf_style_rope, causal
        )
        self.mlp = FlowFeedForward(dim, expansion, gated_mlp, norm_type, post_norm, bias)

    def forward(self, x, rope=None, cache=None, layer_idx=0, key_padding_mask=None):
        x = x + self.attn(x, rope, cache, layer_idx, key_padding_mask)
        return x + self.mlp(x)


# --------------------------------------------------------------------------------------------------------------
# The flow block
# --------------------------------------------------------------------------------------------------------------


class AutoregressiveFlowBlock(nn.Module):
    r"""One autoregressive affine flow over a token sequence (TARFlow's ``MetaBlock``).

    Args:
        in_channels: channels of one token (latent channels x patch_size**2).
        channels: Transformer width.
        num_layers: Transformer layers.
        head_dim: channels per attention head.
        num_heads / num_kv_heads: attention heads and key/value heads (grouped-query attention); default
            ``channels // head_dim`` and ``num_heads``.
        expansion: MLP width multiplier.
        text_dim: width of the conditioning text features (0 = unconditional block).
        project_text: learn a ``text_dim -> channels`` projection (otherwise ``text_dim`` must equal ``channels``).
        rope: ``"1d"``, ``"2d"``, ``"3d"`` (rotary positions, see :func:`rope_positions`) or ``"none"`` (learned
            absolute position embedding over ``num_positions`` tokens).
        pt_seq_len: grid side the rotary positions are normalised to.
        num_positions: grid tokens of the learned position embedding (only with ``rope="none"``).
        use_sos: predict the first token from a learned start token; otherwise the first token is passed through
            unchanged and the sequence is shifted by one.
        use_softplus: ``sigma = softplus(a + 0.5413)``; otherwise ``sigma = exp(a)``.
        gated_mlp, qk_norm, post_norm, final_norm, bias, norm_type, hf_style_rope: Transformer variants.
        soft_clip: if > 0, the output projection is squashed by ``c * tanh(. / c)``.
        flip: scan the tokens in reverse raster order.
        cond_dim: width of a per-sample conditioning vector (e.g. a noise-level embedding) projected and added to
            every position; 0 = none.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_layers: int,
        head_dim: int = 64,
        num_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        expansion: float = 4.0,
        text_dim: int = 0,
        project_text: bool = True,
        rope: str = "3d",
        pt_seq_len: float = 16,
        num_positions: int = 0,
        use_sos: bool = True,
        use_softplus: bool = True,
        gated_mlp: bool = False,
        qk_norm: bool = False,
        post_norm: bool = False,
        final_norm: bool = False,
        bias: bool = True,
        norm_type: str = "layer_norm",
        hf_style_rope: bool = False,
        soft_clip: float = 0.0,
        flip: bool = False,
        cond_dim: int = 0,
    ):
        super().__init__()
        if rope == "3d" and (head_dim % 4 or head_dim < 2 * TEXT_AXIS_FREQS):
            raise ValueError(
                f"head_dim must be a multiple of 4 and >= {2 * TEXT_AXIS_FREQS} with 3-axis RoPE; got {head_dim}"
            )
        if (rope == "2d" and head_dim % 4) or (rope == "1d" and head_dim % 2):
            raise ValueError(f"head_dim={head_dim} is incompatible with rope={rope!r}")
        self.in_channels = in_channels
        self.rope = rope
        self.pt_seq_len = pt_seq_len
        self.head_dim = head_dim
        self.use_sos = use_sos
        self.use_softplus = use_softplus
        self.soft_clip = soft_clip
        self.flip = flip
        self.text_dim = text_dim
        self.gradient_checkpointing = False

        self.proj_in = nn.Linear(in_channels, channels)
        self.proj_out = nn.Linear(channels, 2 * in_channels)
        nn.init.zeros_(self.proj_out.weight)  # start as the identity flow
        self.sos_embed = nn.Parameter(torch.randn(1, 1, in_channels)) if use_sos else None
        self.pos_embed = nn.Parameter(torch.randn(num_positions, channels) * 1e-2) if rope == "none" else None
        if text_dim > 0:
            if not project_text and text_dim != channels:
                raise ValueError(f"text_dim ({text_dim}) must equal channels ({channels}) without a projection")
            self.proj_txt = nn.Linear(text_dim, channels) if project_text else nn.Identity()
        else:
            self.proj_txt = None
        self.layers = nn.ModuleList(
            [
                FlowTransformerLayer(
                    channels,
                    head_dim,
                    expansion,
                    num_heads,
                    num_kv_heads,
                    norm_type,
                    gated_mlp,
                    qk_norm,
                    post_norm,
                    bias,
                    hf_style_rope,
                )
                for _ in range(num_layers)
            ]
        )
        self.final_norm = RMSNorm(channels) if final_norm else None
        self.proj_cond = nn.Linear(cond_dim, channels) if cond_dim > 0 else None
        self.num_kv_heads = self.layers[0].attn.num_kv_heads if num_layers else 0
        self._rope_cache: Dict[tuple, torch.Tensor] = {}  # (height, width, text_length, device) -> rope tables
        self._compiled_steps: Dict[str, Callable] = {}  # compile_decode_step(): "token" / "window" -> compiled step

    @property
    def is_identity(self) -> bool:
        return len(self.layers) == 0

    # -- sequence order -------------------------------------------------------------------------------------------

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Raster order <-> scan order along dim 1 (the flip is its own inverse)."""
        return x.flip(1) if self.flip else x

    def rotary(
        self, height: int, width: int, text_length: int, device: torch.device | str | None = None
    ) -> Optional[torch.Tensor]:
        """``rope_tables`` ``(2, text_length + height*width, head_dim)`` on ``device`` (default: the block's),
        computed once per shape and device; ``None`` with learned position embeddings."""
        if self.rope == "none":
            return None
        mode = self.rope
        if mode == "2d" and text_length:
            raise ValueError("a 2d-RoPE flow block cannot take text; use rope='3d'")
        text_length = text_length if (self.text_dim > 0 or mode == "1d") else 0
        device = torch.device(device) if device is not None else self.proj_in.weight.device
        key = (height, width, text_length, device)
        if key not in self._rope_cache:
            positions = rope_positions(height, width, text_length, self.pt_seq_len, mode, device)
            self._rope_cache[key] = rope_tables(rope_angles(positions, self.head_dim))
        return self._rope_cache[key]

    # -- the three stages of a step: inputs -> Transformer -> affine parameters ------------------------------------

    def embed(self, tokens: torch.Tensor, start: int = 0, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Project input tokens ``(B, T, C_in)`` at scan positions ``start..start+T`` into the Transformer width."""
        h = self.proj_in(tokens)
        if self.pos_embed is not None:
            h = h + self.permute(self.pos_embed)[start : start + tokens.shape[1]]
        return self.add_cond(h, cond)

    def add_cond(self, h: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """Add the projected conditioning vector ``cond (B, cond_dim)`` to every position of ``h (B, T, C)``."""
        if self.proj_cond is None or cond is None:
            return h
        return h + self.proj_cond(cond.to(h.dtype))[:, None]

    def transformer(
        self,
        h: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        cache: Optional[FlowKVCache] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the layers over new positions ``h (B, T, C)``, appending them to ``cache`` when given."""
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                h = self._gradient_checkpointing_func(layer, h, rope, None, i, key_padding_mask)
            else:
                h = layer(h, rope, cache, i, key_padding_mask)
        if cache is not None:
            cache.advance(h.shape[1])
        return h

    def affine(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Affine parameters ``(mu, sigma)``, float32, of the tokens that the hidden states ``h`` predict."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        out = self.proj_out(h)
        if self.soft_clip > 0:
            out = self.soft_clip * torch.tanh(out / self.soft_clip)
        a, b = out.float().chunk(2, dim=-1)
        sigma = F.softplus(a + INV_SOFTPLUS_1) if self.use_softplus else a.exp()
        return b, sigma

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype, device) -> FlowKVCache:
        return FlowKVCache(len(self.layers), batch_size, self.num_kv_heads, self.head_dim, max_length, dtype, device)

    # -- data -> noise ---------------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        grid: Tuple[int, int],
        text: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        cond: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise.

        Args:
            x: ``(B, N, C_in)`` tokens in raster order, ``N = height * width``.
            grid: ``(height, width)`` of the token grid.
            text: ``(B, L, text_dim)`` conditioning features (ignored by unconditional blocks).
            text_mask: ``(B, L)`` True for real text tokens (padding is never attended to).
            cond: ``(B, cond_dim)`` conditioning vector (blocks built with ``cond_dim > 0``).
        Returns:
            ``z`` ``(B, N, C_in)`` in raster order and ``logdet`` ``(B, N, C_in)`` in this block's scan order.
        """
        if self.is_identity:
            return x, torch.zeros_like(x, dtype=torch.float32)
        text = text if self.proj_txt is not None else None
        L = text.shape[1] if text is not None else 0
        x = self.permute(x)
        inputs = torch.cat([self.sos_embed.expand(x.shape[0], -1, -1), x[:, :-1]], dim=1) if self.use_sos else x
        dtype = compute_dtype(self)  # the flow arithmetic stays float32; the layers run in the compute dtype
        h = self.embed(inputs.to(dtype), cond=cond)
        key_padding_mask = None
        if text is not None:
            h = torch.cat([self.add_cond(self.proj_txt(text.to(dtype)), cond), h], dim=1)  # (B, L + N, C)
            if text_mask is not None:
                key_padding_mask = torch.cat([text_mask.bool(), text_mask.new_ones(x.shape[:2]).bool()], dim=1)
        h = self.transformer(h, self.rotary(*grid, L, x.device), key_padding_mask=key_padding_mask)[:, L:]
        mu, sigma = self.affine(h)
        if not self.use_sos:  # token i is predicted from token i-1; the first passes through (mu=0, sigma=1)
            mu = torch.cat([torch.zeros_like(mu[:, :1]), mu[:, :-1]], dim=1)
            sigma = torch.cat([torch.ones_like(sigma[:, :1]), sigma[:, :-1]], dim=1)
        z = (x.float() - mu) / sigma
        return self.permute(z).to(x.dtype), -torch.log(sigma)

    # -- noise -> data, one position at a time ------------------------------------------------------------------

    def prefill(
        self,
        text: torch.Tensor,
        rope: Optional[torch.Tensor],
        cache: FlowKVCache,
        key_padding_mask: Optional[torch.Tensor] = None,
        cond: Optional[torch.Tensor] = None,
    ) -> None:
        """Fill ``cache`` with the text prefix ``(B, L, text_dim)`` of the token sequence (text-reading blocks);
        ``rope`` and ``key_padding_mask`` cover the whole sequence."""
        h = self.add_cond(self.proj_txt(text.to(cache.dtype)), cond)  # (B, L, C)
        if self._static_shapes:  # compiled layers: shapes fixed by the cache (see static_pass)
            self.static_pass(h, 0, rope, cache, key_padding_mask)
            return
        L = h.shape[1]  # the whole prefix at once, through the attention dispatcher
        rope = rope[:, :L] if rope is not None else None
        self.transformer(h, rope, cache, key_padding_mask[:, :L] if key_padding_mask is not None else None)

    def decode_step(
        self,
        inputs: torch.Tensor,
        index: int,
        text_length: int,
        rope: Optional[torch.Tensor],
        cache: FlowKVCache,
        key_padding_mask: Optional[torch.Tensor] = None,
        cond: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Affine parameters ``(mu, sigma)`` ``(B, T, C_in)`` predicted by the inputs ``(B, T, C_in)`` at input
        positions ``index..index+T`` of the scan (input 0 is the start token, or the first token without one),
        written into ``cache`` there; ``rope`` and ``key_padding_mask`` cover the whole sequence, text prefix
        included.  The cache then ends after them: calling again at the same ``index`` (Jacobi iterations) rewrites
        those positions."""
        pos = text_length + index
        compiled = self._compiled_steps.get("token" if inputs.shape[1] == 1 else "window")
        if compiled is not None:  # the whole step is one graph; positions enter as tensors
            end = pos + inputs.shape[1]
            positions = torch.arange(pos, end, device=inputs.device)
            filled = torch.tensor(end)  # on the CPU: read by the attention operator, never a graph constant
            params = compiled(
                inputs, positions, text_length, rope, key_padding_mask, cond, cache.keys, cache.values, filled
            )
            cache.length = end
            return params
        h = self.embed(inputs.to(cache.dtype), start=index, cond=cond)
        h = self.static_pass(h, pos, rope, cache, key_padding_mask)
        return self.affine(h)

    def static_decode(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        text_length: int,
        rope: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor],
        cond: Optional[torch.Tensor],
        keys: List[torch.Tensor],
        values: List[torch.Tensor],
        filled: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode_step` with every shape fixed by the inputs ``(B, T, C_in)`` and the cache buffers
        ``(B, H_kv, S, D)``: the inputs sit at sequence ``positions (T,)`` and attend over all ``S`` slots under a
        causal (and padding) mask, so that :meth:`compile_decode_step` traces one graph per ``T`` and ``S``."""
        h = self.proj_in(inputs.to(keys[0].dtype))  # the cache's dtype is the compute dtype
        if self.pos_embed is not None:
            h = h + self.permute(self.pos_embed)[positions - text_length]
        h = self.add_cond(h, cond)
        mask = None  # one query over the filled slots (the attention reads no further) sees them all
        if inputs.shape[1] > 1 or key_padding_mask is not None:
            mask = self.decode_mask(positions, keys[0].shape[2], key_padding_mask, h.dtype)
        rope = rope[:, positions, None] if rope is not None else None  # (2, T, 1, D)
        return self.affine(self.run_layers(h, positions, rope, mask, keys, values, filled))

    def decode_mask(
        self, positions: torch.Tensor, num_slots: int, key_padding_mask: Optional[torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive mask of queries at ``positions (T,)`` over ``S`` cache slots, causal, with padded keys hidden
        (``key_padding_mask (B, >= S)``, True = real; a padded query still sees itself), in the row layout of
        :func:`cached_attention`, made once for all layers: ``(G T, S)``, or ``(B H_kv, G T, S)`` with padding
        (``G`` query heads per key head)."""
        G = self.layers[0].attn.num_heads // self.num_kv_heads
        return static_decode_mask(positions, num_slots, key_padding_mask, dtype, self.num_kv_heads, G)

    def static_pass(
        self,
        h: torch.Tensor,
        start: int,
        rope: Optional[torch.Tensor],
        cache: FlowKVCache,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the layers over ``h (B, T, C)`` at sequence positions ``start..start+T``, writing their keys/values
        there; the cache then ends after them.

        Eager layers attend over the filled slots only (the cache is read from memory at every layer and step).
        Compiled layers (``compile_repeated_blocks()`` of the model) attend over the whole buffer under a mask, and
        positions enter as tensors, so every shape is fixed by ``T`` and the cache capacity: they are traced once per
        ``T`` and cache size, not once per token.  (A block's compiled decode step, :meth:`compile_decode_step`, runs
        :meth:`static_decode` instead.)
        """
        end = start + h.shape[1]
        positions = torch.arange(start, end, device=h.device)
        keys, values = cache.keys, cache.values
        filled = None
        if self._static_shapes:
            S, rope = cache.capacity, rope[:, positions, None] if rope is not None else None  # (2, T, 1, D)
            filled = torch.tensor(end)
        else:  # the filled slots only (views: the layers write through them); one new query sees them all
            S, rope = end, rope[:, start:end, None] if rope is not None else None
            keys, values = [k[:, :, :S] for k in keys], [v[:, :, :S] for v in values]
            if h.shape[1] == 1 and key_padding_mask is None:
                h = self.run_layers(h, positions, rope, None, keys, values)
                cache.length = end
                return h
        mask = self.decode_mask(positions, S, key_padding_mask, h.dtype)
        h = self.run_layers(h, positions, rope, mask, keys, values, filled)
        cache.length = end
        return h

    def run_layers(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        rope: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        keys: List[torch.Tensor],
        values: List[torch.Tensor],
        filled: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The layers over ``h (B, T, C)`` at ``positions (T,)``: ``rope (2, T, 1, D)``, the additive ``mask`` of
        :meth:`decode_mask`, one key and one value buffer per layer, ``filled`` (see
        :meth:`FlowAttention.forward_static`)."""
        for layer, k, v in zip(self.layers, keys, values):
            h = layer(h, rope, (k, v, positions, filled), key_padding_mask=mask)
        return h

    @property
    def _static_shapes(self) -> bool:
        return len(self.layers) > 0 and self.layers[0]._compiled_call_impl is not None

    def compile_decode_step(self, mode: Optional[str] = "max-autotune", **compile_kwargs) -> None:
        """Compile this block's decode step (:meth:`static_decode`: input projection, all layers and the affine
        parameters of a step as one graph) with ``torch.compile``; opt-in, for inference.

        Two graphs: single tokens (exact decoding) with static shapes, traced once per cache size and never per
        token, in ``mode``; and Jacobi windows, whose length changes at the end of a block, with dynamic shapes in
        inductor's default mode (one graph for every window length).  With inductor (the default backend) the
        weights are frozen into the graphs as constants (inductor then packs them for its own GEMM kernels, chosen
        by ``mode="max-autotune"``), dynamo does not re-check the modules' attributes at every call (~0.1 ms per
        token), and on a CPU the graphs' kernels are called from C++ (``cpp_wrapper``) while on a GPU
        ``max-autotune`` records CUDA graphs.  So: compile again after changing the weights (``load_state_dict``,
        fusing or loading an adapter) or moving the model.  Other ``compile_kwargs`` (``backend`` — then ``mode``
        is not used —, ``options``...) go to ``torch.compile``; ``dynamic`` is not taken (it is set per graph)."""
        self._compiled_steps = compile_decode_graphs(self.static_decode, mode, **compile_kwargs)


def compile_decode_graphs(method: Callable, mode: Optional[str], **compile_kwargs) -> Dict[str, Callable]:
    """The two compiled graphs of a static-shape decode method: ``"token"`` (one new position; static shapes, in
    ``mode``) and ``"window"`` (several, e.g. a Jacobi window; dynamic shapes, inductor's default mode)."""
    return {
        kind: compile_static_step(method, step_mode, dynamic, **compile_kwargs)
        for kind, step_mode, dynamic in (("token", mode, False), ("window", None, True))
    }


def compile_static_step(method: Callable, mode: Optional[str], dynamic_shapes: bool, **compile_kwargs) -> Callable:
    """``torch.compile`` of a bound decode method (:meth:`AutoregressiveFlowBlock.static_decode`, the Pretzel's
    stream step) as :meth:`AutoregressiveFlowBlock.compile_decode_step` describes it: a code object of its own,
    with inductor frozen weights, guards on parameter identities only, no stride checks, and on a CPU a C++ wrapper
    (on a GPU ``mode="max-autotune"`` records CUDA graphs).  A ``dynamic`` in ``compile_kwargs`` is overridden by
    ``dynamic_shapes``."""
    compile_kwargs = dict(compile_kwargs, dynamic=dynamic_shapes)
    frozen = compile_kwargs.get("backend", "inductor") == "inductor"
    if frozen:
        from torch._inductor import list_mode_options

        options = {
            **list_mode_options(mode or "default"),
            "guard_filter_fn": _identity_guards_on_modules,
            "size_asserts": False,  # checks of each output's strides after every operator call
        }
        device = next(method.__self__.parameters()).device
        if device.type == "cpu":  # no CUDA graphs; kernels called from C++, not Python
            options.pop("triton.cudagraphs", None)
            options["cpp_wrapper"] = True
        compile_kwargs["options"] = {**options, **compile_kwargs.get("options", {})}
    compiled = torch.compile(_with_own_code(method), **compile_kwargs)
    return _with_frozen_weights(compiled) if frozen else compiled


def _with_own_code(method: Callable) -> Callable:
    """``method`` bound to a copy of its function with a code object of its own.  Dynamo keeps compiled graphs per
    code object, with a limit of 8: blocks sharing ``static_decode``'s code would share one list of graphs (each
    holding its block's frozen weights, told apart only by guards) and a model of more than a few blocks, or a few
    compiled models, would hit the limit and fall back to eager decoding."""
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(own, method.__self__)


def _identity_guards_on_modules(guard_entries) -> List[bool]:
    """Dynamo's guards to keep for a compiled decode step: all but those on module attributes (hooks, flags,
    types: hundreds per block, ~0.1 ms per call), except the identity of each parameter.  Graphs of blocks (and of
    model copies) share one code object and hold their own frozen weights; the parameters' identities tell them
    apart."""
    return [
        entry.guard_type == "ID_MATCH" or not entry.orig_guard.source.is_unspecialized_nn_module()
        for entry in guard_entries
    ]


def _with_frozen_weights(compiled: Callable) -> Callable:
    """``compiled`` with inductor's ``freezing`` on whenever it runs (and so whenever it traces a new shape): the
    setting is read while dynamo traces, outside the reach of ``torch.compile``'s ``options``, and is not left on
    for the rest of the process."""
    from torch._inductor import config as inductor_config

    def call(*args, **kwargs):
        before = inductor_config.freezing
        inductor_config.freezing = True
        try:
            return compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = before

    return call

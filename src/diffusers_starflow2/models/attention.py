# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The attention of the flow blocks and the FAE, and the decode kernel the VLM stream's static path shares.

* :class:`FlowAttention` (pre-norm causal or bidirectional self-attention, grouped-query heads, optional QK-norm and
  post-norm) with its full-sequence path, :class:`FlowAttnProcessor` (through diffusers' attention dispatcher), and
  its static-shape decode path (:meth:`FlowAttention.forward_static`);
* :func:`cached_attention`, the decode kernel (a few queries over a short cache), and :func:`static_attention`, the
  same as one opaque ``torch.library`` operator inside compiled graphs;
* :func:`attention_mask`, the one mask builder (causal, padding), and :func:`decode_rows_mask`, its additive form
  in the decode kernel's row layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from ..utils.torch_utils import packed_linear
from .embeddings import apply_rope
from .normalization import RMSNorm, make_norm

if TYPE_CHECKING:  # cache_utils imports the VLM stream, which imports this module
    from .cache_utils import FlowKVCache


def cached_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Attention of scaled queries ``q (R, Q, D)`` over cached keys and values ``(R, S, D)``, one row ``R`` per
    sample and key head (the query heads sharing a key head stacked as ``Q = G T`` queries), under the additive
    ``attn_mask`` broadcastable to ``(R, Q, S)`` (None: every slot); returns ``(R, Q, D)``.

    Written out: for a few queries over a short cache, two matrix products and a softmax cost less than the fused
    kernels, which tile for long query blocks.  On a CPU, lower-precision caches are attended in float32 (returned
    in their dtype): the CPU's bfloat16 ``bmm`` at these sizes is ~3x slower than the casts and the float32 products
    together (``benchmarks/bench_pipeline.py --weights bfloat16 --compile``).
    """
    if q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu":
        mask = attn_mask.float() if attn_mask is not None else None
        return cached_attention(q.float(), keys.float(), values.float(), mask).to(q.dtype)
    keys_t = keys.transpose(1, 2)  # (R, D, S)
    scores = torch.bmm(q, keys_t) if attn_mask is None else torch.baddbmm(attn_mask, q, keys_t)  # (R, Q, S)
    return torch.bmm(scores.softmax(-1, dtype=torch.float32).to(values.dtype), values)


# The same attention as one opaque operator for compiled decode steps: inductor keeps it a single call (it would
# otherwise fuse the two matrix products with their neighbours into scalar loops, an order of magnitude slower at
# decode sizes).  The graph's buffers have a fixed size; ``filled`` (a 0-dim int64 CPU tensor, so that it never
# specialises the graph) cuts them to the slots written so far, which is all a query may see: the cache is read no
# further than it is full.  Defined with the plain operator registry rather than ``torch.library.custom_op``, whose
# autograd wrapper adds several microseconds to every call; decoding never needs gradients.  The Python body below
# is the reference; compiled CPU steps load a C++ kernel for CPU tensors (``cached_attention_cpu.cpp``, built by
# ``utils/cpu_kernels.py``), which reads the filled slots once, bfloat16 as stored, with no Python in the call.
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


def attention_mask(
    positions: torch.Tensor, num_keys: int, key_padding_mask: Optional[torch.Tensor] = None, causal: bool = True
) -> torch.Tensor:
    """Which keys each query may see (True = attend): the one mask of every attention in this package.

    Queries sit at sequence ``positions (T,)``, keys at ``0..num_keys-1``.  ``causal``: a query sees no key after its
    own position.  ``key_padding_mask (B, >= num_keys)`` (True = real) hides padded keys, but every query still sees
    its own position, so that a padded query never attends to nothing (a softmax of no score is NaN).  Returns
    ``(T, S)``, or ``(B, 1, T, S)`` with padding: the layout of the attention dispatcher's boolean masks;
    :func:`decode_rows_mask` turns it into the additive mask of :func:`cached_attention`.
    """
    key_positions = torch.arange(num_keys, device=positions.device)
    own = key_positions == positions[:, None]  # (T, S)
    allowed = key_positions <= positions[:, None] if causal else torch.ones_like(own)
    if key_padding_mask is not None:
        allowed = (allowed & key_padding_mask[:, None, None, :num_keys].bool()) | own  # (B, 1, T, S)
    return allowed


def decode_rows_mask(allowed: torch.Tensor, dtype: torch.dtype, num_kv_heads: int, groups: int) -> torch.Tensor:
    """:func:`attention_mask` ``(T, S)`` / ``(B, 1, T, S)`` as the additive mask (``-inf`` where not allowed) in the
    row layout of :func:`cached_attention` for ``num_kv_heads`` key heads of ``groups`` query heads each:
    ``(G T, S)``, or ``(B H_kv, G T, S)`` with padding; made once per step and shared by all layers."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
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
        elif key_padding_mask is not None or (attn.causal and T < T_k):
            positions = torch.arange(T_k - T, T_k, device=x.device)  # the queries are the last T of T_k positions
            mask = attention_mask(positions, T_k, key_padding_mask, attn.causal)
            mask = mask if mask.ndim == 4 else mask[None, None]  # (B or 1, 1, T, T_k)
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
        ``attn_mask`` of :func:`decode_rows_mask` (``-inf`` at future, unwritten and padded slots; None: no mask).
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

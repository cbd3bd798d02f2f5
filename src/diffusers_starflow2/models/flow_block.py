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

Its parts live beside it: :mod:`.normalization`, :mod:`.embeddings` (RoPE), :mod:`.attention` (the layers'
attention, the decode kernel and the mask); the oneDNN-packed CPU linears in :mod:`..utils.torch_utils` and the
``torch.compile`` machinery of :meth:`~AutoregressiveFlowBlock.compile_decode_step` in :mod:`..utils.compile_utils`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.compile_utils import compile_decode_graphs
from ..utils.torch_utils import compute_dtype, packed_linear
from .attention import FlowAttention, attention_mask, decode_rows_mask
from .cache_utils import FlowKVCache
from .embeddings import TEXT_AXIS_FREQS, rope_angles, rope_positions, rope_tables
from .normalization import RMSNorm, make_norm

# softplus(a + INV_SOFTPLUS_1) == 1 at a == 0, so a zero-initialised output projection starts as the identity map.
INV_SOFTPLUS_1 = 0.541324854612918


# --------------------------------------------------------------------------------------------------------------
# Transformer layer
# --------------------------------------------------------------------------------------------------------------


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
        self.hf_style_rope = hf_style_rope
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
            self._rope_cache[key] = rope_tables(rope_angles(positions, self.head_dim, self.hf_style_rope))
        return self._rope_cache[key]

    # -- the three stages of a step: inputs -> Transformer -> affine parameters ------------------------------------

    def embed(
        self, tokens: torch.Tensor, start: int | torch.Tensor = 0, cond: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Project input tokens ``(B, T, C_in)`` at scan positions ``start..start+T`` (or at the scan positions
        ``start (T,)``, a tensor in compiled steps) into the Transformer width."""
        h = self.proj_in(tokens)
        if self.pos_embed is not None:
            index = start if isinstance(start, torch.Tensor) else slice(start, start + tokens.shape[1])
            h = h + self.permute(self.pos_embed)[index]
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
        cache: Optional[FlowKVCache | Tuple[List[torch.Tensor], List[torch.Tensor]]] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        slots: Optional[torch.Tensor] = None,
        filled: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the layers over new positions ``h (B, T, C)``: the one layer path of every pass, in one of two modes.

        Appending (``slots`` None: training, likelihood, prompts): each layer attends over the positions held in
        ``cache`` (a :class:`FlowKVCache`, or None) and the new ones through its processor (diffusers' attention
        dispatcher), and the new keys/values are appended to ``cache``.  ``rope``: tables of the new positions,
        ``(2, T, D)`` or per sample ``(2, B, 1, T, D)``; ``key_padding_mask (B, T_k)``: True at real keys, the
        cached ones included.

        Static (``slots (T,)``, the cache slots of the new positions: decode steps): ``cache`` is the ``(keys,
        values)`` pair of per-layer buffers ``(B, H_kv, S, D)``; each layer writes the new keys/values at ``slots``
        and attends over all ``S`` slots under the causal mask of
        :func:`~diffusers_starflow2.models.attention.attention_mask` (with ``key_padding_mask (B, >= S)``), so that
        every shape is fixed by ``T`` and ``S``: a compiled step is traced once per shape, not once per position.
        ``rope`` ``(2, T, 1, D)`` or per sample ``(2, B, T, 1, D)``; ``filled``: see
        :meth:`~diffusers_starflow2.models.attention.FlowAttention.forward_static`.
        """
        mask = key_padding_mask
        if slots is not None and (h.shape[1] > 1 or key_padding_mask is not None):
            # made once for all layers; one query over the filled slots (attention reads no further) sees them all
            allowed = attention_mask(slots, cache[0][0].shape[2], key_padding_mask)
            groups = self.layers[0].attn.num_heads // self.num_kv_heads
            mask = decode_rows_mask(allowed, h.dtype, self.num_kv_heads, groups)
        for i, layer in enumerate(self.layers):
            layer_cache = cache if slots is None else (cache[0][i], cache[1][i], slots, filled)
            if self.gradient_checkpointing and torch.is_grad_enabled() and layer_cache is None:
                h = self._gradient_checkpointing_func(layer, h, rope, None, i, mask)
            else:
                h = layer(h, rope, layer_cache, i, mask)
        if slots is None and cache is not None:
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
        if self._static_shapes:  # compiled layers: shapes fixed by the cache (see _transformer_in_cache)
            self._transformer_in_cache(h, 0, rope, cache, key_padding_mask)
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
            positions = cache.claim_slots(pos, inputs.shape[1], inputs.device)
            filled = torch.tensor(cache.length)  # on the CPU: read by the attention operator, never a graph constant
            return compiled(
                inputs, positions, text_length, rope, key_padding_mask, cond, cache.keys, cache.values, filled
            )
        h = self.embed(inputs.to(cache.dtype), start=index, cond=cond)
        return self.affine(self._transformer_in_cache(h, pos, rope, cache, key_padding_mask))

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
        """:meth:`decode_step` as the one graph :meth:`compile_decode_step` traces, every shape fixed by the inputs
        ``(B, T, C_in)`` and the cache buffers ``(B, H_kv, S, D)``: the inputs sit at sequence ``positions (T,)``
        and attend over all ``S`` slots (:meth:`transformer` in its static mode)."""
        h = self.embed(inputs.to(keys[0].dtype), positions - text_length, cond)  # the cache's dtype: compute dtype
        rope = rope[:, positions, None] if rope is not None else None  # (2, T, 1, D)
        return self.affine(self.transformer(h, rope, (keys, values), key_padding_mask, positions, filled))

    def _transformer_in_cache(
        self,
        h: torch.Tensor,
        start: int,
        rope: Optional[torch.Tensor],
        cache: FlowKVCache,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """:meth:`transformer` in its static mode over ``h (B, T, C)`` at sequence positions ``start..start+T`` of
        ``cache``, which then ends after them.

        Eager layers attend over the filled slots only (views of the buffers, which the layers write through).
        Compiled layers (``compile_repeated_blocks()`` of the model) attend over the whole buffers, reading the filled
        slots only (``filled``), and positions enter as tensors, so every shape is fixed by ``T`` and the cache
        capacity: they are traced once per ``T`` and cache size, not once per token.
        """
        slots = cache.claim_slots(start, h.shape[1], h.device)
        end = cache.length
        buffers, filled = (cache.keys, cache.values), None
        if self._static_shapes:
            rope, filled = rope[:, slots, None] if rope is not None else None, torch.tensor(end)  # (2, T, 1, D)
        else:  # the filled slots only
            rope = rope[:, start:end, None] if rope is not None else None
            buffers = ([k[:, :, :end] for k in cache.keys], [v[:, :, :end] for v in cache.values])
        return self.transformer(h, rope, buffers, key_padding_mask, slots, filled)

    @property
    def _static_shapes(self) -> bool:
        return len(self.layers) > 0 and self.layers[0]._compiled_call_impl is not None

    def compile_decode_step(self, mode: Optional[str] = "max-autotune", **compile_kwargs) -> None:
        """Compile this block's decode step (:meth:`static_decode`: input projection, all layers and the affine
        parameters of a step as one graph) with ``torch.compile``; opt-in, for inference.

        Two graphs: single tokens (exact decoding) with static shapes, traced once per cache size and never per
        token, in ``mode``; and Jacobi windows, whose length changes at the end of a block, with dynamic shapes in
        inductor's default mode (one graph for every window length).  With inductor (the default backend) the
        weights are frozen into the graphs as constants (``mode="max-autotune"`` picks the GEMM kernels), dynamo
        does not re-check the modules' attributes at every call (~0.1 ms per token), and on a CPU the graphs'
        kernels are called from C++ (``cpp_wrapper``) and the graphs are kept by inductor's FX graph cache for the
        next process (:func:`~diffusers_starflow2.utils.compile_utils.compile_static_step`) while on a GPU
        ``max-autotune`` records CUDA graphs.  So: compile again after changing the weights (``load_state_dict``,
        fusing or loading an adapter) or moving the model.  Other ``compile_kwargs`` (``backend`` — then ``mode``
        is not used —, ``options``...) go to ``torch.compile``; ``dynamic`` is not taken (it is set per graph)."""
        self._compiled_steps = compile_decode_graphs(self.static_decode, mode, **compile_kwargs)

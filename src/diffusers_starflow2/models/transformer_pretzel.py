# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""PretzelModel: the trainable part of STARFlow2 and the one Pretzel step every pipeline and the training use.

The Pretzel runs two causal streams over one interleaved sequence of text tokens and image-latent spans
``<|vision_start|> x~_0 ... x~_{N-1} <|vision_end|>``:

* the frozen **VLM stream** (a transformers causal LM, see :mod:`.vlm_stream`) reads text embeddings and, at latent
  positions, the visual adapter ``A(x~_i, t)``; it yields hidden states ``h_i``;
* the **TARFlow stream** (the deep autoregressive flow block) reads ``P_txt(h_i)`` at text positions and
  ``proj_in(x~_i) + W_v h_i`` at latent positions (``<|vision_start|>`` also carries the start token), plus the
  noise-level embedding everywhere; its outputs ``g_i`` give the affine parameters of the next latent, and the text
  logits are ``LM_head(h_i + W_t g_i)``.

``W_v`` and ``W_t`` are zero-initialised, so at initialisation the text logits are exactly the VLM's.  Shallow,
visual-only flow blocks map noisy FAE latents ``x`` to ``x~`` before the Pretzel sees them.

This file is over 600 lines because it is one class: the model's step, its static-shape (compiled) variants and its
loss read the same parameters; its caches are :mod:`.cache_utils`, its visual adapter :mod:`.adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..utils.compile_utils import compile_decode_graphs, compile_static_step
from ..utils.torch_utils import compute_dtype, has_values
from .adapter import VisualAdapter
from .cache_utils import FlowKVCache, PretzelCache
from .embeddings import rope_angles, rope_tables
from .flow_block import AutoregressiveFlowBlock
from .likelihood import LOG_2PI, bits_per_dim, flow_nll
from .modeling_utils import refuse_group_offload
from .vlm_stream import VLMStream

# Noise levels live in [0, ~0.3]; the sinusoidal embedding is laid out for diffusion-style timesteps in [0, 1000].
NOISE_LEVEL_SCALE = 1000.0


# --------------------------------------------------------------------------------------------------------------
# Small parts
# --------------------------------------------------------------------------------------------------------------


class _ImageStep(nn.Module):
    """The Pretzel and the VLM stream as one module, so that a compiled :meth:`PretzelModel.static_image_step` holds
    both models' weights as module attributes (frozen into the graph by inductor)."""

    def __init__(self, transformer, vlm: VLMStream):
        super().__init__()
        self.transformer, self.vlm = transformer, vlm

    def forward(self, *args):
        return self.transformer.static_image_step(self.vlm, *args)


@dataclass
class PretzelStepOutput(BaseOutput):
    """
    Args:
        hidden_states: ``(B, T, D)`` VLM stream outputs ``h`` (after its final norm).
        flow_hidden_states: ``(B, T, C)`` TARFlow stream outputs ``g`` (before the flow's final norm).
    """

    hidden_states: torch.Tensor
    flow_hidden_states: torch.Tensor


@dataclass
class PretzelOutput(BaseOutput):
    """
    Args:
        loss: ``flow_loss + text_loss_weight * text_loss`` (terms that have no target count as 0).
        flow_loss: mean over scored images of the NLL per dimension (no Gaussian constant).
        text_loss: mean next-token cross-entropy over scored text positions.
        image_nll: ``(M,)`` NLL in nats per dimension of every image span (Gaussian constant included).
        bits_per_dim: ``(M,)`` the same in bits.
        text_logits: ``(P, V)`` the logits at the scored text positions (row-major order), when there are any.
    """

    # defaults let accelerate's mixed-precision wrapper rebuild the output from a dict
    loss: torch.Tensor = None
    flow_loss: torch.Tensor = None
    text_loss: torch.Tensor = None
    image_nll: torch.Tensor = None
    bits_per_dim: torch.Tensor = None
    text_logits: torch.Tensor = None


def pretzel_paper_config() -> dict:
    """STARFlow2 as in the paper: Qwen2.5-VL-7B (width 3584), FAE 16x16x32 latents, 24-layer deep + 2x4 shallow."""
    return dict(
        latent_channels=32,
        sample_size=16,
        vlm_hidden_size=3584,
        num_shallow_blocks=2,
        shallow_layers=4,
        shallow_channels=3072,
        deep_layers=24,
        deep_channels=3072,
        head_dim=64,
        vision_start_token_id=151652,
    )


def scatter_latents(tokens: torch.Tensor, latent_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Intermediate latents ``(M, N, C)`` (or ``(M*N, C)``) placed at the latent positions of ``latent_mask (B, T)``
    in sequence order (sample-major): returns the ``(B, T, C)`` step input (zeros elsewhere) and the flat positions
    ``(M*N,)`` of the latents in ``B*T``.  The number of positions comes from ``tokens``' shape, not from the mask's
    values, so this runs on ``meta`` too."""
    B, T = latent_mask.shape
    flat = tokens.reshape(-1, tokens.shape[-1])
    slots = torch.nonzero_static(latent_mask.reshape(-1), size=flat.shape[0]).squeeze(1).to(flat.device)
    return flat.new_zeros(B * T, flat.shape[-1]).index_copy(0, slots, flat).view(B, T, -1), slots


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class PretzelModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""The trainable STARFlow2 Transformer: shallow flows, deep TARFlow stream, visual adapter and skip projections.

    The frozen VLM is not part of this model (it is the pipeline's ``vlm`` component); every method that runs the
    Pretzel takes a :class:`~diffusers_starflow2.models.vlm_stream.VLMStream`.

    Args:
        latent_channels: channels ``C`` of an FAE latent.
        sample_size: side of the latent grid (``N = sample_size**2`` positions per image).
        vlm_hidden_size: width ``D`` of the VLM.
        num_shallow_blocks, shallow_layers, shallow_channels: the visual-only shallow flows (alternating scan
            direction, 2-D RoPE over the grid).
        deep_layers, deep_channels: the deep TARFlow stream (1-D RoPE over the interleaved sequence).
        head_dim, num_heads, num_kv_heads, expansion, norm_type, gated_mlp, qk_norm, final_norm: Transformer
            variants shared by all flow blocks (see :class:`AutoregressiveFlowBlock`).
        use_softplus, soft_clip: affine parametrisation of all flow blocks.
        noise_embed_dim: width of the noise-level embedding fed to every flow block and the adapter.
        vision_start_token_id: the token whose TARFlow position carries the start input (predicts latent 0).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AutoregressiveFlowBlock"]
    _skip_layerwise_casting_patterns = ["noise_embed"]
    # compile_repeated_blocks(): the layers of the deep stream and the shallow flows (the static-shape decode path of
    # the shallow flows is traced once per shape; the deep stream's cache grows with the sequence)
    _repeated_blocks = ["FlowTransformerLayer"]

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 32,
        sample_size: int = 16,
        vlm_hidden_size: int = 3584,
        num_shallow_blocks: int = 2,
        shallow_layers: int = 4,
        shallow_channels: int = 3072,
        deep_layers: int = 24,
        deep_channels: int = 3072,
        head_dim: int = 64,
        num_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        expansion: float = 4.0,
        norm_type: str = "layer_norm",
        gated_mlp: bool = False,
        qk_norm: bool = False,
        final_norm: bool = True,
        use_softplus: bool = True,
        soft_clip: float = 4.0,
        noise_embed_dim: int = 256,
        vision_start_token_id: int = 151652,
    ):
        super().__init__()
        common = dict(
            in_channels=latent_channels,
            head_dim=head_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            expansion=expansion,
            norm_type=norm_type,
            gated_mlp=gated_mlp,
            qk_norm=qk_norm,
            final_norm=final_norm,
            use_softplus=use_softplus,
            soft_clip=soft_clip,
            use_sos=True,
            cond_dim=noise_embed_dim,
        )
        self.noise_proj = Timesteps(noise_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.noise_embed = TimestepEmbedding(noise_embed_dim, noise_embed_dim)
        # The shallow block next to the deep stream scans in reverse, so directions alternate along the stack.
        self.shallow = nn.ModuleList(
            [
                AutoregressiveFlowBlock(
                    channels=shallow_channels,
                    num_layers=shallow_layers,
                    rope="2d",
                    pt_seq_len=sample_size,
                    flip=(num_shallow_blocks - 1 - i) % 2 == 0,
                    **common,
                )
                for i in range(num_shallow_blocks)
            ]
        )
        self.deep = AutoregressiveFlowBlock(
            channels=deep_channels, num_layers=deep_layers, rope="1d", text_dim=vlm_hidden_size, **common
        )
        self.adapter = VisualAdapter(latent_channels, vlm_hidden_size, noise_embed_dim)
        self.skip_v = nn.Linear(vlm_hidden_size, deep_channels, bias=False)  # W_v
        self.skip_t = nn.Linear(deep_channels, vlm_hidden_size, bias=False)  # W_t
        nn.init.zeros_(self.skip_v.weight)
        nn.init.zeros_(self.skip_t.weight)
        # compile_decode_step(): the TARFlow stream's step over one new position ("token") / an image span's window
        self._compiled_stream: Dict[str, Callable] = {}

    @property
    def grid(self) -> Tuple[int, int]:
        return self.config.sample_size, self.config.sample_size

    @property
    def num_latents(self) -> int:
        return self.config.sample_size**2

    def noise_embedding(self, noise_level: torch.Tensor) -> torch.Tensor:
        """``(B,)`` noise levels -> ``(B, E)`` embedding."""
        t = self.noise_proj(noise_level.float() * NOISE_LEVEL_SCALE)
        # the embedding is never cast layerwise (``_skip_layerwise_casting_patterns``): it computes in its own dtype,
        # and hands the model's compute dtype on (the step takes it from this embedding)
        return self.noise_embed(t.to(compute_dtype(self.noise_embed))).to(self.dtype)

    # -- shallow flows (visual only) -------------------------------------------------------------------------------

    def latents_to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, N, C)`` raster order, checking the grid."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels or latents.shape[2:] != self.grid:
            raise ValueError(
                f"latents must have shape (B, {self.config.latent_channels}, {self.grid[0]}, "
                f"{self.grid[1]}); got {tuple(latents.shape)}"
            )
        return latents.flatten(2).transpose(1, 2)

    def tokens_to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).unflatten(2, self.grid)

    def shallow_forward(self, latents: torch.Tensor, noise_level: torch.Tensor):
        """Noisy FAE latents ``(B, C, h, w)`` -> intermediate tokens ``x~ (B, N, C)`` and the shallow logdets."""
        x, cond = self.latents_to_tokens(latents), self.noise_embedding(noise_level)
        logdets = []
        for block in self.shallow:
            x, logdet = block(x, self.grid, cond=cond)
            logdets.append(logdet)
        return x, logdets

    # -- the Pretzel step ------------------------------------------------------------------------------------------

    def new_cache(
        self, vlm: VLMStream, noise_level: torch.Tensor, use_flow_cache: bool = True, max_length: int = 256
    ) -> PretzelCache:
        """Empty caches for a batch whose samples sit at ``noise_level (B,)``."""
        from transformers import DynamicCache

        B = noise_level.shape[0]
        flow = self.deep.new_cache(B, max_length, self.dtype, self.device) if use_flow_cache else None
        return PretzelCache(
            vlm=DynamicCache(config=vlm.decoder.config),
            flow=flow,
            cond=self.noise_embedding(noise_level.to(self.device)),
            noise_level=noise_level.to(self.device),
            grid=self.grid,
            mrope=vlm.uses_mrope,
            attention_mask=torch.ones(B, 0, dtype=torch.bool, device=self.device),
            vlm_next=torch.zeros(B, dtype=torch.long, device=self.device),
            flow_next=torch.zeros(B, dtype=torch.long, device=self.device),
            image_cell=torch.zeros(B, dtype=torch.long, device=self.device),
        )

    def step(
        self,
        vlm: VLMStream,
        cache: PretzelCache,
        input_ids: Optional[torch.Tensor] = None,
        latents: Optional[torch.Tensor] = None,
        latent_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        vlm_grad: bool = True,
    ) -> PretzelStepOutput:
        """Run new positions through the VLM stream, then the TARFlow stream, appending them to both caches.

        Args:
            input_ids: ``(B, T)`` token ids (any id at latent positions); None for a latents-only step.
            latents: ``(B, T, C)`` intermediate latents ``x~`` (values at non-latent positions are ignored).
            latent_mask: ``(B, T)`` True at latent positions; default: all latents iff ``input_ids`` is None.
            attention_mask: ``(B, T)`` False at padding: left padding of a batch, or every position of a sample that
                idles in this step (it keeps its ``last_hidden`` / ``last_flow_hidden``; no later position sees
                padding).
            vlm_grad: False runs the VLM stream (adapter and VLM) without autograd, where no gradient through it
                can reach a trainable parameter (see :meth:`vlm_stream_needs_grad`).
        """
        if input_ids is None and latents is None:
            raise ValueError("step needs input_ids or latents")
        B, T = (input_ids if input_ids is not None else latents).shape[:2]
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} does not match the cache's batch of {cache.batch_size}")
        # The model's (onload) device and compute dtype, as the noise-level embedding of the sequence holds them
        # (the embedding is never cast layerwise): looking them up on the model walks every module, at every step.
        device, dtype = cache.cond.device, cache.cond.dtype
        if latent_mask is None:
            latent_mask = torch.full((B, T), input_ids is None, dtype=torch.bool, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        attention_mask, latent_mask = attention_mask.bool().to(device), latent_mask.to(device)
        vlm_pos, flow_pos = cache.assign_positions(latent_mask, attention_mask)
        full_mask = torch.cat([cache.attention_mask, attention_mask], dim=1)  # (B, T_seen + T)

        # VLM stream: text embeddings, adapted latents at latent positions
        vlm_dtype = vlm.vlm.dtype
        if latents is not None:
            latents = latents.to(device=device, dtype=dtype)
        with torch.set_grad_enabled(vlm_grad and torch.is_grad_enabled()):
            embeds = vlm.embed_tokens(input_ids.to(device)) if input_ids is not None else None
            if latents is not None:
                adapted = self.adapter(latents, cache.cond).to(vlm_dtype)
                embeds = adapted if embeds is None else torch.where(latent_mask[..., None], adapted, embeds)
            h, _ = vlm(embeds.to(vlm_dtype), vlm_pos, cache.vlm, attention_mask=full_mask.long())  # (B, T, D)

        # TARFlow stream: P_txt(h) at text, proj_in(x~) + W_v h at latents, start input at <|vision_start|>
        deep = self.deep
        h_flow = h.to(dtype)
        flow_in = deep.proj_txt(h_flow)
        if latents is not None:
            flow_in = torch.where(latent_mask[..., None], deep.proj_in(latents) + self.skip_v(h_flow), flow_in)
        if input_ids is not None:
            is_start = (input_ids.to(device) == self.config.vision_start_token_id) & ~latent_mask
            flow_in = flow_in + is_start[..., None].to(flow_in.dtype) * deep.proj_in(deep.sos_embed.to(dtype))
        if cache.flow is not None:
            cache.flow_inputs.append(flow_in)
            cache.flow_positions.append(flow_pos)
        # a compiled step takes single positions and the (Jacobi) windows of an image span; longer passes (prompts)
        # keep the appending path, whose attention is tiled
        kind = "token" if T == 1 else "window" if input_ids is None else None
        g = self._flow_stream(flow_in, flow_pos, cache.cond, cache.flow, full_mask, kind)

        cache.attention_mask = full_mask
        last_flow_hidden, last_hidden = g[:, -1:], h[:, -1:]
        idle = ~attention_mask.any(1)  # samples that took only padding still end where they were
        if cache.last_hidden is not None:  # no data-dependent branch: no device sync, and it runs on `meta`
            last_flow_hidden = torch.where(idle[:, None, None], cache.last_flow_hidden, last_flow_hidden)
            last_hidden = torch.where(idle[:, None, None], cache.last_hidden, last_hidden)
        cache.last_flow_hidden, cache.last_hidden = last_flow_hidden, last_hidden
        return PretzelStepOutput(hidden_states=h, flow_hidden_states=g)

    def _flow_stream(
        self,
        flow_in: torch.Tensor,
        positions: torch.Tensor,
        cond: torch.Tensor,
        flow_cache: Optional[FlowKVCache],
        key_padding_mask: torch.Tensor,
        compiled: Optional[str] = None,
    ) -> torch.Tensor:
        """The deep TARFlow stream over new positions: level-independent inputs ``(B, T, C)`` plus the noise-level
        embedding, 1-D RoPE at ``positions (B, T)``; appends to ``flow_cache``.  In inference it runs the
        ``compiled`` step (``"token"`` / ``"window"``, see :meth:`compile_decode_step`) when there is one."""
        deep = self.deep
        step = self._compiled_stream.get(compiled) if compiled is not None else None
        if step is not None and flow_cache is not None and not torch.is_grad_enabled():
            slots = flow_cache.claim_slots(flow_cache.length, flow_in.shape[1], flow_in.device)
            # shapes fixed by the buffers: the padding mask covers every slot (slots after the new ones are masked
            # as the future anyway)
            padding = key_padding_mask.new_zeros(key_padding_mask.shape[0], flow_cache.capacity)
            padding[:, : key_padding_mask.shape[1]] = key_padding_mask
            filled = torch.tensor(
                flow_cache.length
            )  # on the CPU: read by the attention operator, never a graph constant
            return step(flow_in, positions, cond, padding, slots, flow_cache.keys, flow_cache.values, filled)
        rope = rope_tables(rope_angles(positions[..., None].float(), deep.head_dim))[:, :, None]  # (2, B, 1, T, Dh)
        return deep.transformer(deep.add_cond(flow_in, cond), rope, flow_cache, key_padding_mask=key_padding_mask)

    def static_stream(
        self,
        flow_in: torch.Tensor,
        positions: torch.Tensor,
        cond: torch.Tensor,
        key_padding_mask: torch.Tensor,
        slots: torch.Tensor,
        keys: List[torch.Tensor],
        values: List[torch.Tensor],
        filled: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """:meth:`_flow_stream` with every shape fixed by the inputs ``(B, T, C)`` and the cache buffers
        ``(B, H_kv, S, D)``: the new positions are written at cache ``slots (T,)`` and attend over all ``S`` slots
        under the causal mask and ``key_padding_mask (B, S)``; RoPE at ``positions (B, T)``.  ``filled``: see
        :meth:`~diffusers_starflow2.models.attention.FlowAttention.forward_static`."""
        deep = self.deep
        rope = rope_tables(rope_angles(positions[..., None].float(), deep.head_dim))[..., None, :]  # (2, B, T, 1, Dh)
        return deep.transformer(deep.add_cond(flow_in, cond), rope, (keys, values), key_padding_mask, slots, filled)

    def static_image_step(
        self,
        vlm: VLMStream,
        latents: torch.Tensor,
        cond: torch.Tensor,
        vlm_positions: torch.Tensor,
        flow_positions: torch.Tensor,
        slots: torch.Tensor,
        key_padding_mask: torch.Tensor,
        vlm_keys: List[torch.Tensor],
        vlm_values: List[torch.Tensor],
        flow_keys: List[torch.Tensor],
        flow_values: List[torch.Tensor],
        filled: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, ...]:
        """The whole Pretzel step over new latents ``(B, T, C)`` of an image span with every shape fixed by the inputs
        and the buffers (:class:`StaticImageSpan` holds them): the visual adapter, the VLM stream's layers
        (:meth:`~diffusers_starflow2.models.vlm_stream.VLMStream.static_layers`), the TARFlow stream
        (:meth:`static_stream`) and the affine parameters, as :meth:`step` computes them.  Both streams write their
        keys/values at cache ``slots (T,)`` of buffers ``(B, H_kv, S, D)`` of one capacity ``S`` and attend under the
        causal mask and ``key_padding_mask (B, S)``; ``vlm_positions`` ``(3, B, T)`` / ``(B, T)`` and
        ``flow_positions (B, T)`` are the streams' position ids.  Returns ``h (B, T, D)``, the TARFlow inputs and
        outputs ``(B, T, C_deep)`` and ``(mu, sigma)`` ``(B, T, C)``."""
        adapted = self.adapter(latents, cond).to(vlm.vlm.dtype)
        h = vlm.static_layers(adapted, vlm_positions, slots, key_padding_mask, vlm_keys, vlm_values, filled)
        flow_in = self.deep.proj_in(latents) + self.skip_v(h.to(latents.dtype))
        g = self.static_stream(flow_in, flow_positions, cond, key_padding_mask, slots, flow_keys, flow_values, filled)
        mu, sigma = self.latent_params(g)
        return h, flow_in, g, mu, sigma

    def enable_group_offload(self, *args, **kwargs) -> None:
        refuse_group_offload(self)

    def compile_decode_step(
        self, mode: Optional[str] = "max-autotune", vlm: Optional[nn.Module] = None, **compile_kwargs
    ) -> None:
        """Compile the sampling steps with ``torch.compile``; opt-in, for inference.  Each shallow flow's decode step
        (:meth:`~diffusers_starflow2.models.flow_block.AutoregressiveFlowBlock.compile_decode_step`) and the deep
        TARFlow stream's step (:meth:`static_stream`: the stream's layers as one graph): over one new position (text
        or latent) with static shapes in ``mode``, traced once per batch size and cache size, never per position;
        over the Jacobi windows of an image span with dynamic shapes in inductor's default mode.

        With ``vlm`` (the pipeline's VLM, or its :class:`~diffusers_starflow2.models.vlm_stream.VLMStream`) whose
        decoder has the static decode path, exact decoding of an image span also runs as one graph per position:
        the whole step of :meth:`static_image_step` (adapter, VLM layers on fixed-size key/value buffers, TARFlow
        stream, affine parameters), traced once per batch size and cache capacity; elsewhere (prompts, Jacobi
        windows) the VLM stream stays a transformers call.  As there, the weights (the VLM's included) are frozen
        into the graphs: compile again after changing them or moving the models.  ``mode`` and ``compile_kwargs``
        as there."""
        for block in self.shallow:
            block.compile_decode_step(mode, **compile_kwargs)
        self._compiled_stream = compile_decode_graphs(self.static_stream, mode, **compile_kwargs)
        if vlm is not None:
            stream = vlm if isinstance(vlm, VLMStream) else VLMStream(vlm)
            if stream.supports_static_decode:
                step = compile_static_step(_ImageStep(self, stream).forward, mode, False, **compile_kwargs)
                self._compiled_stream["image"] = (stream.vlm, step)  # in a dict: not registered as a submodule

    def image_step_for(self, vlm: VLMStream) -> Optional[Callable]:
        """The compiled :meth:`static_image_step` of :meth:`compile_decode_step` for ``vlm``'s model, if any."""
        compiled_vlm, step = self._compiled_stream.get("image", (None, None))
        return step if compiled_vlm is vlm.vlm else None

    def at_noise_level(self, cache: PretzelCache, noise_level: torch.Tensor) -> PretzelCache:
        """The sequence in ``cache`` as the model sees it when its next image is at ``noise_level (B,)``.

        The noise level conditions the TARFlow stream at every position (and the shallow flows), so that stream is
        rebuilt from the kept level-independent inputs; the VLM stream, whose only dependence on the level is the
        adapter's reading of context images at the level they really carry, is shared.  ``cache`` is unchanged; at
        the cache's own level it is returned as is (where the levels have no values, on ``meta``, it is rebuilt).
        """
        noise_level = noise_level.to(cache.noise_level)
        if has_values(noise_level, cache.noise_level) and torch.equal(noise_level, cache.noise_level):
            return cache
        if cache.flow is None:
            raise ValueError("at_noise_level needs a cache with a flow stream (use_flow_cache=True)")
        moved = cache.fork(cache.snapshot(), copy_flow=False)
        moved.noise_level, moved.cond = noise_level, self.noise_embedding(noise_level)
        moved.flow = self.deep.new_cache(cache.batch_size, cache.flow.length, self.dtype, self.device)
        if cache.flow_inputs:
            g = self._flow_stream(
                torch.cat(cache.flow_inputs, 1),
                torch.cat(cache.flow_positions, 1),
                moved.cond,
                moved.flow,
                cache.attention_mask,
            )
            moved.last_flow_hidden = g[:, -1:]
        return moved

    def text_logits(self, vlm: VLMStream, hidden_states: torch.Tensor, flow_hidden_states: torch.Tensor):
        """``LM_head(h + W_t g)`` for ``(B, T, D)`` / ``(B, T, C)`` stream outputs."""
        g = self.deep.final_norm(flow_hidden_states) if self.deep.final_norm is not None else flow_hidden_states
        fused = hidden_states + self.skip_t(g).to(hidden_states.dtype)
        return vlm.logits(fused)

    def latent_params(self, flow_hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Affine parameters ``(mu, sigma)`` (float32) of the latent that each TARFlow output predicts."""
        return self.deep.affine(flow_hidden_states)

    # -- whole images through the step ----------------------------------------------------------------------------

    def image_nll_in_context(self, vlm: VLMStream, cache: PretzelCache, latents: torch.Tensor) -> torch.Tensor:
        """NLL (nats per dimension, Gaussian constant included) of noisy latents ``(B, C, h, w)`` as the next image
        of the sequence in ``cache`` (which must end with ``<|vision_start|>``).  The cache is left unchanged."""
        if cache.batch_size != latents.shape[0]:
            raise ValueError(f"latents batch {latents.shape[0]} does not match the cache batch {cache.batch_size}")
        tokens, shallow_logdets = self.shallow_forward(latents, cache.noise_level)
        snap = cache.snapshot()
        try:
            out = self.step(vlm, cache, latents=tokens[:, :-1])
            g = torch.cat([snap["last_flow_hidden"], out.flow_hidden_states], dim=1)  # predicts latents 0..N-1
        finally:
            cache.restore(snap)
        mu, sigma = self.latent_params(g)
        z = (tokens.float() - mu) / sigma
        return flow_nll(z, [-torch.log(sigma), *shallow_logdets]) + 0.5 * LOG_2PI

    # -- teacher-forced training pass -----------------------------------------------------------------------------

    def vlm_stream_needs_grad(
        self,
        vlm: VLMStream,
        latent_mask: torch.Tensor,
        image_loss_mask: Optional[torch.Tensor] = None,
        text_loss_mask: Optional[torch.Tensor] = None,
        images: Optional[torch.Tensor] = None,
    ) -> bool:
        """Whether the teacher-forced pass over this layout must run the VLM stream (the visual adapter and the VLM)
        with autograd: whether some trainable parameter can receive a non-zero gradient through it.

        Gradient enters the VLM stream only through parameters of its own (a LoRA on the VLM), the adapter's
        parameters, or the adapter's inputs (the shallow flows' outputs ``x~`` and the noise-level embedding).  With a
        frozen adapter whose zero-initialised output projection is still zero, the adapter is a constant map and no
        gradient reaches its inputs.  Otherwise the VLM's outputs ``h`` must also reach the loss: through ``W_v h`` at
        a scored image's own latents (``skip_v`` non-zero), through ``P_txt(h)`` at the text before a scored image
        that follows another image of its sample, or through the text head at a scored text position after a latent.
        Stage 1 from initialisation (skips and adapter output at zero, the adapter frozen) has none of these paths:
        its VLM stream runs without autograd and no VLM module runs a backward.

        Trainable VLM or adapter parameters always answer True (their gradients stay defined, if zero, on every
        batch, as optimisers and DDP expect); where a value it needs is not available (``meta`` / fake tensors) the
        answer is True, which is always correct.

        Args:
            latent_mask, image_loss_mask, text_loss_mask, images: as in :meth:`forward`.
        """
        if not torch.is_grad_enabled():
            return False
        if any(p.requires_grad for p in vlm.parameters()) or any(p.requires_grad for p in self.adapter.parameters()):
            return True
        inputs = [*self.shallow.parameters(), *self.noise_embed.parameters()]
        if not any(p.requires_grad for p in inputs) and not (images is not None and images.requires_grad):
            return False
        proj_out, skip_v = self.adapter.proj_out.weight, self.skip_v.weight
        if not has_values(proj_out, skip_v, latent_mask, image_loss_mask, text_loss_mask):
            return True
        if not bool(proj_out.any()):
            return False  # a constant map: nothing flows back into x~ or the noise-level embedding
        latent_mask = latent_mask.bool()
        counts = latent_mask.sum(1) // self.num_latents  # (B,) images per sample
        scored = (
            image_loss_mask.bool() if image_loss_mask is not None else torch.ones(int(counts.sum()), dtype=torch.bool)
        )
        scored = scored.to(latent_mask.device)
        if bool(scored.any()) and bool(skip_v.any()):
            return True
        first = counts.cumsum(0) - counts  # (B,) index of each sample's first image
        owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)  # (M,)
        if bool((scored & (torch.arange(len(owner), device=owner.device) > first[owner])).any()):
            return True  # a scored image after another image of its sample: P_txt(h) of the text between
        if text_loss_mask is not None:  # logits at position p - 1 predict the token at p
            after_latent = latent_mask.cumsum(1) > 0
            if bool((text_loss_mask[:, 1:].bool() & after_latent[:, :-1]).any()):
                return True
        return False

    def forward(
        self,
        vlm: VLMStream,
        input_ids: torch.Tensor,
        latent_mask: torch.Tensor,
        images: torch.Tensor,
        noise_level: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        image_loss_mask: Optional[torch.Tensor] = None,
        text_loss_mask: Optional[torch.Tensor] = None,
        text_loss_weight: float = 1.0,
        image_loss_weight: Optional[torch.Tensor] = None,
        num_text_targets: Optional[int] = None,
        vlm_requires_grad: Optional[bool] = None,
        return_dict: bool = True,
    ):
        """One teacher-forced pass over whole interleaved sequences; returns the STARFlow2 losses.

        Every shape follows from the inputs' shapes (and ``num_text_targets``), so the pass also runs on ``meta``
        and fake tensors; the checks of the layout run where the values exist.

        Args:
            input_ids: ``(B, T)`` tokens; latent positions hold any id (e.g. ``<|image_pad|>``).
            latent_mask: ``(B, T)`` True at latent positions; each run of ``N`` is one image span, preceded by
                ``<|vision_start|>``.
            images: ``(M, C, h, w)`` noisy FAE latents of all spans, sample-major then in sequence order.
            noise_level: ``(B,)`` the noise level of each sample's images.
            attention_mask: ``(B, T)`` False at padding.
            image_loss_mask: ``(M,)`` which images are scored by the flow loss (default all).
            text_loss_mask: ``(B, T)`` True at tokens predicted by the text loss (from the previous position).
            image_loss_weight: ``(M,)`` multiplies each image's NLL in the flow loss (default 1).
            num_text_targets: the number of True entries of ``text_loss_mask[:, 1:]``; needed where the mask holds
                no values (``meta`` / fake tensors), checked against the mask elsewhere (default: counted).
            vlm_requires_grad: run the VLM stream with autograd; default :meth:`vlm_stream_needs_grad` decides.
        """
        B, T = input_ids.shape
        N = self.num_latents
        M = images.shape[0]
        counts = latent_mask.sum(1)  # (B,)
        text_targets = text_loss_mask[:, 1:].bool() if text_loss_mask is not None else None
        if has_values(counts):
            if int(counts.sum()) != M * N or bool((counts % N).any()):
                raise ValueError(
                    f"latent_mask marks {counts.tolist()} latent positions; expected multiples of {N} "
                    f"summing to {M} images x {N}"
                )
        if text_targets is not None and has_values(text_targets):
            found = int(text_targets.sum())
            if num_text_targets is not None and num_text_targets != found:
                raise ValueError(f"num_text_targets={num_text_targets} but text_loss_mask[:, 1:] marks {found}")
            num_text_targets = found
        elif text_targets is not None and num_text_targets is None:
            raise ValueError("num_text_targets is needed with a text_loss_mask that holds no values (meta/fake)")
        if vlm_requires_grad is None:
            vlm_requires_grad = self.vlm_stream_needs_grad(vlm, latent_mask, image_loss_mask, text_loss_mask, images)

        owner = torch.repeat_interleave(torch.arange(B, device=counts.device), counts // N, output_size=M)  # (M,)
        tokens, shallow_logdets = self.shallow_forward(images, noise_level.to(images.device)[owner])  # (M, N, C)
        C = tokens.shape[-1]
        latents, slots = scatter_latents(tokens, latent_mask)  # (B, T, C); slots (M*N,): never a sample's first

        cache = self.new_cache(vlm, noise_level, use_flow_cache=False)
        out = self.step(vlm, cache, input_ids, latents, latent_mask, attention_mask, vlm_grad=vlm_requires_grad)
        h, g = out.hidden_states, out.flow_hidden_states

        # flow: the output at position p predicts the latent at p + 1
        mu, sigma = self.latent_params(g.reshape(B * T, -1)[slots - 1])  # (M*N, C)
        z = ((tokens.reshape(-1, C).float() - mu) / sigma).view(M, N, C)
        nll = flow_nll(z, [-torch.log(sigma).view(z.shape), *shallow_logdets])  # (M,)
        scored = image_loss_mask.to(nll.device).bool() if image_loss_mask is not None else torch.ones_like(nll).bool()
        weighted = nll if image_loss_weight is None else nll * image_loss_weight.to(nll)
        # the mean over scored images; 0 (still a term of the graph) when none is scored
        flow_loss = torch.where(scored, weighted, 0).sum() / scored.sum().clamp(min=1)

        # text: next-token cross-entropy at the requested positions
        if num_text_targets:
            targets = torch.nonzero_static(text_targets.reshape(-1), size=num_text_targets).squeeze(1)  # (P,)
            rows = (targets // (T - 1)) * T + targets % (T - 1)  # the predicting positions in (B * T)
            rows = rows.to(h.device)
            logits = self.text_logits(vlm, h.reshape(B * T, -1)[rows], g.reshape(B * T, -1)[rows])  # (P, V)
            text_loss = F.cross_entropy(logits.float(), input_ids.reshape(-1).to(h.device)[rows + 1])
        else:
            logits, text_loss = None, g.sum() * 0
        loss = flow_loss + text_loss_weight * text_loss
        result = PretzelOutput(
            loss=loss,
            flow_loss=flow_loss,
            text_loss=text_loss,
            image_nll=(nll + 0.5 * LOG_2PI).detach(),
            bits_per_dim=bits_per_dim(nll).detach(),
            text_logits=logits,
        )
        return result if return_dict else result.to_tuple()

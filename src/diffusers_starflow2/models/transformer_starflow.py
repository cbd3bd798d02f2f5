# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""StarFlowTransformerModel: the STARFlow (v1) deep-shallow flow stack conditioned on text-encoder features.

This is the layout of the released STARFlow checkpoints: ``K`` shallow autoregressive flow blocks that alternate scan
direction, followed by one deep block that reads the text features as a prefix.  Converted reference checkpoints
(``conversion/convert_starflow_to_diffusers.py``) reproduce the reference forward, reverse and self-denoising.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .flow_block import AutoregressiveFlowBlock
from .likelihood import LOG_2PI, bits_per_dim, flow_nll
from .modeling_utils import refuse_group_offload


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/p, W/p, p*p*C)``, channels of a patch ordered (row, col, channel)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, H // p, W // p, p * p * C)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    B, h, w, D = x.shape
    C = D // (p * p)
    return x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)


@dataclass
class StarFlowTransformerOutput(BaseOutput):
    """
    Args:
        z: ``(B, C, H, W)`` the latents mapped to noise space.
        logdets: one ``(B, N, C*p*p)`` tensor per flow block, data->noise order, tokens in the block's scan order;
            summed over non-batch dimensions it is that block's ``log|det J|``.
        loss: scalar, batch mean of ``1/2 mean(z^2) - sum_blocks mean(logdet)`` (training loss).
        nll: ``(B,)`` negative log-likelihood in nats per dimension (Gaussian constant included).
        bits_per_dim: ``(B,)`` the same in bits per dimension.
        block_inputs: the ``(B, H/p, W/p, C*p*p)`` input of every block, then the final output.
    """

    z: torch.Tensor
    logdets: Tuple[torch.Tensor, ...]
    loss: torch.Tensor
    nll: torch.Tensor
    bits_per_dim: torch.Tensor
    block_inputs: Tuple[torch.Tensor, ...] = ()


class StarFlowTransformerModel(ModelMixin, ConfigMixin):
    r"""STARFlow deep-shallow autoregressive flow on text-encoder features.

    Args:
        in_channels: latent channels ``C``.
        sample_size: latent side the model was trained at (RoPE normalisation and learned position embeddings).
        patch_size: latent patch side ``p``; a token has ``C * p * p`` channels.
        channels: width of every block's Transformer.
        layers_per_block: Transformer layers of each block, data->noise order; the last entry is the deep block.
            A 0 makes that block the identity.
        head_dim, num_heads, num_kv_heads: attention heads (grouped-query when ``num_kv_heads < num_heads``).
        expansion: MLP width multiplier.
        use_rope: rotary positions (3-axis with text, 2-axis without); otherwise learned position embeddings.
        pt_seq_len: grid side RoPE positions are normalised to (default ``sample_size // patch_size``).
        use_sos: learned start token; otherwise the first token passes through each block.
        max_text_length: maximum number of text tokens (0 = unconditional model).
        text_dim: width of the text features ``encoder_hidden_states``.
        cond_top_only: only the deep block reads the text (and is guided); otherwise every block does.
        use_softplus: ``sigma = softplus(a + 0.5413)``; otherwise ``exp(a)``.
        gated_mlp: gated GELU MLP (``use_swiglu`` in the reference) instead of GELU MLP.
        use_bias, qk_norm, post_norm, final_norm: Transformer variants.
        norm_type: ``"layer_norm"``, ``"rms_norm"`` or ``"none"``.
        hf_style_rope: rotate channel ``i`` with ``i + d/2`` instead of adjacent pairs.
        soft_clip: squash the affine parameters with ``c * tanh(. / c)`` when > 0.
        seq_order: ``"L2R"`` (deep block scans in raster order) or ``"R2L"``; blocks alternate direction.
        top_block_channels: width of the deep block if different from ``channels``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AutoregressiveFlowBlock"]
    # compile_repeated_blocks(): sampling calls the layers (never `forward`), through a static-shape decode path
    _repeated_blocks = ["FlowTransformerLayer"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        sample_size: int = 32,
        patch_size: int = 1,
        channels: int = 3072,
        layers_per_block: Sequence[int] = (2, 2, 2, 2, 2, 24),
        head_dim: int = 64,
        num_heads: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        expansion: float = 4.0,
        use_rope: bool = True,
        pt_seq_len: Optional[int] = None,
        use_sos: bool = True,
        max_text_length: int = 128,
        text_dim: int = 2048,
        cond_top_only: bool = True,
        use_softplus: bool = True,
        gated_mlp: bool = False,
        use_bias: bool = True,
        qk_norm: bool = False,
        post_norm: bool = False,
        final_norm: bool = True,
        hf_style_rope: bool = False,
        norm_type: str = "layer_norm",
        soft_clip: float = 4.0,
        seq_order: str = "L2R",
        top_block_channels: Optional[int] = None,
    ):
        super().__init__()
        if seq_order not in ("L2R", "R2L"):
            raise ValueError(f"seq_order must be 'L2R' or 'R2L'; got {seq_order!r}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size})")
        grid = sample_size // patch_size
        n = len(layers_per_block)
        common = dict(
            in_channels=in_channels * patch_size**2,
            head_dim=head_dim,
            num_kv_heads=num_kv_heads,
            expansion=expansion,
            rope=("3d" if max_text_length > 0 else "2d") if use_rope else "none",
            pt_seq_len=pt_seq_len or grid,
            num_positions=grid * grid,
            use_sos=use_sos,
            use_softplus=use_softplus,
            gated_mlp=gated_mlp,
            qk_norm=qk_norm,
            post_norm=post_norm,
            final_norm=final_norm,
            bias=use_bias,
            norm_type=norm_type,
            hf_style_rope=hf_style_rope,
            soft_clip=soft_clip,
        )
        blocks = []
        for i, num_layers in enumerate(layers_per_block):
            top = i == n - 1
            width = (top_block_channels or channels) if top else channels
            heads = num_heads if (num_heads or not top or width == channels) else width // head_dim
            # Directions alternate along the stack; "L2R" starts (block 0) with the reversed scan.
            flip = (i % 2 == 0) if seq_order == "L2R" else (i % 2 == 1)
            cond = top or not cond_top_only
            blocks.append(
                AutoregressiveFlowBlock(
                    channels=width,
                    num_layers=num_layers,
                    num_heads=heads,
                    flip=flip,
                    text_dim=text_dim if cond else 0,
                    **common,
                )
            )
        self.blocks = torch.nn.ModuleList(blocks)

    def enable_group_offload(self, *args, **kwargs) -> None:
        refuse_group_offload(self)

    def compile_decode_step(self, mode: Optional[str] = "max-autotune", **compile_kwargs) -> None:
        """``torch.compile`` the decode step of every flow block (one graph per block, query count and cache size,
        never one per token); opt-in, see :meth:`AutoregressiveFlowBlock.compile_decode_step` (weights frozen into
        the graphs: compile again after changing them)."""
        for block in self.blocks:
            if not block.is_identity:
                block.compile_decode_step(mode, **compile_kwargs)

    # -- helpers ---------------------------------------------------------------------------------------------------

    def check_inputs(self, latents: torch.Tensor, text: Optional[torch.Tensor], name: str = "latents") -> None:
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"{name} must have shape (B, {cfg.in_channels}, H, W); got {tuple(latents.shape)}")
        if latents.shape[2] % cfg.patch_size or latents.shape[3] % cfg.patch_size:
            raise ValueError(
                f"{name} height and width {tuple(latents.shape[2:])} must be divisible by patch_size={cfg.patch_size}"
            )
        if (
            not cfg.use_rope
            and latents.shape[2] != cfg.sample_size
            or not cfg.use_rope
            and latents.shape[3] != cfg.sample_size
        ):
            raise ValueError(f"{name} must be {cfg.sample_size}x{cfg.sample_size} for a model without RoPE")
        if cfg.max_text_length > 0 and cfg.text_dim > 0:
            if text is None:
                raise ValueError("encoder_hidden_states is required by this text-conditioned model")
            if text.ndim != 3 or text.shape[-1] != cfg.text_dim or text.shape[0] != latents.shape[0]:
                raise ValueError(
                    f"encoder_hidden_states must have shape ({latents.shape[0]}, L, {cfg.text_dim}); "
                    f"got {tuple(text.shape)}"
                )
            if text.shape[1] > cfg.max_text_length:
                raise ValueError(
                    f"encoder_hidden_states has {text.shape[1]} tokens, more than the model's "
                    f"max_text_length={cfg.max_text_length}"
                )

    def to_tokens(self, latents: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = patchify(latents, self.config.patch_size)  # (B, h, w, C p p)
        return x.flatten(1, 2), (x.shape[1], x.shape[2])

    def to_latents(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return unpatchify(tokens.unflatten(1, grid), self.config.patch_size)

    # -- data -> noise ---------------------------------------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """Map ``latents (B, C, H, W)`` to noise; see :class:`StarFlowTransformerOutput`."""
        self.check_inputs(latents, encoder_hidden_states)
        x, grid = self.to_tokens(latents)  # (B, N, D)
        logdets, inputs = [], []
        for block in self.blocks:
            inputs.append(x.unflatten(1, grid))
            x, logdet = block(x, grid, encoder_hidden_states, encoder_attention_mask)
            logdets.append(logdet)
        inputs.append(x.unflatten(1, grid))
        z = self.to_latents(x, grid)
        per_sample = flow_nll(z, logdets)
        out = StarFlowTransformerOutput(
            z=z,
            logdets=tuple(logdets),
            loss=per_sample.mean(),
            nll=per_sample + 0.5 * LOG_2PI,
            bits_per_dim=bits_per_dim(per_sample),
            block_inputs=tuple(inputs),
        )
        return out if return_dict else out.to_tuple()

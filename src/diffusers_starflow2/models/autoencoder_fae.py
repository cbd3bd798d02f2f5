# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""AutoencoderFAE: the Feature Auto-Encoder whose latent space STARFlow2 generates in.

FAE (Gao et al. 2025, "One Layer Is Enough") compresses the patch features of a frozen DINOv2 into a small
continuous latent with a single self-attention layer, and decodes in two stages:

    image [-1, 1] -> (to [0, 1], resize to ``image_size``, ImageNet-normalise) -> frozen DINOv2 -> patch features
    patch features (B, h*w, D) -> one attention layer + linear -> (mean, logvar) of a (B, latent_channels, h, w) latent
    latent -> feature decoder (Transformer) -> rebuilt DINOv2 features (B, h*w, D)
    rebuilt features -> pixel decoder (ViT) -> one ``out_patch_size``^2 RGB patch per token -> image [-1, 1]

It is trained as a VAE: L2 between rebuilt and true DINOv2 features, L2 between decoded and input pixels, and
``beta`` x KL of the posterior (see :meth:`AutoencoderFAE.compute_loss`).  DINOv2 stays frozen throughout.

Scaling conventions follow diffusers' ``AutoencoderKL`` / Flux: :meth:`~AutoencoderFAE.encode` returns the raw
posterior and :meth:`~AutoencoderFAE.decode` takes raw latents; the generator works in the scaled space
``(raw - shift_factor) * scaling_factor``.  :meth:`~AutoencoderFAE.encode_latents` and
:meth:`~AutoencoderFAE.decode_latents` apply / undo that scaling for callers that do not want to do it themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from .attention import FlowAttention
from .embeddings import rope_angles, rope_positions, rope_tables
from .flow_block import FlowTransformerLayer
from .normalization import RMSNorm
from .transformer_starflow import unpatchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Dinov2Config fields that define the architecture (and hence the state dict); everything else a saved transformers
# config carries (architectures, transformers_version, id2label, ...) is bookkeeping we do not store.
DINOV2_ARCH_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "layerscale_value",
    "drop_path_rate",
    "use_swiglu_ffn",
    "use_mask_token",
)


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


def dinov2_giant_config() -> dict:
    """Architecture of DINOv2-g/14 as in transformers' ``facebook/dinov2-giant`` (1.1B parameters)."""
    # image_size 518 is the resolution of the released position table (37x37); DINOv2 interpolates it to the
    # 16x16 grid of a 224-px input, so it must stay 518 for the released weights to load.
    return dict(
        hidden_size=1536,
        num_hidden_layers=40,
        num_attention_heads=24,
        mlp_ratio=4,
        use_swiglu_ffn=True,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
        image_size=518,
        patch_size=14,
        num_channels=3,
    )


def fae_paper_config() -> dict:
    """The STARFlow2 FAE: DINOv2-g/14 on 224 px -> 16x16x32 latents -> 256-px images (16-px output patches).

    The DINOv2 side and the latent shape are the paper's; the decoder widths/depths are not published and are a
    best guess (a 6-layer feature decoder and an 8-layer pixel decoder, both 1024 wide).
    """
    return dict(
        dinov2_config=dinov2_giant_config(),
        image_size=224,
        sample_size=256,
        latent_channels=32,
        encoder_num_heads=24,
        decoder_dim=1024,
        decoder_layers=6,
        decoder_num_heads=16,
        pixel_decoder_dim=1024,
        pixel_decoder_layers=8,
        pixel_decoder_num_heads=16,
        out_patch_size=16,
    )


def fae_small_config() -> dict:
    """A ~64-px world for quick experiments: image 64, DINOv2 patch 8 -> 8x8x8 latents -> 64-px images."""
    dinov2 = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=4,
        image_size=64,
        patch_size=8,
        num_channels=3,
    )
    return dict(
        dinov2_config=dinov2,
        image_size=64,
        sample_size=64,
        latent_channels=8,
        encoder_num_heads=4,
        decoder_dim=128,
        decoder_layers=4,
        decoder_num_heads=4,
        pixel_decoder_dim=128,
        pixel_decoder_layers=4,
        pixel_decoder_num_heads=4,
        out_patch_size=8,
    )


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def _grid_rope(height: int, width: int, pt_seq_len: float, head_dim: int, device) -> torch.Tensor:
    # (2, h*w, head_dim) cos/sin; positions are normalised to pt_seq_len so rectangular grids stay in the trained range
    return rope_tables(rope_angles(rope_positions(height, width, 0, pt_seq_len, "2d"), head_dim)).to(device)


def _head_dim(dim: int, num_heads: int, name: str) -> int:
    if dim % num_heads:
        raise ValueError(f"{name}: width {dim} is not divisible by {num_heads} heads")
    head_dim = dim // num_heads
    if head_dim % 4:  # 2-axis RoPE gives each grid axis half of the head's rotation pairs
        raise ValueError(f"{name}: head dim {head_dim} must be a multiple of 4 for 2-D rotary positions")
    return head_dim


class FAEEncoder(nn.Module):
    """The single-attention-layer encoder: DINOv2 patch features ``(B, N, D)`` -> ``(B, N, 2 * latent_channels)``.

    Deliberately one attention layer and no MLP: the paper finds that deeper adapters re-encode the features and
    lose information; attention is what removes the redundancy shared across patches (a linear map cannot).
    """

    def __init__(self, feature_dim: int, latent_channels: int, num_heads: int, pt_seq_len: float):
        super().__init__()
        self.head_dim = _head_dim(feature_dim, num_heads, "encoder_num_heads")
        self.pt_seq_len = pt_seq_len
        self.attn = FlowAttention(feature_dim, self.head_dim, num_heads, norm_type="layer_norm", causal=False)
        self.norm_out = RMSNorm(feature_dim)
        self.proj_out = nn.Linear(feature_dim, 2 * latent_channels)

    def forward(self, features: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        rope = _grid_rope(*grid, self.pt_seq_len, self.head_dim, features.device)
        h = features + self.attn(features, rope)  # (B, N, D)
        return self.proj_out(self.norm_out(h))  # (B, N, 2 C)


class FAETransformer(nn.Module):
    """Bidirectional Transformer on a token grid: ``Linear(in) -> layers (2-D RoPE) -> RMSNorm -> Linear(out)``.

    Used twice: as the feature decoder (latents -> DINOv2 features) and as the pixel decoder (features -> pixel
    patches).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        pt_seq_len: float,
        mlp_ratio: float = 4.0,
        gated_mlp: bool = True,
        qk_norm: bool = True,
        name: str = "decoder",
    ):
        super().__init__()
        self.head_dim = _head_dim(dim, num_heads, f"{name}_num_heads")
        self.pt_seq_len = pt_seq_len
        self.gradient_checkpointing = False
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(
            [
                FlowTransformerLayer(
                    dim,
                    self.head_dim,
                    mlp_ratio,
                    num_heads,
                    norm_type="rms_norm",
                    gated_mlp=gated_mlp,
                    qk_norm=qk_norm,
                    causal=False,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = RMSNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        # tokens: (B, h*w, in_dim) in raster order
        rope = _grid_rope(*grid, self.pt_seq_len, self.head_dim, tokens.device)
        h = self.proj_in(tokens)  # (B, N, dim)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = self._gradient_checkpointing_func(layer, h, rope)
            else:
                h = layer(h, rope)
        return self.proj_out(self.norm_out(h))  # (B, N, out_dim)


@dataclass
class FAELossOutput(BaseOutput):
    """
    Args:
        loss: scalar, ``feature_weight * feature_loss + pixel_weight * pixel_loss + beta * kl_loss``.
        feature_loss: scalar, mean squared error between rebuilt and true DINOv2 patch features.
        pixel_loss: scalar, mean squared error between decoded images and the inputs (both in [-1, 1], inputs
            resized to the decoded size when they differ).
        kl_loss: scalar, KL(q(z|x) || N(0, I)) averaged over batch and latent elements (per-dimension nats).
        reconstruction: ``(B, 3, H_out, W_out)`` decoded images (``None`` when ``pixel_weight == 0``).
        latents: ``(B, latent_channels, h, w)`` the raw latents that were decoded (posterior sample or mean).
    """

    loss: torch.Tensor
    feature_loss: torch.Tensor
    pixel_loss: torch.Tensor
    kl_loss: torch.Tensor
    reconstruction: Optional[torch.Tensor]
    latents: torch.Tensor


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class AutoencoderFAE(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""Feature Auto-Encoder on a frozen DINOv2 (the STARFlow2 image tokenizer).

    Inputs are images in ``[-1, 1]`` (like every diffusers VAE) of any size; they are mapped to ``[0, 1]``, resized to
    ``image_size`` x ``image_size`` (antialiased ``resize_mode`` interpolation; a rectangular image is therefore
    squashed) and ImageNet-normalised inside the model.  The latent grid is ``h = w = image_size // patch_size`` of
    DINOv2.  Decoding works on any ``(h, w)`` latent grid (2-D RoPE) and yields ``h * out_patch_size`` x
    ``w * out_patch_size`` images in ``[-1, 1]`` (not clamped).

    DINOv2 is built from ``dinov2_config`` and its weights are part of this model's state dict, so
    ``save_pretrained`` / ``from_pretrained`` round-trip everything.  Use :meth:`from_dinov2_pretrained` or
    :meth:`load_dinov2_weights` to start from a released DINOv2 checkpoint.  DINOv2 is frozen (``requires_grad``
    False, always in eval mode, run under ``no_grad``).

    Args:
        dinov2_config (`dict`, *optional*): keyword arguments of ``transformers.Dinov2Config`` for the frozen feature
            extractor (only architecture fields are kept, see ``DINOV2_ARCH_KEYS``).  Defaults to DINOv2-g/14
            (:func:`dinov2_giant_config`).
        image_size (`int`, defaults to 224): side of the square image fed to DINOv2; must be a multiple of its
            ``patch_size``.
        sample_size (`int`, defaults to 256): side of the decoded image; must equal
            ``(image_size // patch_size) * out_patch_size``.
        latent_channels (`int`, defaults to 32): channels of the latent.
        encoder_num_heads (`int`, defaults to 24): heads of the single encoder attention layer (width = DINOv2's).
        decoder_dim (`int`, defaults to 1024): width of the feature decoder.
        decoder_layers (`int`, defaults to 6): layers of the feature decoder.
        decoder_num_heads (`int`, defaults to 16): heads of the feature decoder.
        pixel_decoder_dim (`int`, defaults to 1024): width of the pixel decoder.
        pixel_decoder_layers (`int`, defaults to 8): layers of the pixel decoder.
        pixel_decoder_num_heads (`int`, defaults to 16): heads of the pixel decoder.
        out_patch_size (`int`, defaults to 16): side of the pixel patch each token decodes to.
        out_channels (`int`, defaults to 3): channels of the decoded image.
        mlp_ratio (`float`, defaults to 4.0): MLP width multiplier of both decoders.
        gated_mlp (`bool`, defaults to True): gated (GeGLU) MLPs in both decoders, else GELU MLPs.
        qk_norm (`bool`, defaults to True): RMS-normalise queries and keys in both decoders.
        scaling_factor (`float`, defaults to 1.0): generator latents are ``(raw - shift_factor) * scaling_factor``.
        shift_factor (`float`, defaults to 0.0): see ``scaling_factor``.
        image_mean (`tuple[float]`, defaults to the ImageNet mean): DINOv2 input normalisation mean ([0, 1] scale).
        image_std (`tuple[float]`, defaults to the ImageNet std): DINOv2 input normalisation std.
        resize_mode (`str`, defaults to ``"bicubic"``): ``"bicubic"`` or ``"bilinear"`` (antialiased) for resizing
            inputs to ``image_size`` and, in :meth:`compute_loss`, the pixel target to the decoded size.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FlowTransformerLayer", "FAEEncoder", "Dinov2Layer", "Dinov2Embeddings"]
    # enable_group_offload(offload_type="block_level"): encode/decode call these parts, not this model's forward
    _group_offload_block_modules = ["dinov2", "encoder", "decoder", "pixel_decoder"]

    @register_to_config
    def __init__(
        self,
        dinov2_config: Optional[dict] = None,
        image_size: int = 224,
        sample_size: int = 256,
        latent_channels: int = 32,
        encoder_num_heads: int = 24,
        decoder_dim: int = 1024,
        decoder_layers: int = 6,
        decoder_num_heads: int = 16,
        pixel_decoder_dim: int = 1024,
        pixel_decoder_layers: int = 8,
        pixel_decoder_num_heads: int = 16,
        out_patch_size: int = 16,
        out_channels: int = 3,
        mlp_ratio: float = 4.0,
        gated_mlp: bool = True,
        qk_norm: bool = True,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        resize_mode: str = "bicubic",
    ):
        super().__init__()
        dino_cfg = Dinov2Config(**self._dinov2_arch(dinov2_config or dinov2_giant_config()))
        patch = dino_cfg.patch_size if isinstance(dino_cfg.patch_size, int) else dino_cfg.patch_size[0]
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of the DINOv2 patch_size ({patch})")
        grid = image_size // patch
        if sample_size != grid * out_patch_size:
            raise ValueError(
                f"sample_size ({sample_size}) must equal (image_size // patch_size) * out_patch_size "
                f"= {grid} * {out_patch_size}"
            )
        if resize_mode not in ("bicubic", "bilinear"):
            raise ValueError(f"resize_mode must be 'bicubic' or 'bilinear'; got {resize_mode!r}")
        if len(image_mean) != dino_cfg.num_channels or len(image_std) != dino_cfg.num_channels:
            raise ValueError(f"image_mean and image_std need {dino_cfg.num_channels} values (DINOv2 num_channels)")
        self.latent_grid = grid
        self.in_channels = dino_cfg.num_channels

        self.dinov2 = Dinov2Model(dino_cfg)
        self.dinov2.requires_grad_(False)
        self.dinov2.eval()

        feature_dim = dino_cfg.hidden_size
        self.encoder = FAEEncoder(feature_dim, latent_channels, encoder_num_heads, pt_seq_len=grid)
        self.decoder = FAETransformer(
            latent_channels,
            feature_dim,
            decoder_dim,
            decoder_layers,
            decoder_num_heads,
            grid,
            mlp_ratio,
            gated_mlp,
            qk_norm,
            name="decoder",
        )
        self.pixel_decoder = FAETransformer(
            feature_dim,
            out_patch_size * out_patch_size * out_channels,
            pixel_decoder_dim,
            pixel_decoder_layers,
            pixel_decoder_num_heads,
            grid,
            mlp_ratio,
            gated_mlp,
            qk_norm,
            name="pixel_decoder",
        )
        self.use_slicing = False

    def enable_tiling(self, *args, **kwargs):
        """Refused (``ValueError``, see its message): diffusers' tiling is for convolutional autoencoders, whose
        receptive field is local; use :meth:`enable_slicing` to decode one image at a time."""
        raise ValueError(
            "AutoencoderFAE cannot decode in tiles: its decoders attend over the whole latent grid, so tiles would "
            "change the image; use enable_slicing() (pipe.enable_vae_slicing()) to decode one image at a time"
        )

    def disable_tiling(self):
        """Tiling is never on (see :meth:`enable_tiling`): nothing to undo."""

    # -- construction from a released DINOv2 -----------------------------------------------------------------------

    @staticmethod
    def _dinov2_arch(config: dict) -> dict:
        return {k: v for k, v in config.items() if k in DINOV2_ARCH_KEYS}  # the fields that shape the state dict

    @classmethod
    def from_dinov2_pretrained(cls, dinov2_path: Union[str, os.PathLike], **config) -> "AutoencoderFAE":
        """Build an FAE around the DINOv2 of a LOCAL transformers checkpoint folder (``Dinov2Model.from_pretrained``).

        The DINOv2 architecture is taken from the checkpoint (``dinov2_config`` must not be passed); ``config`` holds
        the other constructor arguments, e.g. ``AutoencoderFAE.from_dinov2_pretrained(path, **{k: v for k, v in
        fae_paper_config().items() if k != "dinov2_config"})``.  The encoder and decoders are freshly initialised.
        """
        if "dinov2_config" in config:
            raise ValueError(
                "from_dinov2_pretrained takes the DINOv2 architecture from dinov2_path; do not pass dinov2_config"
            )
        dinov2 = Dinov2Model.from_pretrained(dinov2_path)
        model = cls(dinov2_config=cls._dinov2_arch(dinov2.config.to_dict()), **config)
        model.dinov2.load_state_dict(dinov2.state_dict())
        return model

    def load_dinov2_weights(self, dinov2_path: Union[str, os.PathLike]) -> None:
        """Replace the DINOv2 weights with those of a LOCAL transformers checkpoint of the same architecture."""
        dinov2 = Dinov2Model.from_pretrained(dinov2_path)
        ours, theirs = (self._dinov2_arch(c.to_dict()) for c in (self.dinov2.config, dinov2.config))
        diff = {k: (ours.get(k), theirs.get(k)) for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
        if diff:
            raise ValueError(f"DINOv2 checkpoint at {dinov2_path} does not match this model's dinov2_config: {diff}")
        self.dinov2.load_state_dict(dinov2.state_dict())

    def train(self, mode: bool = True) -> "AutoencoderFAE":
        super().train(mode)
        self.dinov2.eval()  # frozen: never switch on dropout / drop-path / layer checkpointing
        return self

    # -- DINOv2 features ---------------------------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor, name: str) -> None:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} must be a (B, {self.in_channels}, H, W) image batch in [-1, 1]; "
                f"got shape {tuple(images.shape)}"
            )

    def _resize(self, images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        if tuple(images.shape[-2:]) == tuple(size):
            return images
        return F.interpolate(images, size=size, mode=self.config.resize_mode, align_corners=False, antialias=True)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images of any size -> the normalised ``(B, 3, image_size, image_size)`` input of DINOv2."""
        self._check_images(images, "images")
        size = self.config.image_size
        # resize in float32: bicubic overshoot is then clipped back into the valid range before normalising
        x = self._resize((images.float() + 1) / 2, (size, size)).clamp(0, 1)
        mean = torch.tensor(self.config.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.image_std, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Frozen DINOv2 patch features ``(B, h*w, D)`` (final LayerNorm applied, CLS/register tokens dropped)."""
        pixel_values = self.preprocess(images)
        grid = (self.latent_grid, self.latent_grid)
        hidden = self.dinov2(pixel_values=pixel_values).last_hidden_state  # (B, prefix + h*w, D)
        return hidden[:, hidden.shape[1] - grid[0] * grid[1] :], grid

    # -- encode ------------------------------------------------------------------------------------------------------

    def _moments(self, features: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        moments = self.encoder(features, grid)  # (B, N, 2C)
        return moments.transpose(1, 2).unflatten(2, grid)  # (B, 2C, h, w): [mean; logvar] along channels

    @apply_forward_hook
    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> Union[AutoencoderKLOutput, Tuple[DiagonalGaussianDistribution]]:
        """Encode ``[-1, 1]`` images ``(B, 3, H, W)`` into the RAW latent posterior over ``(B, C, h, w)``.

        The scaling is NOT applied: generator latents are ``(posterior.sample(generator) - shift_factor) *
        scaling_factor`` (or use :meth:`encode_latents`).
        """
        self._check_images(x, "x")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._moments(*self.extract_features(s)) for s in x.split(1)])
        else:
            moments = self._moments(*self.extract_features(x))
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def encode_latents(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None, sample: bool = True
    ) -> torch.Tensor:
        """``[-1, 1]`` images -> SCALED latents ``(raw - shift_factor) * scaling_factor`` ``(B, C, h, w)``.

        ``sample=True`` draws from the posterior with ``generator``; ``False`` takes its mean.
        """
        self._check_images(images, "images")
        dist = self.encode(images).latent_dist
        raw = dist.sample(generator) if sample else dist.mode()
        return (raw - self.config.shift_factor) * self.config.scaling_factor

    # -- decode ------------------------------------------------------------------------------------------------------

    def _check_latents(self, z: torch.Tensor, name: str) -> None:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"{name} must have shape (B, {self.config.latent_channels}, h, w); got {tuple(z.shape)}")

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        """RAW latents ``(B, C, h, w)`` -> rebuilt DINOv2 patch features ``(B, h*w, D)`` (the feature decoder)."""
        self._check_latents(z, "z")
        grid = (z.shape[2], z.shape[3])
        return self.decoder(z.to(self.dtype).flatten(2).transpose(1, 2), grid)

    def features_to_pixels(self, features: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """DINOv2-space features ``(B, h*w, D)`` -> images ``(B, 3, h*p, w*p)`` in [-1, 1] (the pixel decoder)."""
        patches = self.pixel_decoder(features, grid)  # (B, N, p*p*3)
        return unpatchify(patches.unflatten(1, grid), self.config.out_patch_size)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.features_to_pixels(self.decode_features(z), (z.shape[2], z.shape[3]))

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        """Decode RAW (unscaled) latents ``(B, C, h, w)`` into images ``(B, 3, h*p, w*p)`` in ``[-1, 1]``.

        Generator latents must first be unscaled: ``z = latents / scaling_factor + shift_factor`` (or use
        :meth:`decode_latents`).
        """
        self._check_latents(z, "z")
        if self.use_slicing and z.shape[0] > 1:
            images = torch.cat([self._decode(s) for s in z.split(1)])
        else:
            images = self._decode(z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """SCALED generator latents -> images ``(B, 3, h*p, w*p)`` in ``[-1, 1]``."""
        self._check_latents(latents, "latents")
        return self.decode(latents / self.config.scaling_factor + self.config.shift_factor).sample

    # -- full pass and training loss ---------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        """Reconstruct ``[-1, 1]`` images ``sample`` (posterior mean unless ``sample_posterior``)."""
        self._check_images(sample, "sample")
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    def compute_loss(
        self,
        images: torch.Tensor,
        beta: float = 1e-4,
        feature_weight: float = 1.0,
        pixel_weight: float = 1.0,
        sample_posterior: bool = True,
        generator: Optional[torch.Generator] = None,
        pixel_from_target: bool = False,
    ) -> FAELossOutput:
        """The FAE training objective on ``[-1, 1]`` images ``(B, 3, H, W)``; see :class:`FAELossOutput`.

        ``loss = feature_weight * MSE(rebuilt, DINOv2 features) + pixel_weight * MSE(decoded, images) + beta * KL``.
        By default the pixel decoder reads the *rebuilt* features, so the pixel loss also trains the feature decoder
        and encoder; ``pixel_from_target=True`` feeds it the true DINOv2 features instead (pixel-decoder pre-training).
        Weights of ``0`` skip a term's computation.  DINOv2 receives no gradient either way.
        """
        self._check_images(images, "images")
        features, grid = self.extract_features(images)  # (B, N, D), no grad
        posterior = DiagonalGaussianDistribution(self._moments(features, grid))
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, C, h, w)
        rebuilt = self.decode_features(z)  # (B, N, D)

        zero = z.new_zeros((), dtype=torch.float32)
        feature_loss = F.mse_loss(rebuilt.float(), features.float()) if feature_weight else zero
        kl_loss = posterior.kl().float().mean() / z[0].numel() if beta else zero
        reconstruction = None
        if pixel_weight:
            reconstruction = self.features_to_pixels(features if pixel_from_target else rebuilt, grid)
            target = self._resize(images.float(), tuple(reconstruction.shape[-2:])).clamp(-1, 1)
            pixel_loss = F.mse_loss(reconstruction.float(), target)
        else:
            pixel_loss = zero
        loss = feature_weight * feature_loss + pixel_weight * pixel_loss + beta * kl_loss
        return FAELossOutput(
            loss=loss,
            feature_loss=feature_loss,
            pixel_loss=pixel_loss,
            kl_loss=kl_loss,
            reconstruction=reconstruction,
            latents=z,
        )

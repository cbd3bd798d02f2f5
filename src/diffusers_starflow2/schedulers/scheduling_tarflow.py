# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""TarFlowScheduler: the sampling arithmetic of autoregressive flows.

An autoregressive flow samples in a single pass, so this "scheduler" has no diffusion loop.  It owns the four pieces
of arithmetic that every sampler, the training scripts and the converters share:

* the inverse-affine step ``x = mu + sigma * z`` (one token or many),
* the classifier-free guidance rule for Gaussians (STARFlow), at a constant or a linearly annealed weight along the
  tokens (iTARFlow),
* noise levels: ``x = z + t * eps`` with a fixed ``t`` or ``t ~ U[t0, t1]`` per sample,
* the denoising schedule that removes the sampling noise after the flow pass (Tweedie steps on the flow's own
  score, iterated with Euler updates; one step is STARFlow's self-denoising).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..utils import validation
from ..utils.torch_utils import has_values


@dataclass(frozen=True)
class GuidanceSpec:
    r"""The guidance decision of one call, made once: which branches run, their order along the batch, their weights.

    Every context that is sampled under guidance stacks its branches along the batch in :attr:`branches` order
    (``B`` samples each), and :meth:`TarFlowScheduler.affine_step` combines them with the rule the spec selects.

    Args:
        guidance_scale: text guidance weight ``w`` (0 = no text guidance).
        image_guidance_scale: image guidance ``s_i`` (1 = no image guidance; editing only).
    """

    guidance_scale: float = 0.0
    image_guidance_scale: float = 1.0

    def __post_init__(self):
        if not self.guidance_scale >= 0:  # also rejects NaN
            raise ValueError(f"`guidance_scale` must be >= 0; got {self.guidance_scale}")
        if not self.image_guidance_scale >= 1:
            raise ValueError(
                f"`image_guidance_scale` must be >= 1 (1 = no image guidance); got {self.image_guidance_scale}"
            )

    @property
    def branches(self) -> Tuple[str, ...]:
        """``("conditional",)``, ``+ ("unconditional",)`` with text guidance, ``("conditional", "image",
        "unconditional")`` with image guidance (the image branch drops the text, the unconditional one both)."""
        if self.image_guidance_scale != 1:
            return ("conditional", "image", "unconditional")
        return ("conditional", "unconditional") if self.guidance_scale > 0 else ("conditional",)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    # -- the row layout: branch-major, ``batch_size`` samples per branch ------------------------------------------

    def num_rows(self, batch_size: int) -> int:
        """Rows of a batch of ``batch_size`` samples under guidance: ``num_branches * batch_size``."""
        return self.num_branches * batch_size

    def rows(self, branch: Union[int, str], batch_size: int) -> slice:
        """The batch rows of ``branch`` (its index or name in :attr:`branches`): ``branch * B .. (branch + 1) * B``."""
        index = self.branches.index(branch) if isinstance(branch, str) else branch
        return slice(index * batch_size, (index + 1) * batch_size)

    def conditional_rows(self, batch_size: int) -> slice:
        """The rows of the conditional branch (the first): what a sample is, without its guidance contexts."""
        return self.rows(0, batch_size)

    def sample_rows(self, sample: int, batch_size: int) -> List[int]:
        """The rows of sample ``sample`` in every branch, in branch order."""
        return [b * batch_size + sample for b in range(self.num_branches)]

    def branch_major(self, batch_size: int) -> List[int]:
        """The order that makes sample-major rows (each sample's branches together, ``i * num_branches + b``)
        branch-major: row ``b * B + i`` of the result is row ``i * num_branches + b``."""
        n = self.num_branches
        return [i * n + b for b in range(n) for i in range(batch_size)]

    def stack(self, x):
        """What every branch shares (the tokens being sampled, a noise embedding, a list of per-sample items),
        repeated along the batch once per branch: ``(B, ...) -> (num_branches * B, ...)``."""
        if isinstance(x, torch.Tensor):
            return x.repeat(self.num_branches, *([1] * (x.ndim - 1)))
        return list(x) * self.num_branches

    def image_branches(self, source_in_unconditional: bool) -> Tuple[int, ...]:
        """The branches whose context holds the user's images (an edit's source image), by index.

        The conditional branch always holds them, and so does the image branch of image guidance (it drops only the
        text); the unconditional branch of three-branch guidance never does (the image branch is guided against
        it).  The unconditional branch of text-only (two-branch) guidance is where the pipelines differ, and
        ``source_in_unconditional`` says which they are: editing keeps the source image there (True: text guidance
        contrasts the instruction with the negative prompt on the same image, so this branch is in effect the image
        branch), the interleaved pipeline replaces the whole user turn, images included, by the negative prompt
        (False: text guidance contrasts the user's request with nothing).
        """
        keep = {"conditional", "image"}
        if source_in_unconditional and self.num_branches == 2:
            keep.add("unconditional")
        return tuple(i for i, name in enumerate(self.branches) if name in keep)


@dataclass
class TarFlowSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample: ``(B, ...)`` the sample at the next (lower) noise level.
        pred_original_sample: ``(B, ...)`` the Tweedie estimate of the clean sample at the current level.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


# The sampling recipes of the authors' public code, by model family (see the README's design notes for each value).
SCHEDULER_PRESETS: Dict[str, dict] = {
    # STARFlow2 trains with iTARFlow's multi-noise recipe (paper §4); sampling as ml-itarflow's evaluate_fid.py:
    # flow pass at t1 (init_t = args.t1), guidance annealed along the tokens (--annealed_guidance 1), then one
    # Tweedie step per 0.01 of t1 (steps = int(t1 / 1e-2)) on linspace(t1, t0) followed by 0; t0 = 0.01, t1 = 0.3
    # as its defaults and its 64-px recipe (STARFlow's latent noise level is 0.3 too).
    "starflow2": dict(
        noise_level=0.3, min_noise_level=0.01, max_noise_level=0.3, num_denoising_steps=30, annealed_guidance=True
    ),
    # STARFlow (v1) as ml-starflow's sample.py: one fixed level 0.3 (noise_std), one self-denoising step
    # (self_denoise), constant guidance ('annealed_guidance': False).
    "starflow": dict(
        noise_level=0.3, min_noise_level=0.01, max_noise_level=0.3, num_denoising_steps=1, annealed_guidance=False
    ),
}


class TarFlowScheduler(SchedulerMixin, ConfigMixin):
    r"""Inverse-affine sampling, guidance, noise levels and the denoising schedule of TARFlow-style models.

    :meth:`from_preset` gives the recipe of a model family (``"starflow2"``, ``"starflow"``).

    Args:
        noise_level: the noise level ``t`` images are sampled at (STARFlow: 0.3).
        min_noise_level: ``t0``, lower end of the training noise range and last level of the denoising schedule.
        max_noise_level: ``t1``, upper end of the training noise range.
        num_denoising_steps: default number of denoising steps after sampling (0 disables denoising); 10 as
            ml-itarflow's sampling during training (the ``"starflow2"`` preset takes its evaluation's 30).
        annealed_guidance: scale the guidance weights of the ``k``-th of ``n`` sampled tokens by ``k / n``
            (ml-itarflow's ``annealed_guidance``: ``g = (i + 1) / (T - 1) * guidance``), so guidance grows from
            almost nothing at the first token to full strength at the last; False (default, so that saved
            pipelines keep their behaviour) guides every token at full strength.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        noise_level: float = 0.3,
        min_noise_level: float = 0.01,
        max_noise_level: float = 0.3,
        num_denoising_steps: int = 10,
        annealed_guidance: bool = False,
    ):
        for value, name in ((noise_level, "noise_level"), (min_noise_level, "min_noise_level")):
            validation.check_noise_level(value, name)
        validation.check_number(
            max_noise_level, "max_noise_level", minimum=min_noise_level, maximum=validation.MAX_SCALE
        )
        validation.check_inference_steps(num_denoising_steps, "num_denoising_steps")
        validation.check_bool(annealed_guidance, "annealed_guidance")
        self.timesteps = torch.tensor([])
        self.sigmas = torch.tensor([])
        self._host_sigmas, self._step_index = [0.0], 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TarFlowScheduler":
        """The scheduler of a model family's published recipe (:data:`SCHEDULER_PRESETS`), with ``overrides``.

        ``"starflow2"``: ml-itarflow's sampling (t in [0.01, 0.3], annealed guidance, 30 denoising steps);
        ``"starflow"``: ml-starflow's (level 0.3, constant guidance, one self-denoising step).
        """
        if name not in SCHEDULER_PRESETS:
            raise ValueError(f"`name` must be one of {sorted(SCHEDULER_PRESETS)}; got {name!r}")
        return cls(**{**SCHEDULER_PRESETS[name], **overrides})

    # -- the flow step -------------------------------------------------------------------------------------------

    @staticmethod
    def inverse_affine(noise: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Noise -> data for one or many tokens: ``x = mu + sigma * z``."""
        return noise * sigma + mu

    def affine_step(
        self,
        noise: torch.Tensor,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        guidance: Optional[GuidanceSpec] = None,
        position: int = 0,
        num_positions: Optional[int] = None,
    ) -> torch.Tensor:
        """One sampling step of an autoregressive flow: the guided Gaussian of each token, then noise -> data.

        ``mu``/``sigma`` stack ``guidance.num_branches`` branches along the batch (``(branches * B, T, C)``);
        ``noise`` is ``(B, T, C)``; returns ``x (B, T, C)``.  The ``T`` tokens are tokens ``position ..`` of the
        ``num_positions`` a sampling pass makes, which sets their weights under ``annealed_guidance`` (see
        :meth:`guidance_ramp`; without ``num_positions`` every token is guided at full strength).
        """
        guidance = guidance or GuidanceSpec()
        ramp = None
        if num_positions is not None and guidance.num_branches > 1:
            ramp = self.guidance_ramp(position, noise.shape[1], num_positions, mu.device)
        mu, sigma = self.combine_branches(mu, sigma, guidance, ramp)
        return self.inverse_affine(noise, mu, sigma)

    def guidance_ramp(self, position: int, count: int, num_positions: int, device=None) -> Optional[torch.Tensor]:
        r"""The factor ``r`` of the guidance weights of tokens ``position .. position + count - 1`` of a pass that
        samples ``num_positions`` tokens, ``(1, count, 1)`` float32, or None (``r = 1``) without
        ``annealed_guidance``.

        The ``k``-th sampled token (``k = position + 1 ..``, 1-based) gets ``r = k / num_positions``: ml-itarflow's
        ``g = (i + 1) / (T - 1) * guidance`` for token ``i + 1`` of ``T`` (the first is never sampled) and
        ml-starflow's ``r = (t + 1) / T`` for token ``t`` of ``T`` with a start token.  ``r`` multiplies the text
        weight ``w`` and the image weight ``s_i - 1``.
        """
        if not self.config.annealed_guidance:
            return None
        k = torch.arange(position + 1, position + 1 + count, device=device, dtype=torch.float32)
        return (k / num_positions).view(1, count, 1)

    @classmethod
    def combine_branches(
        cls, mu: torch.Tensor, sigma: torch.Tensor, guidance: GuidanceSpec, ramp: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The guidance rule ``guidance`` selects: none, :meth:`guide` or :meth:`guide_text_and_image`, with the
        weights scaled per token by ``ramp`` (:meth:`guidance_ramp`; None: full strength)."""
        w_text, s_image = guidance.guidance_scale, guidance.image_guidance_scale
        if ramp is not None:
            w_text, s_image = w_text * ramp, 1 + (s_image - 1) * ramp
        if guidance.num_branches == 3:
            return cls.guide_text_and_image(mu, sigma, w_text, s_image)
        if guidance.num_branches == 2:
            return cls.guide(mu, sigma, w_text)
        return mu, sigma

    @staticmethod
    def guide(
        mu: torch.Tensor, sigma: torch.Tensor, guidance_scale: Union[float, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Combine a conditional and an unconditional Gaussian per token (STARFlow's guidance rule).

        ``mu`` and ``sigma`` are batches ``[conditional; unconditional]`` of size ``2B``; returns the guided
        ``(mu, sigma)`` of size ``B``.  With ``w`` the scale and ``s = min(sigma_c / sigma_u, 1)^2``:
        ``sigma = sigma_c / sqrt(1 + w - w s)`` and ``mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)``, which is the
        Gaussian of ``p_c^{1+w} / p_u^{w}`` with the unconditional variance capped so the result stays proper.
        ``guidance_scale`` is a number or a tensor that broadcasts against ``(B, T, C)`` (one weight per token).
        """
        mu_c, mu_u = mu.chunk(2, dim=0)
        sigma_c, sigma_u = sigma.chunk(2, dim=0)
        w = guidance_scale
        s = (sigma_c / sigma_u).clip(max=1.0).square()
        denom = 1 + w - w * s
        return ((1 + w) * mu_c - (w * s) * mu_u) / denom, sigma_c / denom.sqrt()

    @classmethod
    def guide_text_and_image(
        cls,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        guidance_scale: Union[float, torch.Tensor],
        image_guidance_scale: Union[float, torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Three-branch guidance for editing (text and image scales, as InstructPix2Pix).

        ``mu``/``sigma`` stack ``[text+image; image only; neither]`` (``3B``).  The result is the Gaussian of
        ``p_c^{1+w_t} p_i^{w_i - w_t} p_u^{-w_i}`` with ``w_t = guidance_scale`` and
        ``w_i = image_guidance_scale - 1``, formed as the product of the text-guided ``a = guide(c, i; w_t)`` and the
        image-guided ``b = guide(i, u; w_i)`` divided by ``p_i`` (each with the variance cap of :meth:`guide`):
        precisions add, so the result is always proper.  ``image_guidance_scale = 1`` gives ``guide(c, i; w_t)``;
        with equal variances the mean is InstructPix2Pix's ``mu_u + s_i (mu_i - mu_u) + s_t' (mu_c - mu_i)``.
        """
        mu_c, mu_i, mu_u = mu.chunk(3, dim=0)
        sigma_c, sigma_i, sigma_u = sigma.chunk(3, dim=0)
        mu_a, sigma_a = cls.guide(torch.cat([mu_c, mu_i]), torch.cat([sigma_c, sigma_i]), guidance_scale)
        mu_b, sigma_b = cls.guide(torch.cat([mu_i, mu_u]), torch.cat([sigma_i, sigma_u]), image_guidance_scale - 1)
        lam_a, lam_b, lam_i = sigma_a.pow(-2), sigma_b.pow(-2), sigma_i.pow(-2)
        lam = lam_a + lam_b - lam_i
        return (lam_a * mu_a + lam_b * mu_b - lam_i * mu_i) / lam, lam.rsqrt()

    # -- noise levels --------------------------------------------------------------------------------------------

    def sample_noise_levels(
        self, batch_size: int, generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None, device=None
    ) -> torch.Tensor:
        """``t ~ U[min_noise_level, max_noise_level]``, shape ``(batch_size,)``."""
        t0, t1 = self.config.min_noise_level, self.config.max_noise_level
        u = (
            torch.rand(batch_size, generator=generator, device=device)
            if not isinstance(generator, list)
            else torch.stack([torch.rand((), generator=g, device=device) for g in generator])
        )
        return t0 + (t1 - t0) * u

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, noise_level: Union[float, torch.Tensor, None] = None
    ) -> torch.Tensor:
        """``x = z + t * eps``; ``noise_level`` is a float, a ``(B,)`` tensor, or None for ``config.noise_level``."""
        if noise_level is None:
            noise_level = self.config.noise_level
        t = torch.as_tensor(noise_level, dtype=original_samples.dtype, device=original_samples.device)
        if t.ndim == 1:
            t = t.view(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + t * noise

    # -- denoising schedule --------------------------------------------------------------------------------------

    def set_timesteps(
        self, num_inference_steps: Optional[int] = None, device=None, noise_level: Optional[float] = None
    ) -> None:
        """Denoising levels ``linspace(noise_level, min_noise_level, n)`` followed by 0.

        ``timesteps`` holds the ``n`` levels at which a step is taken, ``sigmas`` the ``n + 1`` levels including the
        final 0.  ``n = 0`` gives no steps.
        """
        n = self.config.num_denoising_steps if num_inference_steps is None else num_inference_steps
        if n < 0:
            raise ValueError(f"`num_inference_steps` must be >= 0; got {n}")
        start = self.config.noise_level if noise_level is None else noise_level
        # the schedule is made on the host (in Python: under a FakeTensorMode every torch tensor is fake), so that a
        # step reads its levels without a device synchronisation, and on `meta` (no values) takes the next one
        end = self.config.min_noise_level
        levels = [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [start] * n
        self.timesteps = torch.tensor(levels, dtype=torch.float32, device=device)
        self.sigmas = torch.cat([self.timesteps, self.timesteps.new_zeros(1)])
        self.num_inference_steps = n
        self._host_sigmas = [struct.unpack("f", struct.pack("f", t))[0] for t in levels] + [0.0]  # float32 values
        self._step_index = 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[TarFlowSchedulerOutput, Tuple[torch.Tensor]]:
        r"""One denoising step.

        Args:
            model_output: ``\nabla_x NLL(x | context, t)``, the gradient of the flow's negative log-likelihood summed
                over each sample's dimensions (the negative score).
            timestep: the current noise level ``t`` (one of ``self.timesteps``).
            sample: the current noisy sample ``x``.
        Returns:
            ``prev_sample = x - (x - x0) / t * (t - t_next)`` with the Tweedie estimate ``x0 = x - t^2 * grad``.
        """
        levels = self._host_sigmas[:-1]  # the schedule's step levels
        if not isinstance(timestep, torch.Tensor) or has_values(timestep):
            t = float(timestep)
            idx = min(range(len(levels)), key=lambda i: abs(levels[i] - t)) if levels else None
            if idx is None or abs(levels[idx] - t) > 1e-6:
                raise ValueError(f"timestep {t} is not in the schedule; call set_timesteps first")
        else:  # no value to read (meta): the step after the previous one
            idx = self._step_index if self._step_index < len(levels) else None
            if idx is None:
                raise ValueError("step called more often than the schedule has steps; call set_timesteps first")
        self._step_index = idx + 1
        t, t_next = levels[idx], self._host_sigmas[idx + 1]
        x0 = sample - t * t * model_output
        prev = x0 if t_next == 0 else sample - (sample - x0) / t * (t - t_next)
        if not return_dict:
            return (prev, x0)
        return TarFlowSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

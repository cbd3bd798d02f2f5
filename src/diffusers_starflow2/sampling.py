# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The sampling engine: the loops that drive every STARFlow / STARFlow2 model, written once.

Models expose per-position primitives (a flow block's step, the Pretzel step over new positions, the NLL of an image
given a context); the :class:`~diffusers_starflow2.TarFlowScheduler` owns the per-token arithmetic.  This module
joins the two:

* :class:`GuidanceSpec` - the guidance decision (branches, their order, their weights), made once per call;
* :func:`sample_autoregressive` - the one left-to-right loop over latent positions (flow blocks and the Pretzel);
* :func:`tweedie_denoise` - the one denoising loop (Tweedie steps on the flow's own score, one level per step).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .schedulers.scheduling_tarflow import TarFlowScheduler

# nll(x, noise_level) -> each sample's NLL summed over its dimensions, (B,) or already summed over the batch.
NLLFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tweedie_denoise(nll: NLLFunction, sample: torch.Tensor, scheduler: TarFlowScheduler,
                    num_steps: Optional[int] = None, noise_level: Optional[float] = None,
                    callback: Optional[Callable] = None) -> torch.Tensor:
    """Remove the sampling noise of ``sample`` with the scheduler's denoising schedule.

    Each step at level ``t`` takes the gradient of ``nll(x, t)``: the model is conditioned on the level of the step
    (iTARFlow's multi-noise recipe), not on the level the sample was drawn at.  ``callback(i, t, x)`` runs after
    step ``i`` and may return a replacement for ``x``.  Returns float32 latents of ``sample``'s shape.
    """
    scheduler.set_timesteps(num_steps, device=sample.device, noise_level=noise_level)
    x = sample.float()
    for i, t in enumerate(scheduler.timesteps):
        with torch.enable_grad():
            x_req = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(nll(x_req, t).sum(), [x_req])[0]
        x = scheduler.step(grad, t, x).prev_sample
        if callback is not None:
            x = callback(i, t, x)
    return x

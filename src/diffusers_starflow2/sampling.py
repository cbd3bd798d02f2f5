# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The sampling engine: the loops that drive every STARFlow / STARFlow2 model, written once.

Models expose per-position primitives (a flow block's :meth:`~AutoregressiveFlowBlock.decode_step`, the Pretzel
step over new positions, the NLL of an image given a context); the :class:`~diffusers_starflow2.TarFlowScheduler`
owns the per-token arithmetic (guidance + inverse affine in :meth:`~TarFlowScheduler.affine_step`, the denoising
schedule); a :class:`~diffusers_starflow2.GuidanceSpec` holds the guidance decision of a call.  This module joins
them:

* :func:`sample_autoregressive` - the one left-to-right loop over latent positions;
* :func:`sample_flow_block`, :func:`sample_starflow` - a flow block / the STARFlow (v1) stack, noise -> data;
* :func:`sample_image_tokens`, :func:`shallow_reverse` - an image span of the Pretzel and its shallow flows;
* :func:`tweedie_denoise` (:func:`denoise_starflow`) - the one denoising loop, one noise level per step.

The loop asks a ``step_fn`` for the affine parameters predicted by a run of ``K`` new inputs: exact sequential
decoding uses ``K = 1``, Jacobi decoding (``jacobi_block_size``) a sliding window of ``K`` guesses recomputed until
they settle.  A flow block's step has static shapes (a compiled one is traced once, see
:meth:`~AutoregressiveFlowBlock.compile_decode_step`); neither mode changes the models or the scheduler.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from .models.cache_utils import PretzelCache, StaticImageSpan
from .models.flow_block import AutoregressiveFlowBlock
from .models.transformer_pretzel import PretzelModel
from .models.transformer_starflow import StarFlowTransformerModel
from .models.vlm_stream import VLMStream
from .schedulers.scheduling_tarflow import GuidanceSpec, TarFlowScheduler
from .utils.torch_utils import compute_dtype, has_values, packed_weights
from .utils.validation import check_jacobi

AffineParams = Tuple[torch.Tensor, torch.Tensor]  # (mu, sigma), each (branches * B, K, C), float32
# step_fn(inputs (B, K, C), index) -> the parameters the inputs predict: inputs sit at input positions index..index+K
StepFunction = Callable[[torch.Tensor, int], AffineParams]
# nll(x, noise_level) -> each sample's NLL summed over its dimensions, (B,) or already summed over the batch
NLLFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------------------------


def jacobi_options(
    jacobi_block_size: Optional[int] = None, jacobi_tolerance: float = 1e-3, jacobi_max_iterations: Optional[int] = None
) -> dict:
    """The decoding mode of a call, checked (:func:`~diffusers_starflow2.utils.validation.check_jacobi`): keyword
    arguments of every sampling function."""
    return check_jacobi(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)


def sample_autoregressive(
    step_fn: StepFunction,
    params: AffineParams,
    noise: torch.Tensor,
    scheduler: TarFlowScheduler,
    guidance: GuidanceSpec,
    callback: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    feed_last: bool = False,
    stop: Optional[Callable[[], bool]] = None,
    jacobi_block_size: Optional[int] = None,
    jacobi_tolerance: float = 1e-3,
    jacobi_max_iterations: Optional[int] = None,
) -> torch.Tensor:
    """Noise ``(B, N, C)`` -> tokens ``(B, n, C)``, left to right (``n = N`` unless stopped).

    ``params`` predict token 0 (its guidance branches stacked along the batch).  ``step_fn(inputs, j)`` feeds tokens
    ``j - 1 ..`` back as inputs at input positions ``j ..`` and returns the parameters of tokens ``j ..`` (the branches
    share the tokens: they are repeated ``guidance.num_branches`` times); calling it again at a position forgets what
    an earlier call wrote from there on.  ``feed_last`` also feeds the last token (so it enters the caches).  Token
    ``i`` is the ``i``-th of the ``N`` this pass samples for the scheduler's guidance weights
    (:meth:`~TarFlowScheduler.guidance_ramp`), in either decoding mode.

    Sequential decoding (``jacobi_block_size=None``) makes one token per call.  Jacobi decoding keeps a window of
    ``jacobi_block_size`` tokens after the last final one: the first is exact (its parameters are), the others hold
    guesses (their noise at first), and one call over the window recomputes them all from the current guesses.  The
    tokens that moved by at most ``jacobi_tolerance`` (max abs change), or that have been recomputed
    ``jacobi_max_iterations`` times (default: the window size), are final as far as they run unbroken from the front;
    the window then slides past them (at least one token per call) and new tokens enter it at the back.  The system
    is triangular: call ``k`` makes the ``k``-th token of the window exact, so ``jacobi_max_iterations >=
    jacobi_block_size`` with tolerance 0 gives the sequential result.  A final token's cache entry holds the guess it
    was fed with (at most ``jacobi_tolerance`` away unless ``jacobi_max_iterations`` made it final; ml-starflow's
    ``jacobi`` does the same).

    ``callback(i, x_i)`` runs once token ``i`` is final and may return a replacement (a window's first token is final
    before the window is computed; later replaced tokens are fed again before the next window); when ``stop()`` is
    then true the loop ends and returns the tokens made so far, the caches holding the tokens before the last one (as
    in sequential decoding).
    """
    jacobi_block_size, jacobi_tolerance, jacobi_max_iterations = check_jacobi(
        jacobi_block_size, jacobi_tolerance, jacobi_max_iterations
    ).values()
    if params[0].shape[0] != guidance.num_rows(noise.shape[0]):
        raise ValueError(
            f"the context holds {params[0].shape[0]} rows for {noise.shape[0]} samples; guidance "
            f"{guidance.branches} needs {guidance.num_rows(noise.shape[0])}"
        )
    N = noise.shape[1]
    W = jacobi_block_size or 1
    max_passes = jacobi_max_iterations or W
    tokens = []
    guess = noise[:, :0].float()  # (B, k, C) guesses for the tokens after the first of the window
    ages: List[int] = []  # how many calls over the window recomputed each guess
    c = 0  # tokens before c are final
    written = 0  # the caches hold input positions < written (token i is input i + 1)

    def feed(inputs: torch.Tensor, index: int) -> AffineParams:
        nonlocal written
        written = index + inputs.shape[1]
        return step_fn(guidance.stack(inputs), index)

    def stopped(made: List[torch.Tensor]) -> torch.Tensor:
        # the caches keep the tokens before the last one made, as in sequential decoding: a pass that wrote past it
        # is cut back by feeding the token before it again
        made = tokens + made
        if written > len(made):
            feed(made[-2], len(made) - 1)
        return torch.cat(made, dim=1)

    while c < N:
        n = min(W, N - c)  # window: tokens c .. c + n
        fed = n if c + n < N or feed_last else n - 1  # the last token is an input only when fed
        z = noise[:, c : c + n].float()  # (B, n, C)
        x_c = scheduler.affine_step(z[:, :1], *params, guidance, c, N)  # token c: exact
        if callback is not None:
            x_c = callback(c, x_c)
        if stop is not None and stop():
            return stopped([x_c])
        final, last_params = [x_c], None
        if n > 1:
            k = min(guess.shape[1], n - 1)
            x = torch.cat([x_c, guess[:, :k], z[:, 1 + k :]], dim=1)  # (B, n, C)
            mu, sigma = feed(x[:, :fed], c + 1)  # (branches * B, fed, C): tokens c + 1 ..
            new = scheduler.affine_step(z[:, 1:], mu[:, : n - 1], sigma[:, : n - 1], guidance, c + 1, N)  # (B, n-1, C)
            ages = [a + 1 for a in ages[:k]] + [1] * (n - 1 - k)
            moved = (new - x[:, 1:]).abs().amax(dim=(0, 2))  # (n - 1,) per token
            # without values (meta) no token has converged: only jacobi_max_iterations makes tokens final
            moved = moved.tolist() if has_values(moved) else [math.inf] * (n - 1)
            made = 1
            for change, age in zip(moved, ages):
                if change > jacobi_tolerance and age < max_passes:
                    break
                made += 1
            last_params = (mu, sigma)
            guess, ages = new[:, made:], ages[made:]  # tokens c + made + 1 ..: token c + made becomes exact
            if fed == n and c + n < N:  # the call also predicts the token after the window: a better first guess
                guess = torch.cat(
                    [
                        guess,
                        scheduler.affine_step(
                            noise[:, c + n : c + n + 1].float(), mu[:, n - 1 :], sigma[:, n - 1 :], guidance, c + n, N
                        ),
                    ],
                    dim=1,
                )
                ages.append(0)  # not yet recomputed within the window
            for j in range(1, made):
                x_j = new[:, j - 1 : j]
                if callback is not None:
                    replaced = callback(c + j, x_j)
                    if replaced is not x_j:
                        last_params, x_j = None, replaced
                final.append(x_j)
                if stop is not None and stop():
                    return stopped(final)
        tokens.extend(final)
        made = len(final)
        c += made
        if c < N or feed_last:  # the parameters of token c (or the last token enters the caches)
            if last_params is None:  # sequential decoding, or replaced tokens: one call with the final tokens
                last_params = feed(final[0] if made == 1 else torch.cat(final, dim=1), c + 1 - made)
            if last_params[0].shape[1] > 1:  # a window: the parameters of token c come after the final tokens
                last_params = tuple(p[:, made - 1 : made] for p in last_params)
            params = last_params
    return torch.cat(tokens, dim=1)


# --------------------------------------------------------------------------------------------------------------
# Flow blocks and the STARFlow (v1) stack
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_flow_block(
    block: AutoregressiveFlowBlock,
    noise: torch.Tensor,
    grid: Tuple[int, int],
    scheduler: TarFlowScheduler,
    guidance: Optional[GuidanceSpec] = None,
    text: Optional[torch.Tensor] = None,
    text_mask: Optional[torch.Tensor] = None,
    cond: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    stop: Optional[Callable[[], bool]] = None,
    **jacobi,
) -> torch.Tensor:
    """Invert one flow block: noise ``(B, N, C_in)`` in raster order -> data, float32.

    ``text`` ``(branches * B, L, D)`` stacks the guidance branches (``guidance``); blocks that read no text are
    never guided.  ``text_mask`` ``(branches * B, L)`` is True at real text tokens; ``cond`` ``(B, cond_dim)``.
    ``callback`` and ``stop`` are :func:`sample_autoregressive`'s (scan order); tokens not made when stopped keep
    their noise.  ``jacobi``: its ``jacobi_block_size``, ``jacobi_tolerance``, ``jacobi_max_iterations``.
    """
    if block.is_identity:
        return noise
    B, N, _ = noise.shape
    text = text if block.proj_txt is not None else None
    guidance = guidance if text is not None and guidance is not None else GuidanceSpec()
    cond = guidance.stack(cond) if cond is not None else None
    L = text.shape[1] if text is not None else 0
    rope = block.rotary(*grid, L, noise.device)
    cache = block.new_cache(guidance.num_rows(B), L + N, compute_dtype(block), noise.device)
    pad_mask = None
    if text is not None:
        if text_mask is not None:
            pad_mask = torch.cat([text_mask.bool(), text_mask.new_ones(guidance.num_rows(B), N).bool()], dim=1)
        block.prefill(text, rope, cache, pad_mask, cond)

    z = block.permute(noise.float())
    first = 0 if block.use_sos else 1  # without a start token the first token is its own noise

    def step_fn(inputs: torch.Tensor, index: int) -> AffineParams:
        return block.decode_step(inputs, index, L, rope, cache, pad_mask, cond)

    start = block.sos_embed.expand(B, -1, -1) if block.use_sos else z[:, :1]
    with packed_weights(block):
        x = sample_autoregressive(
            step_fn,
            step_fn(guidance.stack(start), 0),
            z[:, first:],
            scheduler,
            guidance,
            callback,
            stop=stop,
            **jacobi,
        )
    return block.permute(torch.cat([z[:, :first], x, z[:, first + x.shape[1] :]], dim=1))


def _stack_branches(
    text: Optional[torch.Tensor],
    negative: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    negative_mask: Optional[torch.Tensor],
    guidance: GuidanceSpec,
):
    """``[conditional; unconditional]`` text features and masks, as ``guidance`` asks."""
    if guidance.num_branches == 1 or text is None:
        return text, mask
    if negative is None:
        raise ValueError("guidance_scale > 0 requires negative_encoder_hidden_states")
    if negative.shape != text.shape:
        raise ValueError(
            f"negative_encoder_hidden_states must have shape {tuple(text.shape)}; got {tuple(negative.shape)}"
        )
    if mask is not None or negative_mask is not None:
        ones = text.new_ones(text.shape[:2], dtype=torch.bool)
        mask = torch.cat([mask if mask is not None else ones, negative_mask if negative_mask is not None else ones])
    return torch.cat([text, negative]), mask


@torch.no_grad()
def sample_starflow(
    model: StarFlowTransformerModel,
    noise: torch.Tensor,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    negative_encoder_hidden_states: Optional[torch.Tensor] = None,
    guidance_scale: float = 0.0,
    encoder_attention_mask: Optional[torch.Tensor] = None,
    negative_encoder_attention_mask: Optional[torch.Tensor] = None,
    scheduler: Optional[TarFlowScheduler] = None,
    callback: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    stop: Optional[Callable[[], bool]] = None,
    jacobi_block_size: Optional[int] = None,
    jacobi_tolerance: float = 1e-3,
    jacobi_max_iterations: Optional[int] = None,
    block_callback: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Noise ``(B, C, H, W)`` -> latents with a STARFlow (v1) stack: the deep block first (guided against
    ``negative_encoder_hidden_states`` when ``guidance_scale > 0``), then the shallow blocks in reverse.

    ``callback(i, x_i)`` runs after every token of every block (``i`` counts them all, deep block first;
    ``x_i (B, 1, C p p)`` is the token just made, in its block's scan order) and may return a replacement.
    ``block_callback(k, latents)`` runs after the ``k``-th block that is not an identity, with the stack's whole
    latents ``(B, C, H, W)`` at that moment, and may return a replacement that the next blocks invert.  Once
    ``stop()`` is true the remaining tokens and blocks are skipped (an interrupted block gets no block callback).

    ``jacobi_block_size`` (None: exact sequential decoding), ``jacobi_tolerance``, ``jacobi_max_iterations``: Jacobi
    decoding of every block, see :func:`sample_autoregressive`.
    """
    jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
    guidance = GuidanceSpec(guidance_scale)
    model.check_inputs(noise, encoder_hidden_states, name="noise")
    text, mask = _stack_branches(
        encoder_hidden_states,
        negative_encoder_hidden_states,
        encoder_attention_mask,
        negative_encoder_attention_mask,
        guidance,
    )
    scheduler = scheduler or TarFlowScheduler.from_preset("starflow")
    x, grid = model.to_tokens(noise.float())
    made = 0

    def on_token(i: int, x_i: torch.Tensor) -> torch.Tensor:
        nonlocal made
        made += 1
        return callback(made - 1, x_i) if callback is not None else x_i

    blocks = [block for block in reversed(model.blocks) if not block.is_identity]
    for k, block in enumerate(blocks):
        if stop is not None and stop():
            break
        x = sample_flow_block(block, x, grid, scheduler, guidance, text, mask, callback=on_token, stop=stop, **jacobi)
        if block_callback is not None and not (stop is not None and stop()):
            x = model.to_tokens(block_callback(k, model.to_latents(x, grid)).float())[0]
    return model.to_latents(x, grid).to(noise.dtype)


# --------------------------------------------------------------------------------------------------------------
# The Pretzel (STARFlow2)
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_image_tokens(
    transformer: PretzelModel,
    vlm: VLMStream,
    cache: PretzelCache,
    noise: torch.Tensor,
    scheduler: TarFlowScheduler,
    guidance: Optional[GuidanceSpec] = None,
    callback: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    stop: Optional[Callable[[], bool]] = None,
    idle: Optional[torch.Tensor] = None,
    span_callback: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    **jacobi,
) -> torch.Tensor:
    """Sample one image span ``x~ (B, n, C)`` left to right; every latent enters both caches as it is made.

    The cache must end with ``<|vision_start|>`` and hold ``guidance.branches`` stacked along its batch.
    ``callback``/``stop`` as in :func:`sample_autoregressive` (``n < N`` only when stopped).  ``span_callback(x)``
    runs once the whole span ``(B, N, C)`` is made (not when stopped) and may return a replacement: both caches are
    then cut back to ``<|vision_start|>`` and the replacement is fed in one pass, so that every later position sees
    the span that is returned.  ``idle`` ``(B,)``: True
    for samples that sit the span out (in every branch): they take padding positions, which no later position sees,
    and are given the parameters ``(0, 1)`` so that their tokens stay fixed (and never hold a Jacobi window back);
    their tokens mean nothing.  ``jacobi``: its ``jacobi_block_size``, ``jacobi_tolerance``,
    ``jacobi_max_iterations``; a Jacobi pass runs both streams over the window, and the next pass first crops both
    caches back to where it starts.
    """
    guidance = guidance or GuidanceSpec()
    previous = None  # (index, inputs, cache snapshot before them) of the latest call
    real = None if idle is None else guidance.stack(~idle.to(cache.cond.device).bool())[:, None]  # (branches * B, 1)

    def params(flow_hidden: torch.Tensor) -> AffineParams:
        return guided(*transformer.latent_params(flow_hidden))  # (branches * B, K, C)

    def guided(mu: torch.Tensor, sigma: torch.Tensor) -> AffineParams:
        if real is None:
            return mu, sigma
        return torch.where(real[..., None], mu, 0.0), torch.where(real[..., None], sigma, 1.0)

    def span_step(inputs: torch.Tensor):
        mask = None if real is None else real.expand(-1, inputs.shape[1])
        return transformer.step(vlm, cache, latents=inputs, attention_mask=mask)

    def step_fn(inputs: torch.Tensor, index: int) -> AffineParams:
        nonlocal previous
        if previous is not None and index < previous[0] + previous[1].shape[1]:  # rewrite from `index` on
            # Both caches can only go back to a snapshot: go back to the previous call's and feed again what it fed
            # before `index` (the same inputs, so what the cache held there is unchanged).
            start, fed, snap = previous
            cache.restore(snap)
            if index > start:
                span_step(fed[:, : index - start])
        previous = (index, inputs, cache.snapshot())
        return params(span_step(inputs).flow_hidden_states)

    if cache.batch_size != guidance.num_rows(noise.shape[0]):
        raise ValueError(
            f"cache batch {cache.batch_size} does not hold the {guidance.num_branches} guidance branches "
            f"{guidance.branches} of {noise.shape[0]} samples"
        )
    start = cache.snapshot()
    compiled = transformer.image_step_for(vlm) if not jacobi.get("jacobi_block_size") else None
    static = None
    if compiled is not None:  # exact decoding, the whole step one compiled graph (compile_decode_step(vlm=...))
        static = StaticImageSpan(transformer, vlm, cache, noise.shape[1], compiled)

        def static_step_fn(inputs: torch.Tensor, index: int) -> AffineParams:  # positions only advance
            return guided(*static(inputs, None if real is None else real.expand(-1, inputs.shape[1])))

    try:
        with packed_weights(vlm, transformer):  # the VLM's transformers layers and the Pretzel's other linears
            tokens = sample_autoregressive(
                step_fn if static is None else static_step_fn,
                params(cache.last_flow_hidden),
                noise,
                scheduler,
                guidance,
                callback,
                feed_last=True,
                stop=stop,
                **jacobi,
            )
    finally:
        if static is not None:
            static.close()
    if span_callback is None or tokens.shape[1] < noise.shape[1]:
        return tokens
    replaced = span_callback(tokens)
    if replaced is not tokens:
        cache.restore(start)
        with packed_weights(vlm, transformer):
            span_step(guidance.stack(replaced.float()))
    return replaced.float()


@torch.no_grad()
def shallow_reverse(
    transformer: PretzelModel,
    tokens: torch.Tensor,
    noise_level: torch.Tensor,
    scheduler: TarFlowScheduler,
    block_callback: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    stop: Optional[Callable[[], bool]] = None,
    **jacobi,
) -> torch.Tensor:
    """Intermediate tokens ``x~ (B, N, C)`` -> noisy FAE latents ``(B, C, h, w)`` (shallow blocks in reverse).

    ``block_callback(k, x)`` runs after the ``k``-th shallow block that is not an identity with the tokens
    ``(B, N, C)`` it made, and may return a replacement; once ``stop()`` is true the remaining blocks are skipped.
    ``jacobi`` as in :func:`sample_flow_block`."""
    cond = transformer.noise_embedding(noise_level)
    blocks = [block for block in reversed(transformer.shallow) if not block.is_identity]
    for k, block in enumerate(blocks):
        if stop is not None and stop():
            break
        tokens = sample_flow_block(block, tokens, transformer.grid, scheduler, cond=cond, stop=stop, **jacobi)
        if block_callback is not None and not (stop is not None and stop()):
            tokens = block_callback(k, tokens).float()
    return transformer.tokens_to_latents(tokens)


# --------------------------------------------------------------------------------------------------------------
# Denoising
# --------------------------------------------------------------------------------------------------------------


def tweedie_denoise(
    nll: NLLFunction,
    sample: torch.Tensor,
    scheduler: TarFlowScheduler,
    num_steps: Optional[int] = None,
    noise_level: Optional[float] = None,
    callback: Optional[Callable] = None,
    stop: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Remove the sampling noise of ``sample`` with the scheduler's denoising schedule.

    Each step at level ``t`` takes the gradient of ``nll(x, t)``: the model is conditioned on the level of the step
    (iTARFlow's multi-noise recipe), not on the level the sample was drawn at.  ``callback(i, t, x)`` runs after
    step ``i`` and may return a replacement for ``x``; once ``stop()`` is true the remaining steps are skipped.
    Returns float32 latents of ``sample``'s shape.
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
        if stop is not None and stop():
            break
    return x


@torch.no_grad()
def denoise_starflow(
    model: StarFlowTransformerModel,
    latents: torch.Tensor,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    noise_level: Optional[float] = None,
    num_steps: int = 1,
    encoder_attention_mask: Optional[torch.Tensor] = None,
    scheduler: Optional[TarFlowScheduler] = None,
    callback: Optional[Callable] = None,
    stop: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """:func:`tweedie_denoise` with a STARFlow (v1) stack (one fixed noise level: the model takes no level);
    one step at 0.3 is STARFlow's self-denoising ``x - t^2 grad NLL``."""

    def nll(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, encoder_hidden_states, encoder_attention_mask).loss * x.numel()

    scheduler = scheduler or TarFlowScheduler.from_preset("starflow")
    x = tweedie_denoise(nll, latents, scheduler, num_steps, noise_level, callback, stop)
    return x.to(latents.dtype)

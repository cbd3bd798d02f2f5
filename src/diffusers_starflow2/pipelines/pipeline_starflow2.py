# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""StarFlow2Pipeline: text -> image with STARFlow2, and the base shared by the editing and interleaved pipelines."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..loaders.lora import StarFlow2LoraLoaderMixin
from ..models.autoencoder_fae import AutoencoderFAE
from ..models.cache_utils import PretzelCache
from ..models.transformer_pretzel import PretzelModel, scatter_latents
from ..models.vlm_stream import VLMStream
from ..sampling import jacobi_options, sample_image_tokens, shallow_reverse, tweedie_denoise
from ..schedulers.scheduling_tarflow import GuidanceSpec, TarFlowScheduler
from ..utils import validation
from ..utils.chat import check_prompt, model_context_length, prompt_token_limit
from ..utils.image_processing import image_items
from ..utils.sequence import TokenLayout, encode_conversation, pad_layouts, truncate_text
from ..utils.validation import check_generator, check_guidance_scale, check_output_type
from .conversation import ConversationMixin
from .pipeline_utils import (
    FlowPipelineMixin,
    ends_call,
    postprocess_images,
    prepare_noise,
    progress_per_token,
    resolve_callback_tensor_inputs,
    resolve_num_inference_steps,
)

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_starflow2 import StarFlow2Pipeline

        >>> pipe = StarFlow2Pipeline.from_pretrained("path/to/starflow2")  # e.g. the folder of make_tiny_starflow2.py
        >>> image = pipe("a red circle on the left", guidance_scale=2.0,
        ...              generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.save("circle.png")
        ```
"""


@dataclass
class StarFlow2PipelineOutput(BaseOutput):
    """
    Args:
        images: list of PIL images, a ``(B, H, W, 3)`` numpy array or a ``(B, 3, H, W)`` tensor in ``[0, 1]``, or
            the ``(B, C, h, w)`` scaled FAE latents for ``output_type="latent"``.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]


class StarFlow2BasePipeline(FlowPipelineMixin, DiffusionPipeline, StarFlow2LoraLoaderMixin, ConversationMixin):
    """Components, the image-generation core, conversations (:class:`ConversationMixin`) and LoRA loading shared by
    the STARFlow2 pipelines.

    Components:
        vlm: the frozen VLM (``Qwen2_5_VLForConditionalGeneration`` or any transformers causal LM).
        tokenizer: its tokenizer (with the Qwen special tokens and chat template).
        transformer: :class:`PretzelModel`.
        vae: :class:`AutoencoderFAE`.
        scheduler: :class:`TarFlowScheduler`.
    """

    model_cpu_offload_seq = "vlm->transformer->vae"
    _callback_tensor_inputs = ["latents"]
    _optional_components: List[str] = []

    def __init__(self, vlm, tokenizer, transformer: PretzelModel, vae: AutoencoderFAE, scheduler: TarFlowScheduler):
        super().__init__()
        self.register_modules(vlm=vlm, tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae.config.out_patch_size if vae else 16)

    @property
    def vlm_stream(self) -> VLMStream:
        return VLMStream(self.vlm)

    @property
    def image_size(self) -> int:
        """Side of generated images: the FAE output of one latent grid."""
        return self.transformer.config.sample_size * self.vae.config.out_patch_size

    def _check_size(self, height: Optional[int], width: Optional[int]) -> None:
        size = self.image_size
        height = validation.check_integer(height, "height", minimum=1, allow_none=True)
        width = validation.check_integer(width, "width", minimum=1, allow_none=True)
        if (size if height is None else height, size if width is None else width) != (size, size):
            raise ValueError(
                f"`height` and `width` must be {size} (the FAE output of the model's "
                f"{self.transformer.config.sample_size}x{self.transformer.config.sample_size} latent "
                f"grid); got {height} and {width}"
            )

    def _batch(self, layouts: Sequence[TokenLayout]):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return pad_layouts(layouts, pad, side="left", device=self._execution_device)

    @property
    def num_flow_steps(self) -> int:
        """Steps of ``callback_on_step_end`` that sample one image: the Pretzel's TARFlow stream, then each shallow
        flow block that is not an identity (the denoising steps follow)."""
        return 1 + sum(not block.is_identity for block in self.transformer.shallow)

    def _onload_pretzel(self) -> None:
        """The VLM and the Pretzel run together: both on the execution device (see :meth:`_onload`)."""
        self._onload(self.transformer, self.vlm)

    def _new_cache(self, batch_size: int, noise_level: float) -> PretzelCache:
        self._onload_pretzel()
        levels = torch.full((batch_size,), float(noise_level), device=self._execution_device)
        return self.transformer.new_cache(self.vlm_stream, levels)

    def _run_text(self, cache: PretzelCache, layouts: Sequence[TokenLayout], images: Optional[torch.Tensor] = None):
        """Push (left-padded) token layouts into ``cache``; latent positions take ``images`` ``(M, N, C)`` in order."""
        self._onload_pretzel()
        ids, latent_mask, attention_mask, _ = self._batch(layouts)
        latents = None
        if any(any(layout.latent_mask) for layout in layouts):
            latents, _ = scatter_latents(images.to(self.transformer.dtype), latent_mask)
        return self.transformer.step(self.vlm_stream, cache, ids, latents, latent_mask, attention_mask)

    def preprocess_image(self, image, name: str = "image") -> torch.Tensor:
        """Source images -> ``(M, 3, S, S)`` in ``[-1, 1]`` at the model's image size ``S``.

        Accepts PIL images (converted to RGB), numpy ``(H, W, 3)`` / ``(B, H, W, 3)`` arrays (uint8, or float in
        ``[0, 1]``), torch ``(3, H, W)`` / ``(B, 3, H, W)`` tensors (uint8, or float in ``[0, 1]`` or ``[-1, 1]``),
        or a list of one kind (see :func:`~diffusers_starflow2.utils.image_processing.image_items`); anything else
        is refused.  Other sizes are resized (a rectangular image is squashed).
        """
        size = self.image_size
        return torch.cat(
            [self.image_processor.preprocess(x, height=size, width=size) for x in image_items(image, name)]
        )

    def encode_image(
        self,
        images: torch.Tensor,
        noise_level: float,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` images in ``[-1, 1]`` -> their intermediate latents ``x~ (B, N, C)`` at ``noise_level``.

        The FAE posterior mean is noised with ``noise_level * eps`` (``eps`` drawn from ``generator``, one per image)
        as the model saw context images in training, then mapped by the shallow flows.
        """
        noisy = self.noisy_latents(images, noise_level, generator)
        self._onload_pretzel()
        levels = torch.full((noisy.shape[0],), noise_level, device=noisy.device)
        tokens, _ = self.transformer.shallow_forward(noisy.to(self.transformer.dtype), levels)
        return tokens

    def noisy_latents(
        self,
        images: torch.Tensor,
        noise_level: float,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` images in ``[-1, 1]`` -> scaled FAE latents (posterior mean) ``(B, C, h, w)`` plus
        ``noise_level * eps``, float32, ``eps`` drawn from ``generator`` (one per image)."""
        device = self._execution_device
        self._onload(self.vae)
        latents = self.vae.encode_latents(images.to(device=device, dtype=self.vae.dtype), sample=False).float()
        eps = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        return self.scheduler.add_noise(latents, eps, noise_level)

    # image spans a first turn holds besides its prompt: the image to generate (the edit pipeline adds its source)
    _turn_image_spans = 1

    @property
    def max_prompt_tokens(self) -> int:
        """Largest ``max_sequence_length``: the VLM's context minus the image spans of a turn and the chat
        template's framing."""
        return prompt_token_limit(
            model_context_length(self.vlm, self.tokenizer),
            self.transformer.num_latents * self._turn_image_spans,
        )

    def check_prompts(self, prompt, negative_prompt, max_sequence_length: int, num_prompts: Optional[int] = None):
        """Every guidance branch's text, checked the same way: ``(prompts, negative prompts, max_sequence_length)``.

        ``prompt`` and ``negative_prompt`` (default ``""``) become lists of texts without special tokens; the
        negative prompt is one for all or one per prompt (``num_prompts``, default ``len(prompts)``).
        ``max_sequence_length`` must leave room in the VLM's context for a turn's images and the chat template
        (:attr:`max_prompt_tokens`): then every branch fits.  Longer texts are not refused: :meth:`encode_prompt`
        truncates them with a warning.
        """
        limit = validation.check_integer(
            max_sequence_length, "max_sequence_length", minimum=1, maximum=self.max_prompt_tokens
        )
        prompts = check_prompt(prompt, tokenizer=self.tokenizer)
        negatives = check_prompt(
            negative_prompt if negative_prompt is not None else "",
            "negative_prompt",
            allow_empty=True,
            tokenizer=self.tokenizer,
        )
        num_prompts = len(prompts) if num_prompts is None else num_prompts
        if len(negatives) not in (1, num_prompts):
            raise ValueError(
                f"`negative_prompt` has {len(negatives)} entries for {num_prompts} prompts; expected 1 or {num_prompts}"
            )
        return prompts, negatives, limit

    def _truncate(self, texts: List[str], name: str, max_sequence_length: int) -> List[str]:
        """``texts`` cut to ``max_sequence_length`` tokens each, with one warning naming what was cut."""
        split = [truncate_text(self.tokenizer, text, max_sequence_length) for text in texts]
        cut = [removed for _, removed in split if removed]
        if cut:
            logger.warning(
                f"The following part of `{name}` was truncated because `max_sequence_length` is set to "
                f"{max_sequence_length} tokens: {cut}"
            )
        return [kept for kept, _ in split]

    def _prompt_texts(self, prompt, negative_prompt, max_sequence_length: int, num_prompts: Optional[int] = None):
        """:meth:`check_prompts`, then each text truncated to ``max_sequence_length`` tokens (with a warning)."""
        prompts, negatives, limit = self.check_prompts(prompt, negative_prompt, max_sequence_length, num_prompts)
        return self._truncate(prompts, "prompt", limit), self._truncate(negatives, "negative_prompt", limit)

    def _check_noise_level(self, noise_level: Optional[float]) -> float:
        """``noise_level`` or the scheduler's default, checked."""
        noise_level = self.scheduler.config.noise_level if noise_level is None else noise_level
        return validation.check_noise_level(noise_level)

    def _check_inference_steps(self, num_inference_steps: Optional[int]) -> int:
        """``num_inference_steps`` or the scheduler's default, checked."""
        steps = self.scheduler.config.num_denoising_steps if num_inference_steps is None else num_inference_steps
        return validation.check_inference_steps(steps)

    def generate_image(
        self,
        cache: PretzelCache,
        noise: torch.Tensor,
        guidance: GuidanceSpec,
        num_inference_steps: int = 1,
        idle: Optional[torch.Tensor] = None,
        noise_level: Optional[float] = None,
    ):
        """Sample one image span in ``cache`` (which ends with ``<|vision_start|>``) and denoise it.

        Returns ``(tokens, latents)``: the intermediate latents ``x~ (B, N, C)`` now in both caches, and the
        denoised FAE latents ``(B, C, h, w)``.  Each flow block (the Pretzel's TARFlow stream, then the shallow
        blocks in reverse) and each denoising step is a step of the running call (:class:`FlowPipelineMixin`): its
        ``callback_on_step_end`` sees the image's whole latents once the step is done, ``(B, N, C)`` in raster
        order after a flow block and ``(B, C, h, w)`` after a denoising step, and what it returns is used from then
        on (a replaced span is fed to both caches again, so the rest of a conversation sees it).  When the call is
        interrupted, positions not sampled keep their noise (and are not in the caches) and the remaining steps are
        skipped.  ``idle`` ``(B,)``: True for samples that sit the image out on padding positions (see
        :func:`sample_image_tokens`); only the other samples' tokens and latents are returned (and passed to the
        callback).  ``noise_level``: the level the samples of ``cache`` sit at, as the caller knows it (default: read
        from the cache, which needs its values: not on ``meta``).
        """
        self._onload_pretzel()
        vlm, transformer = self.vlm_stream, self.transformer
        B, N = noise.shape[:2]
        rows = torch.arange(cache.batch_size, device=cache.cond.device)[guidance.conditional_rows(B)]
        if idle is not None:
            rows = rows[~idle.to(rows.device)]
        snap = cache.snapshot()
        level = cache.noise_level[0]

        def on_span(tokens: torch.Tensor) -> torch.Tensor:  # (B, N, C), the idle rows' tokens meaning nothing
            made = tokens[rows]
            replaced = self._step_end(level, made)
            if replaced is made:
                return tokens
            return tokens.index_copy(0, rows, replaced.to(tokens.dtype))

        stop = lambda: self.interrupt  # noqa: E731
        jacobi = getattr(self, "_jacobi", {})  # the running call's decoding mode
        with self.progress_bar(total=N) as progress_bar:
            tokens = sample_image_tokens(
                transformer,
                vlm,
                cache,
                noise,
                self.scheduler,
                guidance,
                progress_per_token(progress_bar),
                stop=stop,
                idle=idle,
                span_callback=on_span,
                **jacobi,
            )
        tokens = torch.cat([tokens, noise[:, tokens.shape[1] :].to(tokens.dtype)], dim=1)[rows]  # (B', N, C)
        levels = cache.noise_level[rows]
        latents = shallow_reverse(
            transformer,
            tokens,
            levels,
            self.scheduler,
            block_callback=lambda k, x: self._step_end(level, x),
            stop=stop,
            **jacobi,
        )
        if num_inference_steps > 0 and not self.interrupt:
            validation.check_finite_output(latents, "image latents")  # NaN is refused before it is denoised
            context = cache.fork(snap)  # the conditional context before the image, without guidance branches
            context.select(rows)
            at = float(levels[0]) if noise_level is None else noise_level
            latents = self._denoise_in_context(context, latents, num_inference_steps, at)
        return tokens, latents

    def _denoise_in_context(
        self, context: PretzelCache, latents: torch.Tensor, num_inference_steps: int, noise_level: float
    ) -> torch.Tensor:
        """Tweedie denoising of FAE latents ``(B, C, h, w)`` at ``noise_level`` as the next image of ``context``,
        each step conditioned on its own level; every step is a step of the running call."""
        vlm, transformer = self.vlm_stream, self.transformer
        dims = latents[0].numel()

        def nll(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            at_t = transformer.at_noise_level(context, t.expand(x.shape[0]))
            return transformer.image_nll_in_context(vlm, at_t, x) * dims

        with self.progress_bar(total=num_inference_steps) as progress_bar:

            def on_step(i, t, x):
                x = self._step_end(t, x)
                progress_bar.update()
                return x

            return tweedie_denoise(
                nll, latents, self.scheduler, num_inference_steps, noise_level, on_step, stop=lambda: self.interrupt
            )

    def decode(self, latents: torch.Tensor, output_type: str):
        """Scaled FAE latents -> images of ``output_type``."""
        validation.check_finite_output(latents, "image latents")
        if output_type == "latent":
            return latents
        self._onload(self.vae)
        images = self.vae.decode_latents(latents.to(self.vae.dtype)).float()
        validation.check_finite_output(images, "decoded pixels")
        images = images.clamp(-1, 1)
        return postprocess_images(images, output_type, self.image_processor)


class StarFlow2Pipeline(StarFlow2BasePipeline):
    r"""Text -> image with STARFlow2.

    The prompt is rendered with the VLM's chat template as a user turn, followed by the assistant header and
    ``<|vision_start|>``; the Pretzel then samples the image's latents left to right in one pass (classifier-free
    guidance against the negative prompt, the empty prompt by default), the shallow flows are inverted, the sampling
    noise is removed by Tweedie denoising and the FAE decodes the latents.

    Quality knobs: ``guidance_scale`` (prompt adherence vs diversity; 0 disables guidance), ``noise_level`` (the
    noise level the flow samples at, default the scheduler's, usually the training level), ``num_inference_steps``
    (denoising steps after sampling; 0 returns the noisy sample).
    """

    def encode_prompt(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Union[str, List[str], None] = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 256,
    ) -> List[TokenLayout]:
        """Token layouts of the conditional batch (each prompt repeated ``num_images_per_prompt`` times), followed
        by the unconditional batch when guidance is on.  Texts longer than ``max_sequence_length`` tokens are
        truncated, with a warning naming what was cut."""
        prompts, negatives = self._prompt_texts(prompt, negative_prompt, max_sequence_length)
        negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        n = self.transformer.num_latents

        def layout(text: str) -> TokenLayout:
            return encode_conversation(
                self.tokenizer, [{"role": "user", "content": text}], n, add_generation_prompt=True, open_image=True
            )

        cond = [layout(p) for p in prompts for _ in range(num_images_per_prompt)]
        uncond = [layout(p) for p in negatives for _ in range(num_images_per_prompt)]
        return cond + uncond if do_classifier_free_guidance else cond

    def _prompt_context(
        self, prompt: Union[str, List[str]], batch_size: int, noise_level: float, max_sequence_length: int = 256
    ) -> PretzelCache:
        """A cache holding each prompt's conditional context (one prompt, or one per sample), ending with
        ``<|vision_start|>``, at ``noise_level``."""
        layouts = self.encode_prompt(prompt, None, False, 1, max_sequence_length)
        if len(layouts) not in (1, batch_size):
            raise ValueError(f"`prompt` has {len(layouts)} entries for {batch_size} images; expected 1 or {batch_size}")
        layouts = layouts * batch_size if len(layouts) == 1 else layouts
        cache = self._new_cache(batch_size, noise_level)
        self._run_text(cache, layouts)
        return cache

    @torch.no_grad()
    def denoise_latents(
        self,
        latents: torch.Tensor,
        prompt: Union[str, List[str]],
        noise_level: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        max_sequence_length: int = 256,
        **kwargs,
    ) -> torch.Tensor:
        r"""Remove Gaussian noise of level ``noise_level`` from scaled FAE latents under their prompt.

        Args:
            latents: ``(B, C, h, w)`` scaled FAE latents carrying noise of std ``noise_level`` (as the flow samples
                them, before denoising; ``output_type="latent"`` with ``num_inference_steps=0`` returns these).
            prompt: the caption of each image: one string, or one per image.
            noise_level: the noise level of ``latents`` (default ``scheduler.config.noise_level``).
            num_inference_steps: Tweedie steps (default ``scheduler.config.num_denoising_steps``); each step is
                conditioned on its own level of ``linspace(noise_level, min_noise_level)``, then 0.
            max_sequence_length: maximum number of tokens of a prompt.
        Returns:
            ``(B, C, h, w)`` float32 denoised latents.
        """
        num_inference_steps = resolve_num_inference_steps(
            num_inference_steps, kwargs, f"{type(self).__name__}.denoise_latents"
        )
        t, device = self.transformer, self._execution_device  # scaled FAE latents of the model's grid, float32
        latents = validation.check_latents(latents, (None, t.config.latent_channels, *t.grid), device=device)
        latents = latents.to(device, torch.float32)
        noise_level = self._check_noise_level(noise_level)
        steps = self._check_inference_steps(num_inference_steps)
        if steps == 0:
            return latents
        context = self._prompt_context(prompt, latents.shape[0], noise_level, max_sequence_length)
        return self._denoise_in_context(context, latents, steps, noise_level)

    @torch.no_grad()
    def log_likelihood(
        self,
        image,
        prompt: Union[str, List[str]],
        noise_level: Optional[float] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
    ) -> torch.Tensor:
        r"""Exact likelihood of images under their prompts, in bits per dimension (lower = more likely).

        Each image is FAE-encoded (posterior mean), noised at ``noise_level`` with noise from ``generator`` and
        scored by the flow (shallow flows + deep stream, change of variables) as the image that follows its prompt.

        Args:
            image: images as accepted by :meth:`preprocess_image` (PIL, numpy, torch, or a list).
            prompt: one string for all images, or one per image.
            noise_level: the noise level the latents are scored at (default ``scheduler.config.noise_level``).
            generator: one ``torch.Generator`` or one per image, for the noise.
        Returns:
            ``(B,)`` float32 bits per dimension of each image's noisy FAE latents.
        """
        noise_level = self._check_noise_level(noise_level)
        pixels = self.preprocess_image(image)
        batch_size = pixels.shape[0]
        check_generator(generator, batch_size)
        noisy = self.noisy_latents(pixels, noise_level, generator)
        context = self._prompt_context(prompt, batch_size, noise_level)  # onloads the VLM and the Pretzel
        nll = self.transformer.image_nll_in_context(self.vlm_stream, context, noisy)  # nats/dim
        self.maybe_free_model_hooks()
        return (nll / math.log(2)).float()

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height: Optional[int],
        width: Optional[int],
        guidance_scale: float,
        num_images_per_prompt: int,
        output_type: str,
        max_sequence_length: int,
        noise_level: float,
        num_inference_steps: int,
        callback_on_step_end: Optional[Callable],
        callback_on_step_end_tensor_inputs: List[str],
    ) -> Dict[str, Any]:
        """Validate the call (the same arguments as :meth:`StarFlowPipeline.check_inputs`); returns the checked
        values the call runs with: ``guidance`` (the :class:`GuidanceSpec`), ``noise_level`` and
        ``num_inference_steps`` (the scheduler's defaults for None),
        ``tensor_inputs`` (the callback tensor names to pass).  Both guidance branches' texts are checked by
        :meth:`check_prompts`."""
        self.check_prompts(prompt, negative_prompt, max_sequence_length)
        self._check_size(height, width)
        guidance = GuidanceSpec(check_guidance_scale(guidance_scale))
        check_output_type(output_type)
        validation.check_images_per_prompt(num_images_per_prompt)
        return dict(
            guidance=guidance,
            noise_level=self._check_noise_level(noise_level),
            num_inference_steps=self._check_inference_steps(num_inference_steps),
            tensor_inputs=resolve_callback_tensor_inputs(
                callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
            ),
        )

    @ends_call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        guidance_scale: float = 2.0,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        noise_level: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[[Any, int, Any, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: int = 256,
        jacobi_block_size: Optional[int] = None,
        jacobi_tolerance: float = 1e-3,
        jacobi_max_iterations: Optional[int] = None,
        **kwargs,
    ):
        r"""Generate images from text.

        Args:
            prompt: a prompt or a list of prompts.
            negative_prompt: the unconditional branch of guidance (default ``""``).
            height, width: must be the model's image size (default), the FAE output of its latent grid.
            guidance_scale: guidance weight ``w`` (0 = conditional only).
            num_images_per_prompt: images per prompt.
            generator: a ``torch.Generator`` or one per image, for reproducible noise.
            latents: ``(B, N, C)`` standard-normal noise of the flow (replaces sampling from ``generator``).
            noise_level: noise level of the flow sample (default ``scheduler.config.noise_level``).
            num_inference_steps: Tweedie denoising steps (default ``scheduler.config.num_denoising_steps``).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`StarFlow2PipelineOutput` instead of a tuple.
            callback_on_step_end: ``callback(pipe, step, noise_level, callback_kwargs) -> dict`` called once per
                flow block, then once per denoising step (``step`` counts both; see :class:`FlowPipelineMixin`):
                ``callback_kwargs["latents"]`` holds the image's whole latents, ``(B, N, C)`` after a flow block and
                ``(B, C, h, w)`` after a denoising step; returning ``{"latents": new}`` replaces them from then on.
                Setting ``pipe._interrupt = True`` stops the call.
            callback_on_step_end_tensor_inputs: tensors passed to the callback (``["latents"]``).
            max_sequence_length: maximum number of tokens of a prompt.
            jacobi_block_size: None (default) decodes every latent position exactly, one at a time; an int decodes
                windows of that many positions by Jacobi iterations (see :func:`~diffusers_starflow2.sampling.
                sample_autoregressive`), for every flow block.
            jacobi_tolerance: a position is final once a Jacobi pass moves it by at most this (max abs change).
            jacobi_max_iterations: Jacobi passes after which a position is final anyway (default: the window size,
                which with tolerance 0 gives the sequential result).

        Examples:
        """
        num_inference_steps = resolve_num_inference_steps(
            num_inference_steps, kwargs, f"{type(self).__name__}.__call__"
        )
        self._jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
        checked = self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            guidance_scale,
            num_images_per_prompt,
            output_type,
            max_sequence_length,
            noise_level,
            num_inference_steps,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        guidance, noise_level, steps = checked["guidance"], checked["noise_level"], checked["num_inference_steps"]
        validation.check_bool(return_dict, "return_dict")
        prompts, negatives = self._prompt_texts(prompt, negative_prompt, max_sequence_length)  # cut once, warned once
        layouts = self.encode_prompt(
            prompts, negatives, guidance.num_branches > 1, num_images_per_prompt, max_sequence_length
        )
        batch_size = len(layouts) // guidance.num_branches
        validation.check_batch_size(batch_size)
        check_generator(generator, batch_size)
        shape = (batch_size, self.transformer.num_latents, self.transformer.config.latent_channels)
        noise = prepare_noise(shape, generator, self._execution_device, torch.float32, latents)  # latents checked
        cache = self._new_cache(len(layouts), noise_level)
        self._run_text(cache, layouts)
        self._begin_call(guidance_scale, self.num_flow_steps + steps, callback_on_step_end, checked["tensor_inputs"])
        # denoised in the conditional context the image was sampled in (the prompt's, forked before the image)
        _, image_latents = self.generate_image(cache, noise, guidance, steps, noise_level=noise_level)
        images = self.decode(image_latents, output_type)
        if not return_dict:
            return (images,)
        return StarFlow2PipelineOutput(images=images)

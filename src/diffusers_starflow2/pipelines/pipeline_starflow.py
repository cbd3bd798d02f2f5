# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""StarFlowPipeline: text-to-image with converted STARFlow (v1) checkpoints.

Sampling follows apple/ml-starflow: T5 features of the prompt (padding zeroed, no attention mask given to the flow),
Gaussian noise in VAE-latent space, one reverse pass through the flow stack (deep block first, guided against the
empty prompt), self-denoising with the flow's own score, VAE decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from transformers import PreTrainedTokenizerBase, T5EncoderModel

from ..models.transformer_starflow import StarFlowTransformerModel
from ..sampling import denoise_starflow, jacobi_options, sample_starflow
from ..schedulers.scheduling_tarflow import GuidanceSpec, TarFlowScheduler
from ..utils import validation
from ..utils.chat import check_prompt
from ..utils.image_processing import check_image_size, image_items
from ..utils.sequence import truncate_text
from ..utils.validation import check_generator, check_guidance_scale, check_output_type
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
        >>> from diffusers_starflow2 import StarFlowPipeline

        >>> # a folder written by `conversion/convert_starflow_to_diffusers.py --save_full_pipeline`
        >>> pipe = StarFlowPipeline.from_pretrained("./starflow-3b-t2i-256").to("cuda")
        >>> image = pipe(
        ...     "a film still of a cat playing piano",
        ...     guidance_scale=3.6,
        ...     generator=torch.Generator("cuda").manual_seed(999),
        ... ).images[0]
        >>> image.save("cat.png")
        ```
"""


@dataclass
class StarFlowPipelineOutput(BaseOutput):
    """
    Args:
        images: a list of PIL images, a ``(B, H, W, 3)`` numpy array or ``(B, 3, H, W)`` tensor in ``[0, 1]``, or
            with ``output_type="latent"`` the ``(B, C, H/f, W/f)`` latents (scaled as the transformer sees them).
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]


class StarFlowPipeline(FlowPipelineMixin, DiffusionPipeline):
    r"""Text-to-image generation with a STARFlow deep-shallow autoregressive flow.

    Args:
        text_encoder: FLAN-T5 encoder (``T5EncoderModel``) whose ``d_model`` is the transformer's ``text_dim``.
        tokenizer: the text encoder's tokenizer.
        transformer: the flow, :class:`StarFlowTransformerModel`.
        vae: ``AutoencoderKL``; the flow models its latents times ``vae.config.scaling_factor``.
        scheduler: :class:`TarFlowScheduler` (guidance rule, noise level and denoising schedule).

    Generation has two kinds of steps, which are the unit of ``callback_on_step_end`` and of the progress bar
    (see :class:`FlowPipelineMixin`):

    1. one step per flow block (that is not an identity), in sampling order (the deep, text-reading block first);
    2. ``num_inference_steps`` denoising steps, which remove the Gaussian noise of standard deviation
       ``noise_level`` that the flow was trained on.

    After each step the callback's ``latents`` are the image's whole latents ``(B, C, H, W)`` (the VAE's, times its
    scaling factor), and the latents it returns are those the next steps start from.  The progress bar counts the
    latent positions of every flow block, then the denoising steps.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        text_encoder: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        transformer: StarFlowTransformerModel,
        vae: AutoencoderKL,
        scheduler: TarFlowScheduler,
    ):
        super().__init__()
        self.register_modules(
            text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -- text ------------------------------------------------------------------------------------------------------

    def _encode(self, texts: List[str], name: str, max_sequence_length: int, device) -> torch.Tensor:
        """T5 features ``(len(texts), max_sequence_length, d_model)`` with padding positions zeroed (as in training).

        Texts longer than ``max_sequence_length`` tokens (``</s>`` included) are truncated, with one warning naming
        what was cut of ``name``."""
        cut = [truncate_text(self.tokenizer, t, max_sequence_length, add_special_tokens=True)[1] for t in texts]
        if any(cut):
            logger.warning(
                f"The following part of `{name}` was truncated because `max_sequence_length` is set to "
                f"{max_sequence_length} tokens: {[c for c in cut if c]}"
            )
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        features = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        features = features * mask[..., None].to(features.dtype)
        return features.to(self.transformer.dtype) if self.transformer is not None else features

    def _text_length(self, max_sequence_length: Optional[int]) -> int:
        """``max_sequence_length``, by default the transformer's ``max_text_length`` (without a transformer: the
        tokenizer's ``model_max_length``, which a converted STARFlow folder sets to it)."""
        if max_sequence_length is not None:
            return max_sequence_length
        if self.transformer is not None:
            return self.transformer.config.max_text_length
        length = getattr(self.tokenizer, "model_max_length", None)
        if length is None or length > 10**6:
            raise ValueError(
                "`max_sequence_length` must be given: this pipeline has no transformer and its tokenizer no "
                "`model_max_length` to take the text length from"
            )
        return int(length)

    def encode_prompt(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device=None,
        max_sequence_length: Optional[int] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
    ):
        r"""Encode the prompts and, for guidance, the negative prompts: needs only the text encoder and tokenizer.

        Args:
            prompt: prompt or prompts (or None with ``prompt_embeds``).
            negative_prompt: the unconditional branch of guidance, one for all or one per prompt; ``None`` is the
                empty prompt ``""`` that STARFlow was trained to drop captions to.
            do_classifier_free_guidance: also encode ``negative_prompt``.
            num_images_per_prompt: repeat each prompt's features this many times (consecutively).
            device: where to put the features (default: the execution device).
            max_sequence_length: text tokens; longer texts are truncated with a warning (default and maximum: the
                transformer's ``max_text_length``, see :meth:`_text_length`).
            prompt_embeds, negative_prompt_embeds: features computed before (``(B, L, d_model)``), used as given
                instead of encoding ``prompt`` / ``negative_prompt``.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each ``(B * num_images_per_prompt, L, d_model)`` (in the
            transformer's dtype when there is one); ``negative_prompt_embeds`` is ``None`` without guidance.
        """
        device = device or self._execution_device
        length = self._text_length(max_sequence_length)
        if prompt_embeds is None:
            prompt_embeds = self._encode(check_prompt(prompt, tokenizer=self.tokenizer), "prompt", length, device)
        if not do_classifier_free_guidance:
            negative_prompt_embeds = None
        elif negative_prompt_embeds is None:
            negatives = check_prompt(
                "" if negative_prompt is None else negative_prompt,
                "negative_prompt",
                allow_empty=True,
                tokenizer=self.tokenizer,
            )
            batch_size = prompt_embeds.shape[0]
            if len(negatives) not in (1, batch_size):
                raise ValueError(
                    f"`negative_prompt` has {len(negatives)} entries for {batch_size} prompts; expected 1 or "
                    f"{batch_size}"
                )
            negatives = negatives * batch_size if len(negatives) == 1 else negatives
            negative_prompt_embeds = self._encode(negatives, "negative_prompt", length, device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    # -- checks and latents ----------------------------------------------------------------------------------------

    def _check_embeds(self, embeds, name: str) -> None:
        """``(B, L, text_dim)`` finite floating-point features with ``1 <= L <= max_text_length``."""
        cfg = self.transformer.config
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point() or embeds.ndim != 3:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"`{name}` must be a floating-point tensor (B, L, {cfg.text_dim}); got {got}")
        if embeds.shape[-1] != cfg.text_dim or not 1 <= embeds.shape[1] <= cfg.max_text_length:
            raise ValueError(
                f"`{name}` must have shape (B, L, {cfg.text_dim}) with 1 <= L <= {cfg.max_text_length} (the "
                f"transformer's max_text_length); got {tuple(embeds.shape)}"
            )
        validation.check_tensor_values(embeds, name, self._execution_device)
        validation.check_finite(embeds, name)

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height: int,
        width: int,
        guidance_scale: float,
        num_images_per_prompt: int,
        output_type: str,
        max_sequence_length: int,
        noise_level: float,
        num_inference_steps: int,
        callback_on_step_end: Optional[Callable],
        callback_on_step_end_tensor_inputs: List[str],
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
    ) -> List[str]:
        """Validate the call; returns the callback tensor names to pass.  Both guidance branches are checked here:
        the texts (types, special tokens; longer ones are truncated later, with a warning) or their embeddings
        (one of a text and its embeddings, of the transformer's text shape, the two branches' shapes equal)."""
        cfg = self.transformer.config
        max_sequence_length = validation.check_integer(
            max_sequence_length, "max_sequence_length", minimum=1, maximum=cfg.max_text_length
        )
        for text, embeds, name in (
            (prompt, prompt_embeds, "prompt"),
            (negative_prompt, negative_prompt_embeds, "negative_prompt"),
        ):
            if text is not None and embeds is not None:
                raise ValueError(f"`{name}` and `{name}_embeds` cannot both be given; pass one of them")
            if embeds is not None:
                self._check_embeds(embeds, f"{name}_embeds")
        if prompt is None and prompt_embeds is None:
            raise ValueError("`prompt` or `prompt_embeds` must be given")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`negative_prompt_embeds` must have the shape of `prompt_embeds` {tuple(prompt_embeds.shape)}; "
                    f"got {tuple(negative_prompt_embeds.shape)}"
                )
        prompts = check_prompt(prompt, tokenizer=self.tokenizer) if prompt is not None else None
        num_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if negative_prompt is not None:
            negatives = check_prompt(negative_prompt, "negative_prompt", allow_empty=True, tokenizer=self.tokenizer)
            if len(negatives) not in (1, num_prompts):
                raise ValueError(
                    f"`negative_prompt` has {len(negatives)} entries for {num_prompts} prompts; expected 1 or "
                    f"{num_prompts}"
                )
        if self.text_encoder is None:  # only embeddings can be used
            if prompts is not None:
                raise ValueError("`prompt` needs the pipeline's text_encoder, which is None; pass `prompt_embeds`")
            if GuidanceSpec(check_guidance_scale(guidance_scale)).num_branches > 1 and negative_prompt_embeds is None:
                raise ValueError(
                    "`negative_prompt_embeds` must be given for guidance: the pipeline's text_encoder is None"
                )
        check_image_size(height, width, self.vae_scale_factor * cfg.patch_size)
        if not cfg.use_rope and (height, width) != (self.default_size,) * 2:
            raise ValueError(f"`height` and `width` must be {self.default_size} for a transformer without RoPE")
        check_guidance_scale(guidance_scale)
        validation.check_images_per_prompt(num_images_per_prompt, num_prompts)
        check_output_type(output_type)
        validation.check_noise_level(noise_level)
        validation.check_inference_steps(num_inference_steps)
        return resolve_callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )

    @property
    def default_size(self) -> int:
        """Image side the transformer was trained at (``sample_size`` latents times the VAE factor)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator, device, latents: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Float32 standard-normal noise ``(batch_size, C, height / f, width / f)``, or ``latents`` (shape checked)."""
        shape = (
            batch_size,
            self.transformer.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        return prepare_noise(shape, generator, device, torch.float32, latents)

    # -- sampling --------------------------------------------------------------------------------------------------

    def _num_flow_ticks(self, num_tokens: int) -> int:
        """Progress-bar ticks of one flow pass: the tokens each non-identity block generates."""
        return sum(
            num_tokens - (0 if block.use_sos else 1) for block in self.transformer.blocks if not block.is_identity
        )

    @torch.no_grad()
    def log_likelihood(
        self,
        image,
        prompt: Union[str, List[str]],
        noise_level: Optional[float] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
    ) -> torch.Tensor:
        r"""Exact likelihood of images under their prompts, in bits per dimension (lower = more likely).

        Each image is VAE-encoded (posterior mode, scaled as the transformer sees latents), noised at
        ``noise_level`` with noise from ``generator`` and mapped to noise by the flow (change of variables).

        Args:
            image: what ``VaeImageProcessor.preprocess`` accepts (PIL, numpy, torch, or a list); the side must
                be a multiple of the VAE factor times the patch size.
            prompt: one string for all images, or one per image.
            noise_level: the noise level the latents are scored at (default ``scheduler.config.noise_level``).
            generator: one ``torch.Generator`` or one per image, for the noise.
        Returns:
            ``(B,)`` float32 bits per dimension of each image's noisy latents.
        """
        noise_level = validation.check_noise_level(
            self.scheduler.config.noise_level if noise_level is None else noise_level
        )
        prompts = check_prompt(prompt, tokenizer=self.tokenizer)
        device = self._execution_device
        pixels = [self.image_processor.preprocess(x) for x in image_items(image)]
        if len({tuple(p.shape) for p in pixels}) > 1:
            sizes = sorted({f"{p.shape[3]}x{p.shape[2]}" for p in pixels})
            raise ValueError(f"`image` must hold images of one size; got {', '.join(sizes)}")
        pixels = torch.cat(pixels).to(device=device, dtype=self.vae.dtype)
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if pixels.shape[2] % multiple or pixels.shape[3] % multiple:
            raise ValueError(
                f"`image` sides must be multiples of {multiple} (the VAE factor times the patch size); got "
                f"{pixels.shape[3]}x{pixels.shape[2]}"
            )
        batch_size = pixels.shape[0]
        check_generator(generator, batch_size)
        if len(prompts) not in (1, batch_size):
            raise ValueError(f"`prompt` has {len(prompts)} entries for {batch_size} images; expected 1 or {batch_size}")
        latents = self.vae.encode(pixels).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * self.vae.config.scaling_factor).float()
        eps = prepare_noise(latents.shape, generator, device)
        noisy = self.scheduler.add_noise(latents, eps, noise_level)
        prompt_embeds, _ = self.encode_prompt(prompts * (batch_size // len(prompts)), None, False)
        out = self.transformer(noisy.to(self.transformer.dtype), encoder_hidden_states=prompt_embeds)
        self.maybe_free_model_hooks()
        return out.bits_per_dim.float()

    @ends_call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        guidance_scale: float = 3.6,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        noise_level: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["StarFlowPipeline", int, torch.Tensor, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
        jacobi_block_size: Optional[int] = None,
        jacobi_tolerance: float = 1e-3,
        jacobi_max_iterations: Optional[int] = None,
        **kwargs,
    ):
        r"""Generate images from text.

        Args:
            prompt: prompt or list of prompts (or None with ``prompt_embeds``).
            negative_prompt: the unconditional branch of guidance (default ``""``, as in training); ignored when
                ``guidance_scale == 0``.
            height, width: image size in pixels, multiples of the VAE factor times the patch size (default: the
                training resolution, ``transformer.config.sample_size`` times the VAE factor).
            guidance_scale: STARFlow's guidance weight ``w``: every token's Gaussian is ``p_cond^(1+w) / p_uncond^w``
                (see :meth:`TarFlowScheduler.guide`), i.e. a classifier-free-guidance scale of ``1 + w``. ``0``
                disables guidance (conditional model only, half the compute). Default 3.6, as in the reference
                sampling script.
            num_images_per_prompt: images per prompt.
            generator: a generator, or one per image (``len(prompt) * num_images_per_prompt``).
            latents: the initial noise ``(B * num_images_per_prompt, C, height / f, width / f)`` instead of sampling
                it with ``generator``.
            noise_level: standard deviation of the Gaussian noise the flow was trained on and samples carry
                (default ``scheduler.config.noise_level``, 0.3 for STARFlow); the denoising schedule starts there.
            num_inference_steps: Tweedie steps on the flow's own score that remove that noise (default
                ``scheduler.config.num_denoising_steps``; 1 is STARFlow's self-denoising, 0 keeps the noisy sample).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (skip VAE decoding).
            return_dict: return a :class:`StarFlowPipelineOutput` instead of a tuple.
            callback_on_step_end: ``callback(pipe, step_index, noise_level, callback_kwargs) -> dict`` called after each
                flow block and each denoising step with the whole latents ``(B, C, H, W)`` (see the class
                docstring); ``noise_level`` is a tensor with the level of the latents the step started from.
                Returning ``{"latents": ...}`` replaces them from then on; ``pipe._interrupt = True`` stops the call.
            callback_on_step_end_tensor_inputs: names passed in ``callback_kwargs`` (a subset of
                ``_callback_tensor_inputs``).
            prompt_embeds, negative_prompt_embeds: ``(B, L, d_model)`` text features from :meth:`encode_prompt`
                (for instance of a pipeline holding only the text encoder), used instead of ``prompt`` /
                ``negative_prompt``; they give the images the texts give.
            max_sequence_length: text tokens; prompts are padded to it, as in training (default and maximum: the
                transformer's ``max_text_length``).  A longer prompt is truncated, with a warning naming the cut
                text.
            jacobi_block_size, jacobi_tolerance, jacobi_max_iterations: the decoding mode of every flow block: exact
                sequential decoding (``jacobi_block_size=None``, the default) or Jacobi windows, see
                :func:`~diffusers_starflow2.sampling.sample_autoregressive`.

        Examples:

        Returns:
            :class:`StarFlowPipelineOutput`, or a tuple with the images.
        """
        num_inference_steps = resolve_num_inference_steps(
            num_inference_steps, kwargs, f"{type(self).__name__}.__call__"
        )
        jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        if max_sequence_length is None:
            max_sequence_length = self.transformer.config.max_text_length
        noise_level = self.scheduler.config.noise_level if noise_level is None else noise_level
        if num_inference_steps is None:
            num_inference_steps = self.scheduler.config.num_denoising_steps
        validation.check_bool(return_dict, "return_dict")
        tensor_inputs = self.check_inputs(
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
            prompt_embeds,
            negative_prompt_embeds,
        )
        num_prompts = len(check_prompt(prompt)) if prompt is not None else prompt_embeds.shape[0]
        batch_size = num_prompts * num_images_per_prompt
        check_generator(generator, batch_size)
        device = self._execution_device
        guidance = GuidanceSpec(guidance_scale)

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            guidance.num_branches > 1,
            num_images_per_prompt,
            device,
            max_sequence_length,
            prompt_embeds,
            negative_prompt_embeds,
        )
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(device, dtype)
        if negative_prompt_embeds is not None:
            if negative_prompt_embeds.shape != prompt_embeds.shape:  # one branch from text, the other given
                raise ValueError(
                    f"`negative_prompt_embeds` must have the shape of the prompt's features "
                    f"{tuple(prompt_embeds.shape)}; got {tuple(negative_prompt_embeds.shape)}"
                )
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
        latents = self.prepare_latents(batch_size, height, width, generator, device, latents)

        p = self.transformer.config.patch_size
        num_tokens = (latents.shape[2] // p) * (latents.shape[3] // p)
        num_flow_steps = sum(not block.is_identity for block in self.transformer.blocks)
        self._begin_call(guidance_scale, num_flow_steps + num_inference_steps, callback_on_step_end, tensor_inputs)
        level = torch.tensor(noise_level, device=device)
        with self.progress_bar(total=self._num_flow_ticks(num_tokens) + num_inference_steps) as progress_bar:

            def on_denoising_step(i, t, x):
                progress_bar.update()
                return self._step_end(t, x)

            stop = lambda: self.interrupt  # noqa: E731
            self._onload(self.transformer)  # sampling runs the flow blocks, not the transformer's forward
            latents = sample_starflow(
                self.transformer,
                latents,
                prompt_embeds,
                negative_prompt_embeds,
                guidance_scale,
                scheduler=self.scheduler,
                callback=progress_per_token(progress_bar),
                stop=stop,
                block_callback=lambda k, x: self._step_end(level, x),
                **jacobi,
            )
            if not self.interrupt:
                latents = denoise_starflow(
                    self.transformer,
                    latents,
                    prompt_embeds,
                    noise_level,
                    num_inference_steps,
                    scheduler=self.scheduler,
                    callback=on_denoising_step,
                    stop=stop,
                )

        validation.check_finite_output(latents, "image latents")
        if output_type == "latent":
            images = latents
        else:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None) is not None:
                latents = latents + self.vae.config.shift_factor
            decoded = self.vae.decode(latents, return_dict=False)[0]
            validation.check_finite_output(decoded, "decoded pixels")
            images = postprocess_images(decoded, output_type, self.image_processor)
        return StarFlowPipelineOutput(images=images) if return_dict else (images,)

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""StarFlow2EditPipeline: instruction-based image editing with STARFlow2, one or several turns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import replace_example_docstring

from ..sampling import jacobi_options
from ..schedulers.scheduling_tarflow import GuidanceSpec
from ..utils import validation
from ..utils.chat import CHAT_TEMPLATE_RESERVE, check_prompt, model_context_length
from ..utils.sequence import VISION_END, TokenLayout, encode_conversation, encode_next_turn, special_id, user_message
from ..utils.validation import check_generator, check_guidance_scale, check_output_type
from .conversation import StarFlow2ConversationState
from .pipeline_starflow2 import StarFlow2BasePipeline, StarFlow2PipelineOutput
from .pipeline_utils import (
    ends_call,
    prepare_noise,
    resolve_callback_tensor_inputs,
    resolve_num_inference_steps,
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_starflow2.pipelines.pipeline_starflow2_edit import StarFlow2EditPipeline

        >>> pipe = StarFlow2EditPipeline.from_pretrained("path/to/starflow2")  # a saved StarFlow2Pipeline folder
        >>> out = pipe(Image.open("circle.png"), "make the circle blue", guidance_scale=2.0,
        ...            image_guidance_scale=1.5, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("blue_circle.png")
        >>> # a second turn of the same conversation: the first turn's caches are reused, nothing is re-encoded
        >>> out = pipe(prompt="now make it smaller", state=out.state, generator=torch.Generator().manual_seed(1))
        >>> out.images[0].save("small_blue_circle.png")
        ```
"""

ImageInput = Union[
    PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray], List[torch.Tensor]
]


# An edit conversation is a conversation like any other: the same state continues in either pipeline.
StarFlow2EditState = StarFlow2ConversationState


@dataclass
class StarFlow2EditPipelineOutput(StarFlow2PipelineOutput):
    """
    Args:
        images: as in :class:`StarFlow2PipelineOutput`.
        state: the :class:`StarFlow2EditState` to pass as ``state`` to continue the conversation (None when the
            call was interrupted).
    """

    state: Optional[StarFlow2EditState] = None


def _count_images(image) -> int:
    """How many images ``image`` holds (a list, or a batch array / tensor), before they are checked."""
    if isinstance(image, (list, tuple)):
        return len(image)
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return image.shape[0]
    return 1


def _broadcast(name: str, items: list, size: int) -> list:
    if len(items) not in (1, size):
        raise ValueError(f"`{name}` has {len(items)} entries; expected 1 or {size}")
    return items * size if len(items) == 1 else items


class StarFlow2EditPipeline(StarFlow2BasePipeline):
    r"""Instruction-based image editing with STARFlow2 (InstructPix2Pix-style guidance), with multi-turn editing.

    The source image is FAE-encoded (posterior mean), noised to the sampling noise level, mapped to intermediate
    latents ``x~`` by the shallow flows and placed as a latent span in a user turn ``<image> instruction``, rendered
    with the VLM's chat template and followed by the assistant header and ``<|vision_start|>``; the Pretzel then
    samples the edited image's latents left to right, the shallow flows are inverted, the sampling noise is removed
    by Tweedie denoising and the FAE decodes the latents.

    Guidance uses up to three branches stacked along the batch, ``[image+instruction; image+negative prompt;
    no image+negative prompt]``, combined by :meth:`TarFlowScheduler.guide_text_and_image`: ``guidance_scale`` is the
    text weight (0 = no text guidance) and ``image_guidance_scale`` the image weight (1 = no image guidance, which
    drops the third branch; with ``guidance_scale=0`` too only the conditional branch runs).

    Every output carries a :class:`StarFlow2EditState`; ``pipe(prompt=..., state=out.state)`` continues the same
    conversation with a new instruction (see the state for how the guidance branches continue).
    """

    _turn_image_spans = 2  # a first turn holds the source image and the edited one

    def first_turn_layout(self, text: str, with_image: bool) -> TokenLayout:
        """A user turn ``[<image>] text``, the assistant header and ``<|vision_start|>``."""
        message = user_message(None, text) if with_image else user_message(text)  # None: the image slot
        return encode_conversation(
            self.tokenizer, [message], self.transformer.num_latents, add_generation_prompt=True, open_image=True
        )

    def next_turn_layout(self, text: str) -> TokenLayout:
        """What follows an answer: ``<|im_end|>``, a user turn ``text``, the assistant header and
        ``<|vision_start|>``."""
        return encode_next_turn(self.tokenizer, [user_message(text)], self.transformer.num_latents, open_image=True)

    def encode_prompt(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Union[str, List[str], None] = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 256,
        do_image_guidance: bool = False,
        next_turn: bool = False,
    ) -> List[TokenLayout]:
        """Token layouts of the guidance branches, stacked: ``image+instruction`` (each prompt repeated
        ``num_images_per_prompt`` times), then ``image+negative`` with text or image guidance, then
        ``no image+negative`` with image guidance (the order of :class:`GuidanceSpec`).  First-turn layouts hold an
        image slot per image branch; ``next_turn`` layouts continue a conversation after its last image.  Texts
        longer than ``max_sequence_length`` tokens are truncated, with a warning naming what was cut."""
        prompts, negatives = self._prompt_texts(prompt, negative_prompt, max_sequence_length)
        negatives = _broadcast("negative_prompt", negatives, len(prompts))

        def turn(texts: List[str], with_image: bool) -> List[TokenLayout]:
            return [
                self.next_turn_layout(t) if next_turn else self.first_turn_layout(t, with_image)
                for t in texts
                for _ in range(num_images_per_prompt)
            ]

        layouts = turn(prompts, True)
        if do_classifier_free_guidance or do_image_guidance:
            layouts += turn(negatives, True)
        if do_image_guidance:
            layouts += turn(negatives, False)
        return layouts

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        image,
        guidance_scale: float,
        image_guidance_scale: float,
        num_images_per_prompt: int,
        output_type: str,
        max_sequence_length: int,
        noise_level: Optional[float],
        num_inference_steps: int,
        callback_on_step_end: Optional[Callable],
        callback_on_step_end_tensor_inputs: List[str],
        state: Optional[StarFlow2EditState] = None,
    ) -> Dict[str, Any]:
        """Validate the call; returns the checked values the call runs with: ``guidance`` (the
        :class:`GuidanceSpec`), ``noise_level`` (the state's when continuing one, else the given one or the
        scheduler's), ``num_inference_steps`` and ``tensor_inputs`` (the callback tensor names to pass).  Every
        guidance branch's text is checked by :meth:`check_prompts` (the negative prompt: one, or one per edited
        image), images by :meth:`preprocess_image`."""
        guidance = GuidanceSpec(
            check_guidance_scale(guidance_scale),
            check_guidance_scale(image_guidance_scale, "image_guidance_scale", minimum=1),  # 1 = no image guidance
        )
        check_output_type(output_type)
        validation.check_images_per_prompt(num_images_per_prompt)
        steps = self._check_inference_steps(num_inference_steps)
        if state is None:
            if image is None:
                raise ValueError("`image` is required (the image to edit) unless `state` continues a conversation")
            noise_level = self._check_noise_level(noise_level)
        else:
            self._check_edit_state(state, image, num_images_per_prompt, guidance.num_branches, max_sequence_length)
            if noise_level is not None and noise_level != state.noise_level:
                raise ValueError(
                    f"`noise_level` must be the conversation's {state.noise_level} when continuing "
                    f"a `state`; got {noise_level}"
                )
            noise_level = state.noise_level
        edits = state.batch_size if state is not None else max(_count_images(image), len(check_prompt(prompt)))
        self.check_prompts(prompt, negative_prompt, max_sequence_length, edits)
        tensor_inputs = resolve_callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        return dict(guidance=guidance, noise_level=noise_level, num_inference_steps=steps, tensor_inputs=tensor_inputs)

    def _check_edit_state(
        self, state, image, num_images_per_prompt: int, branches: int, max_sequence_length: int = 256
    ):
        if image is not None:
            raise ValueError("`image` must be None when `state` is given: the conversation already holds its image")
        self._check_state(state, branches)
        if num_images_per_prompt != 1:
            raise ValueError(
                f"`num_images_per_prompt` must be 1 when continuing a `state` (each conversation "
                f"continues with one image); got {num_images_per_prompt}"
            )
        if state.image_tokens is None:
            raise ValueError("`state` holds a conversation without an image: there is nothing to edit")
        # every turn grows the conversation: refuse the one that would run past the VLM's context
        used = state.num_positions
        context = model_context_length(self.vlm, self.tokenizer)
        needed = (
            used
            + validation.check_integer(max_sequence_length, "max_sequence_length", minimum=1)
            + state.num_latents
            + CHAT_TEMPLATE_RESERVE
        )
        if needed > context:
            raise ValueError(
                f"`state` holds a conversation of {used} positions; another turn of up to "
                f"max_sequence_length={max_sequence_length} tokens and an image of {state.num_latents} "
                f"latents needs {needed}, more than the model's context of {context}; lower "
                f"`max_sequence_length` or start a new conversation"
            )

    @ends_call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: Optional[ImageInput] = None,
        prompt: Union[str, List[str]] = None,
        negative_prompt: Union[str, List[str], None] = None,
        guidance_scale: float = 2.0,
        image_guidance_scale: float = 1.5,
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
        state: Optional[StarFlow2EditState] = None,
        jacobi_block_size: Optional[int] = None,
        jacobi_tolerance: float = 1e-3,
        jacobi_max_iterations: Optional[int] = None,
        **kwargs,
    ):
        r"""Edit images following instructions, or continue an edit conversation (``state``).

        Args:
            image: the source image(s): PIL, numpy ``(H, W, 3)``/``(B, H, W, 3)`` (uint8 or float in ``[0, 1]``),
                torch ``(3, H, W)``/``(B, 3, H, W)`` in ``[0, 1]`` or ``[-1, 1]``, or a list; resized to the model's
                image size.  One image is shared by all prompts, one prompt by all images.  Must be None with
                ``state``.
            prompt: the instruction or a list of instructions.
            negative_prompt: the text of the guidance branches without the instruction (default ``""``).
            guidance_scale: text guidance weight ``w_t`` (0 = no text guidance).
            image_guidance_scale: image guidance ``s_i >= 1`` (1 = no image guidance); see
                :meth:`TarFlowScheduler.guide_text_and_image`.
            num_images_per_prompt: images per (image, prompt) pair (must be 1 with ``state``).
            generator: a ``torch.Generator`` or one per generated image; it draws the source image's noise first,
                then the flow noise.
            latents: ``(B, N, C)`` standard-normal noise of the flow (replaces drawing it from ``generator``).
            noise_level: noise level of the source image and the flow sample (default
                ``scheduler.config.noise_level``; with ``state`` it must be the state's, the default).
            num_inference_steps: Tweedie denoising steps (default ``scheduler.config.num_denoising_steps``).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`StarFlow2EditPipelineOutput` instead of a tuple ``(images, state)``.
            callback_on_step_end: as in :class:`StarFlow2Pipeline`: once per flow block, then once per
                denoising step (``step`` counts both); ``pipe._interrupt = True`` stops the call (``state`` is then
                None).
            callback_on_step_end_tensor_inputs: tensors passed to the callback (``["latents"]``).
            max_sequence_length: maximum number of tokens of a prompt.
            state: the ``state`` of a previous output, to append a new turn ``prompt`` to that conversation and
                edit its last image, reusing its caches.
            jacobi_block_size, jacobi_tolerance, jacobi_max_iterations: as in :class:`StarFlow2Pipeline`.

        Examples:
        """
        num_inference_steps = resolve_num_inference_steps(
            num_inference_steps, kwargs, f"{type(self).__name__}.__call__"
        )
        validation.check_bool(return_dict, "return_dict")
        self._jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
        checked = self.check_inputs(
            prompt,
            negative_prompt,
            image,
            guidance_scale,
            image_guidance_scale,
            num_images_per_prompt,
            output_type,
            max_sequence_length,
            noise_level,
            num_inference_steps,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            state,
        )
        guidance, noise_level, steps = checked["guidance"], checked["noise_level"], checked["num_inference_steps"]
        do_guidance, do_image_guidance = guidance.num_branches > 1, "image" in guidance.branches
        transformer = self.transformer

        if state is None:
            images = self.preprocess_image(image)
            pairs = max(len(images), len(check_prompt(prompt)))
            prompts = _broadcast("prompt", check_prompt(prompt), pairs)
            if len(images) not in (1, pairs):
                raise ValueError(f"`image` has {len(images)} images for {pairs} prompts; expected 1 or {pairs}")
            batch_size = pairs * num_images_per_prompt
            validation.check_batch_size(batch_size)
            check_generator(generator, batch_size)
            images = images.expand(pairs, -1, -1, -1).repeat_interleave(num_images_per_prompt, dim=0)
            source = self.encode_image(images, noise_level, generator)
            layouts = self.encode_prompt(
                prompts, negative_prompt, do_guidance, num_images_per_prompt, max_sequence_length, do_image_guidance
            )
            cache = self._new_cache(len(layouts), noise_level)
            # the source image enters every branch but the unconditional one of image guidance
            with_image = guidance.image_branches(source_in_unconditional=True)
            self._run_text(cache, layouts, source.repeat(len(with_image), 1, 1))
        else:
            batch_size = state.batch_size
            prompts = _broadcast("prompt", check_prompt(prompt), batch_size)
            check_generator(generator, batch_size)
            layouts = self.encode_prompt(
                prompts, negative_prompt, do_guidance, 1, max_sequence_length, do_image_guidance, next_turn=True
            )
            cache = self._continue_conversation(state, guidance, layouts)

        noise = prepare_noise(
            (batch_size, transformer.num_latents, transformer.config.latent_channels),
            generator,
            self._execution_device,
            torch.float32,
            latents,
        )
        self._begin_call(guidance_scale, self.num_flow_steps + steps, callback_on_step_end, checked["tensor_inputs"])
        tokens, image_latents = self.generate_image(cache, noise, guidance, steps, noise_level=noise_level)
        new_state = None
        if not self.interrupt:  # an interrupted image is not in the caches as a whole: nothing to continue
            self._append_ids(cache, [special_id(self.tokenizer, VISION_END)])
            new_state = self._conversation_state(cache, batch_size, guidance.num_branches, noise_level, tokens)
        images = self.decode(image_latents, output_type)
        if not return_dict:
            return images, new_state
        return StarFlow2EditPipelineOutput(images=images, state=new_state)

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""StarFlow2InterleavedPipeline: interleaved text + image generation and image understanding in one causal pass.

Text tokens come from the LM head, images from the flow; both enter the KV caches as they are produced, so nothing
is ever re-encoded: every position of the sequence passes through each stream once per guidance branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput, replace_example_docstring
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..models.transformer_pretzel import PretzelCache
from ..sampling import jacobi_options
from ..schedulers.scheduling_tarflow import GuidanceSpec
from ..utils.sequence import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    TokenLayout,
    encode_conversation,
    special_id,
    user_message,
)
from .pipeline_starflow2 import StarFlow2BasePipeline
from .pipeline_utils import check_output_type, prepare_noise, resolve_callback_tensor_inputs

# In the input, this string means "generate an image here".
IMAGE_PLACEHOLDER = "<image>"

Segment = Union[str, PIL.Image.Image, np.ndarray, torch.Tensor]


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_starflow2 import StarFlow2InterleavedPipeline

        >>> pipe = StarFlow2InterleavedPipeline.from_pretrained("path/to/starflow2")  # a saved StarFlow2 folder
        >>> out = pipe(["Draw a red circle on the left.", "<image>"], max_new_tokens=16,
        ...            generator=torch.Generator().manual_seed(0))
        >>> out.segments  # [<PIL.Image>, "..."]
        >>> pipe([out.segments[0], "What color is the shape?"], max_new_tokens=4).text
        ```
"""


@dataclass
class StarFlow2InterleavedOutput(BaseOutput):
    """
    Args:
        segments: what was generated, in order: ``str`` pieces of text and images (of the requested
            ``output_type``: PIL image, ``(H, W, 3)`` numpy array, ``(3, H, W)`` tensor, or ``(C, h, w)`` latents).
    """

    segments: List[Segment]

    @property
    def text(self) -> str:
        """All generated text, images left out."""
        return "".join(s for s in self.segments if isinstance(s, str))

    @property
    def images(self) -> List[Segment]:
        return [s for s in self.segments if not isinstance(s, str)]


def _split_placeholders(parts: Sequence) -> List:
    out = []
    for part in parts:
        if isinstance(part, str):
            out += [p for p in re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", part) if p]
        else:
            out.append(part)
    return out


class StarFlow2InterleavedPipeline(StarFlow2BasePipeline):
    r"""Interleaved text and image generation, and image understanding, with STARFlow2.

    ``prompt`` is a string, a list of segments (strings and images), or chat messages
    (``[{"role": ..., "content": str | [{"type": "text", "text": ...} | {"type": "image", "image": img}]}]``).
    For strings and segments, everything before the first ``"<image>"`` is the user turn; the rest (starting with
    the first ``"<image>"``) is the beginning of the assistant's answer.  For chat messages, a final assistant
    message is that beginning.  In the answer, ``"<image>"`` means "generate an image here" and other parts are
    forced into the sequence.  Once the input is consumed, generation continues freely for up to
    ``max_new_tokens`` tokens (0 = stop after the input): text is sampled from the LM head and whenever the model
    emits ``<|vision_start|>`` an image is sampled (at most ``max_images`` images in all).

    Guidance applies to images only.  The unconditional branch is the conversation whose user turn is replaced by
    ``negative_prompt`` (default ``""``, no images); everything in the assistant's answer - forced parts, generated
    text and generated images - enters both branches, so an image generated late in an answer is guided by the
    user's request while both branches see the answer so far.

    Image understanding: ``pipe([image, "What color is the shape?"]).text``.
    """

    # -- input ---------------------------------------------------------------------------------------------------------

    def _parse(self, prompt) -> Tuple[List[dict], List[Any], List]:
        """``(conversation messages, images of the conversation in order, assistant parts)``."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"`prompt` must be a string, a list of segments or chat messages; got {prompt!r}")
        if all(isinstance(m, dict) and "role" in m for m in prompt):
            messages, images, answer = [], [], []
            for i, message in enumerate(prompt):
                content = message.get("content")
                items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
                parts = [item.get("image") if item.get("type") == "image" else item.get("text") for item in items]
                if message["role"] == "assistant" and i == len(prompt) - 1:
                    answer = _split_placeholders(parts)
                    continue
                if any(isinstance(p, str) and IMAGE_PLACEHOLDER in p for p in parts):
                    raise ValueError(f"`prompt`: {IMAGE_PLACEHOLDER!r} may only appear in the assistant's answer")
                images += [p for p in parts if not isinstance(p, str)]
                messages.append({"role": message["role"], "content": [
                    {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]})
            return messages, images, answer
        parts = _split_placeholders(prompt)
        first = next((i for i, p in enumerate(parts) if isinstance(p, str) and p == IMAGE_PLACEHOLDER), len(parts))
        user, answer = parts[:first], parts[first:]
        if not user:
            raise ValueError("`prompt` needs a user request before the first image placeholder")
        return [user_message(*user)], [p for p in user if not isinstance(p, str)], answer

    # -- generation core -----------------------------------------------------------------------------------------------

    def _append_ids(self, cache: PretzelCache, ids: List[int]) -> None:
        self._onload_pretzel()  # decoding an image onloads the FAE, which offloads the Pretzel
        input_ids = torch.tensor([ids] * cache.batch_size, device=self._execution_device)
        self.transformer.step(self.vlm_stream, cache, input_ids=input_ids)

    def _append_images(self, cache: PretzelCache, tokens: torch.Tensor) -> None:
        """Forced images: ``<|vision_start|>`` + latents + ``<|vision_end|>`` in every branch."""
        vs, ve = special_id(self.tokenizer, VISION_START), special_id(self.tokenizer, VISION_END)
        for x in tokens:  # (N, C)
            self._append_ids(cache, [vs])
            self.transformer.step(self.vlm_stream, cache, latents=x[None].repeat(cache.batch_size, 1, 1))
            self._append_ids(cache, [ve])

    def _next_token(self, cache: PretzelCache, generated: List[int], processors, banned: List[int],
                    generator: Optional[torch.Generator]) -> int:
        """Sample the next text token from the conditional branch: ``LM_head(h + W_t g)`` at the last position."""
        self._onload_pretzel()
        logits = self.transformer.text_logits(self.vlm_stream, cache.last_hidden[:1],
                                              cache.last_flow_hidden[:1])[:, -1].float()  # (1, V)
        logits[:, banned] = -float("inf")
        if processors is None:  # temperature 0: greedy
            return int(logits.argmax(-1))
        scores = processors(torch.tensor([generated], device=logits.device, dtype=torch.long), logits)
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=generator)[0, 0])

    @torch.no_grad()  # torch re-applies it at every resumption of the generator
    def _generate(self, prompt, negative_prompt: str, guidance_scale: float, max_new_tokens: int, max_images: int,
                  temperature: float, top_k: Optional[int], top_p: Optional[float], stop: Sequence[str],
                  generator, noise_level: float, num_denoising_steps: int, output_type: str,
                  callback_on_step_end, tensor_inputs) -> Iterator[Segment]:
        tokenizer, transformer = self.tokenizer, self.transformer
        messages, context_images, answer = self._parse(prompt)
        forced = sum(1 for p in answer if isinstance(p, str) and p == IMAGE_PLACEHOLDER)
        if forced > max_images:
            raise ValueError(f"`max_images` ({max_images}) is smaller than the {forced} images the prompt asks for")
        vs, ve, pad = (special_id(tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD))
        stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        N, C = transformer.num_latents, transformer.config.latent_channels

        guidance = GuidanceSpec(guidance_scale)
        layouts = self.encode_prompt(messages, negative_prompt, guidance.num_branches > 1)
        given = torch.cat([self.encode_image(self.preprocess_image(img, "prompt"), noise_level, generator)
                           for img in context_images]) if context_images else None
        cache = self._new_cache(len(layouts), noise_level)
        self._run_text(cache, layouts, given)

        made = 0

        def image() -> Segment:
            nonlocal made
            self._append_ids(cache, [vs])
            noise = prepare_noise((1, N, C), generator, self._execution_device)
            _, latents = self.generate_image(cache, noise, guidance, num_denoising_steps)
            if not self.interrupt:  # an interrupted span stays open: the answer ends with it
                self._append_ids(cache, [ve])
            made += 1
            return self.decode(latents, output_type)[0]

        self._begin_call(guidance_scale, N + num_denoising_steps, callback_on_step_end, tensor_inputs)
        for part in answer:
            if isinstance(part, str) and part == IMAGE_PLACEHOLDER:
                yield image()
                if self.interrupt:
                    self._end_call()
                    return
            elif isinstance(part, str):
                self._append_ids(cache, tokenizer(part, add_special_tokens=False)["input_ids"])
            else:
                self._append_images(cache, self.encode_image(self.preprocess_image(part, "prompt"), noise_level,
                                                             generator))

        processors = None
        if temperature > 0:
            processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
            if top_k:
                processors.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1:
                processors.append(TopPLogitsWarper(top_p))
        text_ids: List[int] = []
        all_ids: List[int] = []
        for _ in range(max_new_tokens):
            banned = [pad, ve] + ([vs] if made >= max_images else [])
            token = self._next_token(cache, all_ids, processors, banned, generator)
            all_ids.append(token)
            if token in stop_ids:
                break
            if token == vs:
                if text_ids:
                    yield tokenizer.decode(text_ids, skip_special_tokens=True)
                    text_ids = []
                yield image()  # appends <|vision_start|> itself
                if self.interrupt:
                    break
                continue
            self._append_ids(cache, [token])
            text_ids.append(token)
            text = tokenizer.decode(text_ids, skip_special_tokens=True)
            hit = min((text.find(s) for s in stop if s in text), default=-1)
            if hit >= 0:
                if text[:hit]:
                    yield text[:hit]
                text_ids = []
                break
        if text_ids:
            yield tokenizer.decode(text_ids, skip_special_tokens=True)
        self._end_call()

    # -- public API ----------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: List[dict], negative_prompt: Optional[str] = None,
                      do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1) -> List[TokenLayout]:
        """Token layouts of the conversation ``prompt`` (chat messages, images as slots) and, for guidance, of the
        unconditional branch (a user turn ``negative_prompt``, default ``""``), each ending with the assistant
        header.  One conversation makes one answer, so ``num_images_per_prompt`` must be 1."""
        if num_images_per_prompt != 1:
            raise ValueError(f"`num_images_per_prompt` must be 1 (one conversation, one answer); got "
                             f"{num_images_per_prompt}")
        N = self.transformer.num_latents
        layouts = [encode_conversation(self.tokenizer, prompt, N, add_generation_prompt=True)]
        if do_classifier_free_guidance:
            negative = [{"role": "user", "content": negative_prompt or ""}]
            layouts.append(encode_conversation(self.tokenizer, negative, N, add_generation_prompt=True))
        return layouts

    def check_inputs(self, prompt, negative_prompt, guidance_scale: float, max_new_tokens: int, max_images: int,
                     temperature: float, output_type: str, noise_level: float, num_denoising_steps: int,
                     callback_on_step_end: Optional[Callable], callback_on_step_end_tensor_inputs: Sequence[str],
                     generator=None) -> List[str]:
        """Validate the call; returns the callback tensor names to pass.  ``prompt`` is checked as it is parsed."""
        GuidanceSpec(guidance_scale)  # checks the scale
        check_output_type(output_type)
        if max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be >= 0; got {max_new_tokens}")
        if max_images < 0:
            raise ValueError(f"`max_images` must be >= 0; got {max_images}")
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0; got {temperature}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"`negative_prompt` must be a string; got {type(negative_prompt).__name__}")
        if isinstance(generator, list) and len(generator) != 1:
            raise ValueError(f"`generator` must be one generator (the pipeline makes one conversation); got "
                             f"{len(generator)}")
        self._check_noise_level(noise_level)
        self._check_denoising_steps(num_denoising_steps)
        return resolve_callback_tensor_inputs(callback_on_step_end, list(callback_on_step_end_tensor_inputs),
                                              self._callback_tensor_inputs)

    def _checked_generate(self, prompt, negative_prompt=None, guidance_scale: float = 2.0,
                          max_new_tokens: int = 64, max_images: int = 4, temperature: float = 0.0,
                          top_k: Optional[int] = None, top_p: Optional[float] = None,
                          stop: Union[str, Sequence[str], None] = None, generator=None,
                          noise_level: Optional[float] = None, num_denoising_steps: Optional[int] = None,
                          output_type: str = "pil", callback_on_step_end=None,
                          callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                          jacobi_block_size: Optional[int] = None, jacobi_tolerance: float = 1e-3,
                          jacobi_max_iterations: Optional[int] = None) -> Iterator[Segment]:
        self._jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
        noise_level = self._check_noise_level(noise_level)
        steps = self._check_denoising_steps(num_denoising_steps)
        tensor_inputs = self.check_inputs(prompt, negative_prompt, guidance_scale, max_new_tokens, max_images,
                                          temperature, output_type, noise_level, steps, callback_on_step_end,
                                          callback_on_step_end_tensor_inputs, generator)
        generator = generator[0] if isinstance(generator, list) else generator
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        return self._generate(prompt, negative_prompt or "", guidance_scale, max_new_tokens, max_images,
                              temperature, top_k, top_p, stop, generator, noise_level, steps, output_type,
                              callback_on_step_end, tensor_inputs)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(self, prompt, negative_prompt: Optional[str] = None, guidance_scale: float = 2.0,
                 max_new_tokens: int = 64, max_images: int = 4, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 stop: Union[str, Sequence[str], None] = None,
                 generator: Union[torch.Generator, List[torch.Generator], None] = None,
                 noise_level: Optional[float] = None, num_denoising_steps: Optional[int] = None,
                 output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Optional[Callable[[Any, int, Any, Dict], Dict]] = None,
                 callback_on_step_end_tensor_inputs: List[str] = ["latents"],
                 callback_on_segment: Optional[Callable[[Segment], None]] = None,
                 jacobi_block_size: Optional[int] = None, jacobi_tolerance: float = 1e-3,
                 jacobi_max_iterations: Optional[int] = None):
        r"""Generate interleaved text and images.

        Args:
            prompt: a string, a list of segments (``str`` / images) or chat messages; ``"<image>"`` marks an image
                to generate (see the class docstring).
            negative_prompt: user turn of the unconditional branch of image guidance (default ``""``).
            guidance_scale: image guidance weight (0 = conditional only).
            max_new_tokens: tokens generated freely after the input (0 = stop after the input).
            max_images: maximum number of images in the answer.
            temperature: text sampling temperature (0 = greedy); ``top_k``, ``top_p``: the usual filters.
            stop: string(s) that end text generation (not included in the output).
            generator: one ``torch.Generator`` for image noise and text sampling.
            noise_level, num_denoising_steps, output_type, callback_on_step_end,
                callback_on_step_end_tensor_inputs: as in :class:`StarFlow2Pipeline` (the callback's step counts
                latent positions and denoising steps across all images of the answer; an interruption ends the
                answer with the image being made).
            callback_on_segment: called with each segment as soon as it is complete (streaming).
            jacobi_block_size, jacobi_tolerance, jacobi_max_iterations: as in :class:`StarFlow2Pipeline`, for every
                image of the answer.
            return_dict: return a :class:`StarFlow2InterleavedOutput` instead of a tuple.

        Examples:
        """
        segments = []
        for segment in self._checked_generate(prompt, negative_prompt, guidance_scale, max_new_tokens, max_images,
                                              temperature, top_k, top_p, stop, generator, noise_level,
                                              num_denoising_steps, output_type, callback_on_step_end,
                                              callback_on_step_end_tensor_inputs, jacobi_block_size,
                                              jacobi_tolerance, jacobi_max_iterations):
            segments.append(segment)
            if callback_on_segment is not None:
                callback_on_segment(segment)
        if not return_dict:
            return (segments,)
        return StarFlow2InterleavedOutput(segments=segments)

    def stream(self, prompt, **kwargs) -> Iterator[Segment]:
        """Like ``__call__`` but yields each segment as soon as it is complete."""
        yield from self._checked_generate(prompt, **kwargs)

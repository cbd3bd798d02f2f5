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
from ..utils import validation
from ..utils.sequence import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    TokenLayout,
    encode_conversation,
    encode_next_turn,
    special_id,
    user_message,
)
from .pipeline_starflow2 import StarFlow2BasePipeline, StarFlow2ConversationState
from .pipeline_utils import check_guidance_scale, check_output_type, prepare_noise, resolve_callback_tensor_inputs

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

        >>> # a conversation: each turn continues the caches of the previous one, nothing is re-encoded
        >>> out = pipe(["draw a red circle", "<image>"], max_new_tokens=0, image_guidance_scale=1.5)
        >>> out = pipe(["make it blue", "<image>"], state=out.state, max_new_tokens=0, image_guidance_scale=1.5)
        >>> out.state.num_positions, out.state.nbytes  # the conversation held, and its memory
        ```
"""


@dataclass
class StarFlow2InterleavedOutput(BaseOutput):
    """
    Args:
        segments: what was generated, in order: ``str`` pieces of text and images (of the requested
            ``output_type``: PIL image, ``(H, W, 3)`` numpy array, ``(3, H, W)`` tensor, or ``(C, h, w)`` latents).
        state: the :class:`StarFlow2ConversationState` to pass as ``state`` to continue the conversation with the
            next user turn (None when the call was interrupted).
    """

    segments: List[Segment]
    state: Optional[StarFlow2ConversationState] = None

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


def _text_processors(temperature: float, top_k: Optional[int], top_p: Optional[float]):
    """The logits warpers of text sampling; None for greedy decoding (temperature 0)."""
    if temperature == 0:
        return None
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def _until_stop(text: str, stop: Sequence[str]) -> Optional[str]:
    """``text`` up to the first stop string, or None when it holds none."""
    hit = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:hit] if hit >= 0 else None


def is_batch(prompt) -> bool:
    """A list of conversations (each a list of segments or of chat messages), not one conversation."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(c, (list, tuple)) for c in prompt)


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
    user's request while both branches see the answer so far.  With ``image_guidance_scale > 1`` a third branch
    keeps the user turn's images but not its text, and images are sampled with the three-branch text+image
    guidance of :class:`StarFlow2EditPipeline` (the same branches, the same rule).

    Conversations: every output carries a ``state``; ``pipe(next_turn, state=out.state)`` appends the next user turn
    and its answer to that conversation's caches, so only the new positions run (see
    :class:`StarFlow2ConversationState` for how the guidance branches continue).  A user turn that asks to change an
    image of the conversation ("make it blue") is an edit: with ``image_guidance_scale > 1`` in the conversation its
    answer is sampled exactly as :class:`StarFlow2EditPipeline` samples a later editing turn.

    Image understanding: ``pipe([image, "What color is the shape?"]).text``.
    """

    # -- input ---------------------------------------------------------------------------------------------------------

    def _parse(self, prompt) -> Tuple[List[dict], List[Any], List]:
        """``(conversation messages, images of the conversation in order, assistant parts)``."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(
                f"`prompt` must be a string, a list of segments or chat messages; got {type(prompt).__name__}"
            )
        if validation.is_chat(prompt):
            messages, images, answer = [], [], []
            for i, message in enumerate(validation.check_messages(prompt)):
                content = message.get("content")
                items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
                parts = [item.get("image") if item.get("type") == "image" else item.get("text") for item in items]
                if message["role"] == "assistant" and i == len(prompt) - 1:
                    answer = _split_placeholders(parts)
                    continue
                if any(isinstance(p, str) and IMAGE_PLACEHOLDER in p for p in parts):
                    raise ValueError(f"`prompt`: {IMAGE_PLACEHOLDER!r} may only appear in the assistant's answer")
                images += [p for p in parts if not isinstance(p, str)]
                messages.append(
                    {
                        "role": message["role"],
                        "content": [
                            {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts
                        ],
                    }
                )
            return messages, images, answer
        for i, part in enumerate(prompt):
            if not isinstance(part, (str, PIL.Image.Image, np.ndarray, torch.Tensor)):
                raise ValueError(
                    f"`prompt` item {i} must be a string or an image (PIL, numpy array, torch tensor); a "
                    f"list of chat messages must hold only dicts; got {type(part).__name__}"
                )
        parts = _split_placeholders(prompt)
        first = next((i for i, p in enumerate(parts) if isinstance(p, str) and p == IMAGE_PLACEHOLDER), len(parts))
        user, answer = parts[:first], parts[first:]
        if all(isinstance(p, str) and not p.strip() for p in user):
            raise ValueError("`prompt` needs a user request (text or an image) before the first image placeholder")
        return [user_message(*user)], [p for p in user if not isinstance(p, str)], answer

    # -- generation core -----------------------------------------------------------------------------------------------

    def _append_images(self, cache: PretzelCache, tokens: torch.Tensor) -> None:
        """Forced images ``(M, N, C)``: ``<|vision_start|>`` + latents + ``<|vision_end|>`` in every branch."""
        vs, ve = special_id(self.tokenizer, VISION_START), special_id(self.tokenizer, VISION_END)
        for x in tokens:  # (N, C)
            self._append_ids(cache, [vs])
            self.transformer.step(self.vlm_stream, cache, latents=x[None].repeat(cache.batch_size, 1, 1))
            self._append_ids(cache, [ve])

    def _next_token(
        self,
        cache: PretzelCache,
        generated: List[int],
        processors,
        banned: List[int],
        generator: Optional[torch.Generator],
        row: int = 0,
    ) -> int:
        """Sample the next text token of conversation ``row`` from its conditional branch: ``LM_head(h + W_t g)`` at
        the last position."""
        self._onload_pretzel()
        logits = self.transformer.text_logits(
            self.vlm_stream, cache.last_hidden[row : row + 1], cache.last_flow_hidden[row : row + 1]
        )[:, -1].float()  # (1, V)
        validation.check_finite_output(logits, "text logits")
        logits[:, banned] = -float("inf")
        if processors is None:  # temperature 0: greedy
            return int(logits.argmax(-1))
        scores = processors(torch.tensor([generated], device=logits.device, dtype=torch.long), logits)
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=generator)[0, 0])

    @torch.no_grad()  # torch re-applies it at every resumption of the generator
    def _generate(
        self,
        prompt,
        negative_prompt: str,
        guidance: GuidanceSpec,
        max_new_tokens: int,
        max_images: int,
        temperature: float,
        top_k: Optional[int],
        top_p: Optional[float],
        stop: Sequence[str],
        generator,
        noise_level: float,
        num_denoising_steps: int,
        output_type: str,
        callback_on_step_end,
        tensor_inputs,
        state: Optional[StarFlow2ConversationState] = None,
        result: Optional[dict] = None,
    ) -> Iterator[Segment]:
        """Yield the answer's segments; at the end ``result["state"]`` is the conversation's new state (None when
        interrupted)."""
        tokenizer, transformer = self.tokenizer, self.transformer
        messages, context_images, answer = self._parse(prompt)
        forced = sum(1 for p in answer if isinstance(p, str) and p == IMAGE_PLACEHOLDER)
        if forced > max_images:
            raise ValueError(f"`max_images` ({max_images}) is smaller than the {forced} images the prompt asks for")
        vs, ve, pad = (special_id(tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD))
        stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        N, C = transformer.num_latents, transformer.config.latent_channels

        branches = guidance.num_branches
        layouts = self.encode_prompt(messages, negative_prompt, branches > 1, 1, branches == 3, state is not None)
        given = (
            torch.cat(
                [
                    self.encode_image(self.preprocess_image(img, "prompt"), noise_level, generator)
                    for img in context_images
                ]
            )
            if context_images
            else None
        )
        if given is not None and branches == 3:  # the image branch holds the user turn's images too
            given = given.repeat(2, 1, 1)
        if state is None:
            cache = self._new_cache(len(layouts), noise_level)
            self._run_text(cache, layouts, given)
        else:
            cache = self._continue_conversation(state, branches, layouts, given)
        last_image = state.image_tokens if state is not None else None  # x~ of the conversation's latest image

        made = 0

        def image() -> Segment:
            nonlocal made, last_image
            self._append_ids(cache, [vs])
            noise = prepare_noise((1, N, C), generator, self._execution_device)
            last_image, latents = self.generate_image(cache, noise, guidance, num_denoising_steps)
            if not self.interrupt:  # an interrupted span stays open: the answer ends with it
                self._append_ids(cache, [ve])
            made += 1
            return self.decode(latents, output_type)[0]

        self._begin_call(guidance.guidance_scale, N + num_denoising_steps, callback_on_step_end, tensor_inputs)
        for part in answer:
            if isinstance(part, str) and part == IMAGE_PLACEHOLDER:
                yield image()
                if self.interrupt:
                    self._end_call()
                    return
            elif isinstance(part, str):
                self._append_ids(cache, tokenizer(part, add_special_tokens=False)["input_ids"])
            else:
                forced = self.encode_image(self.preprocess_image(part, "prompt"), noise_level, generator)
                self._append_images(cache, forced)
                last_image = forced[-1:]

        processors = _text_processors(temperature, top_k, top_p)
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
            text = _until_stop(tokenizer.decode(text_ids, skip_special_tokens=True), stop)
            if text is not None:
                if text:
                    yield text
                text_ids = []
                break
        if text_ids:
            yield tokenizer.decode(text_ids, skip_special_tokens=True)
        if result is not None and not self.interrupt:
            result["state"] = self._conversation_state(cache, 1, branches, noise_level, last_image)
        self._end_call()

    @torch.no_grad()
    def _generate_batch(
        self,
        prompts: List,
        negative_prompt: str,
        guidance: GuidanceSpec,
        max_new_tokens: int,
        temperature: float,
        top_k: Optional[int],
        top_p: Optional[float],
        stop: Sequence[str],
        generator,
        noise_level: float,
        num_denoising_steps: int,
        output_type: str,
    ) -> List[StarFlow2InterleavedOutput]:
        """Conversations run as one batch, each as it would run alone.

        The prompts are left-padded; the answers advance in lockstep: forced text between images is pushed as one
        left-padded step, every conversation's next image is sampled together (the answers must ask for the same
        number of images), and free text follows, a conversation that has stopped taking padding positions that no
        later position sees.  Images are made only where asked (``<|vision_start|>`` is not sampled freely).
        """
        tokenizer, transformer = self.tokenizer, self.transformer
        B, branches = len(prompts), guidance.num_branches
        parsed = [self._parse(p) for p in prompts]
        plans = []  # per conversation: forced text before each image, then after the last one
        for _, _, answer in parsed:
            if any(not isinstance(p, str) for p in answer):
                raise ValueError(
                    "`prompt`: images in the answers of batched conversations must be generated "
                    f"({IMAGE_PLACEHOLDER!r}); put given images in the user turns"
                )
            plans.append("".join(answer).split(IMAGE_PLACEHOLDER))
        if len({len(plan) for plan in plans}) > 1:
            raise ValueError(
                f"`prompt`: batched conversations must ask for the same number of images; they ask for "
                f"{[len(plan) - 1 for plan in plans]} (run them separately)"
            )
        vs, ve, pad = (special_id(tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD))
        stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        N, C = transformer.num_latents, transformer.config.latent_channels
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * B

        per_conversation = [
            self.encode_prompt(messages, negative_prompt, branches > 1, 1, branches == 3) for messages, _, _ in parsed
        ]
        layouts = [per_conversation[i][b] for b in range(branches) for i in range(B)]  # branch-major
        given = [
            torch.cat(
                [self.encode_image(self.preprocess_image(img, "prompt"), noise_level, generators[i]) for img in images]
            )
            if images
            else None
            for i, (_, images, _) in enumerate(parsed)
        ]
        rows = [
            given[i]
            for b in range(min(branches, 2))
            for i in range(B)
            if given[i] is not None and (b == 0 or branches == 3)
        ]  # the conditional and image branches hold the user's images
        cache = self._new_cache(len(layouts), noise_level)
        self._run_text(cache, layouts, torch.cat(rows) if rows else None)

        def push(ids: List[List[int]]) -> None:
            """One left-padded step of each conversation's ``ids`` in every branch (no step if all are empty)."""
            if not any(ids):
                return
            idle = torch.tensor([not ids[i] for _ in range(branches) for i in range(B)], device=cache.cond.device)
            last = cache.last_hidden, cache.last_flow_hidden
            self._run_text(
                cache, [TokenLayout(ids[i], [False] * len(ids[i])) for _ in range(branches) for i in range(B)]
            )
            # a conversation that took only padding still ends where it was
            cache.last_hidden = torch.where(idle[:, None, None], last[0], cache.last_hidden)
            cache.last_flow_hidden = torch.where(idle[:, None, None], last[1], cache.last_flow_hidden)

        segments, last_image = [[] for _ in range(B)], None
        self._begin_call(guidance.guidance_scale, N + num_denoising_steps, None, [])
        for k, text in enumerate(zip(*plans)):
            push([tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in text])
            if k == len(plans[0]) - 1:
                break
            self._append_ids(cache, [vs])
            noise = prepare_noise((B, N, C), generator, self._execution_device)
            last_image, latents = self.generate_image(cache, noise, guidance, num_denoising_steps)
            self._append_ids(cache, [ve])
            for i, image in enumerate(self.decode(latents, output_type)):
                segments[i].append(image)

        processors = _text_processors(temperature, top_k, top_p)
        generated, text_ids, done = [[] for _ in range(B)], [[] for _ in range(B)], [False] * B
        for _ in range(max_new_tokens):
            step = []
            for i in range(B):
                token = None
                if not done[i]:
                    token = self._next_token(cache, generated[i], processors, [pad, ve, vs], generators[i], row=i)
                    generated[i].append(token)
                    done[i] = token in stop_ids
                step.append([token] if token is not None and not done[i] else [])
                if step[i]:
                    text_ids[i].append(token)
                    cut = _until_stop(tokenizer.decode(text_ids[i], skip_special_tokens=True), stop)
                    if cut is not None:
                        done[i] = True
            if all(not ids for ids in step):
                break
            push(step)
            if all(done):
                break
        for i in range(B):
            text = tokenizer.decode(text_ids[i], skip_special_tokens=True)
            text = _until_stop(text, stop) if _until_stop(text, stop) is not None else text
            if text:
                segments[i].append(text)
        self._end_call()

        outputs = []
        for i in range(B):
            own = cache.fork(cache.snapshot())
            own.select(torch.tensor([b * B + i for b in range(branches)], device=cache.cond.device))
            image_tokens = last_image[i : i + 1] if last_image is not None else None
            outputs.append(
                StarFlow2InterleavedOutput(
                    segments=segments[i], state=self._conversation_state(own, 1, branches, noise_level, image_tokens)
                )
            )
        return outputs

    # -- public API ----------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: List[dict],
        negative_prompt: Optional[str] = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        do_image_guidance: bool = False,
        next_turn: bool = False,
    ) -> List[TokenLayout]:
        """Token layouts of the guidance branches, each ending with the assistant header: the conversation
        ``prompt`` (chat messages, images as slots); with image guidance the image branch, a user turn of the
        images of ``prompt`` and ``negative_prompt``; with any guidance the unconditional branch, a user turn
        ``negative_prompt`` (default ``""``).  ``next_turn`` layouts continue a conversation after its last answer.
        One conversation makes one answer, so ``num_images_per_prompt`` must be 1."""
        if num_images_per_prompt != 1:
            raise ValueError(
                f"`num_images_per_prompt` must be 1 (one conversation, one answer); got {num_images_per_prompt}"
            )
        N = self.transformer.num_latents

        def layout(messages: List[dict]) -> TokenLayout:
            if next_turn:
                return encode_next_turn(self.tokenizer, messages, N)
            return encode_conversation(self.tokenizer, messages, N, add_generation_prompt=True)

        layouts = [layout(prompt)]
        negative = negative_prompt or ""
        if do_image_guidance:
            slots = [item for m in prompt for item in m["content"] if item["type"] == "image"]
            layouts.append(layout([{"role": "user", "content": slots + [{"type": "text", "text": negative}]}]))
        if do_classifier_free_guidance or do_image_guidance:
            layouts.append(layout([{"role": "user", "content": negative}]))
        return layouts

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        guidance_scale: float,
        max_new_tokens: int,
        max_images: int,
        temperature: float,
        top_k: Optional[int],
        top_p: Optional[float],
        stop,
        output_type: str,
        noise_level: float,
        num_denoising_steps: int,
        callback_on_step_end: Optional[Callable],
        callback_on_step_end_tensor_inputs: Sequence[str],
        generator=None,
        image_guidance_scale: float = 1.0,
        state: Optional[StarFlow2ConversationState] = None,
    ) -> Dict[str, Any]:
        """Validate the call, the whole prompt included (texts and their special tokens, images, and the context
        budget of the conversation held by ``state`` + prompt + answer) before anything runs.  Returns the checked
        values: the numbers as Python numbers, ``guidance`` the :class:`GuidanceSpec`, ``stop`` as a list,
        ``generator`` as one generator, ``tensor_inputs`` the callback tensor names to pass."""
        checked = dict(
            guidance=GuidanceSpec(
                check_guidance_scale(guidance_scale),
                check_guidance_scale(image_guidance_scale, "image_guidance_scale", minimum=1),
            )
        )  # 1 = no image guidance
        check_output_type(output_type)
        tokenizer, num_latents = self.tokenizer, self.transformer.num_latents
        context = validation.model_context_length(self.vlm, tokenizer)
        image_positions = num_latents + 2  # <|vision_start|>, the latents, <|vision_end|>
        checked["max_new_tokens"] = validation.check_integer(
            max_new_tokens, "max_new_tokens", minimum=0, maximum=context
        )
        checked["max_images"] = validation.check_integer(
            max_images, "max_images", minimum=0, maximum=context // image_positions
        )
        checked["temperature"] = validation.check_number(temperature, "temperature", minimum=0)
        # top_k 0 = off, as in transformers
        checked["top_k"] = validation.check_integer(top_k, "top_k", minimum=0, allow_none=True)
        checked["top_p"] = validation.check_number(
            top_p, "top_p", minimum=0, maximum=1, exclusive_minimum=True, allow_none=True
        )
        checked["stop"] = validation.check_stop(stop)
        if negative_prompt is not None:
            validation.check_text(negative_prompt, "negative_prompt", tokenizer, allow_empty=True)
        validation.check_generator(generator, 1)
        # the pipeline makes one conversation
        checked["generator"] = generator[0] if isinstance(generator, (list, tuple)) else generator
        self._check_noise_level(noise_level)
        self._check_denoising_steps(num_denoising_steps)
        held = 0
        if state is not None:
            self._check_state(state, checked["guidance"].num_branches)
            if state.batch_size != 1:
                raise ValueError(
                    f"`state` holds {state.batch_size} conversations per branch; this pipeline "
                    f"continues one conversation per state"
                )
            if noise_level != state.noise_level:
                raise ValueError(
                    f"`noise_level` must be the conversation's {state.noise_level} when continuing "
                    f"a `state`; got {noise_level}"
                )
            held = state.num_positions
        messages, images, answer = self._parse(prompt)
        prompt_positions = validation.check_conversation(
            messages, images, answer, IMAGE_PLACEHOLDER, tokenizer, image_positions
        )
        validation.check_context_budget(
            prompt_positions, checked["max_new_tokens"], checked["max_images"], image_positions, context, held
        )
        checked["tensor_inputs"] = resolve_callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        return checked

    def _checked_generate(
        self,
        prompt,
        negative_prompt=None,
        guidance_scale: float = 2.0,
        image_guidance_scale: float = 1.0,
        state: Optional[StarFlow2ConversationState] = None,
        result: Optional[dict] = None,
        max_new_tokens: int = 64,
        max_images: int = 4,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop: Union[str, Sequence[str], None] = None,
        generator=None,
        noise_level: Optional[float] = None,
        num_denoising_steps: Optional[int] = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        jacobi_block_size: Optional[int] = None,
        jacobi_tolerance: float = 1e-3,
        jacobi_max_iterations: Optional[int] = None,
    ) -> Iterator[Segment]:
        self._jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
        # a continued conversation samples at its own noise level
        noise_level = self._check_noise_level(
            state.noise_level if isinstance(state, StarFlow2ConversationState) and noise_level is None else noise_level
        )
        steps = self._check_denoising_steps(num_denoising_steps)
        checked = self.check_inputs(
            prompt,
            negative_prompt,
            guidance_scale,
            max_new_tokens,
            max_images,
            temperature,
            top_k,
            top_p,
            stop,
            output_type,
            noise_level,
            steps,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            generator,
            image_guidance_scale,
            state,
        )
        return self._generate(
            prompt,
            negative_prompt or "",
            checked["guidance"],
            checked["max_new_tokens"],
            checked["max_images"],
            checked["temperature"],
            checked["top_k"],
            checked["top_p"],
            checked["stop"],
            checked["generator"],
            noise_level,
            steps,
            output_type,
            callback_on_step_end,
            checked["tensor_inputs"],
            state,
            result,
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt,
        negative_prompt: Optional[str] = None,
        guidance_scale: float = 2.0,
        max_new_tokens: int = 64,
        max_images: int = 4,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop: Union[str, Sequence[str], None] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        noise_level: Optional[float] = None,
        num_denoising_steps: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[[Any, int, Any, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        callback_on_segment: Optional[Callable[[Segment], None]] = None,
        image_guidance_scale: float = 1.0,
        state: Optional[StarFlow2ConversationState] = None,
        jacobi_block_size: Optional[int] = None,
        jacobi_tolerance: float = 1e-3,
        jacobi_max_iterations: Optional[int] = None,
    ):
        r"""Generate interleaved text and images.

        Args:
            prompt: a string, a list of segments (``str`` / images) or chat messages; ``"<image>"`` marks an image
                to generate (see the class docstring).  A list of such conversations (each a list) runs as one
                batch and returns a list of outputs, each equal to running its conversation alone; their answers
                must ask for the same number of images, and images come only where asked.
            negative_prompt: user turn of the unconditional branch of image guidance (default ``""``).
            guidance_scale: image guidance weight (0 = conditional only).
            image_guidance_scale: weight ``s_i >= 1`` of the user turn's images against the unconditional branch
                (1 = off); with it images are sampled with :meth:`TarFlowScheduler.guide_text_and_image`, as
                :class:`StarFlow2EditPipeline` samples them.
            max_new_tokens: tokens generated freely after the input (0 = stop after the input).
            max_images: maximum number of images in the answer.
            temperature: text sampling temperature (0 = greedy); ``top_k``, ``top_p``: the usual filters.
            stop: string(s) that end text generation (not included in the output).
            generator: one ``torch.Generator`` for image noise and text sampling (for a batch, one per
                conversation, or one shared).
            noise_level, num_denoising_steps, output_type, callback_on_step_end,
                callback_on_step_end_tensor_inputs: as in :class:`StarFlow2Pipeline` (the callback's step counts
                latent positions and denoising steps across all images of the answer; an interruption ends the
                answer with the image being made).
            callback_on_segment: called with each segment as soon as it is complete (streaming).
            jacobi_block_size, jacobi_tolerance, jacobi_max_iterations: as in :class:`StarFlow2Pipeline`, for every
                image of the answer.
            return_dict: return a :class:`StarFlow2InterleavedOutput` instead of a tuple ``(segments, state)``.
            state: the ``state`` of a previous output: ``prompt`` is then the next user turn (and the beginning of
                its answer) of that conversation, whose caches are reused (forked: the state is not modified).  The
                guidance of a later turn may use fewer branches than the first turn's, not more; ``noise_level``
                is the conversation's.

        Examples:
        """
        validation.check_callable(callback_on_segment, "callback_on_segment")
        validation.check_bool(return_dict, "return_dict")
        if is_batch(prompt):
            self._jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
            outputs = self._checked_batch(
                prompt,
                negative_prompt,
                guidance_scale,
                image_guidance_scale,
                state,
                max_new_tokens,
                max_images,
                temperature,
                top_k,
                top_p,
                stop,
                generator,
                noise_level,
                num_denoising_steps,
                output_type,
                callback_on_step_end,
                callback_on_segment,
            )
            return outputs if return_dict else [(o.segments, o.state) for o in outputs]
        segments, result = [], {}
        for segment in self._checked_generate(
            prompt,
            negative_prompt,
            guidance_scale,
            image_guidance_scale,
            state,
            result,
            max_new_tokens,
            max_images,
            temperature,
            top_k,
            top_p,
            stop,
            generator,
            noise_level,
            num_denoising_steps,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            jacobi_block_size,
            jacobi_tolerance,
            jacobi_max_iterations,
        ):
            segments.append(segment)
            if callback_on_segment is not None:
                callback_on_segment(segment)
        if not return_dict:
            return segments, result.get("state")
        return StarFlow2InterleavedOutput(segments=segments, state=result.get("state"))

    def _checked_batch(
        self,
        prompts,
        negative_prompt,
        guidance_scale,
        image_guidance_scale,
        state,
        max_new_tokens,
        max_images,
        temperature,
        top_k,
        top_p,
        stop,
        generator,
        noise_level,
        num_denoising_steps,
        output_type,
        callback_on_step_end,
        callback_on_segment,
    ) -> List[StarFlow2InterleavedOutput]:
        """Validate every conversation of a batch as the call would validate it alone, then run them together."""
        for value, name in (
            (state, "state"),
            (callback_on_step_end, "callback_on_step_end"),
            (callback_on_segment, "callback_on_segment"),
        ):
            if value is not None:
                raise ValueError(
                    f"`{name}` must be None when `prompt` is a list of conversations (a batch); got "
                    f"{type(value).__name__}: run the conversations one by one to use it"
                )
        validation.check_generator(generator, len(prompts))
        noise_level = self._check_noise_level(noise_level)
        steps = self._check_denoising_steps(num_denoising_steps)
        for i, prompt in enumerate(prompts):
            own = generator[i] if isinstance(generator, (list, tuple)) else generator
            checked = self.check_inputs(
                prompt,
                negative_prompt,
                guidance_scale,
                max_new_tokens,
                max_images,
                temperature,
                top_k,
                top_p,
                stop,
                output_type,
                noise_level,
                steps,
                None,
                ["latents"],
                own,
                image_guidance_scale,
            )
        return self._generate_batch(
            list(prompts),
            negative_prompt or "",
            checked["guidance"],
            checked["max_new_tokens"],
            checked["temperature"],
            checked["top_k"],
            checked["top_p"],
            checked["stop"],
            generator,
            noise_level,
            steps,
            output_type,
        )

    def stream(self, prompt, **kwargs) -> Iterator[Segment]:
        """Like ``__call__`` but yields each segment as soon as it is complete; bad input raises at the call.  (To
        continue the conversation afterwards, call the pipeline with ``callback_on_segment``: its output carries
        the ``state``.)"""
        return self._checked_generate(prompt, **kwargs)

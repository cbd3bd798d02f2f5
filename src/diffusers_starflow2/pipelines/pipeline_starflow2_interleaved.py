# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""StarFlow2InterleavedPipeline: interleaved text + image generation and image understanding in one causal pass.

Text tokens come from the LM head, images from the flow; both enter the KV caches as they are produced, so nothing
is ever re-encoded: every position of the sequence passes through each stream once per guidance branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput, replace_example_docstring
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..models.cache_utils import PretzelCache
from ..sampling import jacobi_options
from ..schedulers.scheduling_tarflow import GuidanceSpec
from ..utils import validation
from ..utils.chat import (
    CHAT_TEMPLATE_RESERVE,
    check_context_budget,
    check_conversation,
    check_messages,
    check_stop,
    check_text,
    count_tokens,
    is_chat,
    model_context_length,
)
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
from ..utils.validation import check_guidance_scale, check_output_type
from .pipeline_starflow2 import StarFlow2BasePipeline, StarFlow2ConversationState
from .pipeline_utils import (
    prepare_noise,
    resolve_callback_tensor_inputs,
    resolve_num_inference_steps,
)

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


@dataclass
class _CallOptions:
    """The checked options of one call, shared by all its conversations (see ``__call__`` for each)."""

    guidance: GuidanceSpec
    negative_prompt: str
    max_new_tokens: int
    max_images: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    stop: List[str]
    noise_level: float
    num_inference_steps: int
    output_type: str
    callback_on_step_end: Optional[Callable]
    tensor_inputs: Sequence[str]


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


# A push of one conversation: a token layout and the ``(M, N, C)`` latents of its latent positions (or None).
_Push = Tuple[TokenLayout, Optional[torch.Tensor]]


def _plan(answer: Sequence) -> List:
    """The answer's parts in order as runs of forced parts (lists: text and given images) and ``IMAGE_PLACEHOLDER``
    for each image to generate."""
    plan, run = [], []
    for part in answer:
        if isinstance(part, str) and part == IMAGE_PLACEHOLDER:
            plan += [run, IMAGE_PLACEHOLDER] if run else [IMAGE_PLACEHOLDER]
            run = []
        else:
            run.append(part)
    return plan + ([run] if run else [])


@dataclass
class _Conversation:
    """Where one conversation of a call stands.

    ``todo`` is what its answer still forces (:func:`_plan`); then text is sampled, at most ``budget`` more tokens.
    ``want`` is what it waits for: a :data:`_Push`, ``IMAGE_PLACEHOLDER`` (an image to draw) or None (to decide).
    """

    todo: List
    generator: Optional[torch.Generator]
    budget: int
    last_image: Optional[torch.Tensor] = None  # (1, N, C) x~ of its latest image, for its state
    made: int = 0  # images generated
    sampled: List[int] = field(default_factory=list)  # every token sampled: the history the text processors see
    text_ids: List[int] = field(default_factory=list)  # text sampled since the last segment
    want: Any = None
    done: bool = False

    def flush(self, tokenizer) -> Optional[str]:
        """The text sampled since the last segment, as a segment (None if there is none)."""
        text = tokenizer.decode(self.text_ids, skip_special_tokens=True) if self.text_ids else None
        self.text_ids = []
        return text


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
        if is_chat(prompt):
            messages, images, answer = [], [], []
            for i, message in enumerate(check_messages(prompt)):
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

    def _start(
        self,
        prompts: List,
        negative_prompt: str,
        guidance: GuidanceSpec,
        generators: List[Optional[torch.Generator]],
        noise_level: float,
        max_new_tokens: int,
        states: Optional[List[StarFlow2ConversationState]] = None,
    ) -> Tuple[PretzelCache, List[_Conversation]]:
        """The caches holding every conversation's prompt (left-padded; rows branch-major: ``[branch 0 of each
        conversation; branch 1 ...]``), each prompt the next turn of its conversation's state when ``states`` (one
        per conversation) are given, and where each conversation stands: its answer still to come."""
        parsed = [self._parse(p) for p in prompts]
        with_image_branch = "image" in guidance.branches
        per_conversation = [  # conversation-major: each conversation's branches together
            layout
            for messages, _, _ in parsed
            for layout in self.encode_prompt(
                messages, negative_prompt, guidance.num_branches > 1, 1, with_image_branch, states is not None
            )
        ]
        layouts = [per_conversation[j] for j in guidance.branch_major(len(prompts))]
        given = [
            [self.encode_image(self.preprocess_image(img, "prompt"), noise_level, generators[i]) for img in images]
            for i, (_, images, _) in enumerate(parsed)
        ]
        # the user turns' images enter the conditional branch and the image branch, not the unconditional one
        images = [x for _ in guidance.image_branches(source_in_unconditional=False) for row in given for x in row]
        images = torch.cat(images) if images else None
        if states is None:
            cache = self._new_cache(len(layouts), noise_level)
            self._run_text(cache, layouts, images)
        else:
            cache = self._continue_conversation(states, guidance, layouts, images)
        conversations = [
            _Conversation(
                _plan(answer), generators[i], max_new_tokens, states[i].image_tokens if states is not None else None
            )
            for i, (_, _, answer) in enumerate(parsed)
        ]
        return cache, conversations

    def _forced(self, parts: List, conversation: _Conversation, noise_level: float) -> _Push:
        """A run of forced answer parts as one push: text, and given images as ``<|vision_start|>`` + latents +
        ``<|vision_end|>`` (encoded now, from the conversation's generator, as they come in its answer)."""
        vs, ve, pad = (special_id(self.tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD))
        N = self.transformer.num_latents
        ids, latent_mask, images = [], [], []
        for part in parts:
            if isinstance(part, str):
                text = self.tokenizer(part, add_special_tokens=False)["input_ids"]
                ids, latent_mask = ids + text, latent_mask + [False] * len(text)
                continue
            tokens = self.encode_image(self.preprocess_image(part, "prompt"), noise_level, conversation.generator)
            ids += ([vs] + [pad] * N + [ve]) * len(tokens)
            latent_mask += ([False] + [True] * N + [False]) * len(tokens)
            images.append(tokens)  # (M, N, C)
            conversation.last_image = tokens[-1:]
        return TokenLayout(ids, latent_mask), torch.cat(images) if images else None

    def _push(self, cache: PretzelCache, pushes: List[Optional[_Push]], guidance: GuidanceSpec) -> None:
        """One left-padded step of each conversation's push in every branch; conversations without one (None) take
        padding positions (no step when no conversation has anything to push)."""
        empty = TokenLayout([], [])
        layouts = guidance.stack([p[0] if p is not None else empty for p in pushes])
        if not any(len(layout) for layout in layouts):
            return
        images = guidance.stack([p[1] for p in pushes if p is not None and p[1] is not None])
        self._run_text(cache, layouts, torch.cat(images) if images else None)

    def _advance(
        self,
        cache: PretzelCache,
        conversation: _Conversation,
        row: int,
        processors,
        stop: Sequence[str],
        max_images: int,
        noise_level: float,
    ) -> Optional[str]:
        """Decide what conversation ``row`` does next (its ``want``), unless it waits already or is done: the next
        run of its answer, or else a sampled token (text to push, or ``<|vision_start|>``: an image to draw).
        Returns the text segment this completes, if any."""
        c = conversation
        if c.want is not None or c.done:
            return None
        if c.todo:
            part = c.todo.pop(0)
            c.want = self._forced(part, c, noise_level) if isinstance(part, list) else IMAGE_PLACEHOLDER
            return None
        if c.budget == 0:
            c.done = True
            return c.flush(self.tokenizer)
        tokenizer = self.tokenizer
        vs, ve, pad = (special_id(tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD))
        banned = [pad, ve] + ([vs] if c.made >= max_images else [])
        token = self._next_token(cache, c.sampled, processors, banned, c.generator, row=row)
        c.budget -= 1
        c.sampled.append(token)
        if token in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            c.done = True
            return c.flush(tokenizer)
        if token == vs:
            c.want = IMAGE_PLACEHOLDER
            return c.flush(tokenizer)
        c.want = (TokenLayout([token], [False]), None)  # a stop string's last token enters the caches too
        c.text_ids.append(token)
        text = _until_stop(tokenizer.decode(c.text_ids, skip_special_tokens=True), stop)
        if text is None:
            return None
        c.text_ids, c.done = [], True
        return text or None

    def _draw_images(
        self,
        cache: PretzelCache,
        conversations: List[_Conversation],
        guidance: GuidanceSpec,
        num_inference_steps: int,
        output_type: str,
    ) -> Iterator[Tuple[int, Segment]]:
        """Sample the image of every conversation that waits for one, together: ``<|vision_start|>``, the span and
        ``<|vision_end|>``, the other conversations idling on padding positions.  Yields ``(conversation, image)``."""
        tokenizer, transformer = self.tokenizer, self.transformer
        rows = [i for i, c in enumerate(conversations) if c.want == IMAGE_PLACEHOLDER]
        idle = torch.tensor([c.want != IMAGE_PLACEHOLDER for c in conversations], device=cache.cond.device)

        def push(token: str) -> None:
            one = (TokenLayout([special_id(tokenizer, token)], [False]), None)
            self._push(cache, [one if i in rows else None for i in range(len(conversations))], guidance)

        push(VISION_START)
        N, C = transformer.num_latents, transformer.config.latent_channels
        noise = torch.zeros(len(conversations), N, C, device=self._execution_device)
        for i in rows:  # each from its conversation's generator, as when it runs alone
            noise[i] = prepare_noise((1, N, C), conversations[i].generator, self._execution_device)[0]
        tokens, latents = self.generate_image(
            cache, noise, guidance, num_inference_steps, idle if len(rows) < len(conversations) else None
        )
        if not self.interrupt:  # an interrupted span stays open: the answer ends with it
            push(VISION_END)
        images = self.decode(latents, output_type)
        for k, i in enumerate(rows):
            c = conversations[i]
            c.want, c.made, c.last_image = None, c.made + 1, tokens[k : k + 1]
            yield i, images[k]

    @torch.no_grad()  # torch re-applies it at every resumption of the generator
    def _generate(
        self,
        prompts: List,
        generators: List[Optional[torch.Generator]],
        options: _CallOptions,
        states: Optional[List[StarFlow2ConversationState]] = None,
        result: Optional[dict] = None,
    ) -> Iterator[Tuple[int, Segment]]:
        """Answer conversations together, each as it would be answered alone; yield ``(conversation, segment)`` as
        segments complete.  At the end ``result["states"]`` holds each conversation's new state (None when
        interrupted).

        Each round, every conversation decides what it does next (:meth:`_advance`).  If any has text to push (a
        run of its answer, or a token it sampled), those advance in one left-padded step while the others idle on
        padding positions; otherwise every conversation waiting for an image draws it together
        (:meth:`_draw_images`).  A conversation that reaches an image thus waits until every other one reaches an
        image or ends, so images are sampled in as few spans as possible.  Padding is never seen by later
        positions, so each conversation's logits and latents are its own (up to float rounding).
        """
        o = options
        cache, conversations = self._start(
            prompts, o.negative_prompt, o.guidance, generators, o.noise_level, o.max_new_tokens, states
        )
        processors = _text_processors(o.temperature, o.top_k, o.top_p)
        self._begin_call(
            o.guidance.guidance_scale,
            self.num_flow_steps + o.num_inference_steps,
            o.callback_on_step_end,
            o.tensor_inputs,
        )
        try:  # ends the call however it ends: a stream() its consumer stops early, or an error (ends_call's work)
            while True:
                for i, c in enumerate(conversations):
                    text = self._advance(cache, c, i, processors, o.stop, o.max_images, o.noise_level)
                    if text:
                        yield i, text
                pushes = [c.want if isinstance(c.want, tuple) else None for c in conversations]
                if any(p is not None for p in pushes):
                    self._push(cache, pushes, o.guidance)
                    for c in conversations:
                        c.want = None if isinstance(c.want, tuple) else c.want
                elif any(c.want == IMAGE_PLACEHOLDER for c in conversations):
                    yield from self._draw_images(cache, conversations, o.guidance, o.num_inference_steps, o.output_type)
                    if self.interrupt:
                        break
                else:
                    break
            if result is not None and not self.interrupt:
                result["states"] = self._states(cache, conversations, o.guidance, o.noise_level)
        finally:
            self._end_call()

    def _states(
        self, cache: PretzelCache, conversations: List[_Conversation], guidance: GuidanceSpec, noise_level: float
    ) -> List[StarFlow2ConversationState]:
        """Each conversation's state: its rows of the caches (a single conversation keeps the caches)."""
        B = len(conversations)
        states = []
        for i, c in enumerate(conversations):
            own = cache
            if B > 1:
                own = cache.fork(cache.snapshot())
                own.select(torch.tensor(guidance.sample_rows(i, B), device=cache.cond.device))
            states.append(self._conversation_state(own, 1, guidance.num_branches, noise_level, c.last_image))
        return states

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
        noise_level: Optional[float],
        num_inference_steps: Optional[int],
        callback_on_step_end: Optional[Callable],
        callback_on_step_end_tensor_inputs: Sequence[str],
        generator=None,
        image_guidance_scale: float = 1.0,
        state: Optional[StarFlow2ConversationState] = None,
    ) -> Dict[str, Any]:
        """Validate the call, the whole prompt included (texts and their special tokens, images, and the context
        budget of the conversation held by ``state`` + prompt + answer) before anything runs.  Returns the checked
        values: the numbers as Python numbers (``noise_level``: the state's for None when continuing one, else the
        scheduler's; ``num_inference_steps``: the scheduler's for None), ``guidance`` the :class:`GuidanceSpec`,
        ``stop`` as a list, ``generator`` as one generator, ``tensor_inputs`` the callback tensor names to pass."""
        checked = dict(
            guidance=GuidanceSpec(
                check_guidance_scale(guidance_scale),
                check_guidance_scale(image_guidance_scale, "image_guidance_scale", minimum=1),
            )
        )  # 1 = no image guidance
        check_output_type(output_type)
        tokenizer, num_latents = self.tokenizer, self.transformer.num_latents
        context = model_context_length(self.vlm, tokenizer)
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
        checked["stop"] = check_stop(stop)
        if negative_prompt is not None:
            check_text(negative_prompt, "negative_prompt", tokenizer, allow_empty=True)
        validation.check_generator(generator, 1)
        # the pipeline makes one conversation
        checked["generator"] = generator[0] if isinstance(generator, (list, tuple)) else generator
        if noise_level is None and isinstance(state, StarFlow2ConversationState):  # else refused below
            noise_level = state.noise_level
        checked["noise_level"] = noise_level = self._check_noise_level(noise_level)
        checked["num_inference_steps"] = self._check_inference_steps(num_inference_steps)
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
        asked = sum(1 for p in answer if isinstance(p, str) and p == IMAGE_PLACEHOLDER)
        if asked > checked["max_images"]:
            raise ValueError(f"`max_images` ({max_images}) is smaller than the {asked} images the prompt asks for")
        # every guidance branch must fit: the user turn differs between them, the answer enters all of them
        branch_positions = {
            "prompt": check_conversation(messages, images, answer, IMAGE_PLACEHOLDER, tokenizer, image_positions)
        }
        guidance = checked["guidance"]
        if guidance.num_branches > 1:
            answer_positions = check_conversation([], [], answer, IMAGE_PLACEHOLDER, tokenizer, image_positions)
            negative_turn = count_tokens(tokenizer, negative_prompt or "") + CHAT_TEMPLATE_RESERVE
            # a branch besides the conditional one that holds the user turn's images (the image branch) holds the
            # negative prompt with them
            with_images = any(b > 0 for b in guidance.image_branches(source_in_unconditional=False))
            images_in_branch = len(images) * image_positions if with_images else 0
            branch_positions["negative_prompt"] = negative_turn + images_in_branch + answer_positions
        for name, positions in branch_positions.items():
            check_context_budget(
                positions, checked["max_new_tokens"], checked["max_images"], image_positions, context, held, name
            )
        checked["tensor_inputs"] = resolve_callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        return checked

    def _check_conversations(
        self,
        prompts: Sequence,
        states: Sequence[Optional[StarFlow2ConversationState]],
        generators: Sequence,
        noise_level: Optional[float],
        num_inference_steps: Optional[int],
        negative_prompt,
        guidance_scale: float,
        max_new_tokens: int,
        max_images: int,
        temperature: float,
        top_k: Optional[int],
        top_p: Optional[float],
        stop,
        output_type: str,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: Sequence[str],
        image_guidance_scale: float,
    ) -> Tuple[_CallOptions, List[Optional[torch.Generator]]]:
        """:meth:`check_inputs` for each conversation, with its own state and generator; returns the call's checked
        options (the noise level: a continued conversation samples at its own, checked to be one for all) and each
        conversation's generator."""
        if noise_level is None and isinstance(states[0], StarFlow2ConversationState):
            noise_level = states[0].noise_level  # a batch samples at one level: its first conversation's
        checked_generators = []
        for prompt, state, generator in zip(prompts, states, generators):
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
                num_inference_steps,
                callback_on_step_end,
                callback_on_step_end_tensor_inputs,
                generator,
                image_guidance_scale,
                state,
            )
            checked_generators.append(checked["generator"])
        shared = (
            "guidance",
            "max_new_tokens",
            "max_images",
            "temperature",
            "top_k",
            "top_p",
            "stop",
            "noise_level",
            "num_inference_steps",
            "tensor_inputs",
        )
        options = _CallOptions(
            **{name: checked[name] for name in shared},  # the same for every conversation
            negative_prompt=negative_prompt or "",
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
        )
        return options, checked_generators

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
        num_inference_steps: Optional[int] = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        jacobi_block_size: Optional[int] = None,
        jacobi_tolerance: float = 1e-3,
        jacobi_max_iterations: Optional[int] = None,
    ) -> Iterator[Segment]:
        self._jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
        options, generators = self._check_conversations(
            [prompt],
            [state],
            [generator],
            noise_level,
            num_inference_steps,
            negative_prompt,
            guidance_scale,
            max_new_tokens,
            max_images,
            temperature,
            top_k,
            top_p,
            stop,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            image_guidance_scale,
        )
        segments = self._generate([prompt], generators, options, [state] if state is not None else None, result)
        return (segment for _, segment in segments)

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
        num_inference_steps: Optional[int] = None,
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
        **kwargs,
    ):
        r"""Generate interleaved text and images.

        Args:
            prompt: a string, a list of segments (``str`` / images) or chat messages; ``"<image>"`` marks an image
                to generate (see the class docstring).  A list of such conversations (each a list) runs as one
                batch and returns a list of outputs, each equal to running its conversation alone (with its own
                generator and state): answers may ask for different numbers of images at different places, hold
                given images, open images freely and stop at different times; a conversation that waits takes
                padding positions, which no later position sees.  ``callback_on_step_end`` and
                ``callback_on_segment`` take one conversation, not a batch.
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
                conversation, which makes each conversation's output its output alone, or one shared).
            noise_level, num_inference_steps, output_type, callback_on_step_end,
                callback_on_step_end_tensor_inputs: as in :class:`StarFlow2Pipeline` (the callback's step counts
                flow blocks and denoising steps across all images of the answer; an interruption ends the
                answer with the image being made).
            callback_on_segment: called with each segment as soon as it is complete (streaming).
            jacobi_block_size, jacobi_tolerance, jacobi_max_iterations: as in :class:`StarFlow2Pipeline`, for every
                image of the answer.
            return_dict: return a :class:`StarFlow2InterleavedOutput` instead of a tuple ``(segments, state)``.
            state: the ``state`` of a previous output: ``prompt`` is then the next user turn (and the beginning of
                its answer) of that conversation, whose caches are reused (forked: the state is not modified).  The
                guidance of a later turn may use fewer branches than the first turn's, not more; ``noise_level``
                is the conversation's.  For a batch, a list of one state per conversation (all at one noise level).

        Examples:
        """
        num_inference_steps = resolve_num_inference_steps(
            num_inference_steps, kwargs, f"{type(self).__name__}.__call__"
        )
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
                num_inference_steps,
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
            num_inference_steps,
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
        state = result.get("states", [None])[0]
        if not return_dict:
            return segments, state
        return StarFlow2InterleavedOutput(segments=segments, state=state)

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
        num_inference_steps,
        output_type,
        callback_on_step_end,
        callback_on_segment,
    ) -> List[StarFlow2InterleavedOutput]:
        """Validate every conversation of a batch as the call would validate it alone (with its own generator and
        state), then run them together."""
        for value, name in (
            (callback_on_step_end, "callback_on_step_end"),
            (callback_on_segment, "callback_on_segment"),
        ):
            if value is not None:
                raise ValueError(
                    f"`{name}` must be None when `prompt` is a list of conversations (a batch); got "
                    f"{type(value).__name__}: run the conversations one by one to use it"
                )
        B = len(prompts)
        if state is not None and (
            not isinstance(state, (list, tuple)) or len(state) != B or any(s is None for s in state)
        ):
            got = f"a list of {len(state)}" if isinstance(state, (list, tuple)) else type(state).__name__
            raise ValueError(
                f"`state` must be None or a list of {B} states, one per conversation, when `prompt` is a list of "
                f"{B} conversations (a batch); got {got}"
            )
        validation.check_generator(generator, B)
        options, generators = self._check_conversations(
            prompts,
            state if state is not None else [None] * B,
            generator if isinstance(generator, (list, tuple)) else [generator] * B,
            noise_level,
            num_inference_steps,
            negative_prompt,
            guidance_scale,
            max_new_tokens,
            max_images,
            temperature,
            top_k,
            top_p,
            stop,
            output_type,
            None,
            ["latents"],
            image_guidance_scale,
        )
        result = {}
        segments = [[] for _ in range(B)]
        states = list(state) if state is not None else None
        for i, segment in self._generate(list(prompts), generators, options, states, result):
            segments[i].append(segment)
        return [StarFlow2InterleavedOutput(segments=s, state=state) for s, state in zip(segments, result["states"])]

    def stream(self, prompt, **kwargs) -> Iterator[Segment]:
        """Like ``__call__`` but yields each segment as soon as it is complete; bad input raises at the call.  (To
        continue the conversation afterwards, call the pipeline with ``callback_on_segment``: its output carries
        the ``state``.)"""
        steps = resolve_num_inference_steps(
            kwargs.pop("num_inference_steps", None),
            {k: kwargs.pop(k) for k in ("num_denoising_steps",) if k in kwargs},
            f"{type(self).__name__}.stream",
        )
        return self._checked_generate(prompt, num_inference_steps=steps, **kwargs)

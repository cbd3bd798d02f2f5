# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The conversation engine of :class:`~diffusers_starflow2.StarFlow2InterleavedPipeline`.

A call answers one conversation or a batch of them.  Its prompts are parsed into a user turn and the beginning of an
answer (:func:`parse_prompt`); the answer becomes a plan of forced runs and images to draw (:func:`plan`); each
conversation's :class:`Conversation` tracks where it stands, and :class:`ConversationEngine` drives them together
through the pipeline's caches: forced runs and sampled text tokens are pushed in left-padded steps, images are
drawn together with the conversations that do not draw idling on padding positions.  :class:`ConversationOptions`
holds the checked options of the call, built once and shared by every conversation.

A call ends with each conversation's :class:`StarFlow2ConversationState`; :class:`ConversationMixin` continues
states (the edit and the interleaved pipelines alike).
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..models.cache_utils import PretzelCache
from ..schedulers.scheduling_tarflow import GuidanceSpec
from ..utils import validation
from ..utils.chat import check_conversation_state, check_messages, is_chat
from ..utils.sequence import IMAGE_PAD, VISION_END, VISION_START, TokenLayout, special_id, user_message
from .pipeline_utils import prepare_noise

# In the input, this string means "generate an image here".
IMAGE_PLACEHOLDER = "<image>"

Segment = Union[str, PIL.Image.Image, np.ndarray, torch.Tensor]


@dataclass
class ConversationOptions:
    """The checked options of one call of the interleaved pipeline, shared by all its conversations (see its
    ``__call__`` for each)."""

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


@dataclass
class StarFlow2ConversationState:
    r"""Where a conversation stands after a call: enough to continue it with another user turn, re-encoding nothing.

    The guidance branches are stacked along the batch in :class:`GuidanceSpec` order (the first ``num_branches`` of
    ``[conditional; image; unconditional]``, ``batch_size`` conversations each), and each keeps its own context
    across turns: a new user turn enters the conditional branch as given, the other branches as the negative prompt
    (the image branch with the turn's images, the unconditional one without); everything the assistant produces
    enters every branch.  Images in the context are the intermediate latents ``x~`` at ``noise_level`` as sampled
    (not the denoised outputs), which is what the model was trained on.

    The caches end with the last answer (its ``<|im_end|>`` comes with the next turn, as the chat template renders
    it).  A state is never modified: each call continuing it works on a fork, so one state can be continued several
    times.  It follows the pipeline to its device and dtype when continued; :meth:`to` moves it explicitly.

    Args:
        cache: both streams' KV caches of all branches.
        batch_size: conversations per branch ``B``.
        num_branches: guidance branches held in ``cache`` (1, 2 or 3); later turns may use fewer, not more (the
            first ones: a two-branch turn of a three-branch conversation contrasts with the image branch, as the
            edit pipeline's two-branch guidance does).
        noise_level: the noise level of every image in the conversation (later turns sample at it).
        num_latents: latent positions ``N`` of an image span.
        image_tokens: ``(B, N, C)`` the intermediate latents ``x~`` of the conversation's last image (None if it
            holds none).
        model: a weak reference to the transformer that made the caches: a state only continues on it (any
            pipeline sharing it, at any device or dtype).
    """

    cache: PretzelCache
    batch_size: int
    num_branches: int
    noise_level: float
    num_latents: int
    image_tokens: Optional[torch.Tensor] = None
    model: Optional[weakref.ref] = None

    @property
    def num_positions(self) -> int:
        """Positions of the conversation held per branch (padding of a batch included)."""
        return self.cache.length

    @property
    def nbytes(self) -> int:
        """Memory the state holds, in bytes (both streams' caches of every branch)."""
        extra = self.image_tokens.nelement() * self.image_tokens.element_size() if self.image_tokens is not None else 0
        return self.cache.nbytes + extra

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "StarFlow2ConversationState":
        """A copy of the state on ``device`` (a device of this machine) with its floating tensors in ``dtype`` (a
        compute dtype: float32, bfloat16, float16, float64)."""
        device, dtype = validation.check_device(device, "device"), validation.check_dtype(dtype, "dtype")
        image_tokens = self.image_tokens.to(device, dtype) if self.image_tokens is not None else None
        return dataclasses.replace(self, cache=self.cache.to(device, dtype), image_tokens=image_tokens)


class ConversationMixin:
    """Continuing conversations, for the STARFlow2 pipelines (it uses their ``_onload_pretzel``, ``_run_text``,
    ``transformer``, ``vlm``): a state is forked, reduced to the call's guidance branches and given the next turn."""

    def _append_ids(self, cache: PretzelCache, ids: List[int]) -> None:
        """The same tokens at the end of every sample of ``cache``."""
        self._onload_pretzel()  # decoding an image onloads the FAE, which offloads the Pretzel
        input_ids = torch.tensor([ids] * cache.batch_size, device=self._execution_device)
        self.transformer.step(self.vlm_stream, cache, input_ids=input_ids)

    def _check_state(self, state, num_branches: int) -> None:
        check_conversation_state(state, StarFlow2ConversationState, self.transformer, num_branches)

    def _continue_conversation(
        self,
        state: Union[StarFlow2ConversationState, Sequence[StarFlow2ConversationState]],
        guidance: GuidanceSpec,
        layouts: Sequence[TokenLayout],
        images: Optional[torch.Tensor] = None,
    ) -> PretzelCache:
        """A fork of ``state``'s caches (on the pipeline's device and dtypes), reduced to the branches of
        ``guidance`` (the first of the state's), with the next turn's ``layouts`` (one per sample, branch-major) pushed: only these new positions
        run through the streams.  ``state`` may be a list of single-conversation states, continued as one batch:
        their caches side by side (left-padded, :meth:`PretzelCache.stack`), rows branch-major."""
        self._onload_pretzel()
        states = [state] if isinstance(state, StarFlow2ConversationState) else list(state)
        device, dtype, vlm_dtype = self._execution_device, self.transformer.dtype, self.vlm.dtype
        caches = []
        for state in states:
            cache = state.cache
            if (
                cache.cond.device != torch.device(device)
                or cache.cond.dtype != dtype
                or any(
                    getattr(layer, "keys", None) is not None and layer.keys.dtype != vlm_dtype
                    for layer in cache.vlm.layers
                )
            ):
                cache = cache.to(device, dtype, vlm_dtype)  # the pipeline moved since the state was made
            cache = cache.fork(cache.snapshot())
            if guidance.num_branches < state.num_branches:
                cache.select(torch.arange(guidance.num_rows(state.batch_size), device=cache.cond.device))
            caches.append(cache)
        cache = caches[0]
        if len(caches) > 1:
            cache = PretzelCache.stack(caches)  # conversation-major: reorder the rows branch-major
            cache.select(torch.tensor(guidance.branch_major(len(caches)), device=cache.cond.device))
        self._run_text(cache, layouts, images)
        return cache

    def _conversation_state(
        self,
        cache: PretzelCache,
        batch_size: int,
        num_branches: int,
        noise_level: float,
        image_tokens: Optional[torch.Tensor],
    ) -> StarFlow2ConversationState:
        return StarFlow2ConversationState(
            cache=cache,
            batch_size=batch_size,
            num_branches=num_branches,
            noise_level=float(noise_level),
            num_latents=self.transformer.num_latents,
            image_tokens=image_tokens,
            model=weakref.ref(self.transformer),
        )


def split_placeholders(parts: Sequence) -> List:
    """``parts`` with every string split at ``IMAGE_PLACEHOLDER`` (kept as parts of their own)."""
    out = []
    for part in parts:
        if isinstance(part, str):
            out += [p for p in re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", part) if p]
        else:
            out.append(part)
    return out


def text_processors(temperature: float, top_k: Optional[int], top_p: Optional[float]):
    """The logits warpers of text sampling; None for greedy decoding (temperature 0)."""
    if temperature == 0:
        return None
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def until_stop(text: str, stop: Sequence[str]) -> Optional[str]:
    """``text`` up to the first stop string, or None when it holds none."""
    hit = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:hit] if hit >= 0 else None


def is_batch(prompt) -> bool:
    """A list of conversations (each a list of segments or of chat messages), not one conversation."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(c, (list, tuple)) for c in prompt)


# A push of one conversation: a token layout and the ``(M, N, C)`` latents of its latent positions (or None).
Push = Tuple[TokenLayout, Optional[torch.Tensor]]


def plan(answer: Sequence) -> List:
    """The answer's parts in order as runs of forced parts (lists: text and given images) and ``IMAGE_PLACEHOLDER``
    for each image to generate."""
    steps, run = [], []
    for part in answer:
        if isinstance(part, str) and part == IMAGE_PLACEHOLDER:
            steps += [run, IMAGE_PLACEHOLDER] if run else [IMAGE_PLACEHOLDER]
            run = []
        else:
            run.append(part)
    return steps + ([run] if run else [])


@dataclass
class Conversation:
    """Where one conversation of a call stands.

    ``todo`` is what its answer still forces (:func:`plan`); then text is sampled, at most ``budget`` more tokens.
    ``want`` is what it waits for: a :data:`Push`, ``IMAGE_PLACEHOLDER`` (an image to draw) or None (to decide).
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


def parse_prompt(prompt) -> Tuple[List[dict], List[Any], List]:
    """A prompt of the interleaved pipeline (a string, segments or chat messages) ->
    ``(conversation messages, images of the conversation in order, assistant parts)``."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"`prompt` must be a string, a list of segments or chat messages; got {type(prompt).__name__}")
    if is_chat(prompt):
        messages, images, answer = [], [], []
        for i, message in enumerate(check_messages(prompt)):
            content = message.get("content")
            items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            parts = [item.get("image") if item.get("type") == "image" else item.get("text") for item in items]
            if message["role"] == "assistant" and i == len(prompt) - 1:
                answer = split_placeholders(parts)
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
    parts = split_placeholders(prompt)
    first = next((i for i, p in enumerate(parts) if isinstance(p, str) and p == IMAGE_PLACEHOLDER), len(parts))
    user, answer = parts[:first], parts[first:]
    if all(isinstance(p, str) and not p.strip() for p in user):
        raise ValueError("`prompt` needs a user request (text or an image) before the first image placeholder")
    return [user_message(*user)], [p for p in user if not isinstance(p, str)], answer


class ConversationEngine:
    """Answers the conversations of one call of ``pipe`` (a :class:`StarFlow2InterleavedPipeline`) together, each
    as it would be answered alone, under the call's ``options``.

    :meth:`run` is the call's generator; the engine holds the call's caches (rows branch-major: ``[branch 0 of each
    conversation; branch 1 ...]``, :class:`GuidanceSpec`) and each conversation's :class:`Conversation`.
    """

    def __init__(self, pipe, options: ConversationOptions):
        self.pipe, self.options = pipe, options
        self.cache: Optional[PretzelCache] = None
        self.conversations: List[Conversation] = []

    def start(self, prompts: List, generators: List[Optional[torch.Generator]], states=None) -> None:
        """Push every conversation's prompt into new caches (left-padded), each prompt the next turn of its
        conversation's state when ``states`` (one per conversation) are given, and note where each conversation
        stands: its answer still to come."""
        pipe, o = self.pipe, self.options
        guidance = o.guidance
        parsed = [parse_prompt(p) for p in prompts]
        with_image_branch = "image" in guidance.branches
        per_conversation = [  # conversation-major: each conversation's branches together
            layout
            for messages, _, _ in parsed
            for layout in pipe.encode_prompt(
                messages, o.negative_prompt, guidance.num_branches > 1, 1, with_image_branch, states is not None
            )
        ]
        layouts = [per_conversation[j] for j in guidance.branch_major(len(prompts))]
        given = [
            [pipe.encode_image(pipe.preprocess_image(img, "prompt"), o.noise_level, generators[i]) for img in images]
            for i, (_, images, _) in enumerate(parsed)
        ]
        # the user turns' images enter the conditional branch and the image branch, not the unconditional one
        images = [x for _ in guidance.image_branches(source_in_unconditional=False) for row in given for x in row]
        images = torch.cat(images) if images else None
        if states is None:
            self.cache = pipe._new_cache(len(layouts), o.noise_level)
            pipe._run_text(self.cache, layouts, images)
        else:
            self.cache = pipe._continue_conversation(states, guidance, layouts, images)
        self.conversations = [
            Conversation(
                plan(answer), generators[i], o.max_new_tokens, states[i].image_tokens if states is not None else None
            )
            for i, (_, _, answer) in enumerate(parsed)
        ]

    def forced(self, parts: List, conversation: Conversation) -> Push:
        """A run of forced answer parts as one push: text, and given images as ``<|vision_start|>`` + latents +
        ``<|vision_end|>`` (encoded now, from the conversation's generator, as they come in its answer)."""
        pipe = self.pipe
        vs, ve, pad = (special_id(pipe.tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD))
        N = pipe.transformer.num_latents
        ids, latent_mask, images = [], [], []
        for part in parts:
            if isinstance(part, str):
                text = pipe.tokenizer(part, add_special_tokens=False)["input_ids"]
                ids, latent_mask = ids + text, latent_mask + [False] * len(text)
                continue
            pixels = pipe.preprocess_image(part, "prompt")
            tokens = pipe.encode_image(pixels, self.options.noise_level, conversation.generator)
            ids += ([vs] + [pad] * N + [ve]) * len(tokens)
            latent_mask += ([False] + [True] * N + [False]) * len(tokens)
            images.append(tokens)  # (M, N, C)
            conversation.last_image = tokens[-1:]
        return TokenLayout(ids, latent_mask), torch.cat(images) if images else None

    def push(self, pushes: List[Optional[Push]]) -> None:
        """One left-padded step of each conversation's push in every branch; conversations without one (None) take
        padding positions (no step when no conversation has anything to push)."""
        guidance, empty = self.options.guidance, TokenLayout([], [])
        layouts = guidance.stack([p[0] if p is not None else empty for p in pushes])
        if not any(len(layout) for layout in layouts):
            return
        images = guidance.stack([p[1] for p in pushes if p is not None and p[1] is not None])
        self.pipe._run_text(self.cache, layouts, torch.cat(images) if images else None)

    def advance(self, row: int, processors) -> Optional[str]:
        """Decide what conversation ``row`` does next (its ``want``), unless it waits already or is done: the next
        run of its answer, or else a sampled token (text to push, or ``<|vision_start|>``: an image to draw).
        Returns the text segment this completes, if any."""
        c, o = self.conversations[row], self.options
        if c.want is not None or c.done:
            return None
        if c.todo:
            part = c.todo.pop(0)
            c.want = self.forced(part, c) if isinstance(part, list) else IMAGE_PLACEHOLDER
            return None
        tokenizer = self.pipe.tokenizer
        if c.budget == 0:
            c.done = True
            return c.flush(tokenizer)
        vs, ve, pad = (special_id(tokenizer, t) for t in (VISION_START, VISION_END, IMAGE_PAD))
        banned = [pad, ve] + ([vs] if c.made >= o.max_images else [])
        token = self.pipe._next_token(self.cache, c.sampled, processors, banned, c.generator, row=row)
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
        text = until_stop(tokenizer.decode(c.text_ids, skip_special_tokens=True), o.stop)
        if text is None:
            return None
        c.text_ids, c.done = [], True
        return text or None

    def draw_images(self) -> Iterator[Tuple[int, Segment]]:
        """Sample the image of every conversation that waits for one, together: ``<|vision_start|>``, the span and
        ``<|vision_end|>``, the other conversations idling on padding positions.  Yields ``(conversation, image)``."""
        pipe, o, conversations = self.pipe, self.options, self.conversations
        rows = [i for i, c in enumerate(conversations) if c.want == IMAGE_PLACEHOLDER]
        idle = torch.tensor([c.want != IMAGE_PLACEHOLDER for c in conversations], device=self.cache.cond.device)

        def push(token: str) -> None:
            one = (TokenLayout([special_id(pipe.tokenizer, token)], [False]), None)
            self.push([one if i in rows else None for i in range(len(conversations))])

        push(VISION_START)
        N, C = pipe.transformer.num_latents, pipe.transformer.config.latent_channels
        device = pipe._execution_device
        noise = torch.zeros(len(conversations), N, C, device=device)
        for i in rows:  # each from its conversation's generator, as when it runs alone
            noise[i] = prepare_noise((1, N, C), conversations[i].generator, device)[0]
        tokens, latents = pipe.generate_image(
            self.cache, noise, o.guidance, o.num_inference_steps, idle if len(rows) < len(conversations) else None
        )
        if not pipe.interrupt:  # an interrupted span stays open: the answer ends with it
            push(VISION_END)
        images = pipe.decode(latents, o.output_type)
        for k, i in enumerate(rows):
            c = conversations[i]
            c.want, c.made, c.last_image = None, c.made + 1, tokens[k : k + 1]
            yield i, images[k]

    @torch.no_grad()  # torch re-applies it at every resumption of the generator
    def run(
        self,
        prompts: List,
        generators: List[Optional[torch.Generator]],
        states=None,
        result: Optional[dict] = None,
    ) -> Iterator[Tuple[int, Segment]]:
        """Answer the conversations ``prompts``; yield ``(conversation, segment)`` as segments complete.  At the
        end ``result["states"]`` holds each conversation's new state (None when interrupted).

        Each round, every conversation decides what it does next (:meth:`advance`).  If any has text to push (a
        run of its answer, or a token it sampled), those advance in one left-padded step while the others idle on
        padding positions; otherwise every conversation waiting for an image draws it together
        (:meth:`draw_images`).  A conversation that reaches an image thus waits until every other one reaches an
        image or ends, so images are sampled in as few spans as possible.  Padding is never seen by later
        positions, so each conversation's logits and latents are its own (up to float rounding).
        """
        pipe, o = self.pipe, self.options
        self.start(prompts, generators, states)
        processors = text_processors(o.temperature, o.top_k, o.top_p)
        pipe._begin_call(
            o.guidance.guidance_scale,
            pipe.num_flow_steps + o.num_inference_steps,
            o.callback_on_step_end,
            o.tensor_inputs,
        )
        try:  # ends the call however it ends: a stream() its consumer stops early, or an error (ends_call's work)
            while True:
                for i in range(len(self.conversations)):
                    text = self.advance(i, processors)
                    if text:
                        yield i, text
                pushes = [c.want if isinstance(c.want, tuple) else None for c in self.conversations]
                if any(p is not None for p in pushes):
                    self.push(pushes)
                    for c in self.conversations:
                        c.want = None if isinstance(c.want, tuple) else c.want
                elif any(c.want == IMAGE_PLACEHOLDER for c in self.conversations):
                    yield from self.draw_images()
                    if pipe.interrupt:
                        break
                else:
                    break
            if result is not None and not pipe.interrupt:
                result["states"] = self.states()
        finally:
            pipe._end_call()

    def states(self) -> list:
        """Each conversation's :class:`StarFlow2ConversationState`: its rows of the caches (a single conversation
        keeps the caches)."""
        cache, guidance, B = self.cache, self.options.guidance, len(self.conversations)
        states = []
        for i, c in enumerate(self.conversations):
            own = cache
            if B > 1:
                own = cache.fork(cache.snapshot())
                own.select(torch.tensor(guidance.sample_rows(i, B), device=cache.cond.device))
            states.append(
                self.pipe._conversation_state(own, 1, guidance.num_branches, self.options.noise_level, c.last_image)
            )
        return states

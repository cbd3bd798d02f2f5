# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""StarFlow2InterleavedPipeline: interleaved text + image generation and image understanding in one causal pass.

Text tokens come from the LM head, images from the flow; both enter the KV caches as they are produced, so nothing
is ever re-encoded: every position of the sequence passes through each stream once per guidance branch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.utils import BaseOutput, replace_example_docstring

from ..models.cache_utils import PretzelCache
from ..sampling import jacobi_options
from ..schedulers.scheduling_tarflow import GuidanceSpec
from ..utils import validation
from ..utils.chat import (
    CHAT_TEMPLATE_RESERVE,
    check_context_budget,
    check_conversation,
    check_stop,
    check_text,
    count_tokens,
    model_context_length,
)
from ..utils.sequence import (
    TokenLayout,
    encode_conversation,
    encode_next_turn,
)
from ..utils.validation import check_guidance_scale, check_output_type
from .conversation import (
    IMAGE_PLACEHOLDER,
    ConversationEngine,
    ConversationOptions,
    Segment,
    StarFlow2ConversationState,
    is_batch,
    parse_prompt,
)
from .pipeline_starflow2 import StarFlow2BasePipeline
from .pipeline_utils import (
    resolve_callback_tensor_inputs,
    resolve_num_inference_steps,
)

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
        messages, images, answer = parse_prompt(prompt)
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

    def _call_options(
        self, prompts: Sequence, states: Sequence, generators: Sequence, arguments: Dict[str, Any]
    ) -> Tuple[ConversationOptions, List[Optional[torch.Generator]]]:
        """:meth:`check_inputs` for each conversation, with its own state and generator, of the call's
        ``arguments`` (the keyword arguments of :meth:`check_inputs` but those three); returns the call's options,
        built once (the noise level: a continued conversation samples at its own, checked to be one for all), and
        each conversation's generator."""
        arguments = dict(arguments)
        if arguments["noise_level"] is None and isinstance(states[0], StarFlow2ConversationState):
            arguments["noise_level"] = states[0].noise_level  # a batch samples at one level: its first's
        checked_generators = []
        for prompt, state, generator in zip(prompts, states, generators):
            checked = self.check_inputs(prompt, generator=generator, state=state, **arguments)
            checked_generators.append(checked["generator"])
        shared = ("max_new_tokens", "max_images", "temperature", "top_k", "top_p", "stop", "noise_level")
        options = ConversationOptions(
            **{name: checked[name] for name in shared},  # the same for every conversation
            guidance=checked["guidance"],
            num_inference_steps=checked["num_inference_steps"],
            tensor_inputs=checked["tensor_inputs"],
            negative_prompt=arguments["negative_prompt"] or "",
            output_type=arguments["output_type"],
            callback_on_step_end=arguments["callback_on_step_end"],
        )
        return options, checked_generators

    def _segments(self, prompt, state, generator, arguments: Dict[str, Any], result: dict) -> Iterator[Segment]:
        """The segments of one conversation's answer, checked before anything runs (``arguments`` as in
        :meth:`_call_options`); ``result["states"]`` then holds its new state."""
        options, generators = self._call_options([prompt], [state], [generator], arguments)
        engine = ConversationEngine(self, options)
        return (
            segment for _, segment in engine.run([prompt], generators, [state] if state is not None else None, result)
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
        self._jacobi = jacobi_options(jacobi_block_size, jacobi_tolerance, jacobi_max_iterations)
        arguments = dict(
            negative_prompt=negative_prompt,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            max_new_tokens=max_new_tokens,
            max_images=max_images,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=stop,
            noise_level=noise_level,
            num_inference_steps=num_inference_steps,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        if is_batch(prompt):
            outputs = self._batch_outputs(prompt, state, generator, arguments, callback_on_segment)
            return outputs if return_dict else [(o.segments, o.state) for o in outputs]
        segments, result = [], {}
        for segment in self._segments(prompt, state, generator, arguments, result):
            segments.append(segment)
            if callback_on_segment is not None:
                callback_on_segment(segment)
        state = result.get("states", [None])[0]
        if not return_dict:
            return segments, state
        return StarFlow2InterleavedOutput(segments=segments, state=state)

    def _batch_outputs(
        self, prompts, state, generator, arguments: Dict[str, Any], callback_on_segment
    ) -> List[StarFlow2InterleavedOutput]:
        """Validate every conversation of a batch as the call would validate it alone (with its own generator and
        state), then run them together."""
        for value, name in (
            (arguments["callback_on_step_end"], "callback_on_step_end"),
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
        options, generators = self._call_options(
            prompts,
            state if state is not None else [None] * B,
            generator if isinstance(generator, (list, tuple)) else [generator] * B,
            {**arguments, "callback_on_step_end_tensor_inputs": ["latents"]},
        )
        result = {}
        segments = [[] for _ in range(B)]
        states = list(state) if state is not None else None
        for i, segment in ConversationEngine(self, options).run(list(prompts), generators, states, result):
            segments[i].append(segment)
        return [StarFlow2InterleavedOutput(segments=s, state=state) for s, state in zip(segments, result["states"])]

    def stream(self, prompt, **kwargs) -> Iterator[Segment]:
        """Like ``__call__`` but yields each segment as soon as it is complete; bad input raises at the call.  (To
        continue the conversation afterwards, call the pipeline with ``callback_on_segment``: its output carries
        the ``state``.)"""
        for name in ("return_dict", "callback_on_segment"):
            if name in kwargs:
                raise TypeError(f"stream() got an unexpected keyword argument '{name}'")
        kwargs["num_inference_steps"] = resolve_num_inference_steps(
            kwargs.pop("num_inference_steps", None),
            {k: kwargs.pop(k) for k in ("num_denoising_steps",) if k in kwargs},
            f"{type(self).__name__}.stream",
        )
        call = inspect.signature(type(self).__call__).bind(self, prompt, **kwargs)  # __call__'s defaults
        call.apply_defaults()
        unknown = call.arguments.get("kwargs")
        if unknown:
            raise TypeError(f"stream() got an unexpected keyword argument '{next(iter(unknown))}'")
        arguments = {k: v for k, v in call.arguments.items() if k not in ("self", "prompt", "kwargs")}
        state, generator = arguments.pop("state"), arguments.pop("generator")
        jacobi = {k: arguments.pop(k) for k in ("jacobi_block_size", "jacobi_tolerance", "jacobi_max_iterations")}
        for name in ("return_dict", "callback_on_segment"):
            arguments.pop(name)
        self._jacobi = jacobi_options(**jacobi)
        return self._segments(prompt, state, generator, arguments, {})

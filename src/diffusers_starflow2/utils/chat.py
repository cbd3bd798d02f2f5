# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Checking prompts, chat messages and conversations: their text, their special tokens, their roles and images,
the context they fill (:func:`check_context_budget`) and the conversation state a call continues.

The refusals follow :mod:`~diffusers_starflow2.utils.validation`: a ``ValueError`` naming the argument in
backticks, what was given and what is accepted; a check that normalises (a single prompt into a list) returns the
normalised value.

Special tokens of the tokenizer (``<|im_end|>``, ``<|image_pad|>``, ``</s>``, ...) typed inside a prompt are
refused rather than escaped: the chat template renders the prompt as text that is tokenized as a whole, so a typed
control token would become the real one (ending a turn early, or opening an image slot with no image).  They are
looked for in the text as the model sees it: segments that are rendered next to each other (the text items of one
message, the text parts of a forced answer, the rows of training data) are joined first, so a token split across
two segments (``"what <|im_"`` + ``"end|>"``) is refused like a whole one (:func:`check_special_tokens`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from .image_processing import check_single_image
from .validation import MAX_IMAGES_PER_CALL, _describe

# Positions that the chat template adds around a prompt (role headers, turn ends, <|vision_start|>), kept free of
# prompt tokens when the token limit is derived from the model's context.
CHAT_TEMPLATE_RESERVE = 32
CHAT_ROLES = ("system", "user", "assistant")


def special_tokens(tokenizer) -> List[str]:
    """The tokenizer's special tokens that are matched inside plain text (longest first)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return sorted((t for t in tokens if t), key=len, reverse=True)


def joined_texts(parts: Sequence[Any]) -> List[List[str]]:
    """The runs of adjacent strings of ``parts`` (anything else, an image, ends a run): the pieces of text that are
    rendered next to each other, each run then read as one text."""
    runs, run = [], []
    for part in parts:
        if isinstance(part, str):
            run.append(part)
        else:
            runs, run = runs + ([run] if run else []), []
    return runs + ([run] if run else [])


def check_special_tokens(pieces: Union[str, Sequence[str]], name: str, tokenizer, where: str = "") -> None:
    """Refuse the tokenizer's special tokens in the text as the model sees it: ``pieces``, one text or the adjacent
    segments that are rendered as one text, joined (so a token split across segments is found too).  The one
    special-token check of the pipelines' prompts and of the training data."""
    pieces = [pieces] if isinstance(pieces, str) else list(pieces)
    text = "".join(pieces)
    typed = [t for t in special_tokens(tokenizer) if t in text]
    if not typed:
        return
    token = typed[0]
    whole = any(token in p for p in pieces)
    across = "" if whole or len(pieces) == 1 else f" where its segments {' + '.join(_describe(p) for p in pieces)} join"
    raise ValueError(
        f"`{name}`{where} contains the tokenizer's special token {token!r}{across}, which would act as a control "
        f"token; special tokens are not accepted in text (remove or rephrase it)"
    )


def check_text(text: Any, name: str, tokenizer=None, allow_empty: bool = False, where: str = "") -> str:
    """A string, not blank (unless ``allow_empty``), without the tokenizer's special tokens typed in it
    (:func:`check_special_tokens`).

    ``where`` locates the text inside the argument (e.g. ``" item 1"``) in messages.
    """
    if not isinstance(text, str):
        raise ValueError(f"`{name}`{where} must be a string; got {type(text).__name__} {_describe(text)}")
    if not allow_empty and not text.strip():
        raise ValueError(f"`{name}`{where} must not be empty or blank; got {text!r}")
    if tokenizer is not None:
        check_special_tokens(text, name, tokenizer, where)
    return text


def check_prompt(
    prompt: Any,
    name: str = "prompt",
    allow_empty: bool = False,
    tokenizer=None,
    max_items: Optional[int] = MAX_IMAGES_PER_CALL,
) -> List[str]:
    """A string or a non-empty list/tuple of at most ``max_items`` strings, returned as a list (each item checked by
    :func:`check_text`).  ``allow_empty`` accepts ``""`` items (negative prompts: ``""`` is the unconditional one).
    """
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt:
        prompts = list(prompt)
    else:
        raise ValueError(
            f"`{name}` must be a string or a non-empty list of strings; got {type(prompt).__name__} {_describe(prompt)}"
        )
    if max_items is not None and len(prompts) > max_items:
        raise ValueError(f"`{name}` is a list of {len(prompts)} prompts; one call takes at most {max_items}")
    for i, text in enumerate(prompts):
        check_text(text, name, tokenizer, allow_empty, "" if isinstance(prompt, str) else f" item {i}")
    return prompts


def count_tokens(tokenizer, text: str, add_special_tokens: bool = False) -> int:
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def model_context_length(vlm, tokenizer=None) -> int:
    """Positions the VLM can attend over: its ``max_position_embeddings`` (or the tokenizer's limit)."""
    config = vlm.config.get_text_config() if hasattr(vlm.config, "get_text_config") else vlm.config
    length = getattr(config, "max_position_embeddings", None)
    if not length and tokenizer is not None:
        length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length and length < 10**9 else 32768


def prompt_token_limit(context_length: int, num_latents: int) -> int:
    """Most tokens a prompt may have when one image of ``num_latents`` positions follows it in the context."""
    return max(context_length - num_latents - CHAT_TEMPLATE_RESERVE, 1)


def check_stop(stop: Any, name: str = "stop") -> List[str]:
    """``None``, a non-empty string, or a list/tuple of non-empty strings -> a list."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ValueError(
            f"`{name}` must be None, a non-empty string or a list of non-empty strings; got {_describe(stop)}"
        )
    return list(items)


# -- chat messages ---------------------------------------------------------------------------------------------------


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is meant as chat messages (a list of dicts) rather than segments."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _check_content_item(item: Any, name: str, where: str) -> None:
    if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
        raise ValueError(
            f"`{name}`{where} must be {{'type': 'text', 'text': str}} or {{'type': 'image', 'image': "
            f"image}}; got {_describe(item)}"
        )
    if item["type"] == "text":
        check_text(item.get("text"), name, allow_empty=True, where=f"{where} text")
    elif item.get("image") is None:
        raise ValueError(f"`{name}`{where} is an image item without an 'image'")


def check_messages(messages: Any, name: str = "prompt") -> list:
    """Chat messages: dicts ``{"role": one of CHAT_ROLES, "content": str | [content items]}``, content non-empty."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"`{name}` must be a non-empty list of chat messages; got {_describe(messages)}")
    for i, message in enumerate(messages):
        where = f" message {i}"
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ValueError(
                f"`{name}`{where} must be a dict with 'role' and 'content' (no other keys); got {_describe(message)}"
            )
        if message["role"] not in CHAT_ROLES:
            raise ValueError(
                f"`{name}`{where} role must be one of {list(CHAT_ROLES)}; got {_describe(message['role'])}"
            )
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)) or not content:
            raise ValueError(
                f"`{name}`{where} content must be a string or a non-empty list of content items; got "
                f"{_describe(content)}"
            )
        for j, item in enumerate(content):
            _check_content_item(item, name, f"{where} content item {j}")
    return list(messages)


def check_conversation(
    messages: Sequence[dict],
    images: Sequence,
    answer: Sequence,
    placeholder: str,
    tokenizer,
    image_positions: int,
    name: str = "prompt",
) -> int:
    """Check a parsed interleaved prompt and return the positions it takes in the context.

    ``messages`` are rendered chat messages (text items), ``images`` the images inside them, ``answer`` the forced
    beginning of the answer (strings, ``placeholder`` for an image to generate, or images).
    """
    # what the template renders as one text: the text items of a message side by side, the answer's forced text
    # between its images (and the images to generate)
    runs = [r for m in messages for r in joined_texts([i["text"] if i["type"] == "text" else i for i in m["content"]])]
    runs += joined_texts([None if isinstance(p, str) and p == placeholder else p for p in answer])
    for run in runs:
        for text in run:
            check_text(text, name, allow_empty=True)
        check_special_tokens(run, name, tokenizer)
    texts = [text for run in runs for text in run]
    answer_images = [p for p in answer if not isinstance(p, str) or p == placeholder]
    for image in list(images) + [p for p in answer_images if not isinstance(p, str)]:
        check_single_image(image, name)
    return (
        sum(count_tokens(tokenizer, t) for t in texts)
        + CHAT_TEMPLATE_RESERVE * len(messages)
        + (len(images) + len(answer_images)) * image_positions
    )


def check_context_budget(
    prompt_positions: int,
    max_new_tokens: int,
    max_images: int,
    image_positions: int,
    context_length: int,
    held_positions: int = 0,
    name: str = "prompt",
) -> None:
    """The longest sequence a call may build (``held_positions`` of a conversation continued from a ``state``, the
    prompt, new tokens, new images) fits in the model's context; ``name`` is the text of the guidance branch checked
    (``"negative_prompt"`` for the branches whose user turn it is)."""
    needed = held_positions + prompt_positions + max_new_tokens + max_images * image_positions
    if needed > context_length:
        held = f"the conversation `state` holds {held_positions}, " if held_positions else ""
        raise ValueError(
            f"`{name}` needs up to {needed} positions ({held}{prompt_positions} for the prompt, "
            f"max_new_tokens={max_new_tokens}, max_images={max_images} of {image_positions} positions "
            f"each), more than the model's context of {context_length}; shorten `{name}`, lower "
            f"`max_new_tokens` / `max_images`" + (" or start a new conversation" if held else "")
        )


def check_conversation_state(state: Any, state_type: type, transformer: Any, num_branches: int) -> None:
    """A conversation ``state`` to continue: a ``state_type`` made with ``transformer`` (its caches hold that
    model's keys and values), holding the guidance branches the call needs (a later turn may use fewer branches
    than the first, not more)."""
    if not isinstance(state, state_type):
        raise ValueError(
            f"`state` must be a {state_type.__name__} (the `state` of a previous output); got {type(state).__name__}"
        )
    if state.model is None or state.model() is not transformer:
        raise ValueError(
            "`state` was made by another model (its caches hold another transformer's keys and "
            "values); continue a conversation with a pipeline sharing the transformer that started it"
        )
    if num_branches > state.num_branches:
        name = "image_guidance_scale" if num_branches == 3 else "guidance_scale"
        raise ValueError(
            f"`{name}` needs {num_branches} guidance branches but `state` holds {state.num_branches}; "
            f"use the guidance of every later turn already in the first turn"
        )

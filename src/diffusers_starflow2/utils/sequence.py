# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Interleaved text/image sequences: chat messages -> token ids with latent spans, and batching.

One layout is used by every pipeline and by training, so what the model sees at sampling time is what it was trained
on.  A conversation is rendered with the tokenizer's chat template (Qwen2.5-VL's: an image renders as
``<|vision_start|><|image_pad|><|vision_end|>``); each ``<|image_pad|>`` is then expanded into the ``N`` latent
positions of one image span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

import torch

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

Message = Dict[str, Union[str, List[dict]]]


@dataclass
class TokenLayout:
    """One sample: token ids (``<|image_pad|>`` at latent positions), which positions are latents, and which tokens
    belong to assistant turns (the targets of the text loss)."""

    input_ids: List[int]
    latent_mask: List[bool]
    assistant_mask: List[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def special_id(tokenizer, token: str) -> int:
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or idx == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {token} token")
    return idx


def user_message(*parts) -> Message:
    """A user turn from strings and images (anything that is not a string becomes an image slot)."""
    return {
        "role": "user",
        "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts],
    }


def encode_conversation(
    tokenizer,
    messages: Sequence[Message],
    num_latents: int,
    add_generation_prompt: bool = False,
    open_image: bool = False,
) -> TokenLayout:
    """Render ``messages`` and expand each image into ``num_latents`` latent positions.

    ``add_generation_prompt`` appends the assistant header; ``open_image`` then also appends ``<|vision_start|>``
    so that the next positions are the latents of an image to generate.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if open_image:
        ids = ids + [special_id(tokenizer, VISION_START)]
    pad, im_start, im_end = (special_id(tokenizer, t) for t in (IMAGE_PAD, IM_START, IM_END))
    out, latent, assistant = [], [], []
    role, in_header = None, False
    for tok in ids:
        header_token = tok == im_start or in_header  # "<|im_start|>role\n" belongs to no turn's content
        if tok == im_start:
            role, in_header = "", True
        elif in_header:
            piece = tokenizer.decode([tok])
            role += piece.split("\n")[0]
            in_header = "\n" not in piece
        is_assistant = role == "assistant" and not header_token
        if tok == pad:
            out += [pad] * num_latents
            latent += [True] * num_latents
            assistant += [is_assistant] * num_latents
        else:
            out.append(tok)
            latent.append(False)
            assistant.append(is_assistant)
        if tok == im_end:
            role = None
    return TokenLayout(out, latent, assistant)


def pad_layouts(
    layouts: Sequence[TokenLayout], pad_token_id: int, side: str = "left", device=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack layouts into ``input_ids``, ``latent_mask``, ``attention_mask``, ``assistant_mask``, all ``(B, T)``.

    Prompts are padded on the left so that every sample's next position is the same column.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right'; got {side!r}")
    T = max(len(layout) for layout in layouts)
    rows = []
    for layout in layouts:
        n = T - len(layout)
        parts = [
            layout.input_ids,
            layout.latent_mask,
            [True] * len(layout),
            layout.assistant_mask or [False] * len(layout),
        ]
        fills = [pad_token_id, False, False, False]
        rows.append([([f] * n + p) if side == "left" else (p + [f] * n) for p, f in zip(parts, fills)])
    ids, lat, att, asst = (torch.tensor([r[k] for r in rows], device=device) for k in range(4))
    return ids, lat.bool(), att.bool(), asst.bool()


def encode_next_turn(tokenizer, messages: Sequence[Message], num_latents: int, open_image: bool = False) -> TokenLayout:
    """What follows an assistant answer already in a sequence: the ``<|im_end|>`` that closes it, ``messages``, the
    assistant header (and ``<|vision_start|>`` with ``open_image``), as the chat template renders them after an
    assistant turn - so a conversation continued turn by turn is token for token the conversation rendered whole."""
    prefix = encode_conversation(tokenizer, [{"role": "assistant", "content": ""}], num_latents)
    full = encode_conversation(
        tokenizer,
        [{"role": "assistant", "content": ""}, *messages],
        num_latents,
        add_generation_prompt=True,
        open_image=open_image,
    )
    end = len(prefix) - 1 - prefix.input_ids[::-1].index(special_id(tokenizer, IM_END))  # the answer's <|im_end|>
    if full.input_ids[: end + 1] != prefix.input_ids[: end + 1]:
        raise ValueError(
            "the tokenizer's chat template does not render a conversation as the concatenation of its "
            "turns; conversations cannot be continued with it"
        )
    return TokenLayout(full.input_ids[end:], full.latent_mask[end:], full.assistant_mask[end:])


def truncate_text(tokenizer, text: str, max_tokens: int, add_special_tokens: bool = False) -> Tuple[str, str]:
    """``(kept, cut)``: ``text`` split after its first tokens, so that ``kept`` tokenizes to at most ``max_tokens``
    tokens (counting the tokenizer's own special tokens, such as T5's ``</s>``, when ``add_special_tokens``).

    ``cut`` is ``""`` when the whole text fits.  The split is made in the text itself, at a token boundary (the
    tokenizer's offsets), so ``kept`` is a prefix of ``text``, never re-decoded.
    """
    special = len(tokenizer("", add_special_tokens=True)["input_ids"]) if add_special_tokens else 0
    budget = max(max_tokens - special, 0)
    # verbose=False: a text longer than the tokenizer's model_max_length is what this function is for
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if len(ids) <= budget:
        return text, ""
    while True:
        end = offsets[budget - 1][1] if budget > 0 else 0
        kept = text[:end]
        # a word cut in two may tokenize into more pieces than it was part of: step back until it fits
        if (
            budget == 0
            or len(tokenizer(kept, add_special_tokens=False, verbose=False)["input_ids"]) <= max_tokens - special
        ):
            return kept, text[end:]
        budget -= 1

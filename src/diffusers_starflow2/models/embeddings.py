# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Rotary position embeddings (RoPE) of the flow blocks, the FAE and the VLM stream's static decode path.

One layout for the tables: ``rope = rope_tables(angles)`` is ``(2, ..., T, D)``, the cosines and sines of one angle
per channel, laid out like the channels they rotate (each angle stands at both channels of its pair).  Rotating
``x (..., T, D)`` is always ``x * cos + rotate(x) * sin`` (:func:`apply_rope`).

Two channel pairings are needed, because weights were trained with each and a rotation cannot be moved between
them without permuting the query/key projections:

* **adjacent pairs** (``2i``, ``2i + 1``), the default: TARFlow / STARFlow's layout, which every converted
  reference checkpoint uses;
* **halves** (``i``, ``i + D/2``, ``halves=True``): transformers' ``rotate_half`` layout, which Qwen2.5-VL's
  language model uses (its tables come from the decoder's own rotary embedding) and which reference flows built
  with ``hf_style_rope=True`` use.

The angles themselves (:func:`rope_angles`) are TARFlow's: one axis is the language-model RoPE; two axes give half
of the frequencies to each grid axis; three axes give the text axis ``TEXT_AXIS_FREQS`` frequencies and share the
rest between the two grid axes (positions from :func:`rope_positions`).
"""

from __future__ import annotations

import math

import torch

from ..utils.torch_utils import has_values

ROPE_THETA = 10000
# Number of rotary frequencies given to the text axis of 3-axis positions (the reference's fixed split).
TEXT_AXIS_FREQS = 8


def rope_positions(
    height: int, width: int, text_length: int, pt_seq_len: float, mode: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """Positions of ``text_length`` text tokens followed by a ``height x width`` grid in raster order.

    ``mode="1d"``: one index per token, text first.  ``"2d"``: (row, col) of the grid scaled so that the grid's
    geometric-mean side equals ``pt_seq_len`` (no text).  ``"3d"``: (row, col, text) - text tokens sit at the grid
    origin and walk the third axis over ``[0, pt_seq_len)``; grid tokens have text coordinate 0.
    Returns ``(T, n_axes)`` float positions on ``device``.
    """
    if mode == "1d":
        return torch.arange(text_length + height * width, device=device).float().unsqueeze(-1)
    mean_side = math.sqrt(height * width)
    rows = torch.arange(height, device=device) / mean_side * pt_seq_len
    cols = torch.arange(width, device=device) / mean_side * pt_seq_len
    rows, cols = (p.reshape(-1) for p in torch.meshgrid(rows, cols, indexing="ij"))
    if mode == "2d":
        return torch.stack([rows, cols], dim=-1)
    if mode != "3d":
        raise ValueError(f"rope mode must be '1d', '2d' or '3d'; got {mode!r}")
    text_pos = torch.arange(text_length, device=device) / max(text_length, 1) * pt_seq_len
    zeros = torch.zeros(text_length, device=device)
    axes = [torch.cat([zeros, rows]), torch.cat([zeros, cols]), torch.cat([text_pos, torch.zeros_like(rows)])]
    return torch.stack(axes, dim=-1)


def rope_angles(positions: torch.Tensor, head_dim: int, halves: bool = False) -> torch.Tensor:
    """Rotation angles ``(..., T, head_dim)`` for ``(..., T, n_axes)`` positions, on the positions' device, each angle
    at both channels of its pair: adjacent channels, or with ``halves`` channels ``i`` and ``i + head_dim/2``.

    One axis: the standard language-model RoPE.  Two axes: half the frequencies per grid axis.  Three axes: the
    text axis takes ``TEXT_AXIS_FREQS`` frequencies and the two grid axes share the rest.
    """
    device = positions.device

    def inv_freq(dim: int) -> torch.Tensor:
        return 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))

    half = head_dim // 2
    if positions.shape[-1] == 1:
        angles = positions[..., 0:1] * inv_freq(head_dim)
    else:
        grid_dim = half - TEXT_AXIS_FREQS if positions.shape[-1] == 3 else half
        parts = [positions[..., 0:1] * inv_freq(grid_dim), positions[..., 1:2] * inv_freq(grid_dim)]
        if positions.shape[-1] == 3:
            text_freq = 1.0 / (
                ROPE_THETA ** (torch.arange(0, TEXT_AXIS_FREQS, device=device).float() / TEXT_AXIS_FREQS)
            )
            parts.append(positions[..., 2:3] * text_freq)
        angles = torch.cat(parts, dim=-1)
    return torch.cat([angles, angles], dim=-1) if halves else angles.repeat_interleave(2, dim=-1)


def rope_tables(angles: torch.Tensor) -> torch.Tensor:
    """``(2, ..., T, D)``: cosines and sines of ``angles (..., T, D)``, computed once and shared by all layers."""
    return torch.stack([angles.cos(), angles.sin()])


_PAIR_SIGN = torch.tensor([-1.0, 1.0])


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...); flip + sign, no concatenation.  reshape, not unflatten:
    # dynamo cannot trace Tensor.unflatten's Python body under a torch function mode (compile_utils.FewRowLinears)
    pairs = x.reshape(*x.shape[:-1], -1, 2).flip(-1)
    return (pairs * _PAIR_SIGN.to(device=x.device, dtype=x.dtype)).flatten(-2)


def _rotate_halves(x: torch.Tensor) -> torch.Tensor:
    # (x_a, x_b) -> (-x_b, x_a) for the two halves of the channels
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, halves: bool = False) -> torch.Tensor:
    """Rotate ``x (..., T, D)`` by ``rope = rope_tables(angles)`` (broadcastable to ``(2, ..., T, D)``), pairing
    adjacent channels, or with ``halves`` channel ``i`` with ``i + D/2`` (the tables laid out to match)."""
    cos, sin = rope[0], rope[1]
    return x * cos + (_rotate_halves(x) if halves else _rotate_pairs(x)) * sin


# Model types whose language model uses Qwen's 3-axis multimodal RoPE and assigns image positions as below.
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def position_ids(
    latent_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    grid: tuple[int, int],
    mrope: bool = True,
    start: torch.LongTensor | None = None,
    open_cells: torch.LongTensor | int = 0,
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """
    Position ids of new positions of interleaved text/image sequences, for the whole batch at once.

    Every image is a run of `grid_h * grid_w` latent positions in raster order (a run may be split over calls:
    `open_cells` says how much of the current one came before). `<|vision_start|>` / `<|vision_end|>` are text.

    With `mrope=True` this reproduces Qwen2.5-VL's `get_rope_index` for still images:

    - a text token at position `p` gets `(p, p, p)`; the next token gets `p + 1`;
    - an image starting at `p` (the position right after `<|vision_start|>`) gets `(p, p + row, p + col)` for each
      grid cell, and the token after the image continues at `p + max(grid_h, grid_w)` (= max id + 1).

    With `mrope=False` (plain causal LMs) every position, image cells included, takes the next 1-D position.
    Padding takes the current position of its sample and advances nothing; a sample that takes only padding in a call
    (idle while others sample an image span) is outside the span.

    Everything is computed with tensor operations (no value is read by Python, so it runs on `meta` and under
    `torch.compile`); the layout checks (no text inside an image span, the samples taking positions agree on the
    cells of an open span) run where the values exist.

    Args:
        latent_mask (`torch.Tensor` of shape `(B, T)`): True at image-latent positions.
        attention_mask (`torch.Tensor` of shape `(B, T)`): False at padding.
        grid (`tuple[int, int]`): `(grid_h, grid_w)` of every image (the LLM-side grid).
        mrope (`bool`, defaults to `True`): Build 3-axis M-RoPE ids instead of 1-D ids.
        start (`torch.LongTensor` of shape `(B,)`, *optional*): First free position of each sample (default 0).
        open_cells (`torch.LongTensor` of shape `(B,)` or `int`, defaults to 0): Cells of an unfinished image
            already placed in each sample.

    Returns:
        `tuple`: ids `(3, B, T)` (`mrope=True`) or `(B, T)`, the next free position of each sample `(B,)`, and the
        cells of the image left unfinished in each sample `(B,)`.
    """
    grid_h, grid_w = grid
    cells = grid_h * grid_w
    real = attention_mask.bool()
    latent = (latent_mask.bool() & real).long()  # (B, T)
    if start is None:
        start = torch.zeros(latent.shape[0], dtype=torch.long, device=latent.device)
    opened = torch.as_tensor(open_cells, dtype=torch.long, device=latent.device).expand(latent.shape[0])  # (B,)
    cell = (opened[:, None] + latent.cumsum(1) - latent) % cells  # (B, T) grid cell of (or before) each position
    text = real & ~latent.bool()
    after = (opened + latent.sum(1)) % cells  # (B,)
    if has_values(cell, after):
        inside = text & (cell != 0)
        if bool(inside.any()):
            raise ValueError(
                f"a text token arrived inside an image span after {int(cell[inside][0])} of {cells} latents"
            )
        # a sample that takes only padding (idle while others sample an image) leaves the open span to the others
        taking = after[real.any(1)]
        if bool((taking != taking[:1]).any()):
            raise ValueError("every sample taking positions must have the same number of latents in an open span")

    if mrope:  # an image advances the text axis once, at its last cell, by its extent
        advance = text.long() + latent * (cell == cells - 1).long() * max(grid_h, grid_w)
    else:
        advance = real.long()
    base = start[:, None] + advance.cumsum(1) - advance  # (B, T) position before each one advances
    if mrope:
        ids = torch.stack([base, base + latent * (cell // grid_w), base + latent * (cell % grid_w)])  # (3, B, T)
    else:
        ids = base
    return ids, start + advance.sum(1), after

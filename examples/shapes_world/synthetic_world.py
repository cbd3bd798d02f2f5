"""The synthetic "shapes world": one coloured shape per image on a white background.

Everything here is deterministic from a seed: each generated item draws from its own
``numpy.random.Generator`` seeded with ``(seed, split, kind, index)``, so no global random state is
touched and ``write_world(num_images=N)`` is a prefix of ``write_world(num_images=M)`` for ``M > N``.

Attributes: 4 colours x 3 shapes x 5 positions = 60 combinations (:func:`all_combinations`).

Train / held-out split (:data:`SPLITS`)
    Every combination appears in both splits (there are only 60). The held-out split differs in
    (a) its random stream: jitters are drawn with a different split id, so scenes are fresh, and
    (b) its phrasing: captions, questions, edit instructions and document texts use paraphrases that
    never occur in train (the ``"heldout"`` template lists below). The canonical caption
    (:func:`canonical_caption`, e.g. "a red circle on the left") is train-only phrasing and is the
    prompt format used for evaluating generation.

Layout written by :func:`write_world` (``file_name`` values are relative to the kind's folder)::

    OUTPUT/world.json                    config + counts (seed, split, image_size, palette, ...)
    OUTPUT/caption/metadata.jsonl        {"file_name", "text", "attributes"}
    OUTPUT/caption/images/00000.png
    OUTPUT/understanding/metadata.jsonl  {"file_name", "prompt", "response", "attribute"} x3 per image
    OUTPUT/understanding/images/00000.png
    OUTPUT/edit/metadata.jsonl           {"source_file_name", "instruction", "target_file_name", "edit"}
    OUTPUT/edit/images/00000_source.png, 00000_target.png
    OUTPUT/interleaved/metadata.jsonl    {"segments": [{"text": ...} | {"file_name": ...}, ...]}
    OUTPUT/interleaved/images/00000_0.png, 00000_1.png
    OUTPUT/chat_edit/metadata.jsonl      {"prompt", "source_file_name", "instruction", "target_file_name", "edit"}
    OUTPUT/chat_edit/images/00000_source.png, 00000_target.png

A ``chat_edit`` item is a two-turn conversation: the user asks for the source image with a caption, the assistant
draws it, the user asks for an edit and the assistant draws the target (see :func:`make_chat_edit`).

CLI: ``python -m shapes_world.synthetic_world --output DIR --num_images N --seed S [--image_size 64]
[--split train|heldout] [--kinds caption,understanding,edit,interleaved,chat_edit]``
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

# The palette and the shape anchors are the analyser's: one definition for drawing and for judging.
from diffusers_starflow2.utils.io import write_text_atomic

from .shape_analysis import ANCHORS, PALETTE

COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUND = (255, 255, 255)
# new kinds go last: an item's random stream is seeded with its kind's index here
KINDS: tuple[str, ...] = ("caption", "understanding", "edit", "interleaved", "chat_edit")
SPLITS: tuple[str, ...] = ("train", "heldout")

MAX_OFFSET = 1 / 32  # centre jitter, fraction of the side
SCALE_RANGE = (0.30, 0.36)  # shape side / diameter, fraction of the side
MAX_TINT = 10  # per-channel colour jitter

# ----------------------------------------------------------------------------------------------
# phrasing (small vocabulary). "train" lists are the training phrasings, "heldout" never in train.
LOC = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
SIDE = {
    "left": "on the left side",
    "right": "on the right side",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}
NOUN = {"circle": "round shape", "square": "square shape", "triangle": "triangle shape"}
CAPTION_TEMPLATES = {
    # the first train template is canonical and drawn with probability 1/2
    "train": (
        "a {color} {shape} {loc}",
        "a {shape} that is {color}, {side}",
        "{position}: a {color} {shape}",
        "a {color} {noun} {loc}",
    ),
    "heldout": ("there is a {color} {shape} {loc}", "{loc}, a {color} {shape}"),
}
QUESTIONS = {
    "train": {
        "color": ("what color is the shape?", "which color is it?", "what is the color of the shape?"),
        "shape": ("what shape is it?", "what kind of shape is this?", "which shape is shown?"),
        "position": ("where is the shape?", "where is it located?", "in which part of the image is the shape?"),
    },
    "heldout": {
        "color": ("what color does the object have?",),
        "shape": ("name the shape.",),
        "position": ("where is the object?",),
    },
}
EDIT_TEMPLATES = {
    "train": {
        "color": ("make the {shape} {new}", "change the color to {new}", "turn it {new}"),
        "shape": ("make it a {new}", "turn the {shape} into a {new}", "change the shape to a {new}"),
        "position": ("move the {shape} to the {new}", "put it {newloc}", "move it to the {new}"),
    },
    "heldout": {
        "color": ("paint the {shape} {new}",),
        "shape": ("replace the {shape} with a {new}",),
        "position": ("place the {shape} {newloc}",),
    },
}
EDIT_WEIGHTS = {"color": 0.6, "shape": 0.2, "position": 0.2}
DOC_TEMPLATES = {
    "train": {
        "color": ("here is a {caption}:", "and now the same {shape} in {new}:"),
        "position": ("here is a {caption}:", "and here it is moved to the {new}:"),
        "describe": ("this shows a {caption}.",),
    },
    "heldout": {
        "color": ("look at this {caption}:", "the same {shape}, now {new}:"),
        "position": ("look at this {caption}:", "the same {shape}, now {newloc}:"),
        "describe": ("in this picture: a {caption}.",),
    },
}

Rng = Union[np.random.Generator, random.Random]


def _randint(rng: Rng, n: int) -> int:
    """Uniform integer in [0, n) from either kind of generator."""
    return int(rng.integers(n)) if isinstance(rng, np.random.Generator) else rng.randrange(n)


def _uniform(rng: Rng, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _choice(rng: Rng, seq: Sequence):
    return seq[_randint(rng, len(seq))]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """One shape on a white background. Jitters are fractions of the image side, so a scene
    renders identically (up to resolution) at any size."""

    color: str
    shape: str
    position: str
    dx: float = 0.0  # centre offset, |dx|, |dy| <= MAX_OFFSET
    dy: float = 0.0
    scale: float = 0.33  # side / diameter / triangle base and height, fraction of the side
    tint: tuple[int, int, int] = (0, 0, 0)  # per-channel colour jitter in [-MAX_TINT, MAX_TINT]

    def __post_init__(self):
        for name, value, allowed in (
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"Scene.{name} must be one of {allowed}, got {value!r}")

    @property
    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "position": self.position}

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(PALETTE[self.color], self.tint))

    @property
    def center(self) -> tuple[float, float]:
        ax, ay = ANCHORS[self.position]
        return ax + self.dx, ay + self.dy

    def replace(self, **changes) -> "Scene":
        """Same scene (same jitters) with some attributes changed."""
        return dataclasses.replace(self, **changes)


def all_combinations() -> list[tuple[str, str, str]]:
    """All 60 (color, shape, position) triples, in a fixed order."""
    return list(itertools.product(COLORS, SHAPES, POSITIONS))


def random_scene(rng: Rng, color: str | None = None, shape: str | None = None, position: str | None = None) -> Scene:
    """A scene with random jitters; attributes not given are drawn uniformly."""
    color = color or _choice(rng, COLORS)
    shape = shape or _choice(rng, SHAPES)
    position = position or _choice(rng, POSITIONS)
    return Scene(
        color,
        shape,
        position,
        dx=round(_uniform(rng, -MAX_OFFSET, MAX_OFFSET), 5),
        dy=round(_uniform(rng, -MAX_OFFSET, MAX_OFFSET), 5),
        scale=round(_uniform(rng, *SCALE_RANGE), 5),
        tint=tuple(_randint(rng, 2 * MAX_TINT + 1) - MAX_TINT for _ in range(3)),
    )


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` as an RGB ``size`` x ``size`` image (drawn at ``supersample``x, LANCZOS-downsampled).
    The shape's bounding box is centred on the (jittered) anchor; triangles point up."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy = (c * big for c in scene.center)
    half = scene.scale * big / 2
    x0, y0, x1, y1 = (round(v) for v in (cx - half, cy - half, cx + half, cy + half))
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=scene.rgb)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=scene.rgb)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=scene.rgb)
    return image.resize((size, size), Image.LANCZOS)


# ----------------------------------------------------------------------------------------------
def _fields(scene: Scene) -> dict[str, str]:
    return {
        "color": scene.color,
        "shape": scene.shape,
        "position": scene.position,
        "loc": LOC[scene.position],
        "side": SIDE[scene.position],
        "noun": NOUN[scene.shape],
    }


def canonical_caption(scene: Scene) -> str:
    """E.g. "a red circle on the left", "a blue square at the top", "a green triangle in the center"."""
    return CAPTION_TEMPLATES["train"][0].format(**_fields(scene))


def caption(scene: Scene, rng: Rng | None = None, split: str = "train") -> str:
    """A caption of ``scene``: canonical when ``rng`` is None; otherwise for "train" canonical with
    probability 1/2 else a train paraphrase, for "heldout" a held-out paraphrase."""
    templates = CAPTION_TEMPLATES[_check_split(split)]
    if rng is None:
        return canonical_caption(scene)
    if split == "train":
        if _randint(rng, 2) == 0:
            return canonical_caption(scene)
        templates = templates[1:]
    return _choice(rng, templates).format(**_fields(scene))


def questions(scene: Scene, rng: Rng, split: str = "train") -> list[tuple[str, str, str]]:
    """One ``(attribute, question, single-word answer)`` per attribute (color, shape, position)."""
    table = QUESTIONS[_check_split(split)]
    return [(attr, _choice(rng, table[attr]), scene.attributes[attr]) for attr in ("color", "shape", "position")]


def _other(rng: Rng, values: Sequence[str], current: str) -> str:
    return _choice(rng, [v for v in values if v != current])


def make_edit(scene: Scene, rng: Rng, split: str = "train", attribute: str | None = None) -> tuple[Scene, str, dict]:
    """Draw an edit of ``scene``: returns ``(target, instruction, info)`` where ``target`` is the same
    scene (same jitters) with exactly one attribute changed and ``info = {"attribute", "from", "to"}``.
    ``attribute`` defaults to a draw with :data:`EDIT_WEIGHTS` (colour 0.6, shape 0.2, position 0.2)."""
    table = EDIT_TEMPLATES[_check_split(split)]
    if attribute is None:
        attribute = _weighted(rng, EDIT_WEIGHTS)
    values = {"color": COLORS, "shape": SHAPES, "position": POSITIONS}[attribute]
    old = scene.attributes[attribute]
    new = _other(rng, values, old)
    target = scene.replace(**{attribute: new})
    text = _choice(rng, table[attribute]).format(shape=scene.shape, new=new, newloc=LOC.get(new, ""))
    return target, text, {"attribute": attribute, "from": old, "to": new}


def make_chat_edit(scene: Scene, rng: Rng, split: str = "train") -> tuple[str, Scene, str, dict]:
    """A two-turn chat about ``scene``: ``(request, target, instruction, info)``. The user asks for ``scene`` with a
    caption (canonical half of the time in train, as :func:`caption`), then asks for the edit that turns the
    assistant's drawing into ``target`` (:func:`make_edit`, colour with probability 0.6)."""
    request = caption(scene, rng, split)
    target, instruction, info = make_edit(scene, rng, split)
    return request, target, instruction, info


def _weighted(rng: Rng, weights: dict[str, float]) -> str:
    names, w = list(weights), np.cumsum(list(weights.values()))
    u = _uniform(rng, 0.0, float(w[-1]))
    return names[min(int(np.searchsorted(w, u, side="right")), len(names) - 1)]


def make_document(rng: Rng, split: str = "train") -> list[Union[str, Scene]]:
    """An interleaved document: a list of text strings and :class:`Scene` s (images), one of
    text-image-text-image (colour change or move) or image-text (description)."""
    table = DOC_TEMPLATES[_check_split(split)]
    scene = random_scene(rng)
    form = _choice(rng, ("color", "position", "describe"))
    cap = canonical_caption(scene)[2:]  # drop the leading "a "
    if form == "describe":
        return [scene, table["describe"][0].format(caption=cap)]
    target, _, info = make_edit(scene, rng, split, attribute=form)
    first, second = table[form]
    new = info["to"]
    return [
        first.format(caption=cap),
        scene,
        second.format(shape=scene.shape, new=new, newloc=LOC.get(new, "")),
        target,
    ]


# ----------------------------------------------------------------------------------------------
def _item_rng(seed: int, split: str, kind: str, index: int, stream: int = 0) -> np.random.Generator:
    """Independent generator per item and stream (0: scene jitters, 1: text and edits,
    2: the combination permutation of block ``index``)."""
    return np.random.default_rng([seed, SPLITS.index(split), KINDS.index(kind), index, stream])


def balanced_scene(seed: int, split: str, kind: str, index: int) -> Scene:
    """Scene ``index`` of a kind: attribute combinations cycle through a fresh permutation of all
    60 every 60 items (balanced coverage), jitters come from the item's own generator."""
    block, offset = divmod(index, 60)
    perm = _item_rng(seed, split, kind, block, stream=2).permutation(60)
    color, shape, position = all_combinations()[int(perm[offset])]
    return random_scene(_item_rng(seed, split, kind, index), color, shape, position)


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", optimize=False)


def _jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def _write_pair(folder: Path, i: int, source: Scene, target: Scene, image_size: int) -> dict:
    """Render an edit's source and target images; their file names as a row fragment."""
    src, tgt = f"images/{i:05d}_source.png", f"images/{i:05d}_target.png"
    _save_png(render(source, image_size), folder / src)
    _save_png(render(target, image_size), folder / tgt)
    return {"source_file_name": src, "target_file_name": tgt}


def _write_document(folder: Path, i: int, rng: np.random.Generator, split: str, image_size: int) -> tuple[list, int]:
    """One interleaved document; ``j`` numbers its images in order of appearance."""
    segments, j = [], 0
    for seg in make_document(rng, split):
        if isinstance(seg, Scene):
            name = f"images/{i:05d}_{j}.png"
            _save_png(render(seg, image_size), folder / name)
            segments.append({"file_name": name})
            j += 1
        else:
            segments.append({"text": seg})
    return [{"segments": segments}], j


def _write_item(folder: Path, kind: str, i: int, seed: int, split: str, image_size: int) -> tuple[list, int]:
    """Write item ``i`` of ``kind`` into ``folder``: ``(metadata rows, number of images written)``."""
    rng = _item_rng(seed, split, kind, i, stream=1)
    if kind == "interleaved":
        return _write_document(folder, i, rng, split, image_size)
    scene = balanced_scene(seed, split, kind, i)
    if kind == "edit":
        target, instruction, info = make_edit(scene, rng, split)
        return [{**_write_pair(folder, i, scene, target, image_size), "instruction": instruction, "edit": info}], 2
    if kind == "chat_edit":
        request, target, instruction, info = make_chat_edit(scene, rng, split)
        row = {"prompt": request, "instruction": instruction, "edit": info}
        return [{**_write_pair(folder, i, scene, target, image_size), **row}], 2
    name = f"images/{i:05d}.png"
    _save_png(render(scene, image_size), folder / name)
    if kind == "caption":
        return [{"file_name": name, "text": caption(scene, rng, split), "attributes": scene.attributes}], 1
    return [
        {"file_name": name, "prompt": q, "response": a, "attribute": attr}
        for attr, q, a in questions(scene, rng, split)
    ], 1


def write_world(
    output_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    image_size: int = 64,
    kinds: Sequence[str] = KINDS,
    split: str = "train",
    progress: bool = True,
) -> dict:
    """Write ``num_images`` items of each kind in ``kinds`` under ``output_dir`` (layout in the module
    docstring): one image per caption / understanding item (3 QA rows each), a source+target pair per
    edit and per chat edit, and one document (1-2 images) per interleaved item. Images are written first and each
    ``metadata.jsonl`` (then ``world.json``) is written atomically last, so a folder with metadata is
    complete. Re-running into the same folder overwrites files; stale extra images are left alone.
    Returns the ``world.json`` content."""
    from tqdm.auto import tqdm

    _check_split(split)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if num_images < 1 or image_size < 8:
        raise ValueError(f"need num_images >= 1 and image_size >= 8, got {num_images}, {image_size}")
    root = Path(output_dir)
    counts: dict[str, dict[str, int]] = {}
    bar = tqdm(total=num_images * len(kinds), desc=f"shapes world ({split})", unit="item", disable=not progress)
    for kind in kinds:
        folder = root / kind
        (folder / "images").mkdir(parents=True, exist_ok=True)
        rows, n_files = [], 0
        for i in range(num_images):
            item_rows, item_files = _write_item(folder, kind, i, seed, split, image_size)
            rows += item_rows
            n_files += item_files
            bar.update(1)
        write_text_atomic(folder / "metadata.jsonl", _jsonl(rows))
        counts[kind] = {"rows": len(rows), "images": n_files}
    bar.close()
    info = {
        "version": 1,
        "seed": seed,
        "split": split,
        "image_size": image_size,
        "num_images": num_images,
        "kinds": counts,
        "palette": {k: list(v) for k, v in PALETTE.items()},
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
    }
    write_text_atomic(root / "world.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the synthetic shapes world (caption / understanding / edit / interleaved / chat_edit folders)."
    )
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--num_images", type=int, required=True, help="items per kind")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        info = write_world(args.output, args.num_images, args.seed, args.image_size, kinds, args.split)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(info["kinds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

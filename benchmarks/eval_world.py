"""Quality report of a STARFlow2 trained on the synthetic shapes world (default: the embedded model).

Measures, on held-out material of the world (fresh jitters and wordings never seen in training):

* prompt adherence of generated images: colour / shape / position accuracy of the drawn shape, read by the
  deterministic analyser ``shapes_world.shape_analysis`` (guidance on and off);
* understanding accuracy: single-word answers to questions about held-out images, asked in the training wording and
  in the held-out wording (paraphrases never seen in training);
* colour-edit success: the edited image has the requested colour (and keeps its shape), both wordings;
* colour-edit success inside a chat: "draw X", then a colour instruction in the next turn of the same conversation
  (the interleaved pipeline continuing its ``state``, text+image guidance as in ``tests/test_pipeline_starflow2_edit``);
* bits/dim of held-out images under their captions (the flow's exact likelihood of noisy FAE latents).

Prints a markdown table and writes a grid of samples (PNG).

    python benchmarks/eval_world.py [--model DIR] [--seeds 2] [--grid docs/images/world_samples.png]
                                    [--annealed_guidance] [--weights float32|bfloat16|int8]

``--annealed_guidance`` samples with the scheduler's annealed guidance (ml-itarflow's ramp: the ``k``-th of ``N``
latents guided at ``k/N`` of the scales) instead of the model's scheduler config, for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the shapes world example

from shapes_world.shape_analysis import analyze_shape  # noqa: E402
from shapes_world.synthetic_world import (  # noqa: E402
    all_combinations,
    canonical_caption,
    make_edit,
    questions,
    random_scene,
    render,
)

from diffusers_starflow2 import (  # noqa: E402
    IMAGE_PLACEHOLDER,
    StarFlow2EditPipeline,
    StarFlow2InterleavedPipeline,
    StarFlow2Pipeline,
    TarFlowScheduler,
)
from diffusers_starflow2.cli import DEFAULT_MODEL  # noqa: E402
from diffusers_starflow2.utils.sequence import encode_conversation, pad_layouts  # noqa: E402

HELDOUT_SEED = 12345


def generation_accuracy(pipe, guidance_scale: float, seeds: int, keep: list) -> dict:
    hits = {"color": 0, "shape": 0, "position": 0}
    total = 0
    rng = np.random.default_rng(HELDOUT_SEED)
    for i, (color, shape, position) in enumerate(all_combinations()):
        scene = random_scene(rng, color, shape, position)
        prompt = canonical_caption(scene)
        gens = [torch.Generator().manual_seed(HELDOUT_SEED + s) for s in range(seeds)]
        images = pipe([prompt] * seeds, guidance_scale=guidance_scale, generator=gens).images
        for image in images:
            report = analyze_shape(image).attributes
            for key, want in (("color", color), ("shape", shape), ("position", position)):
                hits[key] += report[key] == want
            total += 1
        if i % 6 == 0 and guidance_scale > 0:  # every colour, shape and position appears in the grid
            keep.append((prompt, images[0]))
    return {k: v / total for k, v in hits.items()}


def understanding_accuracy(pipe, n: int, image_size: int, wording: str) -> float:
    """Held-out images (fresh scenes); questions in the training wording or the held-out wording."""
    rng = np.random.default_rng(HELDOUT_SEED + 1)
    right = total = 0
    for _ in range(n):
        scene = random_scene(rng)
        image = render(scene, image_size)
        for _, question, answer in questions(scene, rng, split=wording):
            text = pipe([image, question], max_new_tokens=8, guidance_scale=0.0).text.strip().lower()
            right += text.split(" ")[0].strip(".") == answer
            total += 1
    return right / total


def edit_success(pipe, n: int, image_size: int, keep: list, wording: str) -> float:
    """Colour edits of held-out images; instructions in the training wording or the held-out wording."""
    rng = np.random.default_rng(HELDOUT_SEED + 2)
    right = 0
    for i in range(n):
        scene = random_scene(rng)
        target, instruction, info = make_edit(scene, rng, split=wording, attribute="color")
        out = pipe(
            image=render(scene, image_size),
            prompt=instruction,
            generator=torch.Generator().manual_seed(HELDOUT_SEED + i),
        ).images[0]
        report = analyze_shape(out).attributes
        right += report["color"] == target.color and report["shape"] == target.shape
        if len(keep) < 4:
            keep.append((f"{canonical_caption(scene)} -> {instruction}", out))
    return right / n


def chat_edit_success(chat, n: int, wording: str) -> float:
    """Held-out chats: the canonical caption of a fresh scene, then a colour instruction (training or held-out
    wording) continuing the same conversation; the answer must have the requested colour and keep the shape."""
    rng = np.random.default_rng(HELDOUT_SEED + 4)
    options = dict(max_new_tokens=0, image_guidance_scale=1.5)
    right = 0
    for i in range(n):
        scene = random_scene(rng)
        target, instruction, _ = make_edit(scene, rng, split=wording, attribute="color")
        seed = torch.Generator().manual_seed
        first = chat([canonical_caption(scene), IMAGE_PLACEHOLDER], generator=seed(HELDOUT_SEED + i), **options)
        edited = chat(
            [instruction, IMAGE_PLACEHOLDER], state=first.state, generator=seed(HELDOUT_SEED + n + i), **options
        )
        report = analyze_shape(edited.images[0]).attributes
        right += report["color"] == target.color and report["shape"] == target.shape
    return right / n


@torch.no_grad()
def heldout_bits_per_dim(pipe, n: int, image_size: int) -> float:
    """Mean bits/dim of held-out images (FAE latents at the sampling noise level) given their captions."""
    rng = np.random.default_rng(HELDOUT_SEED + 3)
    t, vae, tok = pipe.transformer, pipe.vae, pipe.tokenizer
    level = pipe.scheduler.config.noise_level
    bpd = []
    for i in range(n):
        scene = random_scene(rng)
        pixels = pipe.preprocess_image(render(scene, image_size))
        latents = vae.encode_latents(pixels, sample=False)
        noisy = pipe.scheduler.add_noise(
            latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(i)), level
        )
        layout = encode_conversation(
            tok,
            [
                {"role": "user", "content": canonical_caption(scene)},
                {"role": "assistant", "content": [{"type": "image"}]},
            ],
            t.num_latents,
        )
        ids, lat_mask, att, _ = pad_layouts([layout], tok.pad_token_id)
        out = t(pipe.vlm_stream, ids, lat_mask, noisy, torch.full((1,), level), att)
        bpd.append(float(out.bits_per_dim[0]))
    return float(np.mean(bpd))


def save_grid(items, path: Path, scale: int = 3) -> None:
    tiles = [np.asarray(img.convert("RGB")) for _, img in items]
    h, w, _ = tiles[0].shape
    cols = 8
    rows = (len(tiles) + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = tile
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--seeds", type=int, default=2, help="images per held-out prompt")
    parser.add_argument("--understanding", type=int, default=60, help="held-out images for QA (3 questions each)")
    parser.add_argument("--edits", type=int, default=60)
    parser.add_argument("--chat_edits", type=int, default=64, help="held-out chats with a colour edit, per wording")
    parser.add_argument("--bpd", type=int, default=60)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--grid", default=str(REPO / "docs" / "images" / "world_samples.png"))
    parser.add_argument(
        "--annealed_guidance", action="store_true", help="sample with annealed guidance (the scheduler's option)"
    )
    parser.add_argument(
        "--weights",
        choices=("float32", "bfloat16", "int8"),
        default="float32",
        help="load the weights as (diffusers_starflow2.utils.quantization.weights_kwargs; int8 needs torchao)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    start = time.time()
    from diffusers_starflow2.utils.quantization import weights_kwargs

    overrides = weights_kwargs(args.weights)
    if args.annealed_guidance:
        overrides["scheduler"] = TarFlowScheduler.from_pretrained(
            args.model, subfolder="scheduler", annealed_guidance=True
        )
    pipe = StarFlow2Pipeline.from_pretrained(args.model, **overrides)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.image_size
    kept, kept_edits = [], []
    gen_cfg = generation_accuracy(pipe, args.guidance_scale, args.seeds, kept)
    gen_plain = generation_accuracy(pipe, 0.0, args.seeds, [])
    chat = StarFlow2InterleavedPipeline.from_pretrained(args.model, **overrides)
    chat.set_progress_bar_config(disable=True)
    qa = {w: understanding_accuracy(chat, args.understanding, size, w) for w in ("train", "heldout")}
    chat_edits = {w: chat_edit_success(chat, args.chat_edits, w) for w in ("train", "heldout")}
    edit = StarFlow2EditPipeline.from_pretrained(args.model, **overrides)
    edit.set_progress_bar_config(disable=True)
    edits = {
        w: edit_success(edit, args.edits, size, kept_edits if w == "train" else [], w) for w in ("train", "heldout")
    }
    bpd = heldout_bits_per_dim(pipe, args.bpd, size)

    n = 60 * args.seeds
    print(
        f"model: {args.model} ({args.weights} weights); held-out prompts: 60 x {args.seeds} images; {args.understanding * 3} questions; "
        f"{args.edits} colour edits; {args.chat_edits} chats; {args.bpd} images for bits/dim; "
        f"{'annealed' if pipe.scheduler.config.annealed_guidance else 'constant'} guidance; {time.time() - start:.0f} s"
    )
    print("| metric | guidance 2.0 | guidance 0 | target |")
    print("|---|---|---|---|")
    for key, target in (("color", 0.90), ("shape", 0.75), ("position", 0.75)):
        print(f"| {key} accuracy ({n} images) | {gen_cfg[key]:.1%} | {gen_plain[key]:.1%} | >= {target:.0%} |")
    print(f"| understanding accuracy, held-out images, training wording | {qa['train']:.1%} | | >= 90% |")
    print(f"| understanding accuracy, held-out images, held-out wording | {qa['heldout']:.1%} | | |")
    print(f"| colour-edit success, held-out images, training wording | {edits['train']:.1%} | | >= 75% |")
    print(f"| colour-edit success, held-out images, held-out wording | {edits['heldout']:.1%} | | |")
    print(f"| colour-edit success inside a chat, held-out scenes, training wording | {chat_edits['train']:.1%} | | |")
    print(f"| colour-edit success inside a chat, held-out scenes, held-out wording | {chat_edits['heldout']:.1%} | | |")
    print(f"| held-out bits/dim (noisy FAE latents) | {bpd:.3f} | | |")
    if args.grid:
        save_grid(kept + kept_edits, Path(args.grid))
        print(f"samples: {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

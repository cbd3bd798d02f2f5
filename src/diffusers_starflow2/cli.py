# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The ``starflow2`` command: generate, edit, describe, chat and convert with a STARFlow2 pipeline folder.

Without ``--model`` the commands use the embedded default model shipped inside the package (a tiny STARFlow2
trained on the synthetic shapes world, see ``diffusers_starflow2.world.train_world``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _model_dir(path: Optional[str]) -> str:
    model = Path(path) if path else DEFAULT_MODEL
    if not (model / "model_index.json").is_file():
        where = f"--model {path}" if path else f"the embedded default model ({model})"
        raise CLIError(f"{where} is not a STARFlow2 pipeline folder (no model_index.json)")
    return str(model)


def _load(cls_name: str, model: Optional[str]):
    import diffusers_starflow2 as pkg  # imported late: --help stays fast

    pipe = getattr(pkg, cls_name).from_pretrained(_model_dir(model))
    return pipe


def _generator(seed: Optional[int]):
    import torch

    return torch.Generator().manual_seed(seed) if seed is not None else None


def _check_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise CLIError(f"--output {path!r} must end in .png, .jpg, .jpeg, .webp or .bmp")
    if not out.resolve().parent.is_dir():
        raise CLIError(f"--output folder {str(out.parent)!r} does not exist")
    return out


def _save(image, path: str) -> None:
    """Write through a temporary file in the same folder, so a failed write leaves no partial image."""
    out = _check_output(path)
    fd, tmp = tempfile.mkstemp(suffix=out.suffix, dir=str(out.resolve().parent))
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _open_image(path: str):
    import PIL.Image

    if not Path(path).is_file():
        raise CLIError(f"image {path!r} does not exist")
    try:
        return PIL.Image.open(path).convert("RGB")
    except (OSError, PIL.UnidentifiedImageError) as err:
        raise CLIError(f"cannot read image {path!r}: {err}") from None


def cmd_generate(args) -> None:
    _check_output(args.output)
    pipe = _load("StarFlow2Pipeline", args.model)
    image = pipe(args.prompt, guidance_scale=args.guidance_scale, generator=_generator(args.seed),
                 num_denoising_steps=args.denoising_steps).images[0]
    _save(image, args.output)
    print(args.output)


def cmd_edit(args) -> None:
    _check_output(args.output)
    source = _open_image(args.image)
    pipe = _load("StarFlow2EditPipeline", args.model)
    image = pipe(image=source, prompt=args.instruction, guidance_scale=args.guidance_scale,
                 image_guidance_scale=args.image_guidance_scale, generator=_generator(args.seed)).images[0]
    _save(image, args.output)
    print(args.output)


def cmd_describe(args) -> None:
    source = _open_image(args.image)
    pipe = _load("StarFlow2InterleavedPipeline", args.model)
    print(pipe([source, args.question], max_new_tokens=args.max_new_tokens, guidance_scale=0.0,
               generator=_generator(args.seed)).text.strip())


def cmd_chat(args) -> None:
    pipe = _load("StarFlow2InterleavedPipeline", args.model)
    out = Path(args.output_dir)
    if not out.is_dir():
        raise CLIError(f"--output-dir {args.output_dir!r} is not a folder")
    count = 0
    for segment in pipe.stream(args.prompt, max_new_tokens=args.max_new_tokens, guidance_scale=args.guidance_scale,
                               temperature=args.temperature, generator=_generator(args.seed)):
        if isinstance(segment, str):
            print(segment, end="", flush=True)
        else:
            path = out / f"image_{count:02d}.png"
            _save(segment, str(path))
            print(f"\n[image: {path}]", flush=True)
            count += 1
    print()


def cmd_convert(args) -> int:
    import importlib

    module = {"starflow": "convert_starflow_to_diffusers", "tiny": "make_tiny_starflow2",
              "assemble": "assemble_starflow2"}[args.kind]
    return importlib.import_module(f"diffusers_starflow2.conversion.{module}").main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starflow2", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, seed=True):
        p.add_argument("--model", help="pipeline folder (default: the embedded model)")
        if seed:
            p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = sub.add_parser("generate", help="text -> image")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", required=True, help="output image file (.png, .jpg, ...)")
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--denoising-steps", type=int, default=None)
    common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="image + instruction -> image")
    p.add_argument("image")
    p.add_argument("instruction")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--image-guidance-scale", type=float, default=1.0)
    common(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("describe", help="image + question -> text")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=8)
    common(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("chat", help="interleaved generation: prints text, writes images ('<image>' forces one)")
    p.add_argument("prompt")
    p.add_argument("--output-dir", default=".", help="where generated images are written")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--temperature", type=float, default=0.0)
    common(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="run a converter: starflow | tiny | assemble (pass its own arguments)")
    p.add_argument("kind", choices=["starflow", "tiny", "assemble"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the converter")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (CLIError, ValueError) as err:
        print(f"starflow2 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

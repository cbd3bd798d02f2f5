# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The starflow2 command: generate, edit, describe, chat and convert with a STARFlow2 pipeline.

Without --model the commands use the embedded default model shipped inside the package (a tiny STARFlow2
trained on the synthetic shapes world, see ``examples/shapes_world``).  Every failure - a bad
argument, an unreadable file, a broken model, NaN/inf produced while sampling - is one line on stderr,
``starflow2 <command>: error: ...``, and exit status 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

from .utils.hub import EMBEDDED_MODEL

DEFAULT_MODEL = Path(EMBEDDED_MODEL)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DTYPES = ("float32", "float16", "bfloat16")
MAX_NUM_IMAGES = 64


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message``, exit 2) and defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append ``(default: X)`` to options that have a meaningful default (not None, not a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and "default" not in text:
            text += f" (default: {action.default})"
        return text


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a multi-line message's lines joined by ``; ``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


def run_main(prog: str, func, args) -> int:
    """Run ``func(args)``; a user-facing failure becomes one line ``prog: error: ...`` and exit status 2."""
    try:
        return func(args) or 0
    except (CLIError, ValueError, OSError) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: nothing was written (outputs are renamed into place only when complete)
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# -- model, device, logging ------------------------------------------------------------------------------------------


def _model_source(path: Optional[str]) -> str:
    """A local pipeline folder, or a Hugging Face Hub repo id (``user/name``)."""
    if path is None:
        if not (DEFAULT_MODEL / "model_index.json").is_file():
            raise CLIError(
                f"the embedded default model ({DEFAULT_MODEL}) is not a STARFlow2 pipeline folder (no model_index.json)"
            )
        return str(DEFAULT_MODEL)
    from .utils.hub import pipeline_source

    try:
        return pipeline_source(path, "--model")
    except ValueError as err:
        raise CLIError(str(err)) from None


def _device(name: Optional[str]):
    """``--device`` checked by the pipelines' device check (a device of this machine), ``meta`` excepted: nothing
    computed there could be written out."""
    from .utils.validation import check_device

    if name is None:
        return None
    try:
        device = check_device(name, "--device", allow_none=False)
    except ValueError as err:
        raise CLIError(str(err).replace("`--device`", "--device", 1)) from None
    if device.type == "meta":
        raise CLIError(f"--device {name!r} holds no values, so no image could be written; use cpu or an accelerator")
    return device


def _load(cls_name: str, args):
    """The pipeline ``cls_name`` from ``--model`` in ``--dtype`` on ``--device``."""
    import torch

    import diffusers_starflow2 as pkg  # imported late: --help stays fast

    source, device = _model_source(args.model), _device(args.device)
    try:
        pipe = getattr(pkg, cls_name).from_pretrained(source, dtype=getattr(torch, args.dtype))
        if device is not None:
            pipe = pipe.to(device)
    except Exception as err:  # noqa: BLE001 - whatever breaks while loading, the model is what is broken
        raise CLIError(f"cannot load the model {source}: {one_line(err)}") from None
    # the one progress bar of the work: in a terminal (or with --verbose), not in logs
    pipe.set_progress_bar_config(disable=not (args.verbose or sys.stderr.isatty()))
    return pipe


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence loading bars and library warnings (unless ``verbose``); restore them afterwards."""
    if verbose:
        yield
        return
    import diffusers
    import huggingface_hub.utils as hub_utils
    import transformers

    saved = [
        (lib.utils.logging, lib.utils.logging.get_verbosity(), lib.utils.logging.is_progress_bar_enabled())
        for lib in (diffusers, transformers)
    ]
    hub_bars = hub_utils.are_progress_bars_disabled()
    for logging, _, _ in saved:
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logging, level, bars in saved:
            logging.set_verbosity(level)
            if bars:
                logging.enable_progress_bar()
        if not hub_bars:
            hub_utils.enable_progress_bars()


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


# -- files -----------------------------------------------------------------------------------------------------------


def _check_writable_folder(folder: Path, option: str) -> None:
    if not folder.is_dir():
        raise CLIError(f"{option} folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{option} folder {str(folder)!r} is not writable")


def _output_paths(path: str, count: int) -> List[Path]:
    """``path`` itself for one image; ``name_0.png``, ``name_1.png``, ... for several.  Checked before any work."""
    out = Path(path)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise CLIError(f"--output {path!r} must be a file name ending in {', '.join(IMAGE_SUFFIXES)}")
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]
    for p in paths:
        if p.is_dir():
            raise CLIError(f"--output {str(p)!r} is a folder")
    _check_writable_folder(out.resolve().parent, "--output")
    return paths


def _save(image, path: Path, option: str = "--output") -> None:
    """One atomic write with the user's umask, so a failed write leaves no partial image."""
    from .utils.io import atomic_write_file

    try:
        atomic_write_file(path, image.save)
    except OSError as err:  # the temporary file's name would only confuse: name the output
        raise CLIError(f"cannot write {option} file {str(path)!r}: {err.strerror or err}") from None


def _open_image(path: str, option: str = "image"):
    """Open a local image file as RGB, refusing files too large to decode safely."""
    import PIL.Image

    from .utils.image_processing import check_image_pixels

    if not Path(path).is_file():
        raise CLIError(f"{option} {path!r} does not exist or is not a file")
    try:
        with PIL.Image.open(path) as image:
            check_image_pixels(image.height, image.width, option)  # from the header, before decoding
            return image.convert("RGB")
    except PIL.Image.DecompressionBombError:
        raise CLIError(f"{option} {path!r} is too large to decode safely") from None
    except (OSError, SyntaxError, PIL.UnidentifiedImageError) as err:  # PIL raises SyntaxError on broken headers
        raise CLIError(f"cannot read {option} {path!r}: {err}") from None


def _checked(args) -> None:
    """The numbers every command shares, checked before anything is loaded."""
    from .utils import validation
    from .utils.chat import check_text

    validation.check_seed(args.seed, "--seed")
    for option, minimum in (("guidance_scale", 0), ("image_guidance_scale", 1)):
        if hasattr(args, option):
            validation.check_guidance_scale(getattr(args, option), "--" + option.replace("_", "-"), minimum)
    if hasattr(args, "temperature"):
        validation.check_number(args.temperature, "--temperature", minimum=0)
    for option, minimum, maximum in (
        ("max_new_tokens", 0, None),
        ("num_images", 1, MAX_NUM_IMAGES),
        ("num_inference_steps", 0, None),
    ):
        if getattr(args, option, None) is not None:
            validation.check_integer(getattr(args, option), "--" + option.replace("_", "-"), minimum, maximum)
    for option in ("prompt", "instruction", "question"):
        if getattr(args, option, None) is not None:  # chat without a prompt reads its turns from stdin
            check_text(getattr(args, option), option)


# -- commands --------------------------------------------------------------------------------------------------------


def cmd_generate(args) -> None:
    paths = _output_paths(args.output, args.num_images)
    pipe = _load("StarFlow2Pipeline", args)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images,
        generator=_generator(args.seed),
        num_inference_steps=args.num_inference_steps,
    ).images
    for image, path in zip(images, paths):
        _save(image, path)
        print(path)


def cmd_edit(args) -> None:
    paths = _output_paths(args.output, args.num_images)
    source = _open_image(args.image)
    pipe = _load("StarFlow2EditPipeline", args)
    images = pipe(
        image=source,
        prompt=args.instruction,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        num_images_per_prompt=args.num_images,
        generator=_generator(args.seed),
    ).images
    for image, path in zip(images, paths):
        _save(image, path)
        print(path)


def cmd_describe(args) -> None:
    source = _open_image(args.image)
    pipe = _load("StarFlow2InterleavedPipeline", args)
    print(
        pipe(
            [source, args.question],
            max_new_tokens=args.max_new_tokens,
            guidance_scale=0.0,
            generator=_generator(args.seed),
        ).text.strip()
    )


def _prepare_output_dir(path: str) -> Path:
    if not path:
        raise CLIError("--output-dir must not be empty (use . for the current folder)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {path!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--output-dir {path!r} cannot be created: {err.strerror or err}") from None
    _check_writable_folder(out, "--output-dir")
    return out


CHAT_HELP = "one turn per line; '<image>' asks for an image, /image TEXT forces one, /reset clears, /quit ends"


def _chat_turn(pipe, prompt, state, args, out: Path, generator, count: int):
    """One turn: prints its text and saves its images as they come; returns ``(state, images saved)``."""

    def show(segment):
        nonlocal count
        if isinstance(segment, str):
            print(segment, end="", flush=True)
        else:
            path = out / f"image_{count:02d}.png"
            _save(segment, path, "--output-dir")
            print(f"\n[image: {path}]", flush=True)
            count += 1

    result = pipe(
        prompt,
        negative_prompt=args.negative_prompt,
        max_new_tokens=args.max_new_tokens,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        temperature=args.temperature,
        generator=generator,
        state=state,
        callback_on_segment=show,
    )
    print()
    return result.state, count


def _chat_session(pipe, args, out: Path, generator) -> None:
    """Turns from standard input, one per line, in one conversation whose caches are kept between turns.  A bad
    turn is reported on stderr and the conversation goes on as it was."""
    state, count = None, 0
    if sys.stdin.isatty():
        print(f"[chat: {CHAT_HELP}]", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            state = None
            print("[conversation cleared]", flush=True)
            continue
        if command == "/image":
            prompt = [rest, "<image>"]
        elif command.startswith("/"):
            print(f"starflow2 chat: unknown command {command!r}; {CHAT_HELP}", file=sys.stderr, flush=True)
            continue
        else:
            prompt = line
        try:
            state, count = _chat_turn(pipe, prompt, state, args, out, generator, count)
        except ValueError as err:  # the turn is refused before anything runs: the conversation is unchanged
            print(f"starflow2 chat: bad turn: {one_line(err)}", file=sys.stderr, flush=True)


def cmd_chat(args) -> None:
    out = _prepare_output_dir(args.output_dir)  # before loading: a typo should not cost a model load
    pipe = _load("StarFlow2InterleavedPipeline", args)
    generator = _generator(args.seed)
    if args.prompt is None:
        _chat_session(pipe, args, out, generator)
    else:
        _chat_turn(pipe, args.prompt, None, args, out, generator, 0)


CONVERTERS = {
    "starflow": "convert_starflow_to_diffusers",
    "tiny": "make_tiny_starflow2",
    "assemble": "assemble_starflow2",
}


def cmd_convert(args) -> int:
    import importlib

    module = importlib.import_module(f"diffusers_starflow2.conversion.{CONVERTERS[args.kind]}")
    return module.main(args.rest, prog=f"starflow2 convert {args.kind}")


# -- parser ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="starflow2", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def common(p):
        p.add_argument("--model", help="pipeline folder or Hugging Face Hub repo id (default: the embedded model)")
        p.add_argument("--device", help="where to run: cpu, cuda, cuda:N, mps (default: cpu)")
        p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype")
        p.add_argument("--seed", type=int, default=0, help="random seed")
        p.add_argument("--verbose", action="store_true", help="show loading bars and library warnings")

    def images(p):
        p.add_argument(
            "-o",
            "--output",
            required=True,
            help="output image file (.png, .jpg, ...); with --num-images N: name_0.png ... name_{N-1}.png",
        )
        p.add_argument("--negative-prompt", help="text of the unguided branch (default: empty)")
        p.add_argument("--num-images", type=int, default=1, help=f"images to generate (at most {MAX_NUM_IMAGES})")
        p.add_argument("--guidance-scale", type=float, default=2.0, help="text guidance weight (0 = off)")

    p = sub.add_parser("generate", help="text -> image", description="Draw an image from a prompt.")
    p.add_argument("prompt")
    images(p)
    p.add_argument("--num-inference-steps", type=int, help="denoising steps after sampling (default: the model's)")
    # the option's former name, still accepted
    p.add_argument("--denoising-steps", type=int, dest="num_inference_steps", help=argparse.SUPPRESS)
    common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="image + instruction -> image", description="Edit an image by an instruction.")
    p.add_argument("image")
    p.add_argument("instruction")
    images(p)
    p.add_argument("--image-guidance-scale", type=float, default=1.0, help="image guidance weight (1 = off)")
    common(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("describe", help="image + question -> text", description="Answer a question about an image.")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=8, help="longest answer in tokens")
    common(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser(
        "chat",
        help="interleaved generation: prints text, writes images ('<image>' forces one)",
        description="Interleaved text and images; images go to --output-dir as image_NN.png.  "
        f"Without PROMPT, a conversation read from standard input ({CHAT_HELP}); "
        "each turn continues the caches of the previous ones.",
    )
    p.add_argument("prompt", nargs="?", help="one turn; omit it for a conversation read from standard input")
    p.add_argument("--output-dir", default=".", help="where generated images are written (created if missing)")
    p.add_argument("--negative-prompt", help="user turn of the unguided branch (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated after the prompt")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="image guidance weight (0 = off)")
    p.add_argument(
        "--image-guidance-scale",
        type=float,
        default=1.5,
        help="weight of the user's images against the unconditional branch, as in edit (1 = off); "
        "a conversation keeps the branches of its first turn",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="text sampling temperature (0 = greedy)")
    common(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "convert",
        help="run a converter: starflow | tiny | assemble (pass its own arguments)",
        description="Run a converter; the arguments after KIND are the converter's own.",
    )
    p.add_argument("kind", choices=sorted(CONVERTERS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the converter")
    p.set_defaults(func=cmd_convert)
    return parser


def _run_command(args) -> int:
    if args.command != "convert":
        _checked(args)
    with _quiet(getattr(args, "verbose", True)):
        try:
            return args.func(args) or 0
        except (RuntimeError, MemoryError) as err:  # e.g. out of memory on the device: not a traceback either
            if getattr(args, "verbose", False):
                raise
            raise CLIError(f"{type(err).__name__}: {one_line(err)} (rerun with --verbose for details)") from None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(f"starflow2 {args.command}", _run_command, args)


if __name__ == "__main__":
    sys.exit(main())

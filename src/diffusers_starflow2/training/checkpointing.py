# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Checkpoints and final weights of ``training/train_starflow2.py``.

``checkpoint-N`` folders (:func:`save_checkpoint`) are written to a temporary folder and renamed into place, their
``training_state.json`` last; resuming (:func:`resolve_checkpoint`, :func:`resume`) refuses, naming the file at
fault, a checkpoint that is incomplete, truncated or written by a different setup. :func:`save_final` writes the
run's result: the pipeline folder (full runs) or the LoRA file (LoRA runs, with ``--save_fused`` a fused pipeline).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import List, Optional

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

from ..utils.io import publish_into, replace_path, write_json_atomic, write_text_atomic
from .args import ArgumentError
from .lora import fused_pipeline, write_lora_file

logger = logging.getLogger("train_starflow2")

EMA_WEIGHT_NAME = "ema.safetensors"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")

# what accelerate's save_state writes for this script's one model, optimizer and LR scheduler (process 0's RNG states)
CHECKPOINT_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")
CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the ``checkpoint-N`` folder ``path`` cannot be resumed, naming the file, or None when it is complete.

    Reads only headers: ``training_state.json`` (written last) parses to a state with its ``global_step``, the
    weights and the other files accelerate writes are there, every safetensors file's header matches its length,
    and every torch-saved ``.bin`` is a whole zip archive (a truncated one has lost its directory)."""
    import zipfile

    from safetensors import safe_open

    state_file = path / "training_state.json"
    if not state_file.is_file():
        return "no training_state.json: empty, or written by a killed run"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"training_state.json is not valid JSON ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "training_state.json holds no integer 'global_step'"
    if not any((path / name).is_file() for name in CHECKPOINT_WEIGHTS):
        return f"the model weights are missing ({' or '.join(CHECKPOINT_WEIGHTS)})"
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    if "ema" in state and not (path / EMA_WEIGHT_NAME).is_file():
        return f"{EMA_WEIGHT_NAME} is missing"
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix == ".bin":
                with zipfile.ZipFile(file):
                    pass
        except Exception as e:  # safetensors raises its own error type; a torch file is refused as a bad zip
            return (
                f"{file.name} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            )
    return None


def list_checkpoints(output_dir: Path, warn: bool = True) -> List[Path]:
    """The complete ``checkpoint-N`` folders of a run (:func:`checkpoint_problem`), oldest first; incomplete ones
    are skipped, with a warning."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        if not (path.is_dir() and CHECKPOINT_RE.search(path.name)):
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            found.append(path)
        elif warn:
            logger.warning(f"skipping {path}: not a complete checkpoint ({problem})")
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.search(p.name).group(1)))


def resolve_checkpoint(args) -> Optional[Path]:
    """The complete checkpoint folder of ``--resume_from_checkpoint``: a ``checkpoint-N`` folder or its name in
    ``--output_dir``, refused with the file at fault when incomplete; for ``latest`` the newest complete one (newer
    incomplete ones are skipped with a warning), ``None`` when the run has no checkpoint at all.  A run whose
    checkpoints are all incomplete is refused: starting it anew would write over them."""
    flag = f"--resume_from_checkpoint {args.resume_from_checkpoint!r}"
    if args.resume_from_checkpoint == "latest":
        output_dir = Path(args.output_dir)
        found = list_checkpoints(output_dir)
        if found:
            return found[-1]
        broken = sorted(
            (p for p in output_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_RE.search(p.name)),
            key=lambda p: int(CHECKPOINT_RE.search(p.name).group(1)),
        )
        if broken:
            raise ArgumentError(
                f"{flag}: no complete checkpoint in {str(output_dir)!r}; the newest, {str(broken[-1])!r}, is not "
                f"complete ({checkpoint_problem(broken[-1])}): resume from a complete copy or move it away"
            )
        return None
    for path in (Path(args.resume_from_checkpoint), Path(args.output_dir) / args.resume_from_checkpoint):
        if path.is_dir():
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ArgumentError(f"{flag}: {str(path)!r} is not a complete checkpoint ({problem})")
            return path
    raise ArgumentError(
        f"{flag}: no such checkpoint folder (accepted: a checkpoint-N folder, its name inside --output_dir, or "
        "'latest')"
    )


def run_signature(args, num_processes: int) -> dict:
    """The settings a checkpoint must share with the run that resumes it (stored in ``training_state.json``)."""
    return dict(
        stage=args.stage,
        seed=args.seed,
        train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=num_processes,
        lora_rank=args.lora_rank,
        lora_vlm=args.lora_vlm,
        use_ema=args.use_ema,
    )


def resume(accelerator, ema, path: Path, signature: dict) -> int:
    """Load the checkpoint folder ``path`` (accelerate's state and the EMA) into the run; returns its step.  A
    checkpoint of another setup, or one that does not load, is refused with an :class:`ArgumentError`."""
    state = json.loads((path / "training_state.json").read_text())
    mismatch = {k: (state.get(k), v) for k, v in signature.items() if state.get(k) != v}
    if mismatch:
        raise ArgumentError(
            f"--resume_from_checkpoint {str(path)!r} was written by a different setup (checkpoint vs now): {mismatch}"
        )
    try:
        accelerator.load_state(str(path))
        if ema is not None:
            load_ema(ema, path, state)
    except ArgumentError:
        raise
    except Exception as e:  # a file whose header was whole but whose data is not, or another model's
        first = str(e).splitlines()[0] if str(e) else ""
        raise ArgumentError(
            f"--resume_from_checkpoint {str(path)!r} cannot be loaded ({type(e).__name__}: {first})"
        ) from None
    logger.info(f"resumed from {path} at step {state['global_step']}")
    return state["global_step"]


def trim_log(log_path: Path, last_step: int) -> None:
    """Keep the rows of ``train_log.jsonl`` up to ``last_step``: a resumed run rewrites what came after."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # the torn last line of a killed run
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
    write_text_atomic(log_path, "".join(line + "\n" for line in kept))


def save_checkpoint(accelerator, args, trainer, ema, output_dir: Path, step: int, signature: dict) -> None:
    """``accelerator.save_state`` (model, optimizer, LR scheduler, every process's RNG states) into
    ``checkpoint-{step}``, written to a temporary folder first; LoRA runs add ``pytorch_lora_weights.safetensors``
    so that ``pipe.load_lora_weights(checkpoint)`` works, EMA runs ``ema.safetensors``."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    state_dict = accelerator.get_state_dict(trainer) if args.lora_rank is not None else None
    accelerator.wait_for_everyone()  # every process has written its RNG states
    if accelerator.is_main_process:
        if args.lora_rank is not None:
            write_lora_file(args, accelerator.unwrap_model(trainer), tmp, state_dict)
        extra = {}
        if ema is not None:
            extra["ema"] = save_ema(ema, tmp)
        write_json_atomic(tmp / "training_state.json", {"global_step": step, **signature, **extra})
        replace_path(tmp, final)
        if args.checkpoints_total_limit:
            for old in list_checkpoints(output_dir, warn=False)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()


def save_ema(ema, folder: Path) -> dict:
    """The EMA's weights as safetensors (accelerate would pickle a registered object); returns its other state."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(folder / EMA_WEIGHT_NAME))
    return state


def load_ema(ema, folder: Path, training_state: dict) -> None:
    from safetensors.torch import load_file

    if "ema" not in training_state or not (folder / EMA_WEIGHT_NAME).is_file():
        raise ArgumentError(f"--resume_from_checkpoint {str(folder)!r} holds no EMA state ({EMA_WEIGHT_NAME})")
    shadow = load_file(str(folder / EMA_WEIGHT_NAME))
    device = ema.shadow_params[0].device
    ema.load_state_dict(
        {**training_state["ema"], "shadow_params": [shadow[str(i)].to(device) for i in range(len(shadow))]}
    )


def save_final(args, trainer, state_dict: dict, scheduler, output_dir: Path) -> None:
    """Full runs: the pipeline folder (frozen components reloaded from the source folder, so they are bit-exact).
    LoRA runs: ``pytorch_lora_weights.safetensors`` (+ a fused pipeline with ``--save_fused``).  ``trainer`` is the
    unwrapped ``PretzelTrainer``, ``state_dict`` its gathered state dict."""
    from diffusers_starflow2 import PretzelModel, StarFlow2Pipeline

    write_json_atomic(output_dir / "training_args.json", vars(args))
    if args.lora_rank is None:
        transformer_state = {k[len("transformer.") :]: v for k, v in state_dict.items() if k.startswith("transformer.")}
        transformer = PretzelModel.from_config(trainer.transformer.config)
        transformer.load_state_dict({k: v.float() for k, v in transformer_state.items()})
        pipe = StarFlow2Pipeline.from_pretrained(
            args.pretrained_model_name_or_path, transformer=transformer, scheduler=scheduler
        )
        save_pipeline_into(pipe, output_dir)
        logger.info(f"saved the pipeline to {output_dir}")
        return

    write_lora_file(args, trainer, output_dir, state_dict)
    logger.info(f"saved {output_dir / LORA_WEIGHT_NAME_SAFE}")
    if args.save_fused:
        save_pipeline_into(fused_pipeline(args, scheduler, output_dir), output_dir)
        logger.info(f"saved the fused pipeline to {output_dir}")


def save_pipeline_into(pipe, output_dir: Path) -> None:
    """``pipe.save_pretrained`` into the run folder (next to its checkpoints and logs), ``model_index.json`` last."""
    with publish_into(output_dir, last="model_index.json") as staging:
        pipe.save_pretrained(staging, safe_serialization=True)

"""Train a complete tiny STARFlow2 from scratch on the synthetic shapes world, on CPU.

Steps, run in the order given by ``--steps`` (default: all but ``export``); each writes into ``--workdir`` and reads
what the earlier steps wrote there. Nothing is skipped: a step given again is run again, so to continue after a
finished step, name only the remaining ones (e.g. ``--steps stage2 stage3 chat``).

1. ``world``  - the synthetic world at 32 px (train split), see ``examples/shapes_world/synthetic_world.py``;
2. ``fae``    - the FAE on the world's images, its frozen DINOv2 randomly initialised (no pretrained DINOv2 can be
   downloaded here; a random ViT still gives informative features for flat-coloured shapes);
3. ``lm``     - a small Qwen2.5-VL-architecture language model standing in for the pretrained VLM, trained on the
   world's text (requests, descriptions with questions and answers, edit instructions, documents), then frozen;
4. ``init``   - a pipeline folder with the trained FAE and LM and a freshly initialised Pretzel;
5. ``stage1`` / ``stage2`` / ``stage3`` - ``training/train_starflow2.py`` (text->image flow; adapter for understanding;
   joint training with skips on the mixture of the four single-turn data kinds);
6. ``chat``   - stage 3 continued from ``WORKDIR/stage3`` into ``WORKDIR/chat`` on a mixture that adds edits inside a
   chat (the world's ``chat_edit`` kind: "draw X" -> image, "make it blue" -> image) to the four kinds, so that
   the model edits an image it drew earlier in the conversation, not only an image the user gave;
7. ``export`` - only when named: copy ``WORKDIR/chat`` (the last training step) into
   ``src/diffusers_starflow2/default_model`` (the embedded default), atomically.

    python -m shapes_world.train_world --workdir runs/world                            # steps world .. chat
    python -m shapes_world.train_world --workdir runs/world --steps stage3 chat export # redo stages, export

Options: ``--num_images`` (world size, 3000), ``--fae_steps`` (1200), ``--lm_steps`` (1000), ``--chat_steps``
(1000), ``--threads`` (1).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffusers_starflow2.training.data import CaptionDataset, EditDataset, InterleavedDataset

from .synthetic_world import write_world

IMAGE_SIZE = 32
SEED = 0
CHAT_STEPS = 1000


# --------------------------------------------------------------------------------------------------------------
# Model sizes of the embedded default
# --------------------------------------------------------------------------------------------------------------


def fae_world_config() -> dict:
    dinov2 = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
    )
    return dict(
        dinov2_config=dinov2,
        image_size=IMAGE_SIZE,
        sample_size=IMAGE_SIZE,
        latent_channels=8,
        encoder_num_heads=4,
        decoder_dim=96,
        decoder_layers=2,
        decoder_num_heads=4,
        pixel_decoder_dim=96,
        pixel_decoder_layers=3,
        pixel_decoder_num_heads=4,
        out_patch_size=8,
    )


def lm_world_config() -> dict:
    return dict(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2)


def pretzel_world_config(vlm_hidden_size: int, vision_start_token_id: int) -> dict:
    return dict(
        latent_channels=8,
        sample_size=IMAGE_SIZE // 8,
        vlm_hidden_size=vlm_hidden_size,
        num_shallow_blocks=2,
        shallow_layers=2,
        shallow_channels=64,
        deep_layers=4,
        deep_channels=128,
        head_dim=32,
        noise_embed_dim=64,
        vision_start_token_id=vision_start_token_id,
    )


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


def _images_tensor(folder: Path) -> torch.Tensor:
    """All PNGs under ``folder`` as ``[-1, 1]`` tensors ``(M, 3, H, W)``."""
    import numpy as np
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def step_world(work: Path, num_images: int) -> None:
    write_world(work / "world", num_images=num_images, seed=SEED, image_size=IMAGE_SIZE)


def step_fae(work: Path, steps: int, batch_size: int = 64) -> None:
    from tqdm.auto import tqdm

    from diffusers_starflow2 import AutoencoderFAE

    torch.manual_seed(SEED)
    images = _images_tensor(work / "world" / "caption" / "images")
    fae = AutoencoderFAE(**fae_world_config())
    params = [p for p in fae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(SEED)
    fae.train()
    bar = tqdm(range(steps), desc="FAE")
    for step in bar:
        batch = images[torch.randint(len(images), (batch_size,), generator=gen)]
        out = fae.compute_loss(batch, beta=1e-4, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(pixel=f"{out.pixel_loss.item():.4f}", feat=f"{out.feature_loss.item():.4f}")
    fae.eval()
    with torch.no_grad():  # unit-variance latents for the flow
        z = torch.cat([fae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
        fae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    fae.save_pretrained(work / "fae")


def world_texts(work: Path) -> list:
    """Text-only conversations of the world for the language model.

    Images are not available to it yet, so a caption stands in for the image: the model learns to answer questions
    from what the context says ("a red circle on the left. what color is the shape?" -> "red"), to start an image
    (``<|vision_start|>``) when asked to draw, and the wording of edits and documents.  Stage 2 then teaches the
    adapter to make image latents say what the caption said.
    """
    import numpy as np

    from .synthetic_world import Scene, questions

    rng = np.random.default_rng(SEED)
    vs = "<|vision_start|>"
    span = "<|vision_start|><|image_pad|><|vision_end|>"
    convs = []
    for row in CaptionDataset(work / "world" / "caption").rows:
        convs.append([{"role": "user", "content": row["text"]}, {"role": "assistant", "content": vs}])
        scene = Scene(**row["attributes"])
        for _, question, answer in questions(scene, rng):
            convs.append(
                [{"role": "user", "content": f"{row['text']}. {question}"}, {"role": "assistant", "content": answer}]
            )
    for row in EditDataset(work / "world" / "edit").rows:
        convs.append([{"role": "user", "content": f"{span}{row['instruction']}"}, {"role": "assistant", "content": vs}])
    for row in InterleavedDataset(work / "world" / "interleaved").rows:
        parts = [s["text"] if "text" in s else span for s in row["segments"]]
        convs.append(
            [{"role": "user", "content": "tell me about shapes"}, {"role": "assistant", "content": "".join(parts)}]
        )
    return convs


def step_lm(work: Path, steps: int, batch_size: int = 32) -> None:
    from tqdm.auto import tqdm

    from diffusers_starflow2.testing_utils import build_tiny_qwen2_5_vl, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    vlm = build_tiny_qwen2_5_vl(tokenizer, seed=SEED, **lm_world_config())
    convs = world_texts(work)
    encoded = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in encoded]
    T = max(map(len, ids))
    pad = tokenizer.pad_token_id
    data = torch.full((len(ids), T), pad)
    mask = torch.zeros(len(ids), T, dtype=torch.bool)
    for i, row in enumerate(ids):
        data[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    vlm.train()
    opt = torch.optim.AdamW(vlm.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(SEED)
    bar = tqdm(range(steps), desc="LM")
    for step in bar:
        idx = torch.randint(len(ids), (batch_size,), generator=gen)
        x, m = data[idx], mask[idx]
        labels = x.masked_fill(~m, -100)
        out = vlm(input_ids=x, attention_mask=m.long(), labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    vlm.eval()
    vlm.save_pretrained(work / "lm")
    tokenizer.save_pretrained(work / "lm")


def step_init(work: Path) -> None:
    """A pipeline folder: the trained FAE and language model, a freshly initialised Pretzel, the scheduler."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from diffusers_starflow2 import AutoencoderFAE, PretzelModel, StarFlow2Pipeline, TarFlowScheduler

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(work / "lm")
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(work / "lm")
    transformer = PretzelModel(
        **pretzel_world_config(
            vlm.config.get_text_config().hidden_size, tokenizer.convert_tokens_to_ids("<|vision_start|>")
        )
    )
    pipe = StarFlow2Pipeline(
        vlm=vlm,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=AutoencoderFAE.from_pretrained(work / "fae"),
        # 3 denoising steps: measured on the embedded model with benchmarks/eval_denoise.py (README, Denoising)
        scheduler=TarFlowScheduler(noise_level=0.3, min_noise_level=0.05, max_noise_level=0.3, num_denoising_steps=3),
    )
    pipe.save_pretrained(work / "init")


def _stage3_mixture(work: Path, weights: dict) -> list:
    """``--mixture`` of the world's folders (``weights``: mixture name -> (world folder, weight))."""
    entries = [f"{name}={work / 'world' / folder}:{weight}" for name, (folder, weight) in weights.items()]
    return ["--mixture", ",".join(entries)]


SINGLE_TURN = {
    "understanding": ("understanding", 0.3),
    "generation": ("caption", 0.35),
    "editing": ("edit", 0.25),
    "interleaved": ("interleaved", 0.1),
}
# The chat step keeps every single-turn kind in the mix (so that it does not forget them) at lower weights, and
# gives edits inside a chat the largest share: they are the new task.
WITH_CHAT = {
    "understanding": ("understanding", 0.2),
    "generation": ("caption", 0.2),
    "editing": ("edit", 0.15),
    "interleaved": ("interleaved", 0.05),
    "chat_edit": ("chat_edit", 0.4),
}


@dataclass(frozen=True)
class Stage:
    """One run of ``train_starflow2.py``: its stage, the step folder it starts from, its data arguments, steps,
    batch size, peak learning rate and warm-up steps.  Its output folder is the step's name."""

    stage: int
    source: str
    data: Callable[[Path], list]
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 100


STAGES = {
    "stage1": Stage(1, "init", lambda w: ["--train_data_dir", str(w / "world" / "caption")], 3000, 32, 1e-3),
    "stage2": Stage(2, "stage1", lambda w: ["--train_data_dir", str(w / "world" / "understanding")], 1500, 32, 1e-3),
    "stage3": Stage(3, "stage2", lambda w: _stage3_mixture(w, SINGLE_TURN), 2000, 32, 5e-4),
    # a fine-tune: a lower peak rate and a short warm-up, starting from the finished stage 3
    "chat": Stage(3, "stage3", lambda w: _stage3_mixture(w, WITH_CHAT), CHAT_STEPS, 32, 2e-4, 50),
}
FINAL_STEP = "chat"  # the folder that export publishes


def step_stage(work: Path, name: str, steps: int | None = None) -> None:
    from diffusers_starflow2.training.train_starflow2 import cli

    stage = STAGES[name]
    argv = [
        "--stage",
        str(stage.stage),
        "--pretrained_model_name_or_path",
        str(work / stage.source),
        "--output_dir",
        str(work / name),
        *stage.data(work),
        "--max_train_steps",
        str(steps or stage.steps),
        "--train_batch_size",
        str(stage.batch_size),
        "--learning_rate",
        str(stage.learning_rate),
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        str(stage.warmup_steps),
        "--image_loss_reweight",  # the embedded model was trained with the plain mean (the default before 'linear')
        "none",
        "--seed",
        str(SEED),
        "--logging_steps",
        "50",
        "--checkpointing_steps",
        "1000",
    ]
    if cli(argv) != 0:
        raise RuntimeError(f"step {name} failed")


def step_export(work: Path) -> None:
    """Copy the final pipeline into the package as the embedded default model (atomically)."""
    from diffusers_starflow2 import StarFlow2Pipeline
    from diffusers_starflow2.cli import DEFAULT_MODEL
    from diffusers_starflow2.utils.io import save_pretrained_atomic

    pipe = StarFlow2Pipeline.from_pretrained(work / FINAL_STEP)
    for part in (pipe, *pipe.components.values()):  # record the package's name, not this machine's work folder
        if hasattr(part, "register_to_config"):
            part.register_to_config(_name_or_path="diffusers_starflow2/default_model")
    save_pretrained_atomic(pipe, DEFAULT_MODEL, overwrite=True)
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    print(f"embedded model: {DEFAULT_MODEL} ({size / 2**20:.1f} MB)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument(
        "--steps",
        nargs="+",
        default=["world", "fae", "lm", "init", "stage1", "stage2", "stage3", "chat"],
        help="steps to run, in order (add 'export' to replace the embedded default model)",
    )
    parser.add_argument("--num_images", type=int, default=3000)
    parser.add_argument("--fae_steps", type=int, default=1200)
    parser.add_argument("--lm_steps", type=int, default=1000)
    parser.add_argument("--chat_steps", type=int, default=CHAT_STEPS, help="steps of the chat fine-tune")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 avoids oversubscription when other jobs share the cores)",
    )
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    for name in args.steps:
        start = time.time()
        if name == "world":
            step_world(work, args.num_images)
        elif name == "fae":
            step_fae(work, args.fae_steps)
        elif name == "lm":
            step_lm(work, args.lm_steps)
        elif name == "init":
            step_init(work)
        elif name in STAGES:
            step_stage(work, name, args.chat_steps if name == "chat" else None)
        elif name == "export":
            step_export(work)
        else:
            parser.error(f"--steps: unknown step {name!r}")
        print(f"[{name}] {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

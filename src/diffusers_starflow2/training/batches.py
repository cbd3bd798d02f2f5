# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""What the training loop reads: the run's datasets (:func:`open_data`, their texts checked by :func:`check_texts`),
a fixed, step-indexed stream of samples (:class:`SampleStream`, :class:`ExampleReader`) and the batches of
:meth:`PretzelModel.forward` built from them (:class:`BatchBuilder`: chat layouts, noisy FAE latents, the text
targets and, with ``--distill_from_vlm_vision``, the teacher's logits)."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..utils.chat import check_special_tokens
from .args import STAGE_DATA_KIND, ArgumentError
from .data import MixtureSampler, mixture, open_dataset, open_hub_caption_dataset

logger = logging.getLogger("train_starflow2")


def open_data(args):
    """``{name: dataset}`` and the mixture sampler (stage 3) of the run."""
    if args.stage == 3:
        try:
            sampler = mixture(args.mixture, seed=args.seed)
        except ValueError as e:
            raise ArgumentError(f"--mixture: {e}") from None
        return sampler.datasets, sampler
    kind = STAGE_DATA_KIND[args.stage]
    if args.dataset_name:
        try:
            return {
                kind: open_hub_caption_dataset(
                    args.dataset_name, args.dataset_config_name, args.image_column, args.caption_column, args.cache_dir
                )
            }, None
        except (ValueError, FileNotFoundError) as e:
            message = str(e) if str(e).startswith("--") else f"--dataset_name {args.dataset_name!r}: {e}"
            raise ArgumentError(message) from None
    try:
        return {kind: open_dataset(args.train_data_dir, kind)}, None
    except ValueError as e:
        raise ArgumentError(
            f"--train_data_dir {args.train_data_dir!r} (stage {args.stage} reads {kind} rows): {e}"
        ) from None


def check_texts(args, datasets: Dict[str, Dataset], tokenizer) -> None:
    """Every text of the training data as the model will see it (adjacent text segments joined) and every
    ``--validation_prompt`` get the pipelines' special-token check
    (:func:`~diffusers_starflow2.utils.chat.check_special_tokens`), before anything trains: a caption holding
    ``<|im_end|>`` would train the model on a control token the pipelines refuse."""
    source = (
        "--mixture: " if args.stage == 3 else "" if args.dataset_name else f"--train_data_dir {args.train_data_dir!r}: "
    )
    for dataset in datasets.values():
        for where, key, pieces in dataset.texts():
            try:
                check_special_tokens(pieces, key, tokenizer)
            except ValueError as e:
                raise ArgumentError(f"{source}{where}: {e}") from None
    for prompt in args.validation_prompts or []:
        try:
            check_special_tokens(prompt, "--validation_prompt", tokenizer)
        except ValueError as e:
            raise ArgumentError(str(e)) from None


def vision_teacher(args, vlm):
    """The VLM as its own teacher for ``--distill_from_vlm_vision``, or ``None`` (with a warning) without a vision
    tower."""
    if not args.distill_from_vlm_vision:
        return None
    if getattr(getattr(vlm, "model", None), "visual", None) is None:
        logger.warning(
            f"--distill_from_vlm_vision: the VLM ({type(vlm).__name__}) has no vision tower; training "
            "stage 2 without distillation"
        )
        return None
    return vlm


def sample_seed(seed: int, position: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for one sample (or one batch: ``stream`` separates uses)."""
    return int(np.random.SeedSequence([seed, position, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SampleStream(Sampler):
    """Keys ``(position, dataset name, index)`` for positions ``0 .. total-1``, a fixed function of ``seed``.

    One dataset: epochs of seeded permutations.  A mixture: :meth:`MixtureSampler.indices` (weighted, reshuffled
    per pass).  Every prefix is the same for any ``total``, so a run can be continued with more steps.  The
    DataLoader iterates the sampler in the main process; accelerate shards its batches over processes.
    """

    def __init__(self, total: int, seed: int, sizes: Dict[str, int], mixture_sampler: Optional[MixtureSampler] = None):
        self.total, self.seed, self.sizes, self.mixture = total, seed, sizes, mixture_sampler

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        if self.mixture is not None:
            stream = self.mixture.indices()
            for position in range(self.total):
                name, index = next(stream)
                yield position, name, index
            return
        ((name, size),) = self.sizes.items()
        order = None
        for position in range(self.total):
            epoch, k = divmod(position, size)
            if k == 0:
                order = np.random.default_rng([self.seed, epoch]).permutation(size)
            yield position, name, int(order[k])


class ExampleReader(Dataset):
    """``(position, name, index)`` -> the example of ``datasets[name]`` with images as ``(3, H, W)`` tensors in
    [-1, 1] (the pipelines' image processor, resized to the model's image size)."""

    def __init__(self, datasets: Dict[str, Dataset], image_processor, image_size: int):
        self.datasets, self.image_processor, self.image_size = datasets, image_processor, image_size

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())

    def to_tensor(self, image) -> torch.Tensor:
        return self.image_processor.preprocess(image, height=self.image_size, width=self.image_size)[0]

    def __getitem__(self, key) -> dict:
        position, name, index = key
        ex = dict(self.datasets[name][index])
        for k in ("image", "source_image", "target_image"):
            if k in ex:
                ex[k] = self.to_tensor(ex[k])
        if "segments" in ex:
            ex["segments"] = [s if isinstance(s, str) else self.to_tensor(s) for s in ex["segments"]]
        ex.update(position=position, source=name)
        return ex


def collate_examples(examples: List[dict]) -> List[dict]:
    return examples


def conversation(example: dict, drop_text: bool, interleaved_layout: str):
    """The chat messages of an example (the pipelines' layouts), its images in sequence order, whether the flow
    loss scores each image, and whether the text loss applies.

    generation: user caption -> assistant image; understanding: user [image, prompt] -> assistant response;
    editing: user [source, instruction] -> assistant [target]; interleaved: segments (see ``--interleaved_layout``);
    chat editing: user prompt -> assistant [source] -> user instruction -> assistant [target] (:func:`chat_edit`).
    """
    from diffusers_starflow2.utils.sequence import user_message

    image_part = {"type": "image"}
    kind = example["kind"]
    if kind == "caption":
        text = "" if drop_text else example["text"]
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": [image_part]}]
        return messages, [example["image"]], [True], False
    if kind == "understanding":
        messages = [
            user_message(example["image"], example["prompt"]),
            {"role": "assistant", "content": example["response"]},
        ]
        return messages, [example["image"]], [False], True
    if kind == "edit":
        instruction = "" if drop_text else example["instruction"]
        messages = [user_message(example["source_image"], instruction), {"role": "assistant", "content": [image_part]}]
        return messages, [example["source_image"], example["target_image"]], [False, True], False
    if kind == "interleaved":
        segments = example["segments"]
        split = 1 if interleaved_layout == "user_first" and len(segments) > 1 else 0
        reply = [{"type": "text", "text": s} if isinstance(s, str) else image_part for s in segments[split:]]
        messages = ([user_message(*segments[:split])] if split else []) + [{"role": "assistant", "content": reply}]
        images = [s for s in segments if not isinstance(s, str)]
        scored = [i >= split for i, s in enumerate(segments) if not isinstance(s, str)]  # assistant images only
        return messages, images, scored, True
    if kind == "chat_edit":
        return chat_edit(example, drop_text)
    raise ValueError(f"unknown example kind {kind!r}")


def chat_edit(example: dict, drop_text: bool):
    """An edit inside a chat, laid out as :class:`StarFlow2InterleavedPipeline` lays out a continued conversation
    (``pipe([prompt, "<image>"])`` then ``pipe([instruction, "<image>"], state=...)`` renders the same tokens).

    Only the target is scored: the source stands for the image the assistant drew in the earlier turn, in context.
    Dropping the text empties both user turns, which is the unconditional branch of a chat's guidance: there the
    earlier answer stays in context and only the requests are gone."""
    prompt, instruction = ("", "") if drop_text else (example["prompt"], example["instruction"])
    image_part = {"type": "image"}
    messages = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": [image_part]},
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": [image_part]},
    ]
    return messages, [example["source_image"], example["target_image"]], [False, True], False


class BatchBuilder:
    """Examples -> the keyword arguments of :meth:`PretzelModel.forward` (right-padded layouts, noisy FAE latents)."""

    def __init__(self, args, tokenizer, vae, scheduler, num_latents: int, weight_dtype: torch.dtype, teacher=None):
        self.args, self.tokenizer, self.vae, self.scheduler = args, tokenizer, vae, scheduler
        self.num_latents, self.weight_dtype = num_latents, weight_dtype
        self.use_flow, self.use_text = args.stage in (1, 3), args.stage in (2, 3)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.teacher = teacher  # the VLM with its own vision tower (--distill_from_vlm_vision)
        if teacher is not None:
            from transformers import Qwen2VLImageProcessorPil

            vision = teacher.config.vision_config
            factor = vision.patch_size * vision.spatial_merge_size
            # keep the training image size (the processor's default minimum would upsample small images)
            self.teacher_processor = Qwen2VLImageProcessorPil(
                patch_size=vision.patch_size,
                temporal_patch_size=vision.temporal_patch_size,
                merge_size=vision.spatial_merge_size,
                size={"shortest_edge": factor * factor, "longest_edge": 16384 * factor * factor},
            )

    def noise_levels(self, generators: List[torch.Generator]) -> torch.Tensor:
        t = self.scheduler.sample_noise_levels(len(generators), generator=generators)  # U[t0, t1]
        if self.args.image_loss_reweight == "inverse":  # density ∝ 1/t: t = t0 (t1/t0)^u
            t0, t1 = self.scheduler.config.min_noise_level, self.scheduler.config.max_noise_level
            u = (t - t0) / (t1 - t0) if t1 > t0 else torch.zeros_like(t)
            t = t0 * (t1 / t0) ** u
        return t

    @torch.no_grad()
    def __call__(self, examples: List[dict], device) -> dict:
        from diffusers_starflow2.utils.sequence import encode_conversation, pad_layouts

        args, N = self.args, self.num_latents
        gens = [torch.Generator().manual_seed(sample_seed(args.seed, ex["position"])) for ex in examples]
        layouts, images, scored, owners, text_on = [], [], [], [], []
        for b, (ex, g) in enumerate(zip(examples, gens)):
            drop = bool(torch.rand((), generator=g) < args.caption_dropout)
            messages, ims, sc, txt = conversation(ex, drop, args.interleaved_layout)
            layout = encode_conversation(self.tokenizer, messages, N)
            if sum(layout.latent_mask) != len(ims) * N:
                raise ValueError(
                    f"the chat template rendered {sum(layout.latent_mask) // N} image spans for "
                    f"{len(ims)} images ({ex['kind']} example {ex['source']}[{ex['position']}])"
                )
            layouts.append(layout)
            images += ims
            scored += [s and self.use_flow for s in sc]
            owners += [b] * len(ims)
            text_on.append(txt and self.use_text)
        ids, latent_mask, attention_mask, assistant = pad_layouts(layouts, self.pad_id, side="right")

        # text targets: assistant tokens that follow a text position (<|vision_end|> after a latent is forced)
        text_mask = assistant & ~latent_mask
        text_mask[:, 1:] &= ~latent_mask[:, :-1]
        text_mask &= torch.tensor(text_on)[:, None]

        t = self.noise_levels(gens)  # (B,)
        owner_index = torch.tensor(owners, dtype=torch.long)
        extra = {}
        if self.args.image_loss_reweight == "linear":  # iTARFlow's --reweight t: the loss of each image times its t
            extra["image_loss_weight"] = t[owner_index].to(device)
        if self.teacher is not None:
            extra["teacher_logits"] = self.teacher_logits(examples, images, text_mask, device)
        pixels = torch.stack(images).to(device=device, dtype=self.weight_dtype)
        batch_gen = torch.Generator().manual_seed(sample_seed(args.seed, examples[0]["position"], stream=1))
        latents = self.vae.encode_latents(pixels, generator=batch_gen, sample=args.latent_sample == "sample").float()
        eps = torch.stack([torch.randn(latents.shape[1:], generator=gens[b]) for b in owners]).to(device)
        noisy = self.scheduler.add_noise(latents, eps, t.to(device)[owner_index.to(device)])
        return dict(
            input_ids=ids.to(device),
            latent_mask=latent_mask.to(device),
            images=noisy,
            noise_level=t.to(device),
            attention_mask=attention_mask.to(device),
            image_loss_mask=torch.tensor(scored, dtype=torch.bool, device=device),
            text_loss_mask=text_mask.to(device) if self.use_text else None,
            **extra,
        )

    def teacher_logits(self, examples: List[dict], images: List[torch.Tensor], text_mask: torch.Tensor, device):
        """``(P, V)`` logits of the VLM seeing each image through its own vision tower, at the positions the text
        loss scores (the same tokens, in the same order, as the student's: only the image spans differ in length)."""
        from diffusers_starflow2.utils.sequence import encode_conversation, pad_layouts

        pixels = [((im.float() + 1) / 2).clamp(0, 1) for im in images]
        vision = self.teacher_processor(images=pixels, do_rescale=False, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = self.teacher.config.vision_config.spatial_merge_size
        tokens = (grid.prod(-1) // merge**2).tolist()
        if len(set(tokens)) != 1 or len(images) != len(examples):
            raise ValueError("--distill_from_vlm_vision: one image per understanding example of one size expected")
        layouts = [
            encode_conversation(self.tokenizer, conversation(ex, False, self.args.interleaved_layout)[0], tokens[0])
            for ex in examples
        ]
        ids, latent_mask, attention_mask, assistant = pad_layouts(layouts, self.pad_id, side="right")
        teacher_mask = assistant & ~latent_mask
        teacher_mask[:, 1:] &= ~latent_mask[:, :-1]
        selected = teacher_mask[:, 1:]
        if int(selected.sum()) != int(text_mask[:, 1:].sum()):
            raise ValueError("--distill_from_vlm_vision: the teacher and the student score different tokens")
        logits = self.teacher(
            input_ids=ids.to(device),
            attention_mask=attention_mask.long().to(device),
            pixel_values=vision["pixel_values"].to(device, self.weight_dtype),
            image_grid_thw=grid.to(device),
        ).logits
        return logits[:, :-1][selected.to(device)].float()

"""The paper's recipe in training/train_starflow2.py: iTARFlow's linear (loss x t) and the inverse multi-noise
weighting, the optimiser of the paper's appendix C, and stage-2 distillation from the VLM's own vision tower."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import stage1_argv
from shapes_world.synthetic_world import write_world

from diffusers_starflow2 import StarFlow2Pipeline
from diffusers_starflow2.testing_utils import build_tiny_causal_lm, build_tiny_starflow2_components
from diffusers_starflow2.training import train_starflow2 as train
from diffusers_starflow2.training.args import parse_args
from diffusers_starflow2.training.batches import BatchBuilder
from diffusers_starflow2.utils.sequence import IMAGE_PAD, user_message

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def pipe():
    return StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0, perturb=0.05))


@pytest.fixture(scope="module")
def work(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("recipe")
    pipe.save_pretrained(root / "pipe")
    components = build_tiny_starflow2_components(seed=0, perturb=0.05)
    components["vlm"] = build_tiny_causal_lm(components["tokenizer"])  # a language model without vision tower
    StarFlow2Pipeline(**components).save_pretrained(root / "text-only")
    write_world(root / "world", num_images=4, seed=0, image_size=32, kinds=["caption", "understanding"], progress=False)
    return root


def image(seed):
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def args_for(stage, *extra):
    return parse_args(
        [
            "--stage",
            str(stage),
            "--pretrained_model_name_or_path",
            "-",
            "--output_dir",
            "-",
            "--max_train_steps",
            "1",
            "--caption_dropout",
            "0",
            "--latent_sample",
            "mean",
            *extra,
        ]
    )


def flow_loss(pipe, args, examples):
    build = BatchBuilder(args, pipe.tokenizer, pipe.vae, pipe.scheduler, pipe.transformer.num_latents, torch.float32)
    batch = build(examples, "cpu")
    with torch.no_grad():
        out = train.PretzelTrainer(pipe.transformer, pipe.vlm, train_vlm=False)(**batch)
    return out["flow_loss"].item(), batch["noise_level"]


def test_default_reweight_is_itarflow_linear_the_t_weighted_mean_of_per_sample_losses(pipe):
    examples = [
        {"kind": "caption", "image": image(i), "text": f"a red circle {i}", "position": 10 * i, "source": "caption"}
        for i in range(4)
    ]
    none = ("--image_loss_reweight", "none")
    assert args_for(1).image_loss_reweight == "linear"
    plain, t = flow_loss(pipe, args_for(1, *none), examples)
    default, t_default = flow_loss(pipe, args_for(1), examples)  # no flag: iTARFlow's --reweight t
    linear, t_linear = flow_loss(pipe, args_for(1, "--image_loss_reweight", "linear"), examples)
    assert torch.equal(t, t_default) and torch.equal(t, t_linear)  # linear reweights the loss, not the noise levels
    alone = [flow_loss(pipe, args_for(1, *none), [ex])[0] for ex in examples]  # each sample on its own
    assert plain == pytest.approx(sum(alone) / 4, rel=1e-5)
    # ml-itarflow's Model.get_loss: (loss * t).mean() over the batch
    assert default == linear == pytest.approx(sum(ti * li for ti, li in zip(t.tolist(), alone)) / 4, rel=1e-5)
    assert abs(default - plain) > 0.1 * abs(plain)


def test_inverse_reweight_draws_noise_levels_with_density_one_over_t(pipe):
    build = BatchBuilder(
        args_for(1, "--image_loss_reweight", "inverse"),
        pipe.tokenizer,
        pipe.vae,
        pipe.scheduler,
        pipe.transformer.num_latents,
        torch.float32,
    )
    levels = build.noise_levels([torch.Generator().manual_seed(i) for i in range(4000)])
    t0, t1 = pipe.scheduler.config.min_noise_level, pipe.scheduler.config.max_noise_level
    # density ∝ 1/t on [t0, t1]: log t is uniform, so P(t < sqrt(t0 t1)) = 1/2 (uniform t would give ~0.17)
    below = (levels < math.sqrt(t0 * t1)).float().mean().item()
    assert abs(below - 0.5) < 0.03 and levels.min() >= t0 and levels.max() <= t1


def test_paper_recipe_sets_appendix_c_optimiser_and_explicit_flags_win(work, tmp_path):
    args = args_for(1, "--recipe", "paper")
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.adam_weight_decay) == (0.9, 0.95, 1e-8, 1e-4)
    assert (args.lr_scheduler, args.min_learning_rate, args.mixed_precision) == ("cosine_with_min_lr", 1e-6, "bf16")
    default = args_for(1)
    assert (default.adam_beta2, default.adam_weight_decay, default.lr_scheduler) == (0.999, 1e-2, "constant")
    assert args_for(1, "--recipe", "paper", "--adam_beta2", "0.98").adam_beta2 == 0.98

    # cosine from --learning_rate down to --min_learning_rate over the run
    argv = stage1_argv(
        work,
        tmp_path,
        4,
        "--train_batch_size",
        "2",
        "--recipe",
        "paper",
        "--mixed_precision",
        "no",
        "--learning_rate",
        "1e-3",
    )
    history = train.main(parse_args(argv))["history"]
    expected = [1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)]
    assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-6)


def understanding(i):
    return {
        "kind": "understanding",
        "image": image(i),
        "prompt": "what colour is the shape?",
        "response": ["red", "blue"][i % 2],
        "position": i,
        "source": "understanding",
    }


def test_distillation_teacher_sees_the_image_through_the_vlm_vision_tower(pipe):
    args = args_for(2, "--distill_from_vlm_vision")
    build = BatchBuilder(
        args, pipe.tokenizer, pipe.vae, pipe.scheduler, pipe.transformer.num_latents, torch.float32, teacher=pipe.vlm
    )
    examples = [understanding(0), understanding(1)]
    batch = build(examples, "cpu")

    # the teacher, rendered independently: Qwen2.5-VL's own image tokens, next-token logits of the response
    for b, ex in enumerate(examples):
        vision = build.teacher_processor(images=[((ex["image"] + 1) / 2)], do_rescale=False, return_tensors="pt")
        tokens = int(vision["image_grid_thw"].prod()) // pipe.vlm.config.vision_config.spatial_merge_size**2
        messages = [user_message(ex["image"], ex["prompt"]), {"role": "assistant", "content": ex["response"]}]
        text = pipe.tokenizer.apply_chat_template(messages, tokenize=False).replace(IMAGE_PAD, IMAGE_PAD * tokens)
        ids = pipe.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = pipe.vlm(
                input_ids=ids, pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"]
            ).logits[0]
        n = int(batch["text_loss_mask"][b].sum())  # the response tokens, <|im_end|> and what follows it
        start = int(batch["text_loss_mask"][:b].sum())
        end_of_response = text.rindex(ex["response"])
        first = len(pipe.tokenizer(text[:end_of_response], add_special_tokens=False).input_ids)
        torch.testing.assert_close(
            batch["teacher_logits"][start : start + n], logits[first - 1 : first - 1 + n], atol=1e-4, rtol=1e-4
        )

    # the loss adds distill_weight x KL(teacher || student) over the same positions
    trainer = train.PretzelTrainer(pipe.transformer, pipe.vlm, train_vlm=False)
    with torch.no_grad():
        plain = trainer(**{k: v for k, v in batch.items() if k != "teacher_logits"})
        out = trainer(**batch, distill_weight=0.5)
    student = out_student_logits(pipe, batch)
    kl = (
        (
            F.softmax(batch["teacher_logits"], -1)
            * (F.log_softmax(batch["teacher_logits"], -1) - F.log_softmax(student, -1))
        )
        .sum(-1)
        .mean()
    )
    assert out["distill_kl"].item() == pytest.approx(kl.item(), rel=1e-5) and kl > 0
    assert out["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * kl.item(), rel=1e-5)
    assert train.distillation_kl(student, student).abs().item() < 1e-6


def out_student_logits(pipe, batch):
    from diffusers_starflow2.models.vlm_stream import VLMStream

    inputs = {k: v for k, v in batch.items() if k != "teacher_logits"}
    with torch.no_grad():
        return pipe.transformer(VLMStream(pipe.vlm), **inputs).text_logits


def test_distillation_trains_and_is_skipped_without_a_vision_tower(work, tmp_path, caplog):
    common = [
        "--stage",
        "2",
        "--train_data_dir",
        str(work / "world" / "understanding"),
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "2",
        "--distill_from_vlm_vision",
    ]
    history = train.main(
        parse_args(
            common + ["--pretrained_model_name_or_path", str(work / "pipe"), "--output_dir", str(tmp_path / "a")]
        )
    )["history"]
    assert all(
        h["distill_kl"] > 0 and h["loss"] == pytest.approx(h["text_ce"] + h["distill_kl"], rel=1e-5) for h in history
    )
    with caplog.at_level(logging.WARNING, logger="train_starflow2"):
        history = train.main(
            parse_args(
                common
                + ["--pretrained_model_name_or_path", str(work / "text-only"), "--output_dir", str(tmp_path / "b")]
            )
        )["history"]
    assert "has no vision tower" in caplog.text and "Qwen2ForCausalLM" in caplog.text
    assert len(history) == 2 and all("distill_kl" not in h for h in history)

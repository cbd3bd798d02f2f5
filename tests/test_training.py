"""training/train_starflow2.py on a tiny pipeline: every stage trains and saves a loadable pipeline, only the intended
parameters move, the flow NLL falls, resuming is exact, and accelerate runs it on two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

from conftest import write_training_workdir  # noqa: E402
from shapes_world.synthetic_world import write_world  # noqa: E402

from diffusers_starflow2 import StarFlow2Pipeline  # noqa: E402
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components  # noqa: E402
from diffusers_starflow2.training import train_starflow2 as train  # noqa: E402
from diffusers_starflow2.training.args import ArgumentError, parse_args  # noqa: E402
from diffusers_starflow2.training.batches import BatchBuilder  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SCRIPT = REPO / "training" / "train_starflow2.py"
GROUPS = ("shallow", "deep", "noise_embed", "adapter", "skip_v", "skip_t")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return write_training_workdir(tmp_path_factory.mktemp("training"))


def data_args(work, stage):
    w = work / "world"
    if stage == 3:
        return [
            "--mixture",
            f"understanding={w}/understanding:0.3,generation={w}/caption:0.4,"
            f"editing={w}/edit:0.2,interleaved={w}/interleaved:0.1",
        ]
    return ["--train_data_dir", str(w / ("caption" if stage == 1 else "understanding"))]


def run(work, out, stage, *extra, steps=2, batch=2, lr=1e-3):
    argv = [
        "--stage",
        str(stage),
        "--pretrained_model_name_or_path",
        str(work / "pipe"),
        "--output_dir",
        str(out),
        "--max_train_steps",
        str(steps),
        "--train_batch_size",
        str(batch),
        "--learning_rate",
        str(lr),
        "--seed",
        "0",
        *data_args(work, stage),
        *extra,
    ]
    return train.main(parse_args(argv))


def weights(folder, component):
    name = {
        "transformer": "diffusion_pytorch_model.safetensors",
        "vae": "diffusion_pytorch_model.safetensors",
        "vlm": "model.safetensors",
    }[component]
    return load_file(str(Path(folder) / component / name))


def changed_groups(before, after):
    assert before.keys() == after.keys()
    return {g for g in GROUPS for k in before if k.startswith(g + ".") and not torch.equal(before[k], after[k])}


@pytest.mark.parametrize(
    "stage,expected",
    [
        (1, {"shallow", "deep", "noise_embed"}),
        (2, {"adapter"}),
        (3, set(GROUPS)),
    ],
)
def test_stage_trains_intended_parameters_and_saves_pipeline(work, tmp_path, stage, expected):
    result = run(work, tmp_path / "out", stage, steps=3, batch=3)
    assert result["global_step"] == 3 and len(result["history"]) == 3
    logged = result["history"][-1]
    assert ("bits_per_dim" in logged) == (stage != 2) and ("text_ce" in logged) == (stage != 1)

    out = tmp_path / "out"
    before, after = weights(work / "pipe", "transformer"), weights(out, "transformer")
    assert changed_groups(before, after) == expected
    if stage == 1:  # skips held at exactly zero
        assert not after["skip_v.weight"].any() and not after["skip_t.weight"].any()
    for frozen in ("vlm", "vae"):  # never trained, saved bit-exact
        a, b = weights(work / "pipe", frozen), weights(out, frozen)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    pipe = StarFlow2Pipeline.from_pretrained(out)
    assert pipe.scheduler.config.min_noise_level == 0.01 and pipe.scheduler.config.max_noise_level == 0.3
    if stage == 3:  # the trained folder samples
        latents = pipe(
            "a red circle",
            guidance_scale=1.0,
            num_inference_steps=0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert latents.shape == (1, 4, 4, 4) and torch.isfinite(latents).all()
    assert not list(out.glob(".pipeline-*")) and not list(out.glob(".checkpoint-*"))


def test_stage1_flow_nll_falls(work, tmp_path):
    write_world(tmp_path / "two", num_images=2, seed=1, image_size=32, kinds=["caption"], progress=False)
    argv = [
        "--stage",
        "1",
        "--pretrained_model_name_or_path",
        str(work / "pipe"),
        "--output_dir",
        str(tmp_path / "out"),
        "--train_data_dir",
        str(tmp_path / "two" / "caption"),
        "--max_train_steps",
        "30",
        "--train_batch_size",
        "2",
        "--learning_rate",
        "3e-3",
        "--caption_dropout",
        "0",
        "--noise_level_min",
        "0.05",
        "--noise_level_max",
        "0.05",
        "--logging_steps",
        "10",
        "--latent_sample",
        "mean",
    ]  # the untrained tiny FAE's posterior std is ~1: its samples are pure noise
    history = train.main(parse_args(argv))["history"]
    bpd = [h["bits_per_dim"] for h in history]
    first, last = sum(bpd[:5]) / 5, sum(bpd[-5:]) / 5
    assert last < first - 1.0, f"bits/dim did not fall: {first:.3f} -> {last:.3f}"
    saved = StarFlow2Pipeline.from_pretrained(tmp_path / "out").scheduler.config
    assert saved.min_noise_level == saved.max_noise_level == 0.05


def test_resume_is_exact(work, tmp_path):
    full = run(work, tmp_path / "full", 1, "--checkpointing_steps", "3", steps=6)
    assert (tmp_path / "full" / "checkpoint-3").is_dir() and (tmp_path / "full" / "checkpoint-6").is_dir()

    run(work, tmp_path / "split", 1, "--checkpointing_steps", "3", steps=3)
    resumed = run(
        work, tmp_path / "split", 1, "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest", steps=6
    )
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    for a, b in zip(full["history"][3:], resumed["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["bits_per_dim"] - b["bits_per_dim"]) <= 1e-6
    wa, wb = weights(tmp_path / "full", "transformer"), weights(tmp_path / "split", "transformer")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]

    # resuming with another batch size would silently read other data: refused
    with pytest.raises(ArgumentError, match="--resume_from_checkpoint"):
        run(work, tmp_path / "split", 1, "--resume_from_checkpoint", "latest", steps=8, batch=3)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--stage", "3"], "--mixture"),
        (["--stage", "1"], "--train_data_dir"),
        (["--stage", "1", "--train_data_dir", "/nonexistent/folder"], "--train_data_dir"),
        (["--stage", "1", "--train_data_dir", "WORLD/edit"], "--train_data_dir"),  # wrong kind of rows
        (["--stage", "3", "--mixture", "generation=/nonexistent:1"], "--mixture"),
        (["--stage", "3", "--mixture", "generation"], "--mixture"),
        (["--stage", "1", "--train_data_dir", "WORLD/caption", "--lora_rank", "0"], "--lora_rank"),
        (["--stage", "1", "--train_data_dir", "WORLD/caption", "--lora_vlm"], "--lora_vlm"),
        (
            [
                "--stage",
                "1",
                "--train_data_dir",
                "WORLD/caption",
                "--noise_level_min",
                "0.5",
                "--noise_level_max",
                "0.1",
            ],
            "--noise_level_min",
        ),
        (
            ["--stage", "1", "--train_data_dir", "WORLD/caption", "--resume_from_checkpoint", "nope"],
            "--resume_from_checkpoint",
        ),
        (
            ["--stage", "1", "--train_data_dir", "WORLD/caption", "--pretrained_model_name_or_path", "/nonexistent"],
            "--pretrained_model_name_or_path",
        ),
    ],
)
def test_bad_arguments_name_the_argument(work, tmp_path, argv, match):
    argv = [a.replace("WORLD", str(work / "world")) for a in argv]
    if "--pretrained_model_name_or_path" not in argv:
        argv += ["--pretrained_model_name_or_path", str(work / "pipe")]
    args = parse_args(argv + ["--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"])
    with pytest.raises(ArgumentError, match=match):
        train.main(args)


def test_cli_reports_argument_errors(work, tmp_path, capsys):
    code = train.cli(
        [
            "--stage",
            "3",
            "--pretrained_model_name_or_path",
            str(work / "pipe"),
            "--output_dir",
            str(tmp_path),
            "--max_train_steps",
            "1",
        ]
    )
    assert code == 2 and "--mixture" in capsys.readouterr().err


def test_two_processes_with_accelerate_launch(work, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless given an MPI hostfile; on CPU the
    # torchrun launcher of --multi_gpu plus ACCELERATE_USE_CPU=1 gives two gloo processes (DistributedType.MULTI_CPU).
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        str(SCRIPT),
        "--stage",
        "3",
        "--pretrained_model_name_or_path",
        str(work / "pipe"),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "2",
        "--checkpointing_steps",
        "2",
        *data_args(work, 3),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "model_index.json").is_file()
    state = json.loads((out / "checkpoint-2" / "training_state.json").read_text())
    assert state["num_processes"] == 2
    assert {p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    StarFlow2Pipeline.from_pretrained(out)


def test_batches_use_the_pipeline_layouts_and_per_sample_randomness():
    components = build_tiny_starflow2_components(seed=0, perturb=0)
    pipe = StarFlow2Pipeline(**components)
    tok, N = pipe.tokenizer, pipe.transformer.num_latents
    args = parse_args(
        [
            "--stage",
            "3",
            "--pretrained_model_name_or_path",
            "-",
            "--output_dir",
            "-",
            "--max_train_steps",
            "1",
            "--mixture",
            "-",
            "--caption_dropout",
            "0",
        ]
    )
    build = BatchBuilder(args, tok, pipe.vae, pipe.scheduler, N, torch.float32)
    img = lambda: torch.rand(3, 32, 32) * 2 - 1  # noqa: E731
    examples = [
        {"kind": "caption", "image": img(), "text": "a red circle"},
        {"kind": "understanding", "image": img(), "prompt": "what colour?", "response": "red"},
        {"kind": "edit", "source_image": img(), "instruction": "make it blue", "target_image": img()},
        {"kind": "interleaved", "segments": ["a red circle.", img(), "now blue:", img()]},
    ]
    for i, ex in enumerate(examples):
        ex.update(position=i, source=ex["kind"])
    batch = build(examples, "cpu")
    # flow loss: generated images only (the edit target, the assistant's images of the document)
    assert batch["image_loss_mask"].tolist() == [True, False, False, True, True, True]
    assert batch["images"].shape == (6, 4, 4, 4) and batch["latent_mask"].sum() == 6 * N

    # generation: the sampling prompt (user turn, assistant header, <|vision_start|>) is a prefix of the sample
    prompt = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)[0].input_ids
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
    # text loss: the understanding response (and its <|im_end|>), the document's texts; nothing for captions/edits
    mask = batch["text_loss_mask"]
    assert not mask[0].any() and not mask[2].any()
    decoded = tok.decode(batch["input_ids"][1][mask[1]])
    assert decoded.lstrip("\n") == "red<|im_end|>"
    assert "now blue:" in tok.decode(batch["input_ids"][3][mask[3]])

    # per-sample randomness depends on the sample's stream position only, not on its batch-mates
    alone = build([examples[1]], "cpu")
    assert torch.equal(alone["noise_level"][0], batch["noise_level"][1])
    t = batch["noise_level"]
    assert ((t >= 0.01) & (t <= 0.3)).all() and len(set(t.tolist())) == 4

    # caption dropout renders the unconditional prompt of guidance
    args.caption_dropout = 1.0
    dropped = build(examples[:1], "cpu")["input_ids"][0].tolist()
    uncond = pipe.encode_prompt("x", do_classifier_free_guidance=True)[1].input_ids
    assert dropped[: len(uncond)] == uncond

    # --image_loss_reweight inverse: log-uniform noise levels (density ∝ 1/t)
    args.image_loss_reweight = "inverse"
    levels = build.noise_levels([torch.Generator().manual_seed(i) for i in range(4000)])
    assert levels.min() >= 0.01 and levels.max() <= 0.3
    assert abs(levels.log().mean().item() - (torch.tensor([0.01, 0.3]).log().mean().item())) < 0.05


def test_chat_edits_are_laid_out_as_a_continued_chat():
    """A chat_edit sample is token for token what the interleaved pipeline runs for "draw X" then "make it blue" in
    the same conversation; only its second image is scored, and caption dropout empties both user turns (the
    unconditional branch of the chat's guidance)."""
    from diffusers_starflow2 import StarFlow2InterleavedPipeline
    from diffusers_starflow2.utils.sequence import IMAGE_PAD, VISION_END, VISION_START, special_id, user_message

    pipe = StarFlow2InterleavedPipeline(**build_tiny_starflow2_components(seed=0, perturb=0))
    tok, N = pipe.tokenizer, pipe.transformer.num_latents
    args = parse_args(
        ["--stage", "3", "--pretrained_model_name_or_path", "-", "--output_dir", "-", "--mixture", "-"]
        + ["--max_train_steps", "1", "--caption_dropout", "0"]
    )
    build = BatchBuilder(args, tok, pipe.vae, pipe.scheduler, N, torch.float32)
    example = {
        "kind": "chat_edit",
        "prompt": "a red circle",
        "source_image": torch.rand(3, 32, 32) * 2 - 1,
        "instruction": "make it blue",
        "target_image": torch.rand(3, 32, 32) * 2 - 1,
        "position": 0,
        "source": "chat_edit",
    }
    batch = build([example], "cpu")
    assert batch["image_loss_mask"].tolist() == [False, True] and not batch["text_loss_mask"].any()

    vs, ve, pad = (special_id(tok, t) for t in (VISION_START, VISION_END, IMAGE_PAD))
    image = [vs] + [pad] * N + [ve]

    def chat_ids(request, instruction, branch):
        first = pipe.encode_prompt([user_message(request)], do_classifier_free_guidance=True)[branch]
        later = pipe.encode_prompt([user_message(instruction)], do_classifier_free_guidance=True, next_turn=True)
        return first.input_ids + image + later[branch].input_ids + image

    expected = chat_ids("a red circle", "make it blue", 0)
    ids = batch["input_ids"][0].tolist()
    assert ids[: len(expected)] == expected and tok.decode(ids[len(expected) :]).strip() == "<|im_end|>"

    args.caption_dropout = 1.0
    dropped = build([example], "cpu")["input_ids"][0].tolist()
    unconditional = chat_ids("a red circle", "make it blue", 1)
    assert dropped[: len(unconditional)] == unconditional


def test_recipe_chat_step_continues_stage3_with_chat_edits(work, tmp_path):
    """The embedded model's recipe step ``chat``: stage 3 again, from ``WORKDIR/stage3``, on a mixture with the
    world's chat edits; it writes a loadable pipeline into ``WORKDIR/chat``, which ``export`` publishes."""
    import shutil

    from shapes_world import train_world

    shutil.copytree(work / "world", tmp_path / "world")
    shutil.copytree(work / "pipe", tmp_path / "stage3")
    assert "chat_edit=" in " ".join(train_world.STAGES["chat"].data(tmp_path))
    train_world.step_stage(tmp_path, "chat", steps=2)
    assert train_world.FINAL_STEP == "chat"
    StarFlow2Pipeline.from_pretrained(tmp_path / "chat")

"""The diffusers-example habits of training/train_starflow2.py: a 🤗 datasets imagefolder, validation images, EMA,
LoRA checkpoints that load_lora_weights reads, checkpoint limits, trackers and a model card pushed to the Hub."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]

from conftest import sample_latents, write_training_workdir  # noqa: E402
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE  # noqa: E402

from diffusers_starflow2 import StarFlow2Pipeline  # noqa: E402
from diffusers_starflow2.training import train_starflow2 as train  # noqa: E402
from diffusers_starflow2.training.args import ArgumentError, parse_args  # noqa: E402
from diffusers_starflow2.training.checkpointing import EMA_WEIGHT_NAME  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return write_training_workdir(tmp_path_factory.mktemp("habits"), perturb=0.05, kinds=["caption"])


def lora_run(work, out, *extra, steps=4):
    argv = [
        "--stage",
        "1",
        "--pretrained_model_name_or_path",
        str(work / "pipe"),
        "--output_dir",
        str(out),
        "--dataset_name",
        str(work / "world" / "caption"),
        "--cache_dir",
        str(work / "hf-cache"),
        "--max_train_steps",
        str(steps),
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--rank",
        "4",
        "--use_ema",
        "--ema_decay",
        "0.5",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "1",
        "--validation_prompt",
        "a red circle",
        "--num_validation_images",
        "1",
        *extra,
    ]
    return train.main(parse_args(argv))


def test_stage1_lora_with_imagefolder_validation_ema_checkpoints_and_resume(work, tmp_path):
    full = lora_run(work, tmp_path / "full", "--validation_steps", "2")
    out = tmp_path / "full"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["final_prompt0_0.png", "step-2_prompt0_0.png"]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]  # --checkpoints_total_limit 1
    # the EMA is kept as safetensors, not as a pickle that resuming would have to unpickle
    assert (out / "checkpoint-4" / EMA_WEIGHT_NAME).is_file()
    assert not list((out / "checkpoint-4").glob("custom_checkpoint_*"))

    pipe = StarFlow2Pipeline.from_pretrained(work / "pipe")
    base = sample_latents(pipe)
    pipe.load_lora_weights(out / "checkpoint-4", adapter_name="ckpt")
    assert (sample_latents(pipe) - base).abs().max() > 1e-4
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, adapter_name="final")  # the EMA weights
    final_lora = sample_latents(pipe)
    assert (final_lora - base).abs().max() > 1e-4
    ckpt, final = load_file(out / "checkpoint-4" / LORA_WEIGHT_NAME_SAFE), load_file(out / LORA_WEIGHT_NAME_SAFE)
    assert ckpt.keys() == final.keys() and any(not torch.equal(ckpt[k], final[k]) for k in ckpt)  # live vs EMA

    # stop after 2 steps, resume to 4: the same losses and the same final (EMA) LoRA file
    lora_run(work, tmp_path / "split", steps=2)
    resumed = lora_run(work, tmp_path / "split", "--resume_from_checkpoint", "latest")
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(full["history"][2:], resumed["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["bits_per_dim"] - b["bits_per_dim"]) <= 1e-6
    split = load_file(tmp_path / "split" / LORA_WEIGHT_NAME_SAFE)
    assert max((split[k] - final[k]).abs().max().item() for k in final) <= 1e-6
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_ema_is_what_the_final_save_holds(work, tmp_path):
    # decay 0.5, two steps from w0: ema = 0.25 w0 + 0.25 w1 + 0.5 w2 — differs from the live weights w2 of the
    # checkpoint and from w0, and lies between them
    lora_run(work, tmp_path / "ema", steps=2)
    live = load_file(tmp_path / "ema" / "checkpoint-2" / LORA_WEIGHT_NAME_SAFE)
    ema = load_file(tmp_path / "ema" / LORA_WEIGHT_NAME_SAFE)
    assert any((live[k] - ema[k]).abs().max() > 1e-6 for k in live)


def test_report_to_tensorboard_and_push_to_hub_with_model_card(work, tmp_path, monkeypatch):
    calls = {}

    class Repo:
        repo_id = "me/shapes-lora"

    def create_repo(repo_id, exist_ok, token):
        calls["create"] = repo_id
        return Repo()

    def upload_folder(repo_id, folder_path, commit_message, token, ignore_patterns):
        calls["upload"] = (repo_id, Path(folder_path), ignore_patterns)
        calls["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(train, "create_repo", create_repo)
    monkeypatch.setattr(train, "upload_folder", upload_folder)
    out = tmp_path / "hub"
    lora_run(work, out, "--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "me/shapes-lora", steps=2)
    assert calls["create"] == "me/shapes-lora" and calls["upload"][:2] == ("me/shapes-lora", out)
    assert "checkpoint-*" in calls["upload"][2]
    card = calls["card"]
    assert "base_model:" in card and str(work / "pipe") in card and "stage 1" in card
    assert str(work / "world" / "caption") in card and "validation/final_prompt0_0.png" in card
    assert "lora" in card and "load_lora_weights" in card
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "tensorboard wrote no event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0}).Reload()
    assert {"loss", "bits_per_dim"} <= set(acc.Tags()["scalars"]) and "validation" in acc.Tags()["images"]


def test_image_and_caption_columns(work, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    rows = [json.loads(line) for line in (work / "world" / "caption" / "metadata.jsonl").read_text().splitlines()]
    shutil.copytree(work / "world" / "caption" / "images", folder / "images")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": r["file_name"], "caption": r["text"]}) + "\n" for r in rows)
    )
    common = [
        "--stage",
        "1",
        "--pretrained_model_name_or_path",
        str(work / "pipe"),
        "--output_dir",
        str(tmp_path / "out"),
        "--dataset_name",
        str(folder),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--max_train_steps",
        "1",
        "--train_batch_size",
        "2",
    ]
    with pytest.raises(ArgumentError, match="--caption_column 'text' is not a column"):
        train.main(parse_args(common))
    with pytest.raises(ArgumentError, match="--image_column 'picture' is not a column"):
        train.main(parse_args(common + ["--caption_column", "caption", "--image_column", "picture"]))
    result = train.main(parse_args(common + ["--caption_column", "caption"]))
    assert result["global_step"] == 1 and "bits_per_dim" in result["history"][0]


def test_training_docs_name_every_option_and_no_other():
    import argparse
    import re

    section = (REPO / "docs" / "training.md").read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", section))
    options = set()
    parse = argparse.ArgumentParser.parse_args

    def record(parser, *args, **kwargs):
        options.update(o for action in parser._actions for o in action.option_strings if o.startswith("--"))
        return parse(parser, *args, **kwargs)

    argparse.ArgumentParser.parse_args = record
    try:
        parse_args(
            ["--stage", "1", "--pretrained_model_name_or_path", "-", "--output_dir", "-", "--max_train_steps", "1"]
        )
    finally:
        argparse.ArgumentParser.parse_args = parse
    # flags of other commands the section shows: accelerate launch, the world writer, the benchmark, iTARFlow's
    others = {
        "--config_file",
        "--multi_gpu",
        "--num_processes",
        "--cpu",
        "--output",
        "--num_images",
        "--configs",
        "--repeats",
        "--reweight",
    }
    assert options - {"--help"} - named == set()
    assert named - options - others == set()

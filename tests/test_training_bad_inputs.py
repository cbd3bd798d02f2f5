"""Bad input to training: the data loader's table (every row names the file, the line and the key) and the training
arguments' table (every row names the argument and the value), checkpoints and leftovers of killed runs."""

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


from conftest import stage1_argv, write_training_workdir  # noqa: E402

from diffusers_starflow2 import StarFlow2Pipeline  # noqa: E402
from diffusers_starflow2.training import train_starflow2 as train  # noqa: E402
from diffusers_starflow2.training.args import ArgumentError, parse_args  # noqa: E402
from diffusers_starflow2.training.data import load_metadata  # noqa: E402

# -- the data loader ------------------------------------------------------------------------------------------------


def _setup(folder: Path, outside: Path) -> None:
    """Good and bad files of every sort, next to a metadata.jsonl."""
    Image.new("RGB", (8, 8), "white").save(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    data = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "sub").mkdir()
    Image.new("RGB", (8, 8), "white").save(outside / "secret.png")
    (folder / "escape.png").symlink_to(outside / "secret.png")
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    (folder / "inside.png").symlink_to(folder / "a.png")


DATA_BAD = [  # (kind, row, key named in the message)
    ("caption", {"file_name": "notes.txt", "text": "x"}, "file_name"),
    ("caption", {"file_name": "truncated.png", "text": "x"}, "file_name"),
    ("caption", {"file_name": "empty.png", "text": "x"}, "file_name"),
    ("caption", {"file_name": "sub", "text": "x"}, "file_name"),
    ("caption", {"file_name": "escape.png", "text": "x"}, "file_name"),
    ("caption", {"file_name": "linked/secret.png", "text": "x"}, "file_name"),
    ("caption", {"file_name": "/etc/passwd", "text": "x"}, "file_name"),
    ("caption", {"file_name": "C:/a.png", "text": "x"}, "file_name"),
    ("caption", {"file_name": "sub/../../a.png", "text": "x"}, "file_name"),
    ("caption", {"file_name": "", "text": "x"}, "file_name"),
    ("caption", {"file_name": 3, "text": "x"}, "file_name"),
    ("caption", {"file_name": "a.png", "text": None}, "text"),
    ("caption", {"file_name": "a.png", "text": ["x"]}, "text"),
    ("caption", {"text": "x"}, "file_name"),
    ("understanding", {"file_name": "notes.txt", "prompt": "q", "response": "r"}, "file_name"),
    ("understanding", {"file_name": "a.png", "prompt": "", "response": "r"}, "prompt"),
    ("understanding", {"file_name": "a.png", "prompt": "q"}, "response"),
    ("edit", {"source_file_name": "escape.png", "instruction": "x", "target_file_name": "a.png"}, "source_file_name"),
    (
        "edit",
        {"source_file_name": "a.png", "instruction": "x", "target_file_name": "truncated.png"},
        "target_file_name",
    ),
    ("edit", {"source_file_name": "a.png", "instruction": 1, "target_file_name": "a.png"}, "instruction"),
    ("interleaved", {"segments": [{"text": "x"}, {"file_name": "notes.txt"}]}, "segments[1].file_name"),
    ("interleaved", {"segments": [{"file_name": "linked/secret.png"}]}, "segments[0].file_name"),
    ("interleaved", {"segments": [{"text": ""}]}, "segments[0].text"),
    ("interleaved", {"segments": "a.png"}, "segments"),
]
GOOD = {
    "caption": {"file_name": "a.png", "text": "ok"},
    "understanding": {"file_name": "a.png", "prompt": "q", "response": "r"},
    "edit": {"source_file_name": "a.png", "instruction": "x", "target_file_name": "a.png"},
    "interleaved": {"segments": [{"text": "x"}, {"file_name": "a.png"}]},
}


@pytest.mark.parametrize("kind,row,key", DATA_BAD)
def test_data_loader_bad_rows(tmp_path, kind, row, key):
    folder, outside = tmp_path / "data", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    _setup(folder, outside)
    (folder / "metadata.jsonl").write_text(json.dumps(GOOD[kind]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError) as err:
        load_metadata(folder, kind)
    message = str(err.value)
    assert f"{folder / 'metadata.jsonl'}:2:" in message and repr(key) in message
    value = row.get(key.split("[")[0]) if "[" not in key else None
    if isinstance(value, str) and value:
        assert value in message


def test_symlink_inside_the_folder_is_accepted(tmp_path):
    folder, outside = tmp_path / "data", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    _setup(folder, outside)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "inside.png", "text": "ok"}) + "\n")
    assert load_metadata(folder, "caption") == [{"file_name": "inside.png", "text": "ok"}]


# -- the training arguments -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return write_training_workdir(tmp_path_factory.mktemp("bad-args"), num_images=2, kinds=["caption"])


CAPTION = ["--train_data_dir", "WORLD/caption"]
ARGS_BAD = [  # (extra argv, text the message must hold: the argument and the value)
    (["--dataset_name", "WORLD/caption"], "--dataset_name"),  # together with --train_data_dir
    (["--stage", "2", "--dataset_name", "x"], "--dataset_name"),
    (["--max_train_steps", "0"], "--max_train_steps must be an integer >= 1; got 0"),
    (["--train_batch_size", "-1"], "--train_batch_size must be an integer >= 1; got -1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be an integer >= 1; got 0"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps must be an integer >= 1; got 0"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be an integer >= 1; got 0"),
    (["--validation_prompt", "x", "--validation_steps", "0"], "--validation_steps must be an integer >= 1; got 0"),
    (["--validation_prompt", "x", "--num_validation_images", "0"], "--num_validation_images must be an integer >= 1"),
    (["--validation_steps", "2"], "--validation_steps needs --validation_prompt"),
    (["--validation_prompt", "  "], "--validation_prompt must be non-empty text; got ['  ']"),
    (["--learning_rate", "0"], "--learning_rate must be a finite number > 0; got 0.0"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0; got nan"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0; got inf"),
    (["--adam_beta2", "1.0"], "--adam_beta2 must be a finite number >= 0 and < 1; got 1.0"),
    (["--adam_beta1", "-0.1"], "--adam_beta1 must be a finite number >= 0 and < 1; got -0.1"),
    (["--adam_epsilon", "0"], "--adam_epsilon must be a finite number > 0; got 0.0"),
    (["--adam_weight_decay", "-1"], "--adam_weight_decay must be a finite number >= 0; got -1.0"),
    (["--min_learning_rate", "1"], "--min_learning_rate (1.0) must be <= --learning_rate (0.0001)"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be a finite number >= 0; got -1.0"),
    (["--caption_dropout", "1.5"], "--caption_dropout must be a finite number >= 0 and <= 1; got 1.5"),
    (["--ema_decay", "1"], "--ema_decay must be a finite number > 0 and < 1; got 1.0"),
    (["--text_loss_weight", "-1"], "--text_loss_weight must be a finite number >= 0; got -1.0"),
    (["--distill_weight", "nan"], "--distill_weight must be a finite number >= 0; got nan"),
    (["--noise_level_min", "-0.1"], "--noise_level_min must be a finite number >= 0; got -0.1"),
    (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be an integer >= 0; got -1"),
    (["--num_workers", "-2"], "--num_workers must be an integer >= 0; got -2"),
    (["--rank", "0"], "--lora_rank must be an integer >= 1; got 0"),
    (["--lora_alpha", "4"], "--lora_alpha needs --rank"),
    (["--rank", "4", "--lora_alpha", "0"], "--lora_alpha must be a finite number > 0; got 0.0"),
    (["--distill_from_vlm_vision"], "--distill_from_vlm_vision is for stage 2"),
    (["--hub_model_id", "me/x"], "--hub_model_id 'me/x' needs --push_to_hub"),
    (["--push_to_hub", "--hub_model_id", "a/b/c"], "--hub_model_id 'a/b/c' is not a repository id"),
    (["--resume_from_checkpoint", "checkpoint-9"], "--resume_from_checkpoint 'checkpoint-9': no such checkpoint"),
    (["--stage", "2", "--validation_prompt", "x"], "--validation_prompt samples images; stage 2"),
    (["--push_to_hub", "--hub_token", "hf_x", "--report_to", "wandb"], "--hub_token with --report_to wandb"),
    (
        ["--pretrained_model_name_or_path", "no/such/folder"],
        "--pretrained_model_name_or_path no/such/folder is neither a STARFlow2 pipeline folder nor a Hub repo id",
    ),
    (["--pretrained_model_name_or_path", "WORLD"], "is not a STARFlow2 pipeline folder (no model_index.json)"),
]


@pytest.mark.parametrize("extra,message", ARGS_BAD)
def test_training_arguments_bad_values(work, tmp_path, extra, message):
    # later values of an option win: a row's --stage or --max_train_steps replaces the default one
    argv = [
        "--stage",
        "1",
        *CAPTION,
        "--pretrained_model_name_or_path",
        str(work / "pipe"),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_train_steps",
        "1",
        *extra,
    ]
    args = parse_args([a.replace("WORLD", str(work / "world")) for a in argv])
    with pytest.raises(ValueError) as err:
        train.main(args)
    assert isinstance(err.value, ArgumentError) and message in str(err.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--stage", "4"],
        ["--report_to", "comet"],
        ["--image_loss_reweight", "t"],
        ["--lr_scheduler", "cosine_min"],
        ["--recipe", "itarflow"],
        ["--rank", "two"],
    ],
)
def test_parser_refuses_unknown_choices_with_exit_2(argv, capsys):
    base = ["--stage", "1", "--pretrained_model_name_or_path", "-", "--output_dir", "-", "--max_train_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(base + argv)
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err


# -- checkpoints, logs and leftovers of killed runs -----------------------------------------------------------------


def run(work, out, *extra, steps):
    argv = stage1_argv(
        work,
        out,
        steps,
        "--train_batch_size",
        "2",
        "--checkpointing_steps",
        "2",
        *extra,
    )
    return train.main(parse_args(argv))


def test_incomplete_checkpoints_resume_logs_and_leftovers(work, tmp_path, caplog):
    out = tmp_path / "run"
    run(work, out, steps=3)  # checkpoint-2, then a third logged step (a run killed after it)
    logged = lambda: [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert logged() == [1, 2, 3]

    (out / "checkpoint-4").mkdir()  # empty: a killed copy, or a hand-made folder
    with pytest.raises(
        ArgumentError,
        match=r"--resume_from_checkpoint 'checkpoint-4': .* is not a complete "
        r"checkpoint \(no training_state.json",
    ):
        run(work, out, "--resume_from_checkpoint", "checkpoint-4", steps=4)

    leftovers = [
        out / ".checkpoint-6.tmp",
        out / ".publish-x1",
        out / ".model_index.json.tmp-3",
        out / ".transformer.old-9",
    ]
    for path in leftovers:
        path.mkdir()
    (out / ".keep").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="train_starflow2"):
        result = run(work, out, "--resume_from_checkpoint", "latest", steps=4)
    assert "skipping" in caplog.text and "checkpoint-4" in caplog.text  # latest: the empty folder skipped
    assert [h["step"] for h in result["history"]] == [3, 4]  # resumed from checkpoint-2
    assert logged() == [1, 2, 3, 4]  # step 3 of the killed run replaced, not repeated
    assert not any(p.exists() for p in leftovers) and (out / ".keep").read_text() == "mine"
    assert "left over by a killed run" in caplog.text
    StarFlow2Pipeline.from_pretrained(out)
    assert not [p for p in os.listdir(out) if p.startswith(".publish-")]


def test_publish_into_is_all_or_nothing(tmp_path):
    from diffusers_starflow2.utils.io import publish_into

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model_index.json").write_text("old")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "w").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with publish_into(folder) as staging:
            (Path(staging) / "transformer").mkdir()
            (Path(staging) / "transformer" / "w").write_text("new")
            raise RuntimeError("killed while saving")
    assert (folder / "transformer" / "w").read_text() == "old" and (folder / "model_index.json").read_text() == "old"
    assert sorted(os.listdir(folder)) == ["model_index.json", "transformer"]
    with publish_into(folder) as staging:
        (Path(staging) / "transformer").mkdir()
        (Path(staging) / "transformer" / "w").write_text("new")
        (Path(staging) / "model_index.json").write_text("new")
    assert (folder / "transformer" / "w").read_text() == "new" and (folder / "model_index.json").read_text() == "new"
    assert sorted(os.listdir(folder)) == ["model_index.json", "transformer"]

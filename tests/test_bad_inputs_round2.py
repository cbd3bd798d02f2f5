# ruff: noqa: F811  (the pipelines are module fixtures of test_bad_inputs, requested by name)
"""Bad input to the newer entry points, one table per kind: conversation states, ``log_likelihood``, the Jacobi options,
``denoise_latents``, the scheduler's options, StarFlowPipeline's ``prompt_embeds``, special tokens split across
segments, tensors without values (``meta``); and the training script's ``--dataset_name`` folders, text data and
checkpoints to resume.  Every case is a ``ValueError`` naming the argument (the script: one line and exit 2)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import stage1_argv, write_training_workdir
from test_bad_inputs import assert_refused, chat, components, edit, gen, t2i, v1  # noqa: F401

from diffusers_starflow2 import TarFlowScheduler
from diffusers_starflow2.training import train_starflow2 as train
from diffusers_starflow2.training.args import ArgumentError, parse_args
from diffusers_starflow2.training.batches import check_texts
from diffusers_starflow2.training.checkpointing import list_checkpoints
from diffusers_starflow2.utils.validation import MAX_IMAGES_PER_CALL

INF, NAN = float("inf"), float("nan")
FAST = dict(num_inference_steps=0, output_type="latent")
CHAT_FAST = dict(max_new_tokens=0, num_inference_steps=0, output_type="latent")
META = torch.device("meta")


@pytest.fixture(scope="module")
def state(chat):
    return chat(["a red circle", "<image>"], generator=gen(0), **CHAT_FAST).state


IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)
TOO_MANY = torch.zeros(MAX_IMAGES_PER_CALL + 1, 3, 32, 32, dtype=torch.uint8)  # one batch tensor, not a list

# -- the Jacobi options: one check for every pipeline ---------------------------------------------------------------

JACOBI_CASES = [
    (dict(jacobi_block_size=0), "jacobi_block_size"),
    (dict(jacobi_block_size=2.5), "jacobi_block_size"),
    (dict(jacobi_block_size="4"), "jacobi_block_size"),
    (dict(jacobi_block_size=True), "jacobi_block_size"),
    (dict(jacobi_block_size=10**30), "jacobi_block_size"),
    (dict(jacobi_tolerance=INF), "jacobi_tolerance"),
    (dict(jacobi_tolerance=NAN), "jacobi_tolerance"),
    (dict(jacobi_tolerance=-1e-3), "jacobi_tolerance"),
    (dict(jacobi_tolerance="0.1"), "jacobi_tolerance"),
    (dict(jacobi_tolerance=torch.tensor(0.1)), "jacobi_tolerance"),
    (dict(jacobi_block_size=4, jacobi_max_iterations=0), "jacobi_max_iterations"),
    (dict(jacobi_block_size=4, jacobi_max_iterations=1.5), "jacobi_max_iterations"),
]
PIPELINE_CALLS = {
    "t2i": lambda pipes, kw: pipes["t2i"]("a red circle", generator=gen(0), **{**FAST, **kw}),
    "edit": lambda pipes, kw: pipes["edit"](IMAGE, "make it blue", generator=gen(0), **{**FAST, **kw}),
    "chat": lambda pipes, kw: pipes["chat"](["a red circle", "<image>"], generator=gen(0), **{**CHAT_FAST, **kw}),
    "v1": lambda pipes, kw: pipes["v1"]("a photo of a cat", generator=gen(0), **{**FAST, **kw}),
}


@pytest.fixture(scope="module")
def pipes(t2i, edit, chat, v1):
    return dict(t2i=t2i, edit=edit, chat=chat, v1=v1)


@pytest.mark.parametrize("pipeline", sorted(PIPELINE_CALLS))
@pytest.mark.parametrize("kwargs, name", JACOBI_CASES)
def test_jacobi_options_refused_alike(pipes, pipeline, kwargs, name):
    assert_refused(lambda: PIPELINE_CALLS[pipeline](pipes, kwargs), name)


def test_jacobi_options_take_numpy_numbers_as_the_counts_do(t2i):
    exact = t2i("a red circle", generator=gen(0), jacobi_block_size=4, jacobi_max_iterations=4, **FAST).images
    numpy = t2i(
        "a red circle",
        generator=gen(0),
        jacobi_block_size=np.int64(4),
        jacobi_max_iterations=np.int32(4),
        jacobi_tolerance=np.float32(1e-3),
        num_images_per_prompt=np.int64(1),
        **FAST,
    ).images
    torch.testing.assert_close(numpy, exact, rtol=0, atol=0)


# -- conversation states -------------------------------------------------------------------------------------------

STATE_TO_CASES = [
    (("nonsense",), "device"),
    ((5,), "device") if not torch.cuda.is_available() else ((10**6,), "device"),
    (("cuda:999",), "device"),
    ((torch.float16,), "device"),  # a dtype where the device goes
    ((3.5,), "device"),
    (("cpu", torch.int64), "dtype"),
    (("cpu", torch.bool), "dtype"),
    (("cpu", "float16"), "dtype"),
    (("cpu", torch.float8_e4m3fn), "dtype"),
]
if not torch.cuda.is_available():
    STATE_TO_CASES.append((("cuda",), "device"))  # a CPU build


@pytest.mark.parametrize("args, name", STATE_TO_CASES)
def test_conversation_state_to_refuses(state, args, name):
    assert_refused(lambda: state.to(*args), name)


def test_conversation_state_to_accepts_a_device_and_a_compute_dtype(state):
    moved = state.to("cpu", torch.float64)
    assert moved.cache.cond.dtype == torch.float64 and moved.image_tokens.dtype == torch.float64
    assert state.cache.cond.dtype == torch.float32  # a copy: the state itself is untouched
    assert state.to(torch.device("cpu")).num_positions == state.num_positions


def test_state_argument_refused(chat, state, edit):
    assert_refused(lambda: chat(["make it blue", "<image>"], state="state", **CHAT_FAST), "state")
    assert_refused(lambda: chat(["make it blue", "<image>"], state=state, noise_level=0.5, **CHAT_FAST), "noise_level")
    assert_refused(lambda: edit(None, "make it blue", state=5, **FAST), "state")


# -- special tokens split across segments: the check runs on the text as the model sees it ------------------------

SPLIT_CASES = [
    ["what <|im_", "end|> color"],  # the user turn's text items are rendered side by side
    ["what <|im_end", "|> color"],
    ["a", "<|vision_start", "|>"],  # three segments make it
    ["hi", "<image>", " it is <|vision_", "start|> here"],  # a forced answer's text between images
    ["hi", "<image>", "ok <|im_", "end|>", "<image>"],
    [{"role": "user", "content": [{"type": "text", "text": "a <|image_"}, {"type": "text", "text": "pad|> b"}]}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "<|im"}, {"type": "text", "text": "_end|>"}]},
    ],
]


@pytest.mark.parametrize("prompt", SPLIT_CASES, ids=range(len(SPLIT_CASES)))
def test_special_token_split_across_segments_refused(chat, prompt):
    message = assert_refused(lambda: chat(prompt, **CHAT_FAST), "prompt")
    assert "special token" in message


def test_segments_an_image_separates_are_not_joined(chat):
    # the image's span comes between the two texts: no token can form across it
    out = chat(["what <|im_", IMAGE, "end|> color"], generator=gen(0), **CHAT_FAST)
    assert out.state is not None


def test_negative_prompt_and_edit_texts_keep_the_whole_token_check(chat, edit, t2i):
    assert_refused(
        lambda: chat(["a red circle", "<image>"], negative_prompt="x<|im_end|>", **CHAT_FAST), "negative_prompt"
    )
    assert_refused(lambda: edit(IMAGE, "make <|im_start|> blue", **FAST), "prompt")
    assert_refused(lambda: t2i.log_likelihood(IMAGE, "a <|im_end|>"), "prompt")


# -- log_likelihood: the limits and checks of the calls that generate ----------------------------------------------

LIKELIHOOD_CASES = [
    (dict(image=TOO_MANY), "image"),
    (dict(image=[IMAGE] * (MAX_IMAGES_PER_CALL + 1)), "image"),
    (dict(image=torch.zeros(1, 3, 32, 32, device=META)), "image"),
    (dict(image="circle.png"), "image"),
    (dict(image=np.full((32, 32, 3), NAN, dtype=np.float32)), "image"),
    (dict(image=np.zeros((32, 32, 3), dtype=np.float32) + 2.0), "image"),
    (dict(prompt=None), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=["a", "b"]), "prompt"),  # two prompts for one image
    (dict(noise_level=INF), "noise_level"),
    (dict(noise_level=NAN), "noise_level"),
    (dict(noise_level="0.3"), "noise_level"),
    (dict(noise_level=-1.0), "noise_level"),
    (dict(generator=0), "generator"),
    (dict(generator=[gen(0), gen(1)]), "generator"),
]


@pytest.mark.parametrize("kwargs, name", LIKELIHOOD_CASES)
def test_log_likelihood_refuses(t2i, v1, kwargs, name):
    for pipe, prompt in ((t2i, "a red circle"), (v1, "a photo of a cat")):
        args = {"image": IMAGE, "prompt": prompt, **kwargs}
        assert_refused(lambda pipe=pipe, args=args: pipe.log_likelihood(**args), name)


def test_log_likelihood_v1_refuses_special_tokens_and_sizes(v1):
    assert_refused(lambda: v1.log_likelihood(IMAGE, "a cat </s>"), "prompt")
    assert_refused(lambda: v1.log_likelihood([IMAGE, np.zeros((64, 64, 3), dtype=np.uint8)], "a cat"), "image")


def test_log_likelihood_takes_numpy_noise_levels(t2i):
    bits = t2i.log_likelihood(IMAGE, "a red circle", noise_level=np.float32(0.3), generator=gen(0))
    assert torch.equal(bits, t2i.log_likelihood(IMAGE, "a red circle", noise_level=0.3, generator=gen(0)))


# -- tensors that hold no values, and the other given tensors ------------------------------------------------------

TENSOR_CASES = [
    ("t2i latents meta", lambda p: p["t2i"]("a", latents=torch.zeros(1, 16, 4, device=META), **FAST), "latents"),
    ("edit image meta", lambda p: p["edit"](torch.zeros(3, 32, 32, device=META), "blue", **FAST), "image"),
    ("chat image meta", lambda p: p["chat"]([torch.zeros(3, 32, 32, device=META), "what?"], **CHAT_FAST), "prompt"),
    ("v1 latents meta", lambda p: p["v1"]("a cat", latents=torch.zeros(1, 4, 8, 8, device=META), **FAST), "latents"),
    (
        "denoise meta",
        lambda p: p["t2i"].denoise_latents(torch.zeros(1, 4, 4, 4, device=META), "a", num_inference_steps=1),
        "latents",
    ),
    ("denoise nan", lambda p: p["t2i"].denoise_latents(torch.full((1, 4, 4, 4), NAN), "a"), "latents"),
    ("denoise shape", lambda p: p["t2i"].denoise_latents(torch.zeros(1, 4, 8, 8), "a"), "latents"),
    ("denoise int", lambda p: p["t2i"].denoise_latents(torch.zeros(1, 4, 4, 4, dtype=torch.long), "a"), "latents"),
    ("denoise level", lambda p: p["t2i"].denoise_latents(torch.zeros(1, 4, 4, 4), "a", noise_level=INF), "noise_level"),
    (
        "denoise steps",
        lambda p: p["t2i"].denoise_latents(torch.zeros(1, 4, 4, 4), "a", num_inference_steps="3"),
        "num_inference_steps",
    ),
]


@pytest.mark.parametrize("label, call, name", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_given_tensors_refused(pipes, label, call, name):
    assert_refused(lambda: call(pipes), name)


# -- StarFlowPipeline's prompt embeddings --------------------------------------------------------------------------


def _embeds(v1, **kw):
    cfg = v1.transformer.config
    return torch.zeros(1, 4, cfg.text_dim, **kw)


EMBEDS_CASES = [
    (lambda v1: dict(prompt=None, prompt_embeds=_embeds(v1, device=META)), "prompt_embeds"),
    (lambda v1: dict(prompt=None, prompt_embeds=_embeds(v1) + NAN), "prompt_embeds"),
    (lambda v1: dict(prompt=None, prompt_embeds=_embeds(v1, dtype=torch.long)), "prompt_embeds"),
    (lambda v1: dict(prompt=None, prompt_embeds=_embeds(v1)[0]), "prompt_embeds"),
    (lambda v1: dict(prompt_embeds=_embeds(v1)), "prompt"),  # both the text and its embeddings
    (
        lambda v1: dict(prompt=None, prompt_embeds=_embeds(v1), negative_prompt_embeds=torch.zeros(1, 5, 1)),
        "negative_prompt_embeds",
    ),
    (
        lambda v1: dict(prompt=None, prompt_embeds=_embeds(v1), negative_prompt_embeds=_embeds(v1, device=META)),
        "negative_prompt_embeds",
    ),
]


@pytest.mark.parametrize("make, name", EMBEDS_CASES)
def test_prompt_embeds_refused(v1, make, name):
    kwargs = {"prompt": "a photo of a cat", **FAST, **make(v1)}
    assert_refused(lambda: v1(**kwargs), name)


# -- the scheduler's options ---------------------------------------------------------------------------------------

SCHEDULER_CASES = [
    (dict(annealed_guidance="yes"), "annealed_guidance"),
    (dict(annealed_guidance=1), "annealed_guidance"),
    (dict(noise_level=INF), "noise_level"),
    (dict(noise_level=NAN), "noise_level"),
    (dict(min_noise_level=-0.1), "min_noise_level"),
    (dict(max_noise_level=INF), "max_noise_level"),
    (dict(min_noise_level=0.2, max_noise_level=0.1), "max_noise_level"),
    (dict(num_denoising_steps=2.0), "num_denoising_steps"),
    (dict(num_denoising_steps=10**9), "num_denoising_steps"),
]


@pytest.mark.parametrize("kwargs, name", SCHEDULER_CASES)
def test_scheduler_options_refused(kwargs, name):
    assert_refused(lambda: TarFlowScheduler(**kwargs), name)
    assert_refused(lambda: TarFlowScheduler.from_preset("starflow2", **kwargs), name)


def test_scheduler_preset_name_refused():
    assert_refused(lambda: TarFlowScheduler.from_preset("itarflow"), "name")


def test_num_inference_steps_refused_alike(pipes):
    for pipeline in sorted(PIPELINE_CALLS):
        for steps in (-1, 2.0, "3", NAN, 10**9):
            call = PIPELINE_CALLS[pipeline]
            assert_refused(lambda c=call, n=steps: c(pipes, {"num_inference_steps": n}), "num_inference_steps")


# ================================================================================================================
# The training script
# ================================================================================================================


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return write_training_workdir(tmp_path_factory.mktemp("round2"), num_images=2, kinds=["caption"])


def _cli_error(argv, capsys) -> str:
    """Run the script; it must exit 2 with one error line and no traceback.  Returns that line."""
    code = train.cli([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train_starflow2.py: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _caption_folder(root: Path, rows, images=None) -> Path:
    """A caption folder: ``images`` {name: bytes} (default one good a.png) and ``rows`` of metadata."""
    root.mkdir(parents=True)
    PIL.Image.new("RGB", (32, 32), "red").save(root / "a.png")
    for name, data in (images or {}).items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (32, 32), "blue").save(buffer, format="PNG")
    return buffer.getvalue()


def _data_argv(work, out, flag, folder, *extra):
    argv = stage1_argv(work, out, 1, *extra)
    i = argv.index("--train_data_dir")
    return argv[:i] + [flag, str(folder)] + argv[i + 2 :]


DATA_CASES = [  # (id, flag, rows, extra images, text the error names)
    ("truncated", "--dataset_name", [{"file_name": "b.png", "text": "x"}], {"b.png": _png_bytes()[:40]}, "b.png"),
    ("empty", "--dataset_name", [{"file_name": "b.png", "text": "x"}], {"b.png": b""}, "b.png"),
    ("not an image", "--dataset_name", [{"file_name": "b.png", "text": "x"}], {"b.png": b"hello"}, "b.png"),
    ("symlink out", "--dataset_name", [{"file_name": "link.png", "text": "x"}], None, "outside the dataset folder"),
    ("caption token", "--dataset_name", [{"file_name": "a.png", "text": "a <|im_end|> b"}], None, "`text`"),
    ("caption token dir", "--train_data_dir", [{"file_name": "a.png", "text": "a <|im_end|>"}], None, "`text`"),
    ("caption pad dir", "--train_data_dir", [{"file_name": "a.png", "text": "<|image_pad|>"}], None, "`text`"),
]


@pytest.mark.parametrize("label, flag, rows, images, named", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_training_data_refused_before_training(
    work, tmp_path, capsys, fresh_accelerate_state, label, flag, rows, images, named
):
    folder = _caption_folder(tmp_path / "data", [{"file_name": "a.png", "text": "fine"}, *rows], images)
    if label == "symlink out":
        outside = tmp_path / "outside"
        outside.mkdir()
        PIL.Image.new("RGB", (32, 32), "green").save(outside / "secret.png")
        (folder / "link.png").symlink_to(outside / "secret.png")
    out = tmp_path / "out"
    line = _cli_error(_data_argv(work, out, flag, folder), capsys)
    assert flag in line and named in line, line
    assert not (out / "train_log.jsonl").exists()  # nothing trained


def test_split_special_token_in_interleaved_rows_refused(tmp_path):
    from diffusers_starflow2.testing_utils import build_tiny_tokenizer
    from diffusers_starflow2.training.data import open_dataset

    folder = tmp_path / "doc"
    folder.mkdir()
    PIL.Image.new("RGB", (8, 8)).save(folder / "a.png")
    rows = [
        {"segments": [{"text": "fine"}, {"file_name": "a.png"}]},
        {"segments": [{"text": "a <|im_"}, {"file_name": "a.png"}, {"text": "end|>"}]},  # an image between: fine
        {"segments": [{"text": "a <|im_"}, {"text": "end|> b"}, {"file_name": "a.png"}]},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = parse_args(
        ["--stage", "3", "--pretrained_model_name_or_path", "-", "--output_dir", "-", "--max_train_steps", "1"]
        + ["--mixture", f"interleaved={folder}:1"]
    )
    with pytest.raises(ArgumentError) as err:
        check_texts(args, {"interleaved": open_dataset(folder, "interleaved")}, build_tiny_tokenizer())
    message = str(err.value)
    assert (
        message.startswith("--mixture: ") and f"{folder / 'metadata.jsonl'}:3:" in message and "`segments`" in message
    )


def test_validation_prompt_with_a_special_token_refused(work, tmp_path, capsys, fresh_accelerate_state):
    line = _cli_error(stage1_argv(work, tmp_path / "out", 1, "--validation_prompt", "a <|im_end|>"), capsys)
    assert "--validation_prompt" in line


def test_dataset_name_folder_trains_when_its_files_are_good(work, tmp_path, fresh_accelerate_state):
    folder = _caption_folder(tmp_path / "data", [{"file_name": "a.png", "text": "a red square"}])
    (folder / "inside.png").symlink_to(folder / "a.png")  # a link that stays inside is fine
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "inside.png", "text": "the same square"}) + "\n")
    result = train.main(parse_args(_data_argv(work, tmp_path / "out", "--dataset_name", folder)))
    assert result["global_step"] == 1


# -- resuming ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(work, tmp_path_factory):
    """A run of 2 steps with a checkpoint after each: checkpoint-1 and checkpoint-2."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("resume") / "run"
    train.main(parse_args(stage1_argv(work, out, 2, "--checkpointing_steps", "1")))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = [  # (id, what is done to checkpoint-2, the file the error names)
    ("truncated weights", lambda c: _truncate(c / "model.safetensors"), "model.safetensors"),
    ("missing weights", lambda c: (c / "model.safetensors").unlink(), "model"),
    ("broken state", lambda c: (c / "training_state.json").write_text('{"global_step": 2,'), "training_state.json"),
    ("state without step", lambda c: (c / "training_state.json").write_text("[]"), "training_state.json"),
    ("truncated optimizer", lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin"),
    ("missing optimizer", lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin"),
    ("truncated scheduler", lambda c: _truncate(c / "scheduler.bin"), "scheduler.bin"),
    ("missing rng", lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl"),
]


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("label, corrupt, named", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_resume_refuses_an_incomplete_checkpoint(work, finished_run, tmp_path, capsys, label, corrupt, named):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    corrupt(out / "checkpoint-2")
    before = _snapshot(out)
    line = _cli_error(stage1_argv(work, out, 3, "--resume_from_checkpoint", "checkpoint-2"), capsys)
    assert "--resume_from_checkpoint 'checkpoint-2'" in line and "checkpoint-2" in line and named in line, line
    assert _snapshot(out) == before  # nothing written, nothing removed


def test_resume_latest_skips_to_the_newest_complete_checkpoint(
    work, finished_run, tmp_path, caplog, fresh_accelerate_state
):
    import logging

    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    _truncate(out / "checkpoint-2" / "model.safetensors")
    kept, broken = _snapshot(out / "checkpoint-1"), _snapshot(out / "checkpoint-2")
    with caplog.at_level(logging.WARNING, logger="train_starflow2"):
        result = train.main(parse_args(stage1_argv(work, out, 2, "--resume_from_checkpoint", "latest")))
    assert "skipping" in caplog.text and "checkpoint-2" in caplog.text and "model.safetensors" in caplog.text
    assert [h["step"] for h in result["history"]] == [2]  # resumed from checkpoint-1
    assert _snapshot(out / "checkpoint-1") == kept and _snapshot(out / "checkpoint-2") == broken  # left as found


def test_resume_latest_refuses_when_no_checkpoint_is_complete(work, finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    for name in ("checkpoint-1", "checkpoint-2"):
        (out / name / "optimizer.bin").unlink()
    before = _snapshot(out)
    line = _cli_error(stage1_argv(work, out, 3, "--resume_from_checkpoint", "latest"), capsys)
    assert "checkpoint-2" in line and "optimizer.bin" in line
    assert _snapshot(out) == before


def test_checkpoints_of_a_finished_run_are_complete(finished_run):
    names = sorted(os.listdir(finished_run / "checkpoint-2"))
    assert "model.safetensors" in names and "optimizer.bin" in names, names
    assert [p.name for p in list_checkpoints(finished_run)] == ["checkpoint-1", "checkpoint-2"]

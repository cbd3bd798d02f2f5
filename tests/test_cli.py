"""The ``starflow2`` command: help, every subcommand on a tiny pipeline folder, and one-line errors."""

import io
import os
import shutil
import subprocess
import sys

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_starflow2 import StarFlow2Pipeline
from diffusers_starflow2.cli import CONVERTERS, main
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    PIL.Image.new("RGB", (32, 32), (220, 40, 40)).save(path)
    return str(path)


def test_help_lists_every_subcommand():
    exe = shutil.which("starflow2")
    cmd = [exe] if exe else [sys.executable, "-m", "diffusers_starflow2.cli"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for sub in ("generate", "edit", "describe", "chat", "convert"):
        assert sub in out.stdout


def test_generate_edit_describe_chat(model_dir, image_file, tmp_path, capsys):
    out_png = tmp_path / "out.png"
    assert main(["generate", "a red circle on the left", "-o", str(out_png), "--model", model_dir, "--seed", "1"]) == 0
    assert PIL.Image.open(out_png).size == (32, 32)
    edited = tmp_path / "edited.png"
    assert main(["edit", image_file, "make it blue", "-o", str(edited), "--model", model_dir]) == 0
    assert PIL.Image.open(edited).size == (32, 32)
    capsys.readouterr()
    assert (
        main(["describe", image_file, "what color is the shape?", "--model", model_dir, "--max-new-tokens", "2"]) == 0
    )
    assert capsys.readouterr().out.endswith("\n")
    assert (
        main(
            [
                "chat",
                "draw a red circle <image>",
                "--model",
                model_dir,
                "--output-dir",
                str(tmp_path),
                "--max-new-tokens",
                "0",
            ]
        )
        == 0
    )
    assert (tmp_path / "image_00.png").is_file()


CLI_CASES = [
    # generate: model, output, prompt, numbers, device
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{tmp}/missing"], "--model"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{tmp}/empty"], "--model"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{tmp}/broken"], "cannot load the model"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "no such model!"], "--model"),
    (["generate", "a red circle", "-o", "{tmp}/x.gif", "--model", "{model}"], "--output"),
    (["generate", "a red circle", "-o", "{tmp}/no/such/x.png", "--model", "{model}"], "--output"),
    (["generate", "a red circle", "-o", "{tmp}/folder.png", "--model", "{model}"], "--output"),
    (["generate", "a red circle", "-o", "{tmp}/folder.png", "--model", "{model}", "--num-images", "2"], "--output"),
    (["generate", "a red circle", "-o", "/proc/x.png", "--model", "{model}"], "--output"),
    (["generate", "", "-o", "{tmp}/x.png", "--model", "{model}"], "prompt"),
    (["generate", "  ", "-o", "{tmp}/x.png", "--model", "{model}"], "prompt"),
    (["generate", "a <|image_pad|>", "-o", "{tmp}/x.png", "--model", "{model}"], "prompt"),
    (["generate", "a<|im_end|>", "-o", "{tmp}/x.png", "--model", "{model}"], "prompt"),
    (
        ["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--negative-prompt", "<|im_end|>"],
        "negative_prompt",
    ),
    (
        ["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--guidance-scale", "-1"],
        "--guidance-scale",
    ),
    (
        ["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--guidance-scale", "inf"],
        "--guidance-scale",
    ),
    (
        ["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--guidance-scale", "nan"],
        "--guidance-scale",
    ),
    (
        ["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--guidance-scale", "lots"],
        "--guidance-scale",
    ),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--num-images", "0"], "--num-images"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--num-images", "65"], "--num-images"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--num-images", "1.5"], "--num-images"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--seed", "-1"], "--seed"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--seed", str(2**64)], "--seed"),
    (
        ["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--num-inference-steps", "-1"],
        "--num-inference-steps",
    ),
    (  # the option's former name reaches the same check
        ["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--denoising-steps", "-1"],
        "--num-inference-steps",
    ),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--device", "toaster"], "--device"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--device", "cuda:99"], "--device"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--device", "meta"], "--device"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--dtype", "float8"], "--dtype"),
    (["generate", "a red circle", "--model", "{model}"], "--output"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{nan_model}"], "NaN"),
    # edit: image files
    (["edit", "{tmp}/missing.png", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}"], "image"),
    (["edit", "{tmp}/bad.png", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}"], "image"),
    (["edit", "{tmp}/truncated.png", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}"], "image"),
    (["edit", "{tmp}/huge.png", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}"], "image"),
    (["edit", "{tmp}/folder.png", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}"], "image"),
    (["edit", "{image}", "", "-o", "{tmp}/x.png", "--model", "{model}"], "instruction"),
    (
        ["edit", "{image}", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}", "--image-guidance-scale", "0.5"],
        "--image-guidance-scale",
    ),
    (
        ["edit", "{image}", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}", "--guidance-scale", "-inf"],
        "--guidance-scale",
    ),
    (["edit", "{image}", "make it blue", "-o", "{tmp}/folder.png", "--model", "{model}"], "--output"),
    # describe
    (["describe", "{tmp}/missing.png", "what?", "--model", "{model}"], "image"),
    (["describe", "{image}", "", "--model", "{model}"], "question"),
    (["describe", "{image}", "what <|vision_start|>?", "--model", "{model}"], "prompt"),
    (["describe", "{image}", "what?", "--model", "{model}", "--max-new-tokens", "-1"], "--max-new-tokens"),
    # chat
    (["chat", "hi", "--model", "{model}", "--output-dir", "{image}"], "--output-dir"),
    (["chat", "hi", "--model", "{model}", "--output-dir", "{image}/sub"], "--output-dir"),
    (["chat", "hi", "--model", "{model}", "--output-dir", "{tmp}", "--max-new-tokens", "-2"], "--max-new-tokens"),
    (["chat", "hi", "--model", "{model}", "--output-dir", "{tmp}", "--temperature", "-1"], "--temperature"),
    (["chat", "hi", "--model", "{model}", "--output-dir", "{tmp}", "--temperature", "nan"], "--temperature"),
    (["chat", "", "--model", "{model}", "--output-dir", "{tmp}"], "prompt"),
    (["chat", "hi", "--model", "{model}", "--output-dir", ""], "--output-dir"),
    (["chat", "<image>", "--model", "{model}", "--output-dir", "{tmp}"], "prompt"),
    (
        ["chat", "--model", "{model}", "--output-dir", "{tmp}", "--image-guidance-scale", "0.5"],
        "--image-guidance-scale",
    ),
    (["chat", "hi <|im_end|>", "--model", "{model}", "--output-dir", "{tmp}"], "prompt"),
    # convert
    (["convert", "tiny", "--output", "{image}"], "--output"),
    (["convert", "tiny", "--output", "{tmp}/t", "--seed", "abc"], "--seed"),
    (["convert", "tiny", "--output", "/proc/new-folder"], "--output"),
    (["convert", "tiny"], "--output"),
    (["convert", "paint"], "kind"),
    (
        ["convert", "starflow", "--checkpoint", "{tmp}/missing.pth", "--config", "{tmp}/c.json", "--output", "{tmp}/o"],
        "missing.pth",
    ),
    (
        ["convert", "starflow", "--checkpoint", "{tmp}/bad.png", "--config", "{tmp}/c.json", "--output", "{tmp}/o"],
        "bad.png",
    ),
    ([], "command"),
]


@pytest.fixture(scope="module")
def nan_model(model_dir, tmp_path_factory):
    """The tiny pipeline with one NaN weight in the transformer, as a broken checkpoint would have."""
    path = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(model_dir, path)
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.startswith("deep.") and k.endswith("weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, weights)
    return str(path)


def make_bad_files(tmp):
    (tmp / "bad.png").write_text("not an image")
    (tmp / "folder.png").mkdir()
    (tmp / "folder_1.png").mkdir()  # where --num-images 2 writes its second image
    (tmp / "empty").mkdir()
    (tmp / "broken").mkdir()
    (tmp / "broken" / "model_index.json").write_text("{ not json")
    good = io.BytesIO()
    PIL.Image.new("RGB", (32, 32), (1, 2, 3)).save(good, format="PNG")
    (tmp / "truncated.png").write_bytes(good.getvalue()[:60])
    PIL.Image.new("1", (5000, 5000)).save(tmp / "huge.png")  # 25 M pixels, a few kB on disk


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own errors
        return exit.code


@pytest.mark.parametrize("argv, name", CLI_CASES)
def test_bad_input_is_one_line_and_exit_2(argv, name, model_dir, nan_model, image_file, tmp_path, capsys):
    make_bad_files(tmp_path)
    argv = [a.format(tmp=tmp_path, model=model_dir, nan_model=nan_model, image=image_file) for a in argv]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # no traceback, no progress bar, no warning
    command = argv[:2] if argv[:1] == ["convert"] and argv[1:2] and argv[1] in CONVERTERS else argv[:1]
    assert err[0].startswith(" ".join(["starflow2", *command]) + ": error:"), err[0]
    assert name in err[0], err[0]
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "o").exists()


def test_argparse_errors_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a red circle"])  # missing -o
    assert exc.value.code != 0
    with pytest.raises(SystemExit) as exc:
        main(["paint"])
    assert exc.value.code != 0


def test_convert_forwards_to_the_converters(tmp_path):
    out = tmp_path / "tiny"
    assert main(["convert", "tiny", "--output", str(out)]) == 0
    assert (out / "model_index.json").is_file()
    assert main(["convert", "tiny", "--output", str(out)]) != 0  # exists, no --overwrite


def test_num_images_writes_numbered_files_with_the_umask(model_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "generate",
                    "a red circle",
                    "-o",
                    str(tmp_path / "out.png"),
                    "--model",
                    model_dir,
                    "--num-images",
                    "2",
                    "--negative-prompt",
                    "blue",
                    "--device",
                    "cpu",
                    "--dtype",
                    "float32",
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    captured = capsys.readouterr()
    assert captured.err == ""  # quiet: no loading bars, no library warnings
    assert captured.out.split() == [str(tmp_path / "out_0.png"), str(tmp_path / "out_1.png")]
    for name in ("out_0.png", "out_1.png"):
        assert PIL.Image.open(tmp_path / name).size == (32, 32)
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_0.png", "out_1.png"]  # no temporary files left


def test_chat_creates_the_output_dir_before_loading(model_dir, tmp_path, monkeypatch, capsys):
    import diffusers_starflow2.cli as cli

    seen = []
    real_load = cli._load

    def load(cls_name, args):
        seen.append(os.path.isdir(args.output_dir))
        return real_load(cls_name, args)

    monkeypatch.setattr(cli, "_load", load)
    out = tmp_path / "new" / "images"
    assert (
        main(
            [
                "chat",
                "draw a red circle <image>",
                "--model",
                model_dir,
                "--output-dir",
                str(out),
                "--max-new-tokens",
                "0",
            ]
        )
        == 0
    )
    assert seen == [True] and (out / "image_00.png").is_file()


def test_model_accepts_a_hub_repo_id(monkeypatch, capsys):
    import diffusers_starflow2.cli as cli

    asked = []

    def from_pretrained(source, **kwargs):
        asked.append((source, kwargs))
        raise OSError("offline")

    monkeypatch.setattr(StarFlow2Pipeline, "from_pretrained", staticmethod(from_pretrained))
    assert (
        main(["generate", "a red circle", "-o", "x.png", "--model", "someone/starflow2-world", "--dtype", "bfloat16"])
        == 2
    )
    assert asked == [("someone/starflow2-world", {"dtype": torch.bfloat16})]
    assert capsys.readouterr().err.strip() == (
        "starflow2 generate: error: cannot load the model someone/starflow2-world: offline"
    )
    assert cli._model_source(None) == str(cli.DEFAULT_MODEL)


def test_help_shows_defaults_without_markup():
    import diffusers_starflow2.cli as cli

    text = cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "(default: 2.0)" in text and "(default: float32)" in text
    assert "``" not in text and "%(default)" not in text and "default: None" not in text
    assert "``" not in cli.build_parser().format_help()


@pytest.mark.parametrize("verbose", [False, True])
def test_progress_bar_only_in_verbose_or_terminal_runs(model_dir, verbose):
    import argparse

    import diffusers_starflow2.cli as cli

    args = argparse.Namespace(model=model_dir, device=None, dtype="float32", verbose=verbose)
    with cli._quiet(verbose):
        pipe = cli._load("StarFlow2Pipeline", args)
    assert pipe._progress_bar_config["disable"] is (not verbose)  # pytest's stderr is not a terminal


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tmp_path, capsys):
    import diffusers_starflow2.cli as cli

    def interrupted(cls_name, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.png")]) == 130
    assert capsys.readouterr().err == "starflow2 generate: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_chat_session_reads_turns_from_stdin_and_keeps_the_conversation(model_dir, tmp_path, monkeypatch, capsys):
    from diffusers_starflow2 import StarFlow2InterleavedPipeline

    states = []
    call = StarFlow2InterleavedPipeline.__call__

    def recording_call(self, prompt, **kwargs):
        states.append(kwargs.get("state"))
        return call(self, prompt, **kwargs)

    monkeypatch.setattr(StarFlow2InterleavedPipeline, "__call__", recording_call)
    turns = [
        "draw a red circle <image>",
        "/image make it blue",
        "",
        "hi <|im_end|>",
        "/bogus",
        "/reset",
        "what now?",
        "/quit",
        "never read",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    assert main(["chat", "--model", model_dir, "--output-dir", str(tmp_path), "--max-new-tokens", "1"]) == 0
    captured = capsys.readouterr()
    # images saved as they come, numbered across turns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_00.png", "image_01.png"]
    assert f"[image: {tmp_path / 'image_01.png'}]" in captured.out
    # the bad turn and the unknown command are reported, and the session went on
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and "bad turn: `prompt`" in err[0] and "'/bogus'" in err[1], err
    # turn 2 continued turn 1's state; the refused turn ran nothing; /reset started over; /quit ended the session
    assert len(states) == 4 and states[0] is None and states[1] is not None and states[3] is None
    assert states[2] is not states[1]  # the refused turn was given the state of turn 2

"""The ``starflow2`` command: help, every subcommand on a tiny pipeline folder, and one-line errors."""

import shutil
import subprocess
import sys

import PIL.Image
import pytest

from diffusers_starflow2 import StarFlow2Pipeline
from diffusers_starflow2.cli import main
from diffusers_starflow2.utils.tiny_pipeline import build_tiny_starflow2_components


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
    assert main(["generate", "a red circle on the left", "-o", str(out_png), "--model", model_dir,
                 "--seed", "1"]) == 0
    assert PIL.Image.open(out_png).size == (32, 32)
    edited = tmp_path / "edited.png"
    assert main(["edit", image_file, "make it blue", "-o", str(edited), "--model", model_dir]) == 0
    assert PIL.Image.open(edited).size == (32, 32)
    capsys.readouterr()
    assert main(["describe", image_file, "what color is the shape?", "--model", model_dir,
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["chat", "draw a red circle <image>", "--model", model_dir, "--output-dir", str(tmp_path),
                 "--max-new-tokens", "0"]) == 0
    assert (tmp_path / "image_00.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{tmp}/missing"], "not a STARFlow2 pipeline"),
    (["generate", "a red circle", "-o", "{tmp}/x.gif", "--model", "{model}"], "--output"),
    (["generate", "a red circle", "-o", "{tmp}/no/such/x.png", "--model", "{model}"], "--output folder"),
    (["generate", "", "-o", "{tmp}/x.png", "--model", "{model}"], "prompt"),
    (["generate", "a red circle", "-o", "{tmp}/x.png", "--model", "{model}", "--guidance-scale", "-1"],
     "guidance_scale"),
    (["edit", "{tmp}/missing.png", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}"], "does not exist"),
    (["edit", "{tmp}/bad.png", "make it blue", "-o", "{tmp}/x.png", "--model", "{model}"], "cannot read image"),
    (["describe", "{tmp}/missing.png", "what?", "--model", "{model}"], "does not exist"),
    (["describe", "{tmp}/bad.png", "what?", "--model", "{model}", "--max-new-tokens", "-1"], "cannot read image"),
    (["chat", "hi", "--model", "{model}", "--output-dir", "{tmp}/nowhere"], "--output-dir"),
    (["chat", "hi", "--model", "{model}", "--output-dir", "{tmp}", "--max-new-tokens", "-2"], "max_new_tokens"),
])
def test_bad_input_is_one_line_and_nonzero(argv, message, model_dir, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not an image")
    argv = [a.format(tmp=tmp_path, model=model_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars may come first
    assert err.startswith(f"starflow2 {argv[0]}: error:") and message in err


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

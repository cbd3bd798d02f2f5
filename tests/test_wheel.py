"""The built wheel is complete: installed on its own (no source checkout on the path, run from another folder) it
converts, generates and chats with the embedded model it ships."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next((root / "dist").glob("diffusers_starflow2-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return wheel, root


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    # the wheel's copy first on the path; the dependencies come from this environment
    env = {**os.environ, "PYTHONPATH": str(root / "site")}
    work = root / "elsewhere"
    work.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_ships_the_package_tools_and_the_embedded_model(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "conversion/convert_starflow_to_diffusers.py",
        "conversion/make_tiny_starflow2.py",
        "conversion/assemble_starflow2.py",
        "training/train_starflow2.py",
        "training/data.py",
        "default_model/model_index.json",
        "default_model/transformer/diffusion_pytorch_model.safetensors",
        "default_model/vlm/model.safetensors",
        "default_model/tokenizer/tokenizer.json",
        "configs/qwen2_5_vl_7b_instruct/config.json",
        "models/cached_attention_cpu.cpp",  # built on the user's machine by utils/cpu_kernels.py
        "models/few_row_linear_cpu.cpp",
    ):
        assert f"diffusers_starflow2/{module}" in names, module
    # the shapes world that made the embedded model is an example, not part of the product
    assert not any("shapes_world" in n or "/world/" in n for n in names)


def test_installed_wheel_converts_generates_and_chats(installed):
    _, root = installed
    where = run(root, "-c", "import diffusers_starflow2; print(diffusers_starflow2.__file__)")
    assert where.stdout.strip().startswith(str(root / "site")), where.stdout + where.stderr

    convert = run(root, "-m", "diffusers_starflow2.cli", "convert", "tiny", "--output", "tiny")
    assert convert.returncode == 0, convert.stderr[-2000:]
    assert (root / "elsewhere" / "tiny" / "model_index.json").is_file()

    generate = run(root, "-m", "diffusers_starflow2.cli", "generate", "a red circle on the left", "-o", "red.png")
    assert generate.returncode == 0, generate.stderr[-2000:]
    assert (root / "elsewhere" / "red.png").stat().st_size > 0

    (root / "elsewhere" / "imgs").mkdir()
    chat = run(
        root,
        "-m",
        "diffusers_starflow2.cli",
        "chat",
        "draw a blue square at the top <image>",
        "--output-dir",
        "imgs",
        "--max-new-tokens",
        "4",
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert list((root / "elsewhere" / "imgs").glob("*.png"))

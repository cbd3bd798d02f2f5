"""save_pretrained of our pipelines is atomic: a failed or killed save leaves no partial folder at its path."""

import subprocess
import sys
import textwrap

import pytest
import torch

from diffusers_starflow2 import StarFlow2Pipeline
from diffusers_starflow2.models.autoencoder_fae import AutoencoderFAE
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components


@pytest.fixture(scope="module")
def pipe():
    return StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0))


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_save_writes_a_loadable_folder_and_leaves_nothing_else(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    assert entries(tmp_path) == ["pipe"]
    loaded = StarFlow2Pipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(loaded.transformer.deep.proj_in.weight, pipe.transformer.deep.proj_in.weight)


def test_failed_save_leaves_the_old_folder_untouched(pipe, tmp_path, monkeypatch):
    target = tmp_path / "pipe"
    pipe.save_pretrained(target)
    (target / "README.md").write_text("mine")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def disk_full(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(AutoencoderFAE, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(target)
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert entries(tmp_path) == ["pipe"]  # no staging folder left behind
    with pytest.raises(OSError):
        pipe.save_pretrained(tmp_path / "new")
    assert entries(tmp_path) == ["pipe"]  # a failed first save publishes nothing

    monkeypatch.undo()
    pipe.save_pretrained(target)  # a successful save keeps the files it does not write
    assert (target / "README.md").read_text() == "mine"


def test_killed_save_publishes_nothing(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from diffusers_starflow2 import StarFlow2Pipeline
        from diffusers_starflow2.models.autoencoder_fae import AutoencoderFAE
        from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

        def killed(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        AutoencoderFAE.save_pretrained = killed
        StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0)).save_pretrained({str(tmp_path / "pipe")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert not (tmp_path / "pipe").exists()
    assert all(name.startswith(".pipe.tmp-") for name in entries(tmp_path))  # only the hidden staging folder

"""The Hub round trip: what ``save_pretrained`` writes (and ``push_to_hub`` uploads) loads back from a repository id
through the Hugging Face cache, with our pipeline class and with ``DiffusionPipeline``, and draws the same images as
the local folder. Offline: the uploaded folder is laid out as the hub cache would hold it, under ``HF_HOME``."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

from diffusers_starflow2 import StarFlow2Pipeline
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

REPO_ID = "someone/tiny-starflow2"


def cache_layout(folder: Path, hf_home: Path, repo_id: str) -> None:
    """Place ``folder`` where huggingface_hub keeps a downloaded snapshot of ``repo_id`` (revision main)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """``push_to_hub`` with the network calls replaced: returns the folder it would have uploaded."""
    root = tmp_path_factory.mktemp("hub")
    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0, perturb=0.05))
    pipe.save_pretrained(root / "local")
    uploaded = root / "uploaded"

    import huggingface_hub

    class Repo:
        repo_id = REPO_ID

    def upload(self, folder, repo_id, **kwargs):
        assert repo_id == REPO_ID
        shutil.copytree(folder, uploaded)
        return f"https://huggingface.co/{repo_id}"

    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: Repo())
    mp.setattr(StarFlow2Pipeline, "_upload_folder", upload)
    try:
        pipe.push_to_hub(REPO_ID, trained_on="the synthetic shapes world")
    finally:
        mp.undo()
    return root


def test_model_index_names_the_installed_package(pushed):
    index = json.loads((pushed / "uploaded" / "model_index.json").read_text())
    assert index["_class_name"] == "StarFlow2Pipeline"
    for name in ("transformer", "vae", "scheduler"):
        assert index[name][0] == "diffusers_starflow2", index[name]
    # the check diffusers runs on a repository's file list before downloading it (it refused our components before)
    files = [str(p.relative_to(pushed / "uploaded")) for p in (pushed / "uploaded").rglob("*") if p.is_file()]
    custom, folders = _get_custom_components_and_folders(REPO_ID, index, files)
    assert custom == {} and set(folders) == {"vlm", "tokenizer", "transformer", "vae", "scheduler"}


def test_model_card(pushed):
    card = (pushed / "uploaded" / "README.md").read_text()
    assert "library_name: diffusers" in card and "- diffusers_starflow2" in card
    assert "pip install diffusers-starflow2" in card
    assert f'StarFlow2Pipeline.from_pretrained("{REPO_ID}")' in card
    assert "**Trained on:** the synthetic shapes world." in card


def test_repo_id_round_trip_through_the_hub_cache(pushed, tmp_path):
    hf_home = tmp_path / "hf_home"
    cache_layout(pushed / "uploaded", hf_home, REPO_ID)
    script = textwrap.dedent(f"""
        import json, torch
        import diffusers_starflow2
        from diffusers import DiffusionPipeline
        from diffusers_starflow2 import StarFlow2Pipeline

        def draw(pipe):
            return pipe("a red circle", guidance_scale=1.5, output_type="latent",
                        generator=torch.Generator().manual_seed(3)).images

        local = draw(StarFlow2Pipeline.from_pretrained({str(pushed / "local")!r}))
        ours = StarFlow2Pipeline.from_pretrained({REPO_ID!r})
        generic = DiffusionPipeline.from_pretrained({REPO_ID!r}, trust_remote_code=True)
        print(json.dumps({{"generic_class": type(generic).__name__,
                           "ours": (draw(ours) - local).abs().max().item(),
                           "generic": (draw(generic) - local).abs().max().item()}}))
    """)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"generic_class": "StarFlow2Pipeline", "ours": 0.0, "generic": 0.0}


def test_training_starts_from_a_repo_id(pushed, tmp_path):
    from shapes_world.synthetic_world import write_world

    hf_home = tmp_path / "hf_home"
    cache_layout(pushed / "uploaded", hf_home, REPO_ID)
    write_world(tmp_path / "world", num_images=2, seed=0, image_size=32, kinds=["caption"], progress=False)
    cmd = [
        sys.executable,
        "-m",
        "diffusers_starflow2.training.train_starflow2",
        "--stage",
        "1",
        "--pretrained_model_name_or_path",
        REPO_ID,
        "--train_data_dir",
        str(tmp_path / "world" / "caption"),
        "--output_dir",
        str(tmp_path / "run"),
        "--max_train_steps",
        "1",
        "--train_batch_size",
        "2",
    ]
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = StarFlow2Pipeline.from_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "model_index.json").read_text())["transformer"][0] == "diffusers_starflow2"
    base = StarFlow2Pipeline.from_pretrained(pushed / "local")
    config = {k: v for k, v in trained.transformer.config.items() if k != "_name_or_path"}
    assert config == {k: v for k, v in base.transformer.config.items() if k != "_name_or_path"}

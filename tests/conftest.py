"""Shared test helpers: reference fixtures, the converter CLI module, deterministic seeds."""

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# the shapes world example (examples/shapes_world) makes the training tests' data
sys.path.insert(0, str(REPO_ROOT / "examples"))
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "reference-tarflow"
REFERENCE_FILES = ("config.json", "reference_model.pth", "io.safetensors")
# One folder per reference case holding all of REFERENCE_FILES (empty when the fixtures are absent).
reference_cases = sorted(
    p.name
    for p in (REFERENCE_DIR.iterdir() if REFERENCE_DIR.is_dir() else ())
    if p.is_dir() and all((p / f).is_file() for f in REFERENCE_FILES)
)

# The test models are tiny: one thread per process is faster than two and never oversubscribes a shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def converter():
    from diffusers_starflow2.conversion import convert_starflow_to_diffusers

    return convert_starflow_to_diffusers


@pytest.fixture(scope="session")
def reference_dir():
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate_state():
    """For tests that build an ``Accelerator`` in-process: accelerate keeps its state in process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def write_training_workdir(root: Path, perturb: float = 0.0, num_images: int = 4, kinds=None) -> Path:
    """A tiny pipeline folder ``root/pipe`` and a shapes world ``root/world`` for the training tests."""
    from shapes_world.synthetic_world import write_world

    from diffusers_starflow2 import StarFlow2Pipeline
    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

    StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0, perturb=perturb)).save_pretrained(root / "pipe")
    world_kinds = {} if kinds is None else {"kinds": kinds}  # default: every kind
    write_world(root / "world", num_images=num_images, seed=0, image_size=32, progress=False, **world_kinds)
    return root


def stage1_argv(work: Path, out, steps: int, *extra: str) -> list:
    """Arguments of a stage-1 run of the training script on ``write_training_workdir``'s pipeline and caption
    folder; ``extra`` options come last (a later value of an option wins)."""
    return [
        "--stage", "1",
        "--pretrained_model_name_or_path", str(work / "pipe"),
        "--output_dir", str(out),
        "--train_data_dir", str(work / "world" / "caption"),
        "--max_train_steps", str(steps),
        *extra,
    ]  # fmt: skip


def sample_latents(pipe):
    """One seeded text-to-image sample as latents (guidance 1, no denoising): a cheap fingerprint of the weights."""
    return pipe(
        "a red circle",
        guidance_scale=1.0,
        num_inference_steps=0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images

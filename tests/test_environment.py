"""The installed packages are the tested set of constraints.txt: a run on other versions fails here, loudly, instead
of passing or failing elsewhere for reasons nobody can trace."""

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
# The packages whose versions change what the suite computes or which APIs it reaches.
CORE = [
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "safetensors",
    "tokenizers",
    "huggingface_hub",
    "datasets",
    "numpy",
    "pillow",
]


def pinned() -> dict:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = req.specifier
    return pins


def test_constraints_pin_every_core_package():
    pins = pinned()
    for name in CORE:
        spec = pins.get(name.lower().replace("_", "-"))
        assert spec is not None and str(spec).startswith("=="), f"constraints.txt must pin {name} exactly"


@pytest.mark.parametrize("name", CORE)
def test_installed_version_is_the_tested_one(name):
    spec = pinned()[name.lower().replace("_", "-")]
    installed = importlib.metadata.version(name).split("+")[0]  # torch's local tag (+cpu / +cu128)
    assert spec.contains(installed, prereleases=True), (
        f"{name} {installed} is installed but the tested set is {name}{spec}: install with "
        f'`pip install -e ".[test]" -c constraints.txt`, or retest and update constraints.txt'
    )

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


def _closure_problems(root: str = "diffusers-starflow2", extras=("test",)) -> list:
    """What `pip check` reports, restricted to this package's own dependency tree: on a shared interpreter other
    distributions may conflict among themselves without touching anything the project imports."""
    problems, seen = [], set()
    queue = [(root, set(extras))]
    while queue:
        name, wanted = queue.pop()
        key = (name.lower().replace("_", "-"), frozenset(wanted))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} is required but not installed")
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in environments):
                continue
            try:
                version = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} requires {req}, which is not installed")
                continue
            if not req.specifier.contains(version.split("+")[0], prereleases=True):
                problems.append(f"{dist.metadata['Name']} requires {req}, but {req.name} {version} is installed")
            queue.append((req.name, set(req.extras)))
    return problems


def test_the_dependency_tree_is_consistent():
    problems = _closure_problems()
    assert not problems, "\n".join(problems)

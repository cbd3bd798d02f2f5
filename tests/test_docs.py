"""The documentation builds and its links resolve (its Python snippets run as tests through pytest-markdown-docs)."""

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_mkdocs_build_strict(tmp_path):
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.fail("mkdocs is not installed: it is part of the test extra")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "pipelines" / "starflow2" / "index.html").is_file()


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
)
def test_relative_links_resolve(page):
    text = (ROOT / page).read_text()
    for target, _ in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (ROOT / page).parent.joinpath(target).exists(), f"{page} links to {target}, which does not exist"


def test_module_map_names_live_where_it_says():
    # docs/models.md, "Where each concept lives": each `name` of a row is defined in (not imported into) its module
    text = (ROOT / "docs" / "models.md").read_text().split("## Where each concept lives", 1)[1]
    rows = re.findall(r"^\| `((?:models|utils)/\w+)\.py` \| (.*) \|$", text, flags=re.M)
    assert len(rows) >= 20, rows
    for path, holds in rows:
        module = importlib.import_module("diffusers_starflow2." + path.replace("/", "."))
        names = re.findall(r"`(\w+)`", holds)
        assert names, path
        for name in names:
            assert getattr(getattr(module, name, None), "__module__", None) == module.__name__, (path, name)


def test_readme_is_short():
    # the README is what a newcomer reads first; everything else lives in docs/
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200

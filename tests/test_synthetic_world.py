"""The synthetic shapes world: determinism, rendering + analyser agreement, phrasing, edits, CLI."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFilter

REPO = Path(__file__).resolve().parents[1]

from shapes_world.synthetic_world import (  # noqa: E402
    CAPTION_TEMPLATES,
    COLORS,
    KINDS,
    POSITIONS,
    SHAPES,
    Scene,
    all_combinations,
    canonical_caption,
    caption,
    main,
    make_chat_edit,
    make_document,
    make_edit,
    questions,
    random_scene,
    render,
    write_world,
)


def load_analyser():
    """``shapes_world.shape_analysis`` loaded from its file: it is self-contained, and this
    keeps these tests from paying for the package's (diffusers / transformers) import time."""
    spec = importlib.util.spec_from_file_location("_shape_analysis", REPO / "examples/shapes_world/shape_analysis.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shape_analysis = load_analyser()
ShapeReport, analyze_shape = shape_analysis.ShapeReport, shape_analysis.analyze_shape

# words a caption may use for each attribute value
WORDS = {
    "circle": ("circle", "round"),
    "square": ("square",),
    "triangle": ("triangle",),
    "left": ("left",),
    "right": ("right",),
    "top": ("top",),
    "bottom": ("bottom",),
    "center": ("center", "middle"),
    **{c: (c,) for c in COLORS},
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _degrade(image, rng, sigma=10.0, blur=1.0):
    """Small Gaussian blur, then additive Gaussian noise (uint8)."""
    a = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    return np.clip(np.round(a + rng.normal(0.0, sigma, a.shape)), 0, 255).astype(np.uint8)


def test_write_world_is_deterministic_and_seed_dependent(tmp_path):
    a = write_world(tmp_path / "a", 12, seed=3, image_size=32, progress=False)
    write_world(tmp_path / "b", 12, seed=3, image_size=32, progress=False)
    write_world(tmp_path / "c", 12, seed=4, image_size=32, progress=False)
    fa, fb, fc = (_files(tmp_path / d) for d in "abc")
    assert fa == fb  # same bytes, file for file
    assert any(fa[k] != fc.get(k) for k in fa if k.endswith(".png"))
    assert fa["caption/metadata.jsonl"] != fc["caption/metadata.jsonl"]
    assert not [k for k in fa if ".tmp" in k]  # atomic writes leave no temp files
    assert a["kinds"]["chat_edit"] == a["kinds"]["edit"] == {"rows": 12, "images": 24}
    assert a["kinds"]["understanding"] == {"rows": 36, "images": 12} and a["kinds"]["edit"] == {
        "rows": 12,
        "images": 24,
    }
    assert json.loads(fa["world.json"]) == a
    # items do not depend on how many were asked for: a smaller world is a prefix
    write_world(tmp_path / "d", 5, seed=3, image_size=32, kinds=("caption",), progress=False)
    fd = _files(tmp_path / "d")
    assert all(fd[k] == fa[k] for k in fd if k.endswith(".png"))
    assert fa["caption/metadata.jsonl"].startswith(fd["caption/metadata.jsonl"])


def test_splits_differ_in_jitter_and_phrasing(tmp_path):
    write_world(tmp_path / "tr", 60, seed=0, image_size=32, kinds=("caption",), progress=False)
    write_world(tmp_path / "ho", 60, seed=0, image_size=32, kinds=("caption",), split="heldout", progress=False)
    rows = {
        s: [json.loads(line) for line in (tmp_path / s / "caption/metadata.jsonl").read_text().splitlines()]
        for s in ("tr", "ho")
    }
    for split_rows in rows.values():  # every combination appears once per 60 items, in both splits
        assert {tuple(r["attributes"][k] for k in ("color", "shape", "position")) for r in split_rows} == set(
            all_combinations()
        )
    assert not {r["text"] for r in rows["tr"]} & {r["text"] for r in rows["ho"]}
    assert _files(tmp_path / "tr" / "caption" / "images") != _files(tmp_path / "ho" / "caption" / "images")


def test_scene_enumeration_and_validation():
    combos = all_combinations()
    assert len(combos) == len(set(combos)) == 60 == len(COLORS) * len(SHAPES) * len(POSITIONS)
    with pytest.raises(ValueError, match="color"):
        Scene("purple", "circle", "left")
    with pytest.raises(ValueError, match="kinds"):
        write_world("/nonexistent", 1, 0, kinds=("pictures",), progress=False)
    img = render(Scene("red", "circle", "left"), 48)
    assert img.size == (48, 48) and img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("size", [32, 64])
def test_analyser_reads_every_rendered_combination(size):
    rng = np.random.default_rng(size)
    clean_ok = noisy_ok = total = 0
    for color, shape, position in all_combinations():
        for _ in range(3):
            scene = random_scene(rng, color, shape, position)
            image = render(scene, size)
            report = analyze_shape(image)
            assert isinstance(report, ShapeReport) and 0.03 < report.foreground_fraction < 0.2
            clean_ok += report.attributes == scene.attributes
            noisy_ok += analyze_shape(_degrade(image, rng)).attributes == scene.attributes
            total += 1
    assert clean_ok == total  # 100% on clean renders
    assert noisy_ok >= 0.95 * total  # sigma=10 noise + blur


def test_analyser_handles_blank_images_and_arrays():
    blank = analyze_shape(np.full((40, 40, 3), 255, np.uint8))
    assert (blank.color, blank.shape, blank.position) == ("none", "none", "none") and blank.foreground_fraction < 1e-3
    rgba = np.asarray(render(Scene("blue", "triangle", "bottom"), 32).convert("RGBA"))
    assert analyze_shape(rgba).attributes == {"color": "blue", "shape": "triangle", "position": "bottom"}
    with pytest.raises(ValueError):
        analyze_shape(np.zeros((32, 32, 3), np.float32))


def _mentions(text: str, value: str) -> bool:
    return any(w in text for w in WORDS[value])


def test_captions_and_questions_mention_the_right_attributes():
    rng = np.random.default_rng(0)
    for split in ("train", "heldout"):
        seen = set()
        for color, shape, position in all_combinations():
            scene = random_scene(rng, color, shape, position)
            for _ in range(4):
                text = caption(scene, rng, split)
                seen.add(text)
                for attr, values in (("color", COLORS), ("shape", SHAPES), ("position", POSITIONS)):
                    right = scene.attributes[attr]
                    assert _mentions(text, right), (text, right)
                    assert not any(_mentions(text, v) for v in values if v != right), text
            for attr, question, answer in questions(scene, rng, split):
                assert answer == scene.attributes[attr] and " " not in answer and question.endswith(("?", "."))
        assert len(seen) > 100  # paraphrases are actually used (held-out: 2 templates x 60)
    assert canonical_caption(Scene("red", "circle", "left")) == "a red circle on the left"
    assert canonical_caption(Scene("blue", "square", "top")) == "a blue square at the top"
    assert canonical_caption(Scene("green", "triangle", "center")) == "a green triangle in the center"
    assert caption(Scene("yellow", "square", "bottom")) == "a yellow square at the bottom"
    assert len(CAPTION_TEMPLATES["heldout"]) >= 2


def test_edit_targets_differ_exactly_in_the_edited_attribute():
    rng = np.random.default_rng(1)
    seen = set()
    for i in range(90):
        scene = random_scene(rng)
        target, instruction, info = make_edit(scene, rng, "train" if i % 3 else "heldout")
        seen.add(info["attribute"])
        assert info["from"] == scene.attributes[info["attribute"]] != info["to"] == target.attributes[info["attribute"]]
        assert (target.dx, target.dy, target.scale, target.tint) == (scene.dx, scene.dy, scene.scale, scene.tint)
        assert _mentions(instruction, info["to"]), instruction
        src, tgt = analyze_shape(render(scene, 32)).attributes, analyze_shape(render(target, 32)).attributes
        assert src == scene.attributes and tgt == target.attributes
        assert {k for k in src if src[k] != tgt[k]} == {info["attribute"]}
    assert seen == {"color", "shape", "position"}


def test_chat_edits_ask_for_the_source_then_edit_it():
    rng = np.random.default_rng(3)
    for i in range(60):
        scene = random_scene(rng)
        request, target, instruction, info = make_chat_edit(scene, rng, "train" if i % 3 else "heldout")
        assert all(_mentions(request, v) for v in scene.attributes.values()), request
        assert info["from"] == scene.attributes[info["attribute"]] != info["to"] == target.attributes[info["attribute"]]
        assert _mentions(instruction, info["to"]), instruction


def test_documents_describe_their_images():
    rng = np.random.default_rng(2)
    forms = set()
    for _ in range(40):
        doc = make_document(rng)
        scenes = [s for s in doc if isinstance(s, Scene)]
        texts = [s for s in doc if isinstance(s, str)]
        assert len(scenes) in (1, 2) and texts and all(t.strip() for t in texts)
        first = scenes[0]
        assert all(_mentions(texts[0], v) for v in first.attributes.values())
        forms.add((len(scenes), isinstance(doc[0], str)))
        if len(scenes) == 2:
            changed = [k for k in first.attributes if first.attributes[k] != scenes[1].attributes[k]]
            assert len(changed) == 1 and _mentions(texts[1], scenes[1].attributes[changed[0]])
    assert forms == {(1, False), (2, True)}


def test_cli_writes_a_world(tmp_path, capsys):
    assert (
        main(
            [
                "--output",
                str(tmp_path / "w"),
                "--num_images",
                "3",
                "--seed",
                "5",
                "--image_size",
                "32",
                "--kinds",
                "caption,edit",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == {
        "caption": {"images": 3, "rows": 3},
        "edit": {"images": 6, "rows": 3},
    }
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["caption", "edit", "world.json"]
    # as a module from examples/, held-out split
    out = tmp_path / "s"
    cmd = [
        sys.executable,
        "-m",
        "shapes_world.synthetic_world",
        "--output",
        str(out),
        "--num_images",
        "2",
        "--seed",
        "5",
        "--split",
        "heldout",
    ]
    subprocess.run(cmd, cwd=REPO / "examples", check=True, capture_output=True)
    info = json.loads((out / "world.json").read_text())
    assert info["split"] == "heldout" and info["image_size"] == 64 and sorted(info["kinds"]) == sorted(KINDS)

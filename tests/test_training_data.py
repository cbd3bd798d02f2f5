"""Dataset formats and readers (training/data.py) over a small written shapes world."""

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from shapes_world.synthetic_world import write_world  # noqa: E402

from diffusers_starflow2.training.data import (  # noqa: E402
    CaptionDataset,
    ChatEditDataset,
    EditDataset,
    InterleavedDataset,
    MixtureSampler,
    UnderstandingDataset,
    load_metadata,
    mixture,
    open_dataset,
    parse_mixture,
)

N = 10


def _analyser():
    """The shape analyser loaded from its (self-contained) file, skipping the heavy package import."""
    spec = importlib.util.spec_from_file_location(
        "_shape_analysis_data", REPO / "examples/shapes_world/shape_analysis.py"
    )
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.analyze_shape


analyze_shape = _analyser()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, N, seed=7, image_size=32, progress=False)
    return root


def test_all_formats_round_trip(world):
    cap = CaptionDataset(world / "caption")
    assert len(cap) == N
    for i, row in enumerate(cap.rows):
        item = cap[i]
        assert item["kind"] == "caption" and isinstance(item["image"], Image.Image) and item["image"].size == (32, 32)
        assert item["text"] == row["text"] and analyze_shape(item["image"]).attributes == row["attributes"]

    und = UnderstandingDataset(world / "understanding")
    assert len(und) == 3 * N
    for i, row in enumerate(und.rows):
        item = und[i]
        assert item["prompt"].strip() and item["response"] == analyze_shape(item["image"]).attributes[row["attribute"]]

    edit = EditDataset(world / "edit")
    assert len(edit) == N
    for i, row in enumerate(edit.rows):
        item = edit[i]
        src, tgt = analyze_shape(item["source_image"]).attributes, analyze_shape(item["target_image"]).attributes
        info = row["edit"]
        assert {k for k in src if src[k] != tgt[k]} == {info["attribute"]}  # exactly the edited attribute
        assert (src[info["attribute"]], tgt[info["attribute"]]) == (info["from"], info["to"])
        assert item["instruction"].strip()

    docs = InterleavedDataset(world / "interleaved")
    assert len(docs) == N
    for i in range(N):
        segments = docs[i]["segments"]
        assert any(isinstance(s, str) for s in segments) and any(isinstance(s, Image.Image) for s in segments)
        assert all(isinstance(s, (str, Image.Image)) for s in segments)

    chats = ChatEditDataset(world / "chat_edit")
    assert len(chats) == N
    for i, row in enumerate(chats.rows):
        item = chats[i]
        src, tgt = analyze_shape(item["source_image"]).attributes, analyze_shape(item["target_image"]).attributes
        assert {k for k in src if src[k] != tgt[k]} == {row["edit"]["attribute"]}
        assert src[row["edit"]["attribute"]] == row["edit"]["from"] and item["prompt"].strip()
        assert item["kind"] == "chat_edit" and item["instruction"] == row["instruction"]

    assert isinstance(open_dataset(world / "caption", "generation"), CaptionDataset)
    assert isinstance(open_dataset(world / "edit", "editing"), EditDataset)


GOOD = {
    "caption": {"file_name": "a.png", "text": "a red circle on the left"},
    "understanding": {"file_name": "a.png", "prompt": "what color is the shape?", "response": "red"},
    "edit": {"source_file_name": "a.png", "instruction": "turn it blue", "target_file_name": "a.png"},
    "interleaved": {"segments": [{"text": "here is a red circle:"}, {"file_name": "a.png"}]},
    "chat_edit": {
        "prompt": "a red circle",
        "source_file_name": "a.png",
        "instruction": "turn it blue",
        "target_file_name": "a.png",
    },
}
BAD = [
    ("caption", '{"file_name": "a.png", "text": "x"'),  # bad JSON
    ("caption", '["a.png", "x"]'),  # not an object
    ("caption", '{"file_name": "a.png"}'),  # missing key
    ("caption", '{"file_name": "a.png", "text": 3}'),  # wrong type
    ("caption", '{"file_name": "a.png", "text": "  "}'),  # empty text
    ("caption", '{"file_name": "missing.png", "text": "x"}'),  # missing image
    ("caption", '{"file_name": "../a.png", "text": "x"}'),  # escapes the folder
    ("understanding", '{"file_name": "a.png", "prompt": "q?", "response": ""}'),
    ("edit", '{"source_file_name": "a.png", "instruction": "x", "target_file_name": "b.png"}'),
    ("edit", '{"source_file_name": "a.png", "target_file_name": "a.png"}'),
    ("interleaved", '{"segments": []}'),
    ("interleaved", '{"segments": [{"text": "a", "file_name": "a.png"}]}'),
    ("interleaved", '{"segments": [{"image": "a.png"}]}'),
    ("interleaved", '{"segments": [{"text": "ok"}, {"file_name": "nope.png"}]}'),
    ("chat_edit", '{"source_file_name": "a.png", "instruction": "x", "target_file_name": "a.png"}'),
    ("chat_edit", '{"prompt": "", "source_file_name": "a.png", "instruction": "x", "target_file_name": "a.png"}'),
]


def _folder(tmp_path: Path, kind: str, lines: list[str]) -> Path:
    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return tmp_path


@pytest.mark.parametrize("kind,line", BAD)
def test_malformed_rows_raise_with_file_and_line(tmp_path, kind, line):
    folder = _folder(tmp_path, kind, [json.dumps(GOOD[kind]), "", line, json.dumps(GOOD[kind])])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:3: ") as err:
        load_metadata(folder, kind)
    assert str(folder / "metadata.jsonl") in str(err.value)


def test_valid_rows_blank_lines_and_extra_keys(tmp_path):
    for kind, row in GOOD.items():
        (tmp_path / kind).mkdir()
        folder = _folder(tmp_path / kind, kind, ["", json.dumps({**row, "note": 1}), "  "])
        assert load_metadata(folder, kind) == [{**row, "note": 1}]
    empty = _folder(tmp_path / "caption", "caption", [""])
    with pytest.raises(ValueError, match="no rows"):
        load_metadata(empty, "caption")
    with pytest.raises(ValueError, match="not found"):
        load_metadata(tmp_path / "nowhere", "caption")
    with pytest.raises(ValueError, match="kind"):
        load_metadata(empty, "pictures")


def test_parse_mixture():
    spec = "understanding=data/u:0.3,generation=data/c:0.4,editing=C:/data/e:0.2, interleaved=data/i:0.1"
    entries = parse_mixture(spec)
    assert [(e.name, e.kind, e.path, e.weight) for e in entries] == [
        ("understanding", "understanding", "data/u", 0.3),
        ("generation", "caption", "data/c", 0.4),
        ("editing", "edit", "C:/data/e", 0.2),
        ("interleaved", "interleaved", "data/i", 0.1),
    ]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "generation",
        "generation=data/c",
        "generation=:0.4",
        "=data/c:0.4",
        "generation=data/c:abc",
        "generation=data/c:0",
        "generation=data/c:-1",
        "generation=data/c:nan",
        "pictures=data/c:1",
        "generation=a:1,generation=b:1",
        "generation=data/c:1,",
    ],
)
def test_parse_mixture_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="--mixture"):
        parse_mixture(spec)


def test_mixture_is_reproducible_and_respects_weights(world):
    spec = f"understanding={world}/understanding:0.3,generation={world}/caption:0.4,editing={world}/edit:0.2,interleaved={world}/interleaved:0.1"
    a, b, c = mixture(spec, seed=1), mixture(spec, seed=1), mixture(spec, seed=2)
    first = lambda m, n: [x for _, x in zip(range(n), m.indices())]  # noqa: E731
    assert first(a, 4000) == first(b, 4000) == first(a, 4000) and first(a, 200) != first(c, 200)
    counts = Counter(name for name, _ in first(a, 4000))
    for name, weight in {"understanding": 0.3, "generation": 0.4, "editing": 0.2, "interleaved": 0.1}.items():
        assert abs(counts[name] / 4000 - weight) < 0.03, counts
    # each dataset is walked in shuffled passes: its first len(ds) draws are a permutation
    gen = [i for name, i in first(a, 400) if name == "generation"][:N]
    assert sorted(gen) == list(range(N))
    samples = a.sample(6)
    assert [s["source"] for s in samples] == [n for n, _ in first(a, 6)]
    assert all(
        s["kind"]
        == {"understanding": "understanding", "generation": "caption", "editing": "edit", "interleaved": "interleaved"}[
            s["source"]
        ]
        for s in samples
    )
    bounded = mixture(spec, seed=1, num_samples=5)
    assert len(list(bounded)) == 5
    with pytest.raises(ValueError, match="positive"):
        MixtureSampler({"x": [1]}, {"x": 0.0})

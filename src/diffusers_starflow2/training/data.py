"""Dataset formats and readers for STARFlow2 training (no model code here).

Every dataset is a folder in the datasets "imagefolder" convention: images plus a ``metadata.jsonl``
whose rows name them by paths relative to the folder. One row per line, four kinds:

=============  ==================================================================================
kind           row
=============  ==================================================================================
caption        ``{"file_name": str, "text": str}``
understanding  ``{"file_name": str, "prompt": str, "response": str}``
edit           ``{"source_file_name": str, "instruction": str, "target_file_name": str}``
interleaved    ``{"segments": [{"text": str} | {"file_name": str}, ...]}``
chat_edit      ``{"prompt": str, "source_file_name": str, "instruction": str, "target_file_name": str}``
=============  ==================================================================================

A ``chat_edit`` row is a two-turn conversation: the user's ``prompt``, the assistant's answer (the source image),
the user's ``instruction``, the assistant's answer (the target image) - an edit of an image the assistant drew.

Extra keys are allowed and passed through (e.g. the shapes world's ``"attributes"``). Text values
must be non-empty; file names must be relative and exist, resolve inside the folder (symlinks included) and
be readable images (each is opened and verified when the folder is indexed).
:func:`load_metadata` validates every row and raises ``ValueError("<file>:<line>: ...")`` for the first
problem: nothing is skipped silently (blank lines are not rows and are ignored).

Readers (``torch.utils.data.Dataset``; images are returned as RGB PIL images):

* :class:`CaptionDataset`       -> ``{"kind": "caption", "image", "text"}``
* :class:`UnderstandingDataset` -> ``{"kind": "understanding", "image", "prompt", "response"}``
* :class:`EditDataset`          -> ``{"kind": "edit", "source_image", "instruction", "target_image"}``
* :class:`InterleavedDataset`   -> ``{"kind": "interleaved", "segments": [str | PIL.Image, ...]}``
* :class:`ChatEditDataset`      -> ``{"kind": "chat_edit", "prompt", "source_image", "instruction", "target_image"}``

Stage-3 mixtures: ``--mixture "understanding=DIR:0.3,generation=DIR:0.4,editing=DIR:0.2,interleaved=DIR:0.1"``
is parsed by :func:`parse_mixture`; :func:`mixture` turns it into a reproducible :class:`MixtureSampler`.
Names are kinds or their aliases (:data:`KIND_ALIASES`, e.g. generation -> caption, editing -> edit).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

METADATA = "metadata.jsonl"
#: Required keys per kind: "text" (non-empty string), "file" (existing image path) or "segments".
SCHEMAS: dict[str, dict[str, str]] = {
    "caption": {"file_name": "file", "text": "text"},
    "understanding": {"file_name": "file", "prompt": "text", "response": "text"},
    "edit": {"source_file_name": "file", "instruction": "text", "target_file_name": "file"},
    "interleaved": {"segments": "segments"},
    "chat_edit": {
        "prompt": "text",
        "source_file_name": "file",
        "instruction": "text",
        "target_file_name": "file",
    },
}
KINDS = tuple(SCHEMAS)
#: Names accepted in a mixture spec (and by :func:`open_dataset`) and the kind they read.
KIND_ALIASES = {
    "caption": "caption",
    "captions": "caption",
    "generation": "caption",
    "t2i": "caption",
    "understanding": "understanding",
    "vqa": "understanding",
    "edit": "edit",
    "editing": "edit",
    "interleaved": "interleaved",
    "chat_edit": "chat_edit",
    "chat_editing": "chat_edit",
}

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------
# validation
def _check_file(folder: Path, value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string, got {value!r}")
    rel = PurePosixPath(value.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or (len(value) > 1 and value[1] == ":"):
        raise ValueError(f"{key!r} must be a path relative to the dataset folder, got {value!r}")
    _check_image_file(folder, folder / rel, key, value)
    return value


def _check_image_file(folder: Path, path: Path, key: str, shown: Any) -> None:
    """``path`` is a readable image file lying inside ``folder`` once symlinks are resolved."""
    if not path.is_file():
        raise ValueError(f"{key!r}: image file {str(path)!r} does not exist")
    # a symlink (of the file or of a folder on its way) may point anywhere: what is read must lie in the folder
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise ValueError(f"{key!r}: {shown!r} resolves to {real!r}, outside the dataset folder {root!r}")
    _verify_image(path, key)


def _verify_image(source: Union[Path, io.BytesIO], key: str, shown: Any = None) -> None:
    """``source`` (a file, or the bytes of one) opens and verifies as an image."""
    shown = str(source) if shown is None else shown
    try:
        with Image.open(source) as im:
            im.verify()  # header and integrity (PNG checksums, truncation) without decoding every pixel
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{key!r}: {shown!r} is not a readable image ({type(e).__name__}: {e})") from None


def _check_text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is empty")
    return value


def _check_segments(folder: Path, value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'segments' must be a non-empty list, got {value!r}")
    for i, seg in enumerate(value):
        if not isinstance(seg, dict) or len(seg) != 1 or next(iter(seg)) not in ("text", "file_name"):
            raise ValueError(f"segments[{i}] must be {{'text': str}} or {{'file_name': str}}, got {seg!r}")
        if "text" in seg:
            _check_text(seg["text"], f"segments[{i}].text")
        else:
            _check_file(folder, seg["file_name"], f"segments[{i}].file_name")


def validate_row(row: Any, kind: str, folder: PathLike) -> None:
    """Raise ``ValueError`` (without location) if ``row`` is not a valid ``kind`` row of ``folder``."""
    folder = Path(folder)
    if not isinstance(row, dict):
        raise ValueError(f"row must be a JSON object, got {type(row).__name__}")
    for key, check in SCHEMAS[kind].items():
        if key not in row:
            raise ValueError(f"missing key {key!r} (a {kind} row needs {sorted(SCHEMAS[kind])})")
        if check == "file":
            _check_file(folder, row[key], key)
        elif check == "text":
            _check_text(row[key], key)
        else:
            _check_segments(folder, row[key])


def load_metadata(folder: PathLike, kind: str) -> list[dict]:
    """Read and validate ``folder/metadata.jsonl`` as rows of ``kind`` (see the module docstring).
    Raises ``ValueError`` naming the file and line number of the first malformed row (bad JSON,
    missing or wrongly typed key, empty text, missing image), or if there are no rows at all."""
    kind = _kind(kind)
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise ValueError(f"{path}: metadata file not found")
    return [row for _, row in _numbered_rows(folder, kind)]


def _numbered_rows(folder: Path, kind: str) -> list[tuple[int, dict]]:
    """:func:`load_metadata`'s rows with their line numbers."""
    path = folder / METADATA
    if not path.is_file():
        raise ValueError(f"{path}: metadata file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                validate_row(row, kind, folder)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{lineno}: invalid {kind} row: {e}") from None
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def row_texts(row: dict, kind: str) -> Iterator[tuple[str, list[str]]]:
    """``(key, pieces)`` for each text of a ``kind`` row as training renders it: a text value alone, adjacent text
    segments of an interleaved row together (the chat template joins them into one text)."""
    for key, check in SCHEMAS[kind].items():
        if check == "text":
            yield key, [row[key]]
        elif check == "segments":
            run: list[str] = []
            for seg in row[key] + [{}]:
                if "text" in seg:
                    run.append(seg["text"])
                elif run:
                    yield key, run
                    run = []


def _kind(name: str) -> str:
    try:
        return KIND_ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown dataset kind {name!r}; expected one of {sorted(KIND_ALIASES)}") from None


# ----------------------------------------------------------------------------------------------
# readers
def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class _FolderDataset(Dataset):
    kind = ""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        numbered = _numbered_rows(self.folder, self.kind)
        self.lines, self.rows = [n for n, _ in numbered], [row for _, row in numbered]

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, name: str) -> Image.Image:
        return _open_image(self.folder / name)

    def texts(self) -> Iterator[tuple[str, str, list[str]]]:
        """``(where, key, pieces)`` of every text of the dataset (:func:`row_texts`), ``where`` naming the file and
        line."""
        for line, row in zip(self.lines, self.rows):
            for key, pieces in row_texts(row, self.kind):
                yield f"{self.folder / METADATA}:{line}", key, pieces

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r}, rows={len(self)})"


class CaptionDataset(_FolderDataset):
    """Image-caption pairs: ``{"kind", "image", "text"}``."""

    kind = "caption"

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"kind": self.kind, "image": self.image(row["file_name"]), "text": row["text"]}


class UnderstandingDataset(_FolderDataset):
    """Visual QA: ``{"kind", "image", "prompt", "response"}``."""

    kind = "understanding"

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {
            "kind": self.kind,
            "image": self.image(row["file_name"]),
            "prompt": row["prompt"],
            "response": row["response"],
        }


class EditDataset(_FolderDataset):
    """Edit triplets: ``{"kind", "source_image", "instruction", "target_image"}``."""

    kind = "edit"

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {
            "kind": self.kind,
            "source_image": self.image(row["source_file_name"]),
            "instruction": row["instruction"],
            "target_image": self.image(row["target_file_name"]),
        }


class InterleavedDataset(_FolderDataset):
    """Interleaved documents: ``{"kind", "segments"}`` with each segment a ``str`` or a PIL image."""

    kind = "interleaved"

    def __getitem__(self, i: int) -> dict:
        segments = [seg["text"] if "text" in seg else self.image(seg["file_name"]) for seg in self.rows[i]["segments"]]
        return {"kind": self.kind, "segments": segments}


class ChatEditDataset(_FolderDataset):
    """Edits inside a chat: ``{"kind", "prompt", "source_image", "instruction", "target_image"}``, where the
    source image is the assistant's answer to ``prompt`` and the target its answer to ``instruction``."""

    kind = "chat_edit"

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {
            "kind": self.kind,
            "prompt": row["prompt"],
            "source_image": self.image(row["source_file_name"]),
            "instruction": row["instruction"],
            "target_image": self.image(row["target_file_name"]),
        }


DATASET_CLASSES = {
    cls.kind: cls for cls in (CaptionDataset, UnderstandingDataset, EditDataset, InterleavedDataset, ChatEditDataset)
}


def open_dataset(folder: PathLike, kind: str) -> _FolderDataset:
    """The reader for ``kind`` (or an alias such as "generation") over ``folder``."""
    return DATASET_CLASSES[_kind(kind)](folder)


# ----------------------------------------------------------------------------------------------
# mixtures
@dataclass(frozen=True)
class MixtureEntry:
    name: str  # as written in the spec, e.g. "generation"
    kind: str  # resolved kind, e.g. "caption"
    path: str
    weight: float


def parse_mixture(spec: str) -> list[MixtureEntry]:
    """Parse ``"name=DIR:weight,name=DIR:weight,..."`` (weights > 0, need not sum to 1; names are
    kinds or aliases, each at most once; DIR may not contain commas). Raises ``ValueError``
    mentioning ``--mixture`` for a malformed spec."""

    def bad(msg: str) -> ValueError:
        return ValueError(
            f"--mixture {spec!r}: {msg}; expected 'name=DIR:weight,...', e.g. 'generation=data/caption:0.4,editing=data/edit:0.6'"
        )

    if not isinstance(spec, str) or not spec.strip():
        raise bad("empty spec")
    entries, seen = [], set()
    for part in spec.split(","):
        part = part.strip()
        name, eq, rest = part.partition("=")
        path, colon, weight_text = rest.rpartition(":")
        name, path = name.strip(), path.strip()
        if not eq or not colon or not name or not path:
            raise bad(f"entry {part!r} is not name=DIR:weight")
        if name not in KIND_ALIASES:
            raise bad(f"unknown name {name!r} (known: {', '.join(sorted(KIND_ALIASES))})")
        if name in seen:
            raise bad(f"name {name!r} given twice")
        try:
            weight = float(weight_text)
        except ValueError:
            raise bad(f"weight {weight_text!r} of {name!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise bad(f"weight of {name!r} must be a positive number, got {weight_text!r}")
        seen.add(name)
        entries.append(MixtureEntry(name, KIND_ALIASES[name], path, weight))
    return entries


class MixtureSampler(IterableDataset):
    """Endless stream of examples drawn from several datasets with the given weights.

    Each step picks a dataset with probability proportional to its weight, then its next example
    in a per-dataset shuffled order (reshuffled after every pass). The stream is fully determined by
    ``seed`` (each ``iter()`` restarts it; DataLoader workers get disjoint seeds). Every example dict
    gets ``"source"``: the dataset's name. ``num_samples`` bounds the stream if given."""

    def __init__(
        self,
        datasets: Mapping[str, Dataset],
        weights: Mapping[str, float],
        seed: int = 0,
        num_samples: int | None = None,
    ):
        if not datasets or set(datasets) != set(weights):
            raise ValueError(
                f"datasets and weights need the same non-empty names, got {sorted(datasets)} and {sorted(weights)}"
            )
        if any(len(d) == 0 for d in datasets.values()):
            raise ValueError("every dataset of a mixture needs at least one example")
        w = np.array([float(weights[n]) for n in datasets])
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"mixture weights must be positive, got {dict(weights)}")
        self.names = list(datasets)
        self.datasets = dict(datasets)
        self.probs = w / w.sum()
        self.seed = seed
        self.num_samples = num_samples

    def indices(self) -> Iterator[tuple[str, int]]:
        """The ``(dataset name, example index)`` stream, without loading anything."""
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed] if worker is None else [self.seed, worker.id])
        orders: dict[str, list[int]] = {n: [] for n in self.names}
        count = 0
        while self.num_samples is None or count < self.num_samples:
            name = self.names[int(rng.choice(len(self.names), p=self.probs))]
            if not orders[name]:
                orders[name] = rng.permutation(len(self.datasets[name])).tolist()[::-1]
            yield name, orders[name].pop()
            count += 1

    def __iter__(self) -> Iterator[dict]:
        for name, index in self.indices():
            yield {**self.datasets[name][index], "source": name}

    def sample(self, n: int) -> list[dict]:
        """The first ``n`` examples of the stream."""
        return list(itertools.islice(iter(self), n))


def mixture(spec: Union[str, Sequence[MixtureEntry]], seed: int = 0, num_samples: int | None = None) -> MixtureSampler:
    """Open the datasets of a ``--mixture`` spec (or parsed entries) as a :class:`MixtureSampler`."""
    entries = parse_mixture(spec) if isinstance(spec, str) else list(spec)
    datasets = {e.name: open_dataset(e.path, e.kind) for e in entries}
    return MixtureSampler(datasets, {e.name: e.weight for e in entries}, seed=seed, num_samples=num_samples)


# ----------------------------------------------------------------------------------------------
# 🤗 datasets
class HubCaptionDataset(Dataset):
    """Image-caption pairs of a 🤗 ``datasets.Dataset`` (a Hub dataset or a local imagefolder):
    ``{"kind": "caption", "image", "text"}``. A caption column holding lists uses their first entry.

    Every row is checked up front as a ``--train_data_dir`` folder is: non-empty captions, and images that open and
    verify; for a local ``folder``, image files must lie inside it once symlinks are resolved."""

    kind = "caption"

    def __init__(
        self,
        dataset,
        image_column: str = "image",
        caption_column: str = "text",
        name: str = "dataset",
        folder: PathLike | None = None,
    ):
        columns = list(dataset.column_names)
        for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
            if column not in columns:
                raise ValueError(f"{flag} {column!r} is not a column of {name}; its columns: {columns}")
        if len(dataset) == 0:
            raise ValueError(f"{name} has no rows")
        self.dataset, self.image_column, self.caption_column, self.name = dataset, image_column, caption_column, name
        self.captions = []
        for i, caption in enumerate(dataset[caption_column]):  # the text column is cheap to check up front
            first = caption[0] if isinstance(caption, (list, tuple)) and caption else caption
            if not isinstance(first, str) or not first.strip():
                raise ValueError(
                    f"{name} row {i}: --caption_column {caption_column!r} must hold non-empty text "
                    f"(or lists of it), got {caption!r}"
                )
            self.captions.append(first)
        self._check_images(None if folder is None else Path(folder))

    def _check_images(self, folder: Path | None) -> None:
        from datasets import Image as ImageFeature

        column = self.image_column
        encoded = self.dataset
        if isinstance(self.dataset.features.get(column), ImageFeature):  # the files or bytes, not decoded images
            encoded = self.dataset.cast_column(column, ImageFeature(decode=False))
        key = column
        for i, value in enumerate(encoded[column]):
            try:
                if isinstance(value, dict) and value.get("bytes") is not None:
                    _verify_image(io.BytesIO(value["bytes"]), key, value.get("path") or "its bytes")
                    continue
                path = value.get("path") if isinstance(value, dict) else value
                if not isinstance(path, str) or not path:
                    raise ValueError(
                        f"--image_column {column!r} holds {type(value).__name__}, not an image (an Image feature "
                        "or a path)"
                    )
                if folder is not None:
                    _check_image_file(folder, folder / path, key, path)
                else:
                    if not Path(path).is_file():
                        raise ValueError(f"{key!r}: image file {path!r} does not exist")
                    _verify_image(Path(path), key)
            except ValueError as e:
                raise ValueError(f"{self.name} row {i}: {e}") from None

    def __len__(self) -> int:
        return len(self.dataset)

    def texts(self) -> Iterator[tuple[str, str, list[str]]]:
        """``(where, key, pieces)`` of every caption, ``where`` naming the row."""
        for i, caption in enumerate(self.captions):
            yield f"{self.name} row {i}", self.caption_column, [caption]

    def __getitem__(self, i: int) -> dict:
        row = self.dataset[i]
        image, caption = row[self.image_column], row[self.caption_column]
        if isinstance(image, str):
            image = Image.open(image)
        caption = caption[0] if isinstance(caption, (list, tuple)) else caption
        return {"kind": self.kind, "image": image.convert("RGB"), "text": caption}


def open_hub_caption_dataset(
    name: str,
    config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: str | None = None,
) -> HubCaptionDataset:
    """The ``train`` split of ``datasets.load_dataset(name)`` as a :class:`HubCaptionDataset` (a local folder of
    images with a ``metadata.jsonl`` loads as an imagefolder)."""
    from datasets import load_dataset

    dataset = load_dataset(name, config_name, cache_dir=cache_dir)
    if "train" not in dataset:
        raise ValueError(f"--dataset_name {name!r} has no 'train' split; its splits: {list(dataset)}")
    folder = name if Path(name).is_dir() else None  # a local folder: its files must stay inside it
    return HubCaptionDataset(
        dataset["train"], image_column, caption_column, name=f"--dataset_name {name!r}", folder=folder
    )

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Writing outputs atomically: never a half-written file, model or pipeline folder.

Everything is written next to its final place and renamed into it when complete, with the permissions the user's
umask gives new files (``tempfile`` makes private ones).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def current_umask() -> int:
    umask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(umask)
    return umask


def atomic_write_file(path: PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``.

    The file gets the mode a new file gets under the user's umask (0644 under the usual 022); if ``write`` fails
    nothing is left behind and an existing ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder")
    base, suffix = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", suffix=suffix, dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_output_dir(output: PathLike, overwrite: bool = False, name: str = "--output") -> None:
    """An output folder may be new or empty; an existing non-empty one needs ``overwrite``."""
    output = os.fspath(output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"{name} {output!r} exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ValueError(f"{name} {output!r} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(output: PathLike, overwrite: bool = False, name: str = "--output") -> Iterator[str]:
    """Yield a staging folder next to ``output``; when the block succeeds, rename it to ``output``.

    An existing ``output`` is replaced only at that last moment (and restored if the rename fails); if the block
    raises, nothing is published and the staging folder is removed.
    """
    output = os.path.abspath(os.fspath(output))
    check_output_dir(output, overwrite, name)
    parent = os.path.dirname(output)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    except OSError as err:  # name the output, not the staging folder the user never asked for
        raise OSError(f"{name} {output!r} cannot be written: {err.strerror or err}") from None
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp folders are private; the published folder should not be
    try:
        yield staging
        check_output_dir(output, overwrite, name)  # the folder may have appeared meanwhile
        backup = None
        if os.path.isdir(output):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=parent)
            os.rmdir(backup)
            os.rename(output, backup)
        try:
            os.rename(staging, output)
        except BaseException:
            if backup is not None:
                os.rename(backup, output)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_pretrained_atomic(obj, output: PathLike, overwrite: bool = False, name: str = "--output") -> str:
    """``obj.save_pretrained`` (a model or pipeline, safetensors) into ``output`` through :func:`atomic_output_dir`."""
    with atomic_output_dir(output, overwrite, name) as staging:
        obj.save_pretrained(staging, safe_serialization=True)
    return os.path.abspath(os.fspath(output))


def replace_path(src: PathLike, dst: PathLike) -> None:
    """Move ``src`` onto ``dst``, replacing it; an existing folder is renamed away first and deleted after, so ``dst``
    never holds a mix of old and new files."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.isdir(dst) and not os.path.islink(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(os.path.abspath(dst)))
        os.rmdir(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_json_atomic(path: PathLike, data) -> None:
    """``json.dump`` into a temporary file next to ``path``, then rename it over ``path``."""
    import json

    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write_file`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write_file(path, write)


@contextmanager
def publish_into(folder: PathLike, last: Optional[str] = "model_index.json") -> Iterator[str]:
    """Yield a staging folder inside ``folder`` (a folder that holds other things, e.g. a training run's checkpoints
    and logs); when the block succeeds, move every entry written there into ``folder``, ``last`` at the very end.

    ``last`` is the file that makes ``folder`` loadable (a pipeline's ``model_index.json``): it is removed before the
    other entries are replaced, so a run killed midway never leaves a loadable folder with mixed components.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".publish-", dir=folder)
    try:
        yield staging
        if last and os.path.exists(os.path.join(staging, last)) and os.path.exists(os.path.join(folder, last)):
            os.unlink(os.path.join(folder, last))
        for name in sorted(os.listdir(staging), key=lambda n: n == last):
            replace_path(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(folder: PathLike) -> list:
    """Delete the staging leftovers of killed writers in ``folder`` (the hidden ``.NAME.tmp-*``, ``.NAME.old-*`` and
    ``.publish-*`` entries made by this module); returns their paths."""
    folder = os.fspath(folder)
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        stale = name.startswith(".publish-") or ".tmp-" in name or ".old-" in name or name.endswith(".tmp")
        if name.startswith(".") and stale:
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(path)
    return removed

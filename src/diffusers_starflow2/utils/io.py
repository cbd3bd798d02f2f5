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
from typing import Callable, Iterator, Union

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

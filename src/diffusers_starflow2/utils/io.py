# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Writing output folders atomically: never a half-written model or pipeline folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


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
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp folders are private; the published folder should not be
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

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Compiled graphs that outlive the process: torch's cache artifacts (inductor's FX graphs and kernels, autotuning
results, AOTAutograd entries) saved to and loaded from a folder the user chooses.

    load_compile_cache(folder)                      # before compiling: a second process starts warm
    pipe.transformer.compile_decode_step(vlm=pipe.vlm)
    pipe("...")                                     # the first call compiles (or finds the graphs)
    save_compile_cache(folder)                      # after the first call: everything compiled so far
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .io import PathLike, atomic_write_file

ARTIFACTS_NAME = "torch_compile_artifacts.bin"


def _artifacts_path(folder: PathLike, name: str) -> str:
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"`{name}` must be a folder; got {folder!r}, which is a file")
    return os.path.join(folder, ARTIFACTS_NAME)


def load_compile_cache(folder: PathLike) -> bool:
    """Load the cache artifacts saved in ``folder`` by :func:`save_compile_cache` into this process's compile caches
    (``torch.compiler.load_cache_artifacts``), so that compiling the same graphs again finds them.  Returns whether
    there were any; a folder without artifacts (or not yet made) is a cold start."""
    path = _artifacts_path(folder, "folder")
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    try:
        info = torch.compiler.load_cache_artifacts(data)  # None (and a logged warning) when it cannot read them
    except Exception as error:
        info, reason = None, f": {error}"
    else:
        reason = ""
    if info is None:  # a truncated or foreign file: say which one
        raise ValueError(f"`folder` {os.fspath(folder)!r} holds no readable compile cache ({path}){reason}")
    return True


def save_compile_cache(folder: PathLike) -> Optional[str]:
    """Save what this process compiled (``torch.compiler.save_cache_artifacts``) to ``folder`` (made if missing,
    the file written atomically); returns the file's path, or None when nothing was compiled."""
    path = _artifacts_path(folder, "folder")
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data = saved[0]
    os.makedirs(os.fspath(folder), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write_file(path, write)

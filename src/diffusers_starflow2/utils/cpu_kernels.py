# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""The package's C++ CPU kernels: built on first use with torch's extension builder, loaded into the operator
registry beside the operators' Python implementations, which they replace on CPU tensors.

* ``diffusers_starflow2::cached_attention`` (defined in ``models/attention.py``): ``models/cached_attention_cpu.cpp``,
  one pass over the filled cache slots accumulated in float32 (also for bfloat16 caches, read as stored);
* ``diffusers_starflow2::few_row_linear`` (defined in ``utils/compile_utils.py``): ``models/few_row_linear_cpu.cpp``,
  the linears of a few rows, float32 or bfloat16 weights read once as stored.

Compiled CPU decode steps load them (:func:`~diffusers_starflow2.utils.compile_utils.compile_static_step`); eager
decoding never calls the operators.  The build uses the vector instructions and macros inductor picks for its own
kernels on this CPU and lands in torch's extension folder (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), under a name per instruction set: the first process on a machine compiles (10–20 s
on the 2-core CI machine), later ones load the library (about a second).  Where the build fails (no C++ compiler;
inductor needs one too), the operators keep their Python implementations and a warning says why.
"""

from __future__ import annotations

import functools
import os
import re

from diffusers.utils import logging

logger = logging.get_logger(__name__)

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(_PACKAGE, "models", name) for name in ("cached_attention_cpu.cpp", "few_row_linear_cpu.cpp")]


def _build_flags():
    """Compiler flags and the library's name suffix for this CPU's vector instruction set, as inductor picks it."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    # -ffast-math: reductions vectorise and exp has a vector form (the kernel keeps masked slots finite)
    flags = ["-O3", "-ffast-math", "-fopenmp"]  # OpenMP: at::parallel_for over rows, as inductor's kernels
    if isa:
        flags += isa.build_arch_flags().split() + [f"-D{macro}" for macro in isa.build_macro()]
    return flags, re.sub(r"\W+", "_", str(isa)) if isa else "generic"


@functools.lru_cache(maxsize=None)
def load_cpu_kernels() -> bool:
    """Build (once per machine) and load the package's CPU kernels; returns whether they are in use."""
    from torch.utils.cpp_extension import load

    flags, suffix = _build_flags()
    try:
        load(
            name=f"diffusers_starflow2_cpu_{suffix}",
            sources=SOURCES,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # a missing or failing compiler: the Python implementations stay
        logger.warning(f"the package's CPU kernels could not be built ({error}); using the Python implementations")
        return False
    return True

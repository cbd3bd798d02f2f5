# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Compiling decode steps with ``torch.compile``, and keeping the compiled graphs for the next process.

* :func:`compile_decode_graphs` / :func:`compile_static_step`: the graphs of a static-shape decode method
  (:meth:`~diffusers_starflow2.models.flow_block.AutoregressiveFlowBlock.compile_decode_step`, the Pretzel's
  stream and image steps): a code object of its own per method, inductor's frozen weights, guards on parameter
  identities only;
* :func:`load_compile_cache` / :func:`save_compile_cache`: torch's cache artifacts (inductor's FX graphs and
  kernels, autotuning results, AOTAutograd entries) saved to and loaded from a folder the user chooses::

    load_compile_cache(folder)                      # before compiling: a second process starts warm
    pipe.transformer.compile_decode_step(vlm=pipe.vlm)
    pipe("...")                                     # the first call compiles (or finds the graphs)
    save_compile_cache(folder)                      # after the first call: everything compiled so far
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .cpu_kernels import load_cpu_kernels
from .io import PathLike, atomic_write_file


def compile_decode_graphs(method: Callable, mode: Optional[str], **compile_kwargs) -> Dict[str, Callable]:
    """The two compiled graphs of a static-shape decode method: ``"token"`` (one new position; static shapes, in
    ``mode``) and ``"window"`` (several, e.g. a Jacobi window; dynamic shapes, inductor's default mode)."""
    return {
        kind: compile_static_step(method, step_mode, dynamic, **compile_kwargs)
        for kind, step_mode, dynamic in (("token", mode, False), ("window", None, True))
    }


def compile_static_step(method: Callable, mode: Optional[str], dynamic_shapes: bool, **compile_kwargs) -> Callable:
    """``torch.compile`` of a bound decode method (:meth:`AutoregressiveFlowBlock.static_decode`, the Pretzel's
    stream step) as :meth:`AutoregressiveFlowBlock.compile_decode_step` describes it: a code object of its own,
    with inductor frozen weights, guards on parameter identities only, no stride checks, and on a CPU a C++ wrapper
    and the weights left unpacked, so that the graphs can be cached (on a GPU ``mode="max-autotune"`` records CUDA
    graphs), and the float32 / bfloat16 / int8 linears of token steps traced as :class:`FewRowLinears` writes them.
    ``options={"cpp.weight_prepack": True}`` lets inductor repack the weights for oneDNN and its C++ GEMM
    template instead, which is faster on some CPUs, at the price of compiling again in every process.  A ``dynamic`` in
    ``compile_kwargs`` is overridden by ``dynamic_shapes``."""
    compile_kwargs = dict(compile_kwargs, dynamic=dynamic_shapes)
    frozen = compile_kwargs.get("backend", "inductor") == "inductor"
    if frozen:
        from torch._inductor import list_mode_options

        options = {
            **list_mode_options(mode or "default"),
            "guard_filter_fn": _identity_guards_on_modules,
            "size_asserts": False,  # checks of each output's strides after every operator call
        }
        device = next(method.__self__.parameters()).device
        if device.type == "cpu":  # no CUDA graphs; kernels called from C++, not Python
            options.pop("triton.cudagraphs", None)
            options["cpp_wrapper"] = True
            load_cpu_kernels()  # the package's operators in the graphs (the cached attention) run in C++ too
            # weights frozen as they are, not repacked by oneDNN: inductor's FX graph cache cannot pickle oneDNN
            # tensors and would recompile every graph in every process (see load_compile_cache)
            options["cpp.weight_prepack"] = False
        compile_kwargs["options"] = {**options, **compile_kwargs.get("options", {})}
        # FewRowLinears around CPU token steps whose weights stay unpacked
        cpu_unpacked = device.type == "cpu" and not compile_kwargs["options"]["cpp.weight_prepack"]
        few_rows = cpu_unpacked and not dynamic_shapes
    compiled = torch.compile(_with_own_code(method), **compile_kwargs)
    return _with_frozen_weights(compiled, few_rows) if frozen else compiled


def _with_own_code(method: Callable) -> Callable:
    """``method`` bound to a copy of its function with a code object of its own.  Dynamo keeps compiled graphs per
    code object, with a limit of 8: blocks sharing ``static_decode``'s code would share one list of graphs (each
    holding its block's frozen weights, told apart only by guards) and a model of more than a few blocks, or a few
    compiled models, would hit the limit and fall back to eager decoding."""
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(own, method.__self__)


def _identity_guards_on_modules(guard_entries) -> List[bool]:
    """Dynamo's guards to keep for a compiled decode step: all but those on module attributes (hooks, flags,
    types: hundreds per block, ~0.1 ms per call), except the identity of each parameter.  Graphs of blocks (and of
    model copies) share one code object and hold their own frozen weights; the parameters' identities tell them
    apart."""
    return [
        entry.guard_type == "ID_MATCH" or not entry.orig_guard.source.is_unspecialized_nn_module()
        for entry in guard_entries
    ]


def _with_frozen_weights(compiled: Callable, few_rows: bool) -> Callable:
    """``compiled`` with inductor's ``freezing`` on whenever it runs (and so whenever it traces a new shape): the
    setting is read while dynamo traces, outside the reach of ``torch.compile``'s ``options``, and is not left on
    for the rest of the process.  With ``few_rows``, its linears trace as :class:`FewRowLinears` writes them."""
    from torch._inductor import config as inductor_config

    def call(*args, **kwargs):
        before = inductor_config.freezing
        inductor_config.freezing = True
        try:
            with FewRowLinears() if few_rows else contextlib.nullcontext():
                return compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = before

    return call


# --------------------------------------------------------------------------------------------------------------
# Linears of a few rows as fused reductions
# --------------------------------------------------------------------------------------------------------------

# Rows (a decode step's batch times its guidance branches: 2 for one image with CFG) up to which a stored weight
# dtype reads through the few-row paths of FewRowLinears.  Measured (one thread, benchmarks/bench_gemm.py
# --dependent): float32 and bfloat16 through the operator's C++ loop read at or above their GEMM's rate at 1 to 8
# rows; int8 reductions beat the GEMM over the dequantised float32 weights at 2 to 8 rows.
REDUCTION_ROWS = {torch.float32: 8, torch.bfloat16: 8, torch.int8: 8}


class FewRowLinears(TorchFunctionMode):
    """Traces ``F.linear`` of inputs with static shapes and at most :data:`REDUCTION_ROWS` rows for the weight's
    stored dtype as a pass over the weight as stored:

    * float32 and bfloat16 weights: the operator ``diffusers_starflow2::few_row_linear``, whose CPU kernel
      (``models/few_row_linear_cpu.cpp``) reads every weight row once for all rows of the input (its Python body,
      where the kernel could not be built, is ``F.linear``);
    * torchao's int8 weight-only ``Int8Tensor``: one float32 reduction per output row, ``y[m, n] = sum_k x[m, k]
      w[n, k]`` (rows unrolled), which inductor emits as one vectorised loop reading the int8 values and per-row
      scales (inductor's freezing folds a plain dequantisation of int8 constants into float32 matrices, read at four
      times the bytes).

    In a step whose layers feed each other, the BLAS GEMMs read bfloat16 no faster than float32 at these sizes, and
    inductor's own reductions of bfloat16 at about two thirds of the kernel's rate.  Only entered around compiled
    CPU token steps (see :func:`compile_static_step`); eager calls keep ``F.linear``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            stored = weight.qdata.dtype if hasattr(weight, "qdata") else weight.dtype
            if isinstance(rows, int) and 0 < rows <= REDUCTION_ROWS.get(stored, 0) and not torch.is_grad_enabled():
                if stored == torch.int8:
                    return _reduction_linear(x, weight, bias, rows)
                if x.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype):
                    return torch.ops.diffusers_starflow2.few_row_linear(x, weight, bias)
        return func(*args, **kwargs)


def _reduction_linear(x: torch.Tensor, weight: torch.Tensor, bias, rows: int) -> torch.Tensor:
    qdata = getattr(weight, "qdata", None)  # torchao's Int8Tensor: int8 (N, K) values, (N, 1) scales
    if qdata is not None:
        # dequantised inside the reduction's loop; inductor's freezing never folds this operator into a float32
        # constant (it would fold a plain conversion)
        from torch.ao.quantization.fx import _decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

        scale = weight.scale.reshape(-1).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        weight = torch.ops.quantized_decomposed.dequantize_per_channel(qdata, scale, zero, 0, -128, 127, torch.int8)
    # (M, K) as a buffer of its own: inductor would otherwise inline the input's producers (a norm, a GELU) into
    # the reduction and recompute them for every output row
    from torch._inductor.inductor_prims import force_stride_order

    flat = force_stride_order(x.reshape(rows, x.shape[-1]).float(), (x.shape[-1], 1))
    out = torch.stack([(flat[m] * weight).sum(-1) for m in range(rows)])  # (M, N), one pass over the weight
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], -1)


# The few-row linear as an operator: a C++ CPU kernel (built by utils/cpu_kernels.py) replaces this Python body for
# CPU tensors once loaded; compiled graphs call it as an external kernel.
_LIBRARY = torch.library.Library("diffusers_starflow2", "FRAGMENT")
_LIBRARY.define("few_row_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


@torch.library.impl(_LIBRARY, "few_row_linear", "CompositeExplicitAutograd")
def _few_row_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


@torch.library.register_fake("diffusers_starflow2::few_row_linear")
def _few_row_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# --------------------------------------------------------------------------------------------------------------
# Compiled graphs that outlive the process
# --------------------------------------------------------------------------------------------------------------

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

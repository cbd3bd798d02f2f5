"""The GEMMs of a decode step at a few rows: how fast each way of running them reads the weights, per weight dtype.

A decode step multiplies a few rows (a batch times the guidance branches) by every weight matrix once, so its speed
is the rate at which the weights are read.  This script times a chain of linear layers with the mid model's shapes
(512 -> 2048 -> 512, 512 -> 512, 512 -> 1536; 48 distinct matrices, 143 MB of float32, more than any L2 cache) at
``--rows`` rows, each way in a fresh compile:

* ``eager``: ``F.linear`` (oneDNN / MKL);
* ``compiled, unpacked``: compiled as :meth:`PretzelModel.compile_decode_step` compiles a step (``compile_static_step``:
  inductor's frozen weights, ``mode="max-autotune"``) with the weights as they are (``cpp.weight_prepack`` off, the
  default on a CPU: the graphs are kept by the FX graph cache), so up to ``REDUCTION_ROWS`` rows through the
  few-row operator (``compile_utils.FewRowLinears``);
* ``compiled, without the few-row operator``: the same with the chain's linears traced as inductor's reductions
  (bfloat16) or the GEMM (float32), what such a step ran before the operator;
* ``compiled, packed``: the same with the weights repacked by oneDNN, so that autotuning may pick inductor's C++ GEMM
  template (``cpp.weight_prepack`` on: faster on some CPUs, not kept by the FX graph cache).

Next to them, ``torch.sum`` over the same weights: the read bandwidth the floor of ``bench_pipeline.py`` assumes.
``--dependent`` feeds each layer with the previous one's output, as in a decode step (the compiled kernels then
cannot overlap one layer with the next); ``--scale`` repeats the 48 matrices, to read more than the CPU's caches hold.
Which compiled variant wins depends on the CPU; run this to choose ``options={"cpp.weight_prepack": ...}``.

    python benchmarks/bench_gemm.py [--rows 2] [--threads 1] [--dtypes float32,bfloat16] [--repeats 20]
        [--dependent] [--scale 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffusers_starflow2.utils import compile_utils
from diffusers_starflow2.utils.compile_utils import compile_static_step

SHAPES = [(2048, 512), (512, 2048), (512, 512), (1536, 512)] * 12  # (out, in) of the mid model's layers
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LinearChain(torch.nn.Module):
    """Every layer applied to the (sliced) input, outputs reduced to one number, or with ``dependent`` to the
    (sliced) output of the layer before: each weight is read once."""

    def __init__(self, dtype: torch.dtype, dependent: bool = False, scale: int = 1):
        super().__init__()
        self.dependent = dependent
        self.linear = F.linear
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False, dtype=dtype) for o, i in SHAPES * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (rows, 2048)
        if self.dependent:  # each input width fits in the output before it
            for layer in self.layers:
                x = self.linear(x[:, : layer.in_features], layer.weight)
            return x.sum()
        return torch.stack([self.linear(x[:, : layer.in_features], layer.weight).sum() for layer in self.layers]).sum()


def seconds_per_call(fn, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):  # compiles, then warms up
            fn(x)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(x)
    return (time.perf_counter() - start) / repeats


def compiled(model: torch.nn.Module, packed: bool):
    """``model`` compiled as the decode steps are (:func:`compile_static_step`: frozen weights, ``max-autotune``, C++
    wrapper), with the weights unpacked (the default) or packed for oneDNN."""
    return compile_static_step(model.forward, "max-autotune", False, options={"cpp.weight_prepack": packed})


def _without_operator(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A linear the few-row operator does not take: bfloat16 as inductor's reductions, float32 as the GEMM."""
    if weight.dtype == torch.bfloat16:
        return compile_utils._reduction_linear(x, weight, None, x.shape[0])
    return x @ weight.T


def without_operator(model: torch.nn.Module):
    """``compiled(model, packed=False)`` with the chain's linears traced as :func:`_without_operator`."""
    step = compiled(model, packed=False)

    def run(x):
        model.linear = _without_operator
        try:
            return step(x)
        finally:
            model.linear = F.linear

    return run


def ways(model: torch.nn.Module) -> dict:
    """The ways of running ``model``'s GEMMs, each built right before it runs."""
    weights = list(model.parameters())
    return {
        "torch.sum of the weights": lambda: lambda _x: [w.sum() for w in weights],
        "eager F.linear": lambda: model,
        "compiled, unpacked (default)": lambda: compiled(model, packed=False),
        "compiled, without the few-row operator": lambda: without_operator(model),
        "compiled, packed (cpp.weight_prepack)": lambda: compiled(model, packed=True),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2, help="rows per GEMM (batch x guidance branches)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated of {tuple(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dependent", action="store_true", help="each layer fed by the one before")
    parser.add_argument("--scale", type=int, default=1, help="repeat the 48 matrices this many times")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chain = "each fed by the one before" if args.dependent else "each fed by the input"
    print(
        f"{len(SHAPES) * args.scale} linear layers ({chain}), {args.rows} rows, {args.threads} thread(s), "
        f"torch {torch.__version__}\n"
    )
    print("| weights | MB | way | ms per pass | GB/s of weights |")
    print("|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        torch.manual_seed(0)
        model = LinearChain(DTYPES[name], args.dependent, args.scale).eval()
        x = torch.randn(args.rows, 2048, dtype=DTYPES[name])
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for way, build in ways(model).items():
            torch._dynamo.reset()  # a fresh compile for each way
            t = seconds_per_call(build(), x, args.repeats)
            print(f"| {name} | {nbytes / 1e6:.0f} | {way} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()

# Copyright 2026 The diffusers-starflow2 authors. Apache-2.0.
"""Lower-precision weights for inference through diffusers' own entry points: ``from_pretrained(..., torch_dtype=)``
for bfloat16, ``quantization_config=PipelineQuantizationConfig(...)`` with torchao's int8 weight-only configuration
for the Pretzel (diffusers' ``TorchAoConfig``) and the VLM (transformers' ``TorchAoConfig``).  torchao is an optional
dependency (``pip install diffusers-starflow2[quantization]``).

    pipe = StarFlow2Pipeline.from_pretrained(path, **weights_kwargs("int8"))
"""

from __future__ import annotations

WEIGHTS = ("float32", "bfloat16", "int8")
# the components whose linear layers are read at every latent position (the FAE decodes once per image)
QUANTIZED_COMPONENTS = ("transformer", "vlm")


def int8_weight_only_config():
    """torchao's int8 weight-only configuration (per-row scales; activations stay in the model dtype)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise ImportError(
            "int8 weights need torchao: pip install torchao (or diffusers-starflow2[quantization])"
        ) from None
    return Int8WeightOnlyConfig()


def weights_kwargs(weights: str) -> dict:
    """Keyword arguments of a pipeline's ``from_pretrained`` that load its weights as ``weights``: ``"float32"``
    (as stored), ``"bfloat16"`` (every component cast; the flow arithmetic stays float32) or ``"int8"`` (the
    Pretzel's and the VLM's linear layers quantised weight-only with torchao at load time)."""
    if weights not in WEIGHTS:
        raise ValueError(f"`weights` must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    if weights == "float32":
        return {}
    if weights == "bfloat16":
        import torch

        return dict(torch_dtype=torch.bfloat16)
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from transformers import TorchAoConfig as TransformersTorchAoConfig

    return dict(
        quantization_config=PipelineQuantizationConfig(
            quant_mapping={
                "transformer": TorchAoConfig(int8_weight_only_config()),
                "vlm": TransformersTorchAoConfig(int8_weight_only_config()),
            }
        )
    )


def quantize_components(pipe, weights: str) -> None:
    """The same for a pipeline already built in memory (random-weight benchmarks): the Pretzel and the VLM cast to
    bfloat16, or their linear layers quantised with torchao's ``quantize_`` and the configuration
    ``from_pretrained`` applies."""
    weights_kwargs(weights)  # checks the name
    if weights == "bfloat16":
        import torch

        for name in QUANTIZED_COMPONENTS:
            getattr(pipe, name).to(torch.bfloat16)
    elif weights == "int8":
        from torchao.quantization import quantize_

        for name in QUANTIZED_COMPONENTS:
            quantize_(getattr(pipe, name), int8_weight_only_config())


def stored_nbytes(tensor) -> int:
    """Bytes a weight occupies as stored: a torchao tensor subclass counts its data tensors (int8 values and
    scales), a plain tensor its elements."""
    names = getattr(tensor, "tensor_data_names", None)
    if names:
        parts = [getattr(tensor, name, None) for name in names]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)
    return tensor.numel() * tensor.element_size()

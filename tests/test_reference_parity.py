"""Converted reference checkpoints reproduce every output of the reference implementation (atol 1e-4).

One module-scoped conversion per case folder of ``shared/fixtures/reference-tarflow`` (see its README).
"""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import REFERENCE_DIR, reference_cases
from safetensors.torch import load_file

from diffusers_starflow2 import StarFlowTransformerModel
from diffusers_starflow2.sampling import denoise_starflow, sample_starflow

pytestmark = pytest.mark.skipif(not reference_cases, reason=f"no reference fixtures under {REFERENCE_DIR}")
ATOL = 1e-4


def assert_close(actual, expected, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= ATOL, f"{name}: max abs error {err:.3g} > {ATOL}"


def convert(converter, case_dir, config, output):
    args = ["--checkpoint", str(case_dir / "reference_model.pth"), "--config", str(config), "--output", str(output)]
    assert converter.main(args) == 0
    return StarFlowTransformerModel.from_pretrained(output).eval()


@pytest.fixture(scope="module", params=reference_cases)
def case(request, converter, tmp_path_factory):
    case_dir = REFERENCE_DIR / request.param
    model = convert(converter, case_dir, case_dir / "config.json", tmp_path_factory.mktemp(request.param) / "model")
    io = load_file(case_dir / "io.safetensors")
    with torch.no_grad():
        out = model(io["x"], encoder_hidden_states=io["y"])
    return SimpleNamespace(
        dir=case_dir, meta=json.loads((case_dir / "config.json").read_text()), model=model, io=io, out=out
    )


def test_forward_z_and_loss(case):
    assert_close(case.out.z, case.io["forward_z"], "z")
    assert_close(case.out.loss.reshape(-1), case.io["forward_loss"].reshape(-1), "loss")  # reference: shape (1,)


def test_forward_logdets(case):
    num_blocks = case.meta["model_kwargs"]["num_blocks"]
    assert len(case.out.logdets) == num_blocks
    for i, logdet in enumerate(case.out.logdets):
        assert_close(logdet, case.io[f"forward_logdet_{i}"], f"logdet {i}")


def test_forward_block_inputs(case):
    expected = sorted((k for k in case.io if k.startswith("forward_output_")), key=lambda k: int(k.split("_")[-1]))
    assert len(expected) == len(case.out.block_inputs) == case.meta["model_kwargs"]["num_blocks"] + 1
    for i, key in enumerate(expected):
        assert_close(case.out.block_inputs[i], case.io[key], key)


def test_reverse_without_guidance(case):
    x = sample_starflow(case.model, case.io["reverse_noise"], encoder_hidden_states=case.io["y"])
    assert_close(x, case.io["reverse_g0"], "reverse g=0")


def test_reverse_with_guidance(case):
    io = case.io
    assert (io["reverse_cfg"] - io["reverse_g0"]).abs().max() > 1e-2  # guidance must matter for this test to bite
    x = sample_starflow(
        case.model,
        io["reverse_noise"],
        encoder_hidden_states=io["y"],
        negative_encoder_hidden_states=io["y_null"],
        guidance_scale=case.meta["guidance"],
    )
    assert_close(x, io["reverse_cfg"], f"reverse g={case.meta['guidance']}")


def test_denoise_step(case):
    x0 = denoise_starflow(
        case.model, case.io["denoise_in"], encoder_hidden_states=case.io["y"], noise_level=case.meta["noise_std"]
    )
    assert_close(x0, case.io["denoise_out"], "denoise")


# -- the training-YAML config path ---------------------------------------------------------------------------------

YAML_NAMES = {"in_channels": "channel_size", "num_blocks": "blocks"}  # reference kwarg -> training-script argument
VAE_DOWNSAMPLE = 8  # stabilityai/sd-vae-ft-ema


def training_yaml(model_kwargs: dict) -> str:
    """A reference-format training YAML whose arguments reproduce ``model_kwargs`` (txt_dim comes from the weights)."""
    lines = [
        "arguments:",
        "- vae: stabilityai/sd-vae-ft-ema",
        "- text: google/flan-t5-xl",
        "- noise_std: 0.3",
        "- cfg: 2.5",
        "- batch_size: 16",
    ]
    for key, value in model_kwargs.items():
        if key == "txt_dim":
            continue
        if key == "img_size":
            value *= VAE_DOWNSAMPLE
        if isinstance(value, list):
            value = " ".join(map(str, value))  # "1 1 1 2", parsed as argparse nargs by the reference
        lines.append(f"- {YAML_NAMES.get(key, key)}: {value}")
    return "\n".join(lines) + "\n"


def test_training_yaml_config(case, converter, tmp_path):
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(training_yaml(case.meta["model_kwargs"]))
    model = convert(converter, case.dir, yaml_path, tmp_path / "model")
    config = lambda m: {k: v for k, v in m.config.items() if k != "_name_or_path"}
    assert config(model) == config(case.model)
    with torch.no_grad():
        z = model(case.io["x"], encoder_hidden_states=case.io["y"]).z
    assert_close(z, case.io["forward_z"], "z (yaml config)")

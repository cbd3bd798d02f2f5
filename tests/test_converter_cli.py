"""The checkpoint converter CLI: checkpoint formats, dtype, strict loading and never-half-written outputs.

The checkpoints here are synthetic: a random diffusers model written back under the reference key names (so these
tests do not need the reference fixtures; parity with the reference is in test_reference_parity.py).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_starflow2 import StarFlowTransformerModel
from diffusers_starflow2.loaders.single_file_starflow import config_from_reference_kwargs

# the thin top-level entry point a source checkout runs
CONVERTER_SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "convert_starflow_to_diffusers.py"

REFERENCE_KWARGS = dict(in_channels=4, img_size=4, patch_size=1, channels=32, num_blocks=2, layers_per_block=[1, 2],
                        head_dim=16, num_heads=2, num_kv_heads=1, rope=1, sos=1, txt_size=5, txt_dim=12,
                        cond_top_only=1, use_softplus=1, use_final_norm=1, use_swiglu=1, use_qk_norm=1,
                        use_post_norm=1, norm_type="rms_norm", soft_clip=4.0, seq_order="L2R")
# diffusers names -> reference names inside one Transformer layer
_LAYER_NAMES = {"attn.to_qkv": "attention.qkv", "attn.to_out": "attention.proj", "attn.norm_q": "attention.query_norm",
                "attn.norm_k": "attention.key_norm", "attn.norm_post": "attention.post_norm",
                "attn.norm": "attention.norm", "mlp.fc1": "mlp.main.0", "mlp.fc2": "mlp.main.2",
                "mlp.norm_post": "mlp.post_norm"}


def to_reference_key(key):
    match = re.match(r"^(blocks\.\d+)\.layers\.(\d+)\.(attn|mlp)\.([a-z_0-9]+)\.(.+)$", key)
    if not match:
        return key
    block, layer, part, name, rest = match.groups()
    new = _LAYER_NAMES.get(f"{part}.{name}", f"{part}.{name}")
    return f"{block}.attn_blocks.{layer}.{new}.{rest}"


@pytest.fixture
def reference(tmp_path):
    """A random model, its reference-format checkpoint (nested, DDP-prefixed, with dropped buffers) and config."""
    model = StarFlowTransformerModel(**config_from_reference_kwargs(REFERENCE_KWARGS))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {to_reference_key(k): v.clone() for k, v in model.state_dict().items()}
    assert any(".attn_blocks.0.attention.query_norm." in k for k in state)
    state.update({"var": torch.ones(16, 4), "blocks.0.attn_mask": torch.ones(16, 16)})  # unused reference buffers
    checkpoint, config = tmp_path / "model.pth", tmp_path / "config.json"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "step": 10}, checkpoint)
    config.write_text(json.dumps({"model_kwargs": REFERENCE_KWARGS}))
    return model.eval(), state, checkpoint, config


def run(converter, checkpoint, config, output, *extra):
    return converter.main(["--checkpoint", str(checkpoint), "--config", str(config), "--output", str(output), *extra])


def leftovers(folder, expected):
    return sorted(set(p.name for p in folder.iterdir()) - set(expected))


def test_convert_nested_pth(converter, reference, tmp_path, capsys):
    model, _, checkpoint, config = reference
    assert run(converter, checkpoint, config, tmp_path / "out") == 0
    stdout = capsys.readouterr().out
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in stdout and '"num_kv_heads": 1' in stdout
    assert leftovers(tmp_path, ["model.pth", "config.json", "out"]) == []
    loaded = StarFlowTransformerModel.from_pretrained(tmp_path / "out").eval()
    x, y = torch.randn(2, 4, 4, 4), torch.randn(2, 3, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x, encoder_hidden_states=y).z, model(x, encoder_hidden_states=y).z)


def test_convert_safetensors_to_bfloat16(converter, reference, tmp_path):
    model, state, _, config = reference
    save_file(state, tmp_path / "model.safetensors")
    assert run(converter, tmp_path / "model.safetensors", config, tmp_path / "out", "--dtype", "bfloat16") == 0
    expected = model.state_dict()
    with safe_open(tmp_path / "out" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert set(f.keys()) == set(expected)
        for key in f.keys():
            assert f.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(f.get_tensor(key), expected[key].to(torch.bfloat16))


def test_unknown_config_key_fails_cleanly(converter, reference, tmp_path, capsys):
    _, _, checkpoint, config = reference
    config.write_text(json.dumps({"model_kwargs": {**REFERENCE_KWARGS, "adaln": 1}}))
    assert run(converter, checkpoint, config, tmp_path / "out") != 0
    err = capsys.readouterr().err
    assert "model_kwargs" in err and "adaln" in err and "Traceback" not in err
    assert leftovers(tmp_path, ["model.pth", "config.json"]) == []


@pytest.mark.parametrize("change, listed", [
    (lambda s: s.update({"blocks.2.proj_in.weight": torch.zeros(32, 4)}), "blocks.2.proj_in.weight"),  # unexpected
    (lambda s: s.update({"blocks.0.extra.weight": torch.zeros(1)}), "blocks.0.extra.weight"),  # no counterpart
    (lambda s: s.pop("blocks.1.final_norm.weight"), "blocks.1.final_norm.weight"),  # missing
    (lambda s: s.update({"blocks.0.proj_in.weight": torch.zeros(32, 5)}), "blocks.0.proj_in.weight"),  # shape
])
def test_checkpoint_mismatch_fails_without_output(converter, reference, tmp_path, capsys, change, listed):
    _, state, _, config = reference
    change(state)
    save_file(state, tmp_path / "bad.safetensors")
    assert run(converter, tmp_path / "bad.safetensors", config, tmp_path / "out") != 0
    assert listed in capsys.readouterr().err
    assert leftovers(tmp_path, ["model.pth", "config.json", "bad.safetensors"]) == []


def test_failure_while_writing_leaves_nothing(converter, reference, tmp_path, monkeypatch, capsys):
    _, _, checkpoint, config = reference

    save = converter.StarFlowTransformerModel.save_pretrained

    def fail(self, staging_dir, **kwargs):
        save(self, staging_dir, **kwargs)
        assert (Path(staging_dir) / "config.json").is_file()  # the transformer is already staged
        raise OSError("disk full")

    monkeypatch.setattr(converter.StarFlowTransformerModel, "save_pretrained", fail)
    assert run(converter, checkpoint, config, tmp_path / "out") != 0
    assert "disk full" in capsys.readouterr().err
    assert leftovers(tmp_path, ["model.pth", "config.json"]) == []
    # an existing output survives a failed --overwrite untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    assert run(converter, checkpoint, config, tmp_path / "out", "--overwrite") != 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path, ["model.pth", "config.json", "out"]) == []


def test_existing_output(converter, reference, tmp_path, capsys):
    _, _, checkpoint, config = reference
    (tmp_path / "empty").mkdir()
    assert run(converter, checkpoint, config, tmp_path / "empty") == 0  # an empty folder is fine
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert run(converter, checkpoint, config, out) != 0
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "old"
    assert run(converter, checkpoint, config, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert leftovers(tmp_path, ["model.pth", "config.json", "out", "empty"]) == []


def test_command_line_exit_status(tmp_path):
    result = subprocess.run([sys.executable, str(CONVERTER_SCRIPT), "--checkpoint", str(tmp_path / "missing.pth"),
                             "--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "missing.pth" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

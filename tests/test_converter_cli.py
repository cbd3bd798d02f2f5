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

REFERENCE_KWARGS = dict(
    in_channels=4,
    img_size=4,
    patch_size=1,
    channels=32,
    num_blocks=2,
    layers_per_block=[1, 2],
    head_dim=16,
    num_heads=2,
    num_kv_heads=1,
    rope=1,
    sos=1,
    txt_size=5,
    txt_dim=12,
    cond_top_only=1,
    use_softplus=1,
    use_final_norm=1,
    use_swiglu=1,
    use_qk_norm=1,
    use_post_norm=1,
    norm_type="rms_norm",
    soft_clip=4.0,
    seq_order="L2R",
)
# diffusers names -> reference names inside one Transformer layer
_LAYER_NAMES = {
    "attn.to_qkv": "attention.qkv",
    "attn.to_out": "attention.proj",
    "attn.norm_q": "attention.query_norm",
    "attn.norm_k": "attention.key_norm",
    "attn.norm_post": "attention.post_norm",
    "attn.norm": "attention.norm",
    "mlp.fc1": "mlp.main.0",
    "mlp.fc2": "mlp.main.2",
    "mlp.norm_post": "mlp.post_norm",
}


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


@pytest.mark.parametrize(
    "change, listed",
    [
        (lambda s: s.update({"blocks.2.proj_in.weight": torch.zeros(32, 4)}), "blocks.2.proj_in.weight"),  # unexpected
        (lambda s: s.update({"blocks.0.extra.weight": torch.zeros(1)}), "blocks.0.extra.weight"),  # no counterpart
        (lambda s: s.pop("blocks.1.final_norm.weight"), "blocks.1.final_norm.weight"),  # missing
        (lambda s: s.update({"blocks.0.proj_in.weight": torch.zeros(32, 5)}), "blocks.0.proj_in.weight"),  # shape
    ],
)
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
    result = subprocess.run(
        [
            sys.executable,
            str(CONVERTER_SCRIPT),
            "--checkpoint",
            str(tmp_path / "missing.pth"),
            "--config",
            str(tmp_path / "c.json"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "missing.pth" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# Bad checkpoints and configs: one line on stderr, exit status 2, nothing written
# --------------------------------------------------------------------------------------------------------------


def yaml_config(**changes):
    from test_reference_parity import training_yaml

    return training_yaml({**REFERENCE_KWARGS, **changes})


def _truncated(path):
    data = path.read_bytes()
    return data[: len(data) // 2]


def _with_value(value):
    def change(state):
        key = next(k for k in state if k.endswith("proj_in.weight"))
        state[key] = state[key].clone()
        state[key][0, 0] = value
        return state

    return change


# (what to do to the checkpoint / config, a word the error line must hold)
CONVERTER_CASES = [
    (dict(checkpoint="missing"), "missing.pth"),
    (dict(checkpoint_bytes=b""), "empty"),
    (dict(checkpoint_bytes="truncated"), "cannot be read"),
    (dict(checkpoint_bytes=b"\x00garbage" * 50), "cannot be read"),
    (dict(checkpoint_bytes=b"\x00garbage" * 50, suffix=".safetensors"), "cannot be read"),
    (dict(checkpoint_bytes="truncated", suffix=".safetensors"), "cannot be read"),
    (dict(payload=[1, 2, 3]), "not a state dict"),
    (dict(payload=torch.zeros(3)), "not a state dict"),
    (dict(payload={"step": 10}), "no tensors"),
    (dict(state=_with_value(float("nan"))), "NaN"),
    (dict(state=_with_value(float("inf"))), "--allow_nonfinite"),
    (dict(yaml="arguments:\n- channels: [32\n"), "not valid YAML"),
    (dict(yaml=yaml_config() + "- chanels: 32\n"), "chanels"),
    (dict(yaml=yaml_config(channels=-32)), "channels"),
    (dict(yaml=yaml_config(img_size="big")), "img_size"),
    (dict(yaml=yaml_config(norm_type="batch_norm")), "norm_type"),
    (dict(yaml="arguments: 3\n"), "arguments"),
    (dict(yaml="arguments:\n- just a string\n"), "arguments"),
    (dict(yaml_bytes=b"\xff\xfe\x00bin"), "not a text file"),
    (dict(json="{ not json"), "not valid JSON"),
    (dict(json=json.dumps([1, 2])), "model_kwargs"),
    (dict(kwargs={"adaln": 1}), "adaln"),
    (dict(kwargs={"channels": -32}), "channels"),
    (dict(kwargs={"channels": 32.5}), "channels"),
    (dict(kwargs={"layers_per_block": [0, 2]}), "layers_per_block"),
    (dict(kwargs={"soft_clip": float("nan")}), "soft_clip"),
    (dict(kwargs={"seq_order": "up"}), "seq_order"),
    (dict(kwargs={"patch_size": 3}), "patch_size"),
    (dict(kwargs={"num_heads": 0}), "num_heads"),
    (dict(kwargs={"channels": 30}), "config"),
    (dict(kwargs={"num_kv_heads": 3}), "buildable"),
    (dict(kwargs={"head_dim": 7}), "head_dim"),
    (dict(drop="num_blocks"), "num_blocks"),
    (dict(config="missing"), "missing.json"),
    (dict(argv=["--dtype", "float8"]), "--dtype"),
    (dict(output="file"), "--output"),
    (dict(output="nonempty"), "--overwrite"),
]


def _prepare(case, reference, tmp_path):
    """Checkpoint and config paths (and extra argv) for one case of CONVERTER_CASES."""
    _, state, good_checkpoint, config = reference
    checkpoint = tmp_path / ("ckpt" + case.get("suffix", ".pth"))
    if case.get("suffix") == ".safetensors":
        save_file(state, checkpoint)
    else:
        torch.save(case["state"](dict(state)) if "state" in case else state, checkpoint)
    if case.get("checkpoint_bytes") == "truncated":
        checkpoint.write_bytes(_truncated(checkpoint))
    elif "checkpoint_bytes" in case:
        checkpoint.write_bytes(case["checkpoint_bytes"])
    if "payload" in case:
        torch.save(case["payload"], checkpoint)
    if case.get("checkpoint") == "missing":
        checkpoint = tmp_path / "missing.pth"
    kwargs = {k: v for k, v in {**REFERENCE_KWARGS, **case.get("kwargs", {})}.items() if k != case.get("drop")}
    config.write_text(case.get("json", json.dumps({"model_kwargs": kwargs})))
    for key in ("yaml", "yaml_bytes"):
        if key in case:
            config = tmp_path / "config.yaml"
            data = case[key]
            config.write_bytes(data if isinstance(data, bytes) else data.encode())
    if case.get("config") == "missing":
        config = tmp_path / "missing.json"
    output = tmp_path / "out"
    if case.get("output") == "file":
        output.write_text("a file")
    elif case.get("output") == "nonempty":
        output.mkdir()
        (output / "keep.txt").write_text("old")
    return checkpoint, config, output, case.get("argv", [])


@pytest.mark.parametrize("case, word", CONVERTER_CASES)
def test_bad_checkpoint_or_config_is_one_line_and_exit_2(converter, reference, tmp_path, capsys, case, word):
    checkpoint, config, output, extra = _prepare(case, reference, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = run(converter, checkpoint, config, output, *extra)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert_starflow_to_diffusers.py: error:"), err
    assert word in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary folder left


def test_nonfinite_checkpoint_converts_only_with_the_flag(converter, reference, tmp_path):
    _, state, _, config = reference
    torch.save(_with_value(float("nan"))(dict(state)), tmp_path / "nan.pth")
    assert run(converter, tmp_path / "nan.pth", config, tmp_path / "refused") == 2
    assert run(converter, tmp_path / "nan.pth", config, tmp_path / "out", "--allow_nonfinite") == 0
    loaded = StarFlowTransformerModel.from_pretrained(tmp_path / "out")
    assert not all(torch.isfinite(p).all() for p in loaded.parameters())


def test_starflow2_convert_prefixes_its_errors(tmp_path, capsys):
    from diffusers_starflow2.cli import main

    assert (
        main(
            [
                "convert",
                "starflow",
                "--checkpoint",
                str(tmp_path / "x.pth"),
                "--config",
                str(tmp_path / "c.json"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("starflow2 convert starflow: error: checkpoint")

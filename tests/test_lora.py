"""StarFlow2LoraLoaderMixin and LoRA training: LoRA files load into a pipeline and change its output; adapter weights,
fusing and unloading behave like diffusers' other LoRA pipelines."""

import pytest
import torch
from conftest import sample_latents, stage1_argv, write_training_workdir  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict

from diffusers_starflow2 import StarFlow2Pipeline  # noqa: E402
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components  # noqa: E402
from diffusers_starflow2.training import train_starflow2 as train  # noqa: E402
from diffusers_starflow2.training.args import ArgumentError, parse_args  # noqa: E402
from diffusers_starflow2.training.lora import vlm_lora_targets  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A "pretrained" base (perturbed init: LoRA fine-tuning starts from non-zero output projections) and data."""
    return write_training_workdir(tmp_path_factory.mktemp("lora"), perturb=0.05, kinds=["caption"])


def add_random_lora(components, vlm=True):
    """Peft adapters with non-zero B (a trained-looking LoRA) on the deep stream and the VLM's attention."""
    torch.manual_seed(1)
    transformer = components["transformer"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_qkv", "to_out", "fc1", "fc2"]))
    models = [transformer]
    if vlm:
        targets = vlm_lora_targets(components["vlm"])
        components["vlm"].add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        models.append(components["vlm"])
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)


def test_save_load_switch_fuse_unload(tmp_path):
    source = build_tiny_starflow2_components(seed=0, perturb=0.05)
    add_random_lora(source)
    expected = sample_latents(StarFlow2Pipeline(**source))
    StarFlow2Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(source["transformer"]),
        vlm_lora_layers=get_peft_model_state_dict(source["vlm"]),
        transformer_lora_adapter_metadata=source["transformer"].peft_config["default"].to_dict(),
        vlm_lora_adapter_metadata=source["vlm"].peft_config["default"].to_dict(),
    )
    state_dict = StarFlow2Pipeline.lora_state_dict(tmp_path)
    assert {k.split(".")[0] for k in state_dict} == {"transformer", "vlm"}

    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0, perturb=0.05))
    base = sample_latents(pipe)
    pipe.load_lora_weights(tmp_path, adapter_name="shapes")
    assert pipe.get_list_adapters() == {"transformer": ["shapes"], "vlm": ["shapes"]}
    with_lora = sample_latents(pipe)
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, expected, atol=1e-6, rtol=0)  # loading restores the adapter exactly

    pipe.set_adapters(["shapes"], adapter_weights=[0.0])
    # float-level only: plain linears decode through oneDNN-packed weights, adapter-wrapped ones through the module
    torch.testing.assert_close(sample_latents(pipe), base, atol=1e-5, rtol=0)
    pipe.set_adapters(["shapes"], adapter_weights=[1.0])
    torch.testing.assert_close(sample_latents(pipe), with_lora, atol=1e-6, rtol=0)

    pipe.fuse_lora()
    torch.testing.assert_close(sample_latents(pipe), with_lora, atol=1e-5, rtol=0)
    pipe.unfuse_lora()
    torch.testing.assert_close(sample_latents(pipe), with_lora, atol=1e-5, rtol=0)

    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    torch.testing.assert_close(sample_latents(pipe), base, atol=1e-5, rtol=0)


def test_transformer_only_lora_and_bad_files(tmp_path):
    source = build_tiny_starflow2_components(seed=0, perturb=0.05)
    add_random_lora(source, vlm=False)
    layers = get_peft_model_state_dict(source["transformer"])
    StarFlow2Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers)  # no metadata: ranks from the weights
    pipe = StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0, perturb=0.05))
    pipe.load_lora_weights(tmp_path)
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}

    with pytest.raises(ValueError, match="transformer"):  # keys without a component prefix
        pipe.load_lora_weights(dict(layers))
    with pytest.raises(ValueError, match="at least one"):
        StarFlow2Pipeline.save_lora_weights(tmp_path)


def test_lora_training_writes_a_loadable_file(work, tmp_path):
    out = tmp_path / "run"
    argv = stage1_argv(
        work,
        out,
        3,
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--lora_rank",
        "4",
        "--lora_vlm",
        "--save_fused",
    )
    train.main(parse_args(argv))
    lora_file = out / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()
    state_dict = StarFlow2Pipeline.lora_state_dict(out)
    assert all("lora_" in k for k in state_dict) and {k.split(".")[0] for k in state_dict} == {"transformer", "vlm"}
    assert all(k.startswith("transformer.deep.layers.") for k in state_dict if k.startswith("transformer."))

    pipe = StarFlow2Pipeline.from_pretrained(work / "pipe")
    base = sample_latents(pipe)
    pipe.load_lora_weights(out, adapter_name="trained")
    with_lora = sample_latents(pipe)
    assert (with_lora - base).abs().max() > 1e-4
    pipe.set_adapters(["trained"], adapter_weights=[0.0])
    torch.testing.assert_close(sample_latents(pipe), base, atol=1e-6, rtol=0)

    fused = StarFlow2Pipeline.from_pretrained(out)  # --save_fused: a plain pipeline with the LoRA merged in
    assert not any("lora" in name for name, _ in fused.transformer.named_parameters())
    torch.testing.assert_close(sample_latents(fused), with_lora, atol=1e-4, rtol=0)


def test_lora_arguments(work, tmp_path):
    common = stage1_argv(work, tmp_path, 1)
    for extra, match in (
        (["--lora_rank", "-2"], "--lora_rank"),
        (["--save_fused"], "--save_fused"),
        (["--lora_rank", "4", "--lora_target_modules", "nope"], "--lora_target_modules"),
    ):
        with pytest.raises(ArgumentError, match=match):
            train.main(parse_args(common + extra))

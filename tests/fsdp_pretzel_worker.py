"""Run by tests/test_training_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): the Pretzel sharded with
torch FSDP2 ``fully_shard`` (each deep and shallow flow layer, then the whole model) next to a replicated frozen VLM
trains exactly like one unsharded process on the same global batch, and its gathered weights make a pipeline folder.

Usage: torchrun --nproc_per_node 2 tests/fsdp_pretzel_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from diffusers_starflow2 import PretzelModel, StarFlow2Pipeline
from diffusers_starflow2.models.flow_block import FlowTransformerLayer
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components
from diffusers_starflow2.training import train_starflow2 as train
from diffusers_starflow2.training.args import parse_args
from diffusers_starflow2.training.batches import BatchBuilder

GLOBAL_BATCH, STEPS, LR = 4, 2, 1e-2


def setup():
    components = build_tiny_starflow2_components(seed=0, perturb=0.05)
    args = parse_args(
        [
            "--stage",
            "1",
            "--pretrained_model_name_or_path",
            "-",
            "--output_dir",
            "-",
            "--max_train_steps",
            str(STEPS),
            "--caption_dropout",
            "0",
            "--latent_sample",
            "mean",
        ]
    )
    transformer = components["transformer"]
    train.configure_trainable(args, transformer, components["vlm"])
    transformer.train()
    build = BatchBuilder(
        args,
        components["tokenizer"],
        components["vae"],
        components["scheduler"],
        transformer.num_latents,
        torch.float32,
    )
    return components, build


def batches(step):
    gen = torch.Generator().manual_seed(step)
    return [
        {
            "kind": "caption",
            "image": torch.rand(3, 32, 32, generator=gen) * 2 - 1,
            "text": f"shape {i}",
            "position": step * GLOBAL_BATCH + i,
            "source": "caption",
        }
        for i in range(GLOBAL_BATCH)
    ]


def run(trainer, params, build, examples_of_step, steps=range(STEPS), optimizer=None, on_step=None):
    optimizer = optimizer or torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=1e-4)
    losses = []
    for step in steps:
        out = trainer(**build(examples_of_step(step), "cpu"))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out["loss"].detach())
        if on_step is not None:
            on_step(step, optimizer)
    return losses


def sharded_setup(mesh):
    components, build = setup()
    for module in components["transformer"].modules():
        if isinstance(module, FlowTransformerLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(components["transformer"], mesh=mesh)
    trainer = train.PretzelTrainer(components["transformer"], components["vlm"], train_vlm=False)
    return components, build, trainer


def main(out_dir: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    # one unsharded process on the global batch
    components, build = setup()
    reference = train.PretzelTrainer(components["transformer"], components["vlm"], train_vlm=False)
    ref_losses = run(reference, train.trainable_parameters(reference), build, batches)
    ref_state = {k: v.detach().clone() for k, v in components["transformer"].state_dict().items()}

    # the same model sharded over the processes, each on its share of the global batch; a sharded checkpoint
    # (torch.distributed.checkpoint: every process writes its shards) after the first step
    mesh = init_device_mesh("cpu", (world,))
    components, build, sharded = sharded_setup(mesh)
    transformer, vlm = components["transformer"], components["vlm"]
    vlm_before = {k: v.clone() for k, v in vlm.state_dict().items()}
    share = GLOBAL_BATCH // world
    my_share = lambda step: batches(step)[rank * share : (rank + 1) * share]  # noqa: E731
    checkpoint = out_dir / "sharded-checkpoint"

    def save(step, optimizer):
        if step == 0:
            model_state, optim_state = get_state_dict(transformer, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(checkpoint))

    local = run(sharded, train.trainable_parameters(sharded), build, my_share, on_step=save)
    sharded_numel = sum(p.to_local().numel() for p in transformer.parameters())
    full_numel = sum(p.numel() for p in transformer.parameters())
    losses = []
    for loss in local:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    state = get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # a fresh sharded model and optimizer resume from the checkpoint and take the second step
    resumed_components, build, resumed = sharded_setup(mesh)
    params = train.trainable_parameters(resumed)
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=1e-4)
    model_state, optim_state = get_state_dict(resumed_components["transformer"], optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=str(checkpoint))
    set_state_dict(
        resumed_components["transformer"], optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
    )
    resumed_loss = run(resumed, params, build, my_share, steps=range(1, STEPS), optimizer=optimizer)[0]
    dist.all_reduce(resumed_loss, op=dist.ReduceOp.AVG)
    resumed_state = get_model_state_dict(
        resumed_components["transformer"], options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    shard_files = sorted(p.name for p in checkpoint.iterdir())

    if rank == 0:
        worst = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
        moved = max(
            (ref_state[k] - v).abs().max().item()
            for k, v in build_tiny_starflow2_components(seed=0, perturb=0.05)["transformer"].state_dict().items()
        )
        model = PretzelModel.from_config(transformer.config)
        model.load_state_dict(state)
        pipe = StarFlow2Pipeline(**{**build_tiny_starflow2_components(seed=0, perturb=0.05), "transformer": model})
        pipe.save_pretrained(out_dir / "pipeline")
        report = {
            "losses": losses,
            "reference_losses": [x.item() for x in ref_losses],
            "max_weight_diff": worst,
            "max_weight_update": moved,
            "sharded_numel": sharded_numel,
            "full_numel": full_numel,
            "vlm_unchanged": all(torch.equal(vlm_before[k], v) for k, v in vlm.state_dict().items()),
            "vlm_replicated": not any(type(p).__name__ == "DTensor" for p in vlm.parameters()),
            "resumed_loss": resumed_loss.item(),
            "shard_files": shard_files,
            "resume_max_weight_diff": max((resumed_state[k] - state[k]).abs().max().item() for k in state),
        }
        (out_dir / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

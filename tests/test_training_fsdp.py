"""FSDP on CPU: the Pretzel sharded by torch FSDP2 over two gloo processes trains exactly like one process and its
sharded checkpoint resumes exactly; accelerate itself runs FSDP on accelerators only, and training/train_starflow2.py
says so instead of silently training unsharded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_pretzel_sharded_with_fsdp2_on_two_cpu_processes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests" / "fsdp_pretzel_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # each process holds half of the Pretzel (up to the padding of uneven shards); the frozen VLM is replicated
    assert abs(2 * report["sharded_numel"] - report["full_numel"]) < 0.01 * report["full_numel"]
    assert report["vlm_replicated"] and report["vlm_unchanged"]
    # the global-batch losses and the AdamW-updated weights of one unsharded process (float tolerance: the
    # reductions run in another order; the updates themselves are ~2e-2)
    assert report["losses"] == pytest.approx(report["reference_losses"], rel=1e-5, abs=1e-6)
    assert report["max_weight_diff"] < 1e-4 < report["max_weight_update"]
    # every process wrote its shard; resuming from them gives the uninterrupted second step exactly
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(report["shard_files"])
    assert report["resumed_loss"] == report["losses"][1] and report["resume_max_weight_diff"] == 0.0
    from diffusers_starflow2 import StarFlow2Pipeline

    StarFlow2Pipeline.from_pretrained(tmp_path / "pipeline")


def test_accelerate_fsdp_config_on_cpu_is_refused(tmp_path):
    from shapes_world.synthetic_world import write_world

    from diffusers_starflow2 import StarFlow2Pipeline
    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

    StarFlow2Pipeline(**build_tiny_starflow2_components(seed=0, perturb=0)).save_pretrained(tmp_path / "pipe")
    write_world(tmp_path / "world", num_images=2, seed=0, image_size=32, kinds=["caption"], progress=False)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "training" / "accelerate_configs" / "fsdp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        "0",
        str(REPO / "training" / "train_starflow2.py"),
        "--stage",
        "1",
        "--pretrained_model_name_or_path",
        str(tmp_path / "pipe"),
        "--train_data_dir",
        str(tmp_path / "world" / "caption"),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_train_steps",
        "1",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert (
        "train_starflow2.py: error: the accelerate config asks for FSDP (distributed_type: FSDP), but accelerate"
    ) in proc.stderr
    assert "set up MULTI_CPU on cpu: accelerate shards with FSDP on GPUs and other accelerators only" in proc.stderr
    assert not (tmp_path / "out" / "model_index.json").exists()

"""benchmarks/plan_memory.py on the tiny preset: the --json rows' schema, and the fake-tensor prediction against
the same step run on real tensors (the trackers' peak of the real run; the parameter bytes of the real model)."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "plan_memory.py")
KEYS = {
    "mode",
    "dtype",
    "batch_size",
    "num_gpus",
    "strategy",
    "gradient_checkpointing",
    "weights_gib",
    "grads_gib",
    "optimizer_gib",
    "kv_cache_per_image_gib",
    "activations_gib",
    "peak_gib",
}


def run(*args):
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def rows():
    # stage 1, one process, checkpointing off: one training row (and DDP over 8 adds its gradient buckets)
    args = ["--json", "--presets", "tiny", "--modes", "stage1", "--strategies", "ddp", "--num_gpus", "1,8"]
    return json.loads(run(*args, "--checkpointing", "off"))


def test_json_rows_schema(rows):
    assert len(rows) == 2
    for row in rows:
        assert KEYS <= set(row), KEYS - set(row)
        assert (row["mode"], row["dtype"], row["strategy"], row["gradient_checkpointing"]) == (
            "stage1",
            "bf16-mixed",
            "ddp",
            False,
        )
        assert row["weights_gib"] > 0 and row["optimizer_gib"] > 0 and row["activations_gib"] > 0
        parts = row["weights_gib"] + row["grads_gib"] + row["optimizer_gib"] + row["activations_gib"]
        assert row["peak_gib"] == pytest.approx(parts + row["ddp_buckets_gib"])
    one, eight = rows
    assert (one["num_gpus"], eight["num_gpus"]) == (1, 8)
    assert one["ddp_buckets_gib"] == 0 and eight["ddp_buckets_gib"] > 0
    assert eight["peak_gib"] == pytest.approx(one["peak_gib"] + eight["ddp_buckets_gib"], rel=0.02)


def test_prediction_matches_the_real_tiny_step(rows):
    import torch

    from diffusers_starflow2.testing_utils import build_tiny_starflow2_components

    components = build_tiny_starflow2_components(seed=0)
    row = dict(rows[0], dtype="fp32")
    spec = {k: row[k] for k in ("mode", "dtype", "batch_size", "num_gpus", "strategy", "gradient_checkpointing")}
    spec = json.dumps(dict(spec, preset="tiny"))
    fake = json.loads(run("--plan", spec).strip().splitlines()[-1])
    real = json.loads(run("--track", spec).strip().splitlines()[-1])
    # the same step on fake and on real tensors: the trackers see the same peak
    assert fake["peak_gib"] == pytest.approx(real["tracked_gib"], rel=0.1), (fake, real)
    # fp32 weights: every parameter and buffer of the three models
    tensors = [
        t for n in ("vlm", "transformer", "vae") for t in (*components[n].parameters(), *components[n].buffers())
    ]
    weights = sum(t.numel() * t.element_size() for t in tensors) / 2**30
    assert fake["weights_gib"] == pytest.approx(weights, rel=0.05)
    trainable = sum(
        p.numel()
        for n in ("shallow", "deep", "noise_embed")
        for p in getattr(components["transformer"], n).parameters()
    )
    assert fake["optimizer_gib"] >= 2 * trainable * 4 / 2**30 * 0.99  # AdamW's two moments in fp32
    assert torch.isfinite(torch.tensor(fake["peak_gib"]))


def test_paper_gpu_smoke_dry_run():
    """gpu_check.sh's paper-size section, its code run on the tiny preset on this CPU (no GPU here)."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "paper_gpu_smoke.py")
    out = subprocess.run(
        [sys.executable, script, "--dry-run", "--no-plan"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[0].startswith("| tiny on cpu") and len(lines) == 3
    for line in lines[1:]:
        seconds, gib = (float(v) for v in line.split("|")[2:4])
        assert seconds > 0 and gib > 0
    bad = subprocess.run(
        [sys.executable, script, "--train_batch_size", "0", "--dry-run"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--train_batch_size: 0" in bad.stderr

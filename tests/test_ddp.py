"""Real 2-process data parallel on CPU (gloo) through the documented launch command, for data paths
and models beyond the plain loader's MAE (that one is tests/test_distributed.py's reference run)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, TINY, accelerate_launch, env_without_accelerate
from safetensors.torch import load_file

from mae.config import load_config
from mae.models import build_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "extra",
    [
        ["data.on_device=true", "data.image_size=32"],
        ["train.compile=true", "train.accum_steps=2"],
        ["model.decoder=cross", "model.reconstruct_ratio=0.25", "model.decoder_features=weighted"],
    ],
    ids=["on_device", "compiled_accumulating", "crossmae"],
)
def test_two_cpu_processes_average_gradients_and_stay_in_sync(tmp_path, extra):
    out = tmp_path / "ddp"
    args = [
        *TINY,
        f"output_dir={out}",
        "train.max_steps=6",
        "train.blr=1e-2",
        "train.checkpoint_every=3",
        *extra,
    ]
    env = {**env_without_accelerate(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = accelerate_launch(
        str(Path(__file__).parent / "ddp_worker.py"), *args, processes=2, multi=True
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["compile"] == (
        "train.compile=true" in extra
    )

    derived = json.loads((out / "derived.json").read_text())
    accum = 2 if "train.accum_steps=2" in extra else 1
    assert derived["num_processes"] == 2 and derived["effective_batch"] == 16 * accum
    r0 = load_file(str(out / "rank0_of_2.safetensors"))
    r1 = load_file(str(out / "rank1_of_2.safetensors"))
    # Each process loads its own shard of every global batch ...
    seen0 = [tuple(x) for x in json.loads((out / "rank0_of_2.json").read_text())]
    seen1 = [tuple(x) for x in json.loads((out / "rank1_of_2.json").read_text())]
    # (the loader reads ahead)
    assert min(len(seen0), len(seen1)) >= 6 * 8 and not set(seen0) & set(seen1)
    # ... and computes its own gradients; only averaging them keeps the replicas identical.
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    init = build_model(load_config(None, [*TINY, *extra])).state_dict()
    assert not torch.equal(
        r0["encoder.blocks.0.attn.qkv.weight"], init["encoder.blocks.0.attn.qkv.weight"]
    )
    final = load_file(str(out / "checkpoints/step_6/model.safetensors"))
    assert all(torch.equal(final[k], r0[k]) for k in final)


def test_greedy_stages_run_data_parallel(tmp_path):
    """A stacked autoencoder leaves most parameters idle in each stage; DDP must expect that."""
    out = tmp_path / "stacked"
    args = [
        "model.name=stacked_ae",
        "data.image_size=16",
        "model.widths=[8,16]",
        "model.latent_dim=12",
        "model.stage_steps=2",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.max_steps=7",
        f"output_dir={out}",
    ]
    env = {**env_without_accelerate(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = accelerate_launch(
        str(Path(__file__).parent / "ddp_worker.py"), *args, processes=2, multi=True
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(out / "rank0_of_2.safetensors"))
    r1 = load_file(str(out / "rank1_of_2.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)

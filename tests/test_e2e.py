"""The README's main job, as a user runs it (slow: minutes on 2 CPU cores)."""

import fcntl
import json
import subprocess
import sys

import pytest
import timm
import torch
from helpers import ROOT, SHARED_CIFAR, TINY, accelerate_launch, env_without_accelerate

pytestmark = pytest.mark.slow


def test_accelerate_launch_default_recipe_30_steps(tmp_path):
    out = tmp_path / "run"
    cmd = accelerate_launch("pretrain.py", "train.max_steps=30", f"output_dir={out}")
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env_without_accelerate(), capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    derived = json.loads((out / "derived.json").read_text())
    assert derived["effective_batch"] == 128 and derived["lr"] == pytest.approx(0.001 * 128 / 256)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (out / "recon_30.png").stat().st_size > 0
    model = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)


@pytest.mark.skipif(
    not SHARED_CIFAR.is_dir(), reason=f"full CIFAR-10 copy not found at {SHARED_CIFAR}"
)
def test_pretrain_on_local_parquet_folder(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "pretrain.py",
        *TINY,
        f"data.dataset={SHARED_CIFAR}",
        "data.image_size=32",
        "train.max_steps=5",
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env_without_accelerate(), capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "derived.json").read_text())["dataset_size"] == 50000


def test_bad_config_fails_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "pretrain.py", "train.mask_ratio=0.5", f"output_dir={tmp_path / 'r'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: unknown config key 'train.mask_ratio'")
    )
    assert not (tmp_path / "r").exists()


def test_through_accelerate_launch_a_bad_command_is_one_line(tmp_path):
    """`accelerate launch -q`: the project's one line and nothing else on stderr. The launcher ends
    with 1 whatever its process's exit code (accelerate's `_run_subprocess`), so 2 for a bad
    config is for `python pretrain.py` (test_bad_config_fails_before_any_work)."""
    out = tmp_path / "run"
    busy = tmp_path / "busy"
    busy.mkdir()
    cases = [
        (["train.blrr=1"], "error: unknown config key 'train.blrr'; did you mean 'train.blr'?"),
        ([f"data.dataset={tmp_path / 'missing'}"], f"error: data.dataset='{tmp_path / 'missing'}'"),
        (["data.image_size=3"], "error: data.image_size=3 is smaller than model.patch_size=4"),
        ([f"output_dir={busy}"], f"error: {busy} is in use by"),  # a run that cannot go on
    ]
    with open(busy / "run.lock", "w") as lock:  # held, as a live run holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        for args, start in cases:
            cmd = accelerate_launch("pretrain.py", f"output_dir={out}", *args)
            cmd.insert(cmd.index("accelerate.commands.launch") + 1, "-q")
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env_without_accelerate(), capture_output=True, text=True
            )
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
            assert lines[0].startswith(start), lines
            assert not out.exists()

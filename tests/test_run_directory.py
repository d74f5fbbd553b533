"""A run directory that checks what it resumes from (checkpoint manifests) and admits
one writer (run.lock)."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, env_without_accelerate
from safetensors.torch import load_file

from mae import pretrain
from mae.config import load_config
from mae.run import checkpoint
from mae.run.lock import LOCK, RunDirBusyError, RunLock

COMMON = ["train.max_steps=20", "train.checkpoint_every=10", "train.blr=1e-2", "train.log_every=1"]


def run(out: Path, *extra: str) -> pretrain.RunResult:
    return pretrain.train(load_config(None, [*TINY, *COMMON, f"output_dir={out}", *extra]))


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps, checkpoints at 10 and 20."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(out)
    return out


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, name", [(cut_in_half, "model.safetensors"), (flip_one_byte, "optimizer.bin")]
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(
    straight, tmp_path, capsys, damage, name
):
    out = tmp_path / "run"
    run(out)
    assert (out / "checkpoints/step_20" / checkpoint.MANIFEST).is_file()
    damage(out / "checkpoints/step_20" / name)
    capsys.readouterr()
    result = run(out)
    said = capsys.readouterr().out
    assert (
        f"checkpoints/step_20 is damaged ({name} " in said
        and "set aside as damaged-step_20" in said
    ), said
    assert "at step 10" in said  # resumed from the checkpoint before
    assert (out / "checkpoints/damaged-step_20" / name).is_file()  # kept for inspection
    assert result.steps == 20
    a = load_file(str(straight / "checkpoints/step_20/model.safetensors"))
    b = load_file(str(out / "checkpoints/step_20/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == [
        json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
def test_with_no_checkpoint_that_verifies_the_run_stops_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    run(out, "train.keep_checkpoints=1")
    cut_in_half(out / "checkpoints/step_20/model.safetensors")
    before = digests(out)
    proc = subprocess.run(
        [
            sys.executable,
            "pretrain.py",
            *TINY,
            *COMMON,
            "train.keep_checkpoints=1",
            f"output_dir={out}",
        ],
        cwd=ROOT,
        env=env_without_accelerate(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error: no checkpoint in ") and "step_20: model.safetensors has " in line
    ), line
    assert digests(out) == before


def test_verification_names_a_missing_file_and_a_bad_manifest(tmp_path):
    folder = tmp_path / "step_1"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"x" * 10)
    (folder / checkpoint.LOOP_STATE).write_text("{}")
    checkpoint.write_manifest(folder)
    assert checkpoint.verify(folder) is None
    (folder / "a.bin").unlink()
    assert checkpoint.verify(folder) == "a.bin is missing"
    (folder / checkpoint.MANIFEST).write_text("{")
    assert checkpoint.verify(folder) == f"{checkpoint.MANIFEST} is unreadable"


@pytest.mark.slow
def test_a_second_launch_into_a_held_directory_is_refused_and_changes_nothing(straight, tmp_path):
    out = tmp_path / "run"
    run(out, "train.max_steps=10")
    holder = RunLock(out)  # this test process is the live holder
    assert holder.acquire() is None
    try:
        before = digests(out)
        proc = subprocess.run(
            [sys.executable, "pretrain.py", *TINY, *COMMON, f"output_dir={out}"],
            cwd=ROOT,
            env=env_without_accelerate(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {out} is in use by pid {os.getpid()} on "), line
        assert digests(out) == before
        with pytest.raises(RunDirBusyError):  # a second holder in the same process is refused too
            RunLock(out).acquire()
    finally:
        holder.release()
    assert not (out / LOCK).exists()
    run(out)  # free again: the run goes on


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_line_that_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(
        json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "2026-01-01T00:00:00"})
    )
    result = run(out, "train.max_steps=2")
    said = capsys.readouterr().out
    assert f"took over the stale lock {out / LOCK}: its holder, pid {dead.pid} on elsewhere" in said
    assert result.steps == 2 and not (out / LOCK).exists()  # released at the end


@pytest.mark.slow
def test_a_launch_while_another_trains_is_refused(tmp_path):
    """The real case: a requeued job whose first copy is still running."""
    out = tmp_path / "run"
    worker = str(Path(__file__).parent / "crash_worker.py")
    # 20 steps of 1 s: the second launch starts (imports, data) well within the first's run, even
    # on a busy machine
    env = {**env_without_accelerate(), "STEP_SLEEP": "1.0"}
    first = subprocess.Popen(
        [sys.executable, worker, *TINY, *COMMON, f"output_dir={out}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, "pretrain.py", *TINY, *COMMON, f"output_dir={out}"],
            cwd=ROOT,
            env=env_without_accelerate(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1 and f"is in use by pid {first.pid} on " in second.stderr, (
            second.stderr
        )
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    # one writer: every step logged once
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 20

"""Scale and survive: process-layout equivalence, preemption, kill -9 at random points, bad input.

Real processes are started and killed here; each test says what it injects and what must hold."""

import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    TINY,
    accelerate_launch,
    env_without_accelerate,
    parquet_stream,
    reset_accelerate,
    start_session,
    torchrun,
    write_image_folder,
)
from PIL import Image
from safetensors.torch import load_file

from mae import pretrain
from mae.config import Config, load_config
from mae.run import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resilience")]  # one reference run
WORKER = str(Path(__file__).parent / "crash_worker.py")
EXACT = [*TINY, "train.mixed_precision=no", "train.log_every=1"]


def final_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoints/step_{step}/model.safetensors"))


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: 'unchanged byte for byte'."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def launch(out: Path, *args: str, **env: str) -> subprocess.Popen:
    """``pretrain.py`` in its own process (group), through ``crash_worker.py``."""
    environ = {**env_without_accelerate(), "OMP_NUM_THREADS": "2", **env}
    cmd = [sys.executable, WORKER, *EXACT, f"output_dir={out}", *args]
    return start_session(cmd, environ)


def run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = launch(out, *args, **env)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "decoder",
    [
        [],
        ["model.decoder=cross", "model.reconstruct_ratio=0.25"],
        ["train.masks_per_image=2", "model.target=teacher", "model.teacher_layers=2"],
    ],
    ids=["mae", "cross", "masks+teacher"],
)
def test_two_processes_end_where_one_process_with_the_same_global_batch_ends(tmp_path, decoder):
    """2 processes x batch 4 (gloo) against 1 process x batch 8: the same samples per step, the same
    crops and masks (and CrossMAE's predicted patches) per sample, drawn from each sample's own
    seed, averaged gradients."""
    args = [*EXACT, "train.max_steps=4", "train.blr=1e-2", "train.checkpoint_every=4", *decoder]
    one = run(tmp_path / "one", *args[len(EXACT) :], "train.batch_size=8")
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**env_without_accelerate(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = accelerate_launch(
        str(ROOT / "pretrain.py"),
        *args,
        "train.batch_size=4",
        f"output_dir={tmp_path / 'two'}",
        processes=2,
        multi=True,
    )
    two = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two/derived.json").read_text())["num_processes"] == 2
    a, b = final_weights(tmp_path / "one", 4), final_weights(tmp_path / "two", 4)
    lr = 1e-2 * 8 / 256
    for k in a:
        x, y = a[k], b[k]
        if k.endswith(("attn.qkv.bias", "cross_attn.kv.bias")):
            # The key bias shifts every logit of a query equally, so softmax makes its gradient
            # exactly 0; in floats it is rounding noise, which Adam scales to steps of up to lr.
            # Bounded, not equal.
            cross = k.endswith("cross_attn.kv.bias")  # [k, v]; a self-attention's qkv: [q, k, v]
            dim = x.shape[0] // (2 if cross else 3)
            start = 0 if cross else dim
            assert (x[start : start + dim] - y[start : start + dim]).abs().max() <= 4 * lr, k
            x, y = (
                torch.cat([x[:start], x[start + dim :]]),
                torch.cat([y[:start], y[start + dim :]]),
            )
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)
    losses = [
        [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (tmp_path / "one", tmp_path / "two")
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert len(losses[0]) == 4 and losses[0][0] != losses[0][-1]  # four steps that did train


def test_two_processes_stream_disjoint_parts_and_resume_from_their_own_positions(tmp_path):
    """data.streaming=true under 2 gloo processes x 2 workers: each process checkpoints its own
    stream position; a relaunch for more steps resumes both and finishes."""
    data = parquet_stream(tmp_path / "data", shards=4, per_shard=16)
    env = {**env_without_accelerate(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    common = [
        *EXACT,
        "data.streaming=true",
        f"data.dataset={data}",
        "data.label_column=label",
        "data.stream_size=64",
        "data.num_workers=2",
        "train.batch_size=4",
        "train.checkpoint_every=3",
        f"output_dir={tmp_path / 'run'}",
    ]

    def launch_two(steps):
        cmd = accelerate_launch(
            str(ROOT / "pretrain.py"), *common, f"train.max_steps={steps}", processes=2, multi=True
        )
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    first = launch_two(3)
    assert first.returncode == 0, first.stderr[-3000:]
    states = [
        json.loads((tmp_path / f"run/checkpoints/step_3/process_{r}.json").read_text())
        for r in (0, 1)
    ]
    assert all(s["batches"] == 3 and s["num_processes"] == 2 for s in states)
    again = launch_two(6)
    assert again.returncode == 0 and "at step 3" in again.stdout, again.stderr[-3000:]
    assert checkpoint.latest_checkpoint(tmp_path / "run") == tmp_path / "run/checkpoints/step_6"
    assert [
        json.loads((tmp_path / f"run/checkpoints/step_6/process_{r}.json").read_text())["batches"]
        for r in (0, 1)
    ] == [6, 6]


def test_processes_that_do_not_form_a_group_are_refused(tmp_path, monkeypatch):
    """A launcher starting 2 processes which never join one group would train the same run twice."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        pretrain.ConfigError, match="2 processes were launched but they do not form one group"
    ):
        pretrain.train(
            load_config(None, [*EXACT, f"output_dir={tmp_path / 'run'}", "train.max_steps=1"])
        )
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run: 12 steps, a checkpoint every 3; its run directory."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run(out, "train.max_steps=12", "train.checkpoint_every=3", "data.num_workers=1")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def reference(reference_run):
    return final_weights(reference_run, 12)


def assert_same(weights, reference):
    assert weights.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(weights[k], v), k


def test_sigterm_writes_a_checkpoint_and_the_relaunch_ends_identically(tmp_path, reference):
    out = tmp_path / "run"
    args = ("train.max_steps=12", "train.checkpoint_every=3", "data.num_workers=1")
    proc = launch(out, *args, STEP_SLEEP="0.3")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) >= 4
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as schedulers do: the loader worker too
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error: stopped by SIGTERM after step ")
        and "launch the same command again" in line
    )
    step = int(line.split("after step ")[1].split()[0])
    assert 4 <= step < 12 and (out / f"checkpoints/step_{step}/loop_state.json").is_file()
    again = run(out, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {step}" in again.stdout
    assert_same(final_weights(out, 12), reference)


def test_sigterm_stops_every_process_at_the_same_step(tmp_path):
    """2 gloo processes: the signal reaches them at different moments, still one checkpoint."""
    out = tmp_path / "run"
    args = [
        *EXACT,
        f"output_dir={out}",
        "train.batch_size=4",
        "train.max_steps=30",
        "train.checkpoint_every=100",
    ]
    env = {
        **env_without_accelerate(),
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "STEP_SLEEP": "0.3",
    }
    cmd = accelerate_launch(WORKER, *args, processes=2, multi=True)
    proc = start_session(cmd, env)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) >= 3
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    stops = sorted(
        {
            line.split("after step ")[1].split()[0]
            for line in stderr.splitlines()
            if "stopped by" in line
        }
    )
    assert proc.returncode != 0 and len(stops) == 1, stderr[-3000:]
    step = int(stops[0])
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == [
        f"step_{step}"
    ] and 3 <= step < 30
    env.pop("STEP_SLEEP")
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"at step {step}" in again.stdout, again.stderr[-3000:]
    assert checkpoint.latest_checkpoint(out) == out / "checkpoints/step_30"


def test_kill_9_at_random_moments_loses_nothing_and_ends_identically(tmp_path, reference):
    """SIGKILL at seeded random times (start-up, mid-step, mid-checkpoint), then once exactly inside
    a checkpoint write; every complete checkpoint must stay loadable, and the last relaunch must end
    with the uninterrupted run's weights, bit for bit."""
    out, mark = tmp_path / "run", tmp_path / "saving"
    args = ("train.max_steps=12", "train.checkpoint_every=3", "data.num_workers=1")
    rng = random.Random(7)
    kills = []
    for attempt in range(6):
        # First, exactly inside a checkpoint write, after its files and before the commit, so
        # that a checkpoint is still to come however fast the machine runs the random attempts
        if attempt == 0:
            proc = launch(out, *args, STEP_SLEEP="0.2", SAVE_SLEEP="5", SAVE_MARK=str(mark))
            deadline = time.time() + 300
            while not mark.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            if not mark.exists():
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(
                    f"no checkpoint write began (exit {proc.poll()}): "
                    f"{proc.communicate()[1][-2000:]}"
                )
            kills.append(("in checkpoint write", mark.read_text()))
        else:
            proc = launch(out, *args, STEP_SLEEP="0.2")
            delay = rng.uniform(1.0, 9.0)
            time.sleep(delay)
            kills.append((f"after {delay:.1f} s", None))
        if proc.poll() is not None:  # finished before the kill came
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        # never a complete-looking broken checkpoint
        for folder in checkpoint.complete_checkpoints(out):
            load_file(str(folder / "model.safetensors"))
            json.loads((folder / checkpoint.LOOP_STATE).read_text())
    print("kills:", kills, "checkpoints:", [p.name for p in checkpoint.complete_checkpoints(out)])
    assert any(k[1] for k in kills), kills
    done = run(out, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list((out / "checkpoints").glob("tmp-*"))
    assert_same(final_weights(out, 12), reference)


def test_a_full_disk_while_checkpointing_stops_cleanly_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    """ENOSPC in the middle of the second checkpoint's write (a partial file already out)."""
    out = tmp_path / "run"
    cfg = load_config(
        None, [*EXACT, f"output_dir={out}", "train.max_steps=6", "train.checkpoint_every=2"]
    )
    save, seen = checkpoint.Accelerator.save_state, {}

    def full_disk(self, path, *a, **k):
        if "step_4" not in str(path):
            return save(self, path, *a, **k)
        seen["step_2"] = digests(out / "checkpoints/step_2")
        Path(path, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.Accelerator, "save_state", full_disk)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"could not write the checkpoint of step 4.*No space left"
    ):
        pretrain.train(cfg)
    assert digests(out / "checkpoints/step_2") == seen["step_2"]
    assert not (out / "checkpoints/step_4").exists() and not list(
        (out / "checkpoints").glob("tmp-*")
    )
    assert checkpoint.latest_checkpoint(out) == out / "checkpoints/step_2"


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mae_resilience_pwned",))


@pytest.mark.parametrize("victim", ["random_states_0.pkl", "optimizer.bin"])
def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path, victim):
    out = tmp_path / "run"
    pretrain.train(
        load_config(
            None, [*EXACT, f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2"]
        )
    )
    reset_accelerate()
    torch.save({"state": RunsCode()}, out / "checkpoints/step_2" / victim)
    with pytest.raises(
        checkpoint.CheckpointError, match=f"no checkpoint in .* verifies \\(step_2: {victim} has "
    ):
        pretrain.train(load_config(None, [*EXACT, f"output_dir={out}", "train.max_steps=4"]))
    # a file planted with its manifest: still never run
    checkpoint.write_manifest(out / "checkpoints/step_2")
    before = digests(out / "checkpoints")
    Path("/tmp/mae_resilience_pwned").unlink(missing_ok=True)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read as plain data"):
        pretrain.train(load_config(None, [*EXACT, f"output_dir={out}", "train.max_steps=4"]))
    assert not Path("/tmp/mae_resilience_pwned").exists() and digests(out / "checkpoints") == before


# ---------------------------------------------------------------------------------------- bad input


def bad_folder(root: Path) -> Path:
    """Good images, and what real folders hold: a zero-byte file, a truncated JPEG, text named .jpg,
    a 16-bit PNG, a 1x1 image, a CMYK JPEG, a palette PNG, and a non-image file."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / f"c{c}/{i}.png"
            )
    (root / "c0/empty.png").write_bytes(b"")
    jpeg = root / "c0/truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (root / "c1/notes.jpg").write_text("not an image")
    Image.fromarray((rng.integers(0, 65536, (20, 20))).astype(np.uint16)).save(root / "c1/deep.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "c1/dot.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(root / "c0/cmyk.jpg")
    Image.new("P", (20, 20), 3).save(root / "c0/palette.png")
    (root / "c0/README.txt").write_text("a file that is not an image at all")
    return root


def test_undecodable_images_are_skipped_counted_and_listed(tmp_path):
    data = bad_folder(tmp_path / "data")
    out = tmp_path / "run"
    done = run(
        out,
        f"data.dataset={data}",
        "train.max_steps=8",
        "train.batch_size=4",
        "data.max_bad_images=3",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    listed = {
        Path(json.loads(x)["source"]).name
        for x in (out / pretrain.BAD_IMAGES).read_text().splitlines()
    }
    assert listed == {"empty.png", "truncated.jpg", "notes.jpg"}


def test_an_error_after_training_with_loader_workers_open_ends_the_process_with_that_error(
    tmp_path,
):
    # the workers ignore SIGTERM (they are the main process's to stop), so multiprocessing's exit
    # hook alone would wait for them forever; at exit they are killed, and the run's own error is
    # the last word
    args = (
        f"data.dataset={write_image_folder(tmp_path / 'data')}",
        "train.max_steps=3",
        "data.num_workers=2",
    )
    proc = launch(tmp_path / "run", *args, EXPORT_FAIL="export failed on purpose")
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the process did not end after its error")
    assert proc.returncode == 1
    assert stderr.strip().splitlines()[-1] == "RuntimeError: export failed on purpose"
    # trained and checkpointed before the export
    assert (tmp_path / "run" / "checkpoints" / "step_3").is_dir()


def test_more_bad_images_than_allowed_stop_the_run_and_keep_its_checkpoints(tmp_path):
    data = bad_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = (
        f"data.dataset={data}",
        "train.batch_size=4",
        "data.max_bad_images=1",
        "train.log_every=6",
    )
    # before any bad image is met
    first = run(out, *args, "train.max_steps=2", "train.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-2000:]
    before = digests(out / "checkpoints/step_2")
    stopped = run(out, *args, "train.max_steps=12", "train.checkpoint_every=2")
    assert stopped.returncode == 1
    error = stopped.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "more than data.max_bad_images=1" in error
    # the line names the first bad file met, and the fix
    assert re.search(r"(empty.png|truncated.jpg|notes.jpg) cannot be decoded", error), error
    assert "raise data.max_bad_images, and launch again to resume" in error
    assert digests(out / "checkpoints/step_2") == before
    # as the line says: raised, the run resumes and ends
    raised = [a.replace("max_bad_images=1", "max_bad_images=3") for a in args]
    resumed = run(out, *raised, "train.max_steps=12", "train.checkpoint_every=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_other_modes_and_depths_become_the_configured_channels():
    from mae.data.images import to_mode

    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_mode(deep, "RGB")).min() == 255
    mid = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    # Pillow alone would clip it to 255
    assert abs(int(np.asarray(to_mode(mid, "L"))[0, 0]) - 128) <= 1
    assert to_mode(Image.new("CMYK", (2, 2)), "RGB").mode == "RGB"
    assert to_mode(Image.new("RGBA", (2, 2)), "L").mode == "L"
    floats = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert abs(int(np.asarray(to_mode(floats, "L"))[0, 0]) - 128) <= 1


def test_an_image_over_the_decompression_limit_is_a_bad_image(tmp_path, monkeypatch):
    from mae.config import DataConfig
    from mae.data.images import ImageDataset, eval_transform
    from mae.data.loading import DataError, load_split

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(data / "a/big.png")
    Image.new("RGB", (8, 8)).save(data / "a/small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: a "bomb"
    cfg = DataConfig(
        dataset=str(data), image_size=8, num_workers=0, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    ds = load_split(cfg)
    paths = ds.cast_column("image", datasets.Image(decode=False))["image"]
    big = next(i for i, p in enumerate(paths) if p["path"].endswith("big.png"))
    with pytest.raises(DataError, match=r"big.png.*cannot be decoded.*DecompressionBombError"):
        ImageDataset(ds, cfg.columns, eval_transform(cfg))[big]
    log = tmp_path / "bad.jsonl"
    x, _ = ImageDataset(ds, cfg.columns, eval_transform(cfg), bad_log=log)[big]
    assert x.shape == (3, 8, 8) and "DecompressionBombError" in log.read_text()


def test_an_empty_folder_and_missing_labels_are_one_line_errors(tmp_path, capsys):
    from mae.cli import main
    from mae.config.evaluation import EvalConfig, load_eval_config
    from mae.eval.probe import probe

    (tmp_path / "empty/a").mkdir(parents=True)
    (tmp_path / "flat").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"flat/{i}.png")
    code = main(
        "pretrain",
        Config,
        load_config,
        pretrain.train,
        [f"data.dataset={tmp_path / 'empty'}", f"output_dir={tmp_path / 'r'}"],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "doesn't contain any data files" in err[0]
    assert not (tmp_path / "r").exists()
    code = main(
        "probe",
        EvalConfig,
        load_eval_config,
        probe,
        ["encoder=pixels:8", f"data.dataset={tmp_path / 'flat'}", f"output_dir={tmp_path / 'p'}"],
    )
    # datasets
    err = [
        x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("Generating")
    ]
    assert (
        code == 2
        and len(err) == 1
        and err[0].startswith("error: ")
        and "has no ClassLabel column" in err[0]
    )


# A step of 3 s (inside the forward, where a signal may drop it) and a checkpoint write of 3 s:
# finishing the step, then saving, takes longer than the 5 s `accelerate launch` leaves its
# process between SIGTERM and SIGKILL.
SLOW = {"LOSS_SLEEP": "3", "SAVE_SLEEP": "3"}
TWELVE = ("train.max_steps=12", "train.checkpoint_every=100", "data.num_workers=1")


def stopped_and_resumed(cmd, out, signum, reference_run):
    """Start ``cmd`` (its own session), send ``signum`` to the launcher alone after two whole
    steps, then relaunch without slow-downs: the checkpoint is the last whole step before the
    signal, and the resumed run ends with the reference's export. Returns the launcher's exit."""
    env = {**env_without_accelerate(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "2"}
    proc = start_session(cmd, {**env, **SLOW})
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) >= 2
    ):
        time.sleep(0.05)
    whole = len(metrics.read_text().splitlines())  # steps done; the next one is in flight
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert "stopping; writing a checkpoint of the last whole step" in stderr, stderr[-3000:]
    stop = [line for line in stderr.splitlines() if "stopped by SIGTERM after step " in line]
    assert stop, stderr[-3000:]
    step = int(stop[-1].split("after step ")[1].split()[0])
    assert whole <= step <= whole + 1, (whole, step)  # nothing lost but the step in flight
    assert checkpoint.latest_checkpoint(out) == out / f"checkpoints/step_{step}"
    again = run(out, *TWELVE)
    assert again.returncode == 0 and f"at step {step}" in again.stdout, again.stderr[-3000:]
    assert digests(out / "export") == digests(reference_run / "export")
    return proc.returncode


def test_sigint_to_accelerate_launch_keeps_every_whole_step(tmp_path, reference_run):
    """Ctrl-C reaches `accelerate launch`, which gives its process 5 s after SIGTERM: the process
    drops the step in flight and saves the last whole one within them."""
    out = tmp_path / "run"
    cmd = accelerate_launch(WORKER, *EXACT, f"output_dir={out}", *TWELVE)
    assert stopped_and_resumed(cmd, out, signal.SIGINT, reference_run) == 130


def test_sigterm_to_torchrun_keeps_every_whole_step(tmp_path, reference_run):
    out = tmp_path / "run"
    cmd = torchrun(WORKER, *EXACT, f"output_dir={out}", *TWELVE, processes=1)
    assert stopped_and_resumed(cmd, out, signal.SIGTERM, reference_run) != 0


def test_a_checkpoint_between_metric_lines_resumes_the_same_lines(tmp_path, reference_run):
    """A clock checkpoint (train.checkpoint_minutes) or a signal's lands between metric lines: it
    keeps the running sums, so the resumed run writes the uninterrupted run's lines, bit for bit.
    Here: a checkpoint after every step (by the clock), killed after step 7 of 12, lines every 5."""
    out = tmp_path / "run"
    args = (*TWELVE, "train.log_every=5", "train.checkpoint_minutes=0.0001")
    proc = launch(out, *args, CRASH_AT_STEP="7", CRASH_MARK=str(tmp_path / "crashed"))
    proc.communicate(timeout=300)
    assert proc.returncode == 3 and checkpoint.latest_checkpoint(out).name == "step_7"
    again = run(out, *args)
    assert again.returncode == 0 and "at step 7" in again.stdout, again.stderr[-3000:]
    mine = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the reference logs every step; a line's loss is the fp32 running sum over its window
    # divided by its length, which these sums redo in the same order
    each = [
        json.loads(x)["loss"] for x in (reference_run / "metrics.jsonl").read_text().splitlines()
    ]
    expected = []
    for first, last in ((1, 5), (6, 10), (11, 12)):
        total = torch.zeros((), dtype=torch.float32)
        for loss in each[first - 1 : last]:
            total += torch.tensor(loss, dtype=torch.float32)
        expected.append((last, total.item() / (last - first + 1)))
    assert [(r["step"], r["loss"]) for r in mine] == expected

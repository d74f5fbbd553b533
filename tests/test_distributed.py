"""Distributed launches as docs/distributed.md gives them, on CPU with gloo: FSDP against DDP, two
machines on one host, a machine that stops or dies, and torchrun's restarts. Every run trains the
same 20 steps; the 2-process DDP run of one machine is the reference (made once in each of the two
xdist groups, FSDP and machines, which run side by side)."""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import timm
import torch
from helpers import (
    ROOT,
    TINY,
    env_without_accelerate,
    free_port,
    reset_accelerate,
    start_session,
    torchrun,
)
from safetensors.torch import load_file

from mae import pretrain
from mae.config import ConfigError, load_config
from mae.interop import load_weights
from mae.models import build_model

CONFIGS = ROOT / "configs" / "accelerate"
WORKER = str(Path(__file__).parent / "ddp_worker.py")
CRASHER = str(Path(__file__).parent / "crash_worker.py")
STEPS = 20
ARGS = [
    *TINY,
    "train.blr=1e-2",
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=10",
    "train.log_every=1",
    "train.cpu_threads=1",
    "train.mixed_precision=no",
]
ENV = {**env_without_accelerate(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def launch_cmd(
    script: str, *args: str, config: str, port: int, machines: int = 1, rank: int = 0
) -> list[str]:
    """``accelerate launch`` with one of configs/accelerate/, 2 processes in all, as documented."""
    where = [
        "--num_machines",
        str(machines),
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
    ]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        "2",
        *where,
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        script,
        *args,
    ]


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    return start_session(cmd, {**ENV, **env})


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(cmd: list[str], **env: str) -> str:
    code, out, err = finish(start(cmd, **env))
    assert code == 0, err[-3000:]
    return out


def two_machines(script: str, out: Path, *extra: str, **env: str) -> list[subprocess.Popen]:
    """Machines 0 and 1 on this host, one process each (configs/accelerate/multi_node.yaml)."""
    port = free_port()
    args = [*ARGS, f"output_dir={out}", *extra]
    return [
        start(
            launch_cmd(script, *args, config="multi_node.yaml", port=port, machines=2, rank=r),
            **env,
        )
        for r in (0, 1)
    ]


def run_two_machines(script: str, out: Path, *extra: str) -> list[str]:
    """Both machines to the end, each successful; their standard outputs."""
    results = [finish(p) for p in two_machines(script, out, *extra)]
    assert all(code == 0 for code, _, _ in results), "".join(err[-3000:] for _, _, err in results)
    return [stdout for _, stdout, _ in results]


def kill_machine(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to a launcher and every process it started (torch's launcher starts its workers in
    sessions of their own, so the launcher's process group does not reach them)."""
    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in family:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for(path: Path, deadline_s: float = 180) -> None:
    deadline = time.time() + deadline_s
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def losses(run_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def export(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rel, atol=rel * b[k].abs().max().item()), k


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """The reference: 2 processes, DDP, one machine (configs/accelerate/cpu_ddp.yaml)."""
    out = tmp_path_factory.mktemp("dist") / "ddp"
    run(launch_cmd(WORKER, *ARGS, f"output_dir={out}", config="cpu_ddp.yaml", port=free_port()))
    return out


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "fsdp"
    run(launch_cmd(WORKER, *ARGS, f"output_dir={out}", config="fsdp.yaml", port=free_port()))
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_ddp_processes_read_disjoint_shards_and_stay_identical(ddp):
    seen = [
        {tuple(x) for x in json.loads((ddp / f"rank{r}_of_2.json").read_text())} for r in (0, 1)
    ]
    assert min(map(len, seen)) >= STEPS * 8 and not seen[0] & seen[1]  # (the loader reads ahead)
    r0, r1 = (load_file(str(ddp / f"rank{r}_of_2.safetensors")) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # only averaged gradients keep them so
    final = load_file(str(ddp / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    assert all(torch.equal(final[k], r0[k]) for k in final)
    init = build_model(load_config(None, ARGS)).state_dict()
    key = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(r0[key], init[key])


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_fsdp_is_recorded_and_really_shards_the_parameters(ddp, fsdp):
    assert json.loads((fsdp / "derived.json").read_text())["distributed"] == {
        "type": "fsdp",
        "backend": "gloo",
        "world_size": 2,
        "machines": 1,
        "device": "cpu",
        "fsdp_version": 2,
        "checkpoints": "sharded",
    }
    assert json.loads((ddp / "derived.json").read_text())["distributed"]["type"] == "ddp"
    held = [json.loads((fsdp / f"held_{r}.json").read_text()) for r in (0, 1)]
    total = held[0]["total"]
    # each its slice
    assert all(h["held"] < total for h in held) and sum(h["held"] for h in held) == total
    # replicas
    assert all(json.loads((ddp / f"held_{r}.json").read_text())["held"] == total for r in (0, 1))
    step = fsdp / "checkpoints" / f"step_{STEPS}"
    assert len(list((step / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert not (step / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_fsdp_losses_equal_ddp_at_every_step(ddp, fsdp):
    a, b = losses(fsdp), losses(ddp)
    assert len(a) == len(b) == STEPS
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b, strict=True)), (a, b)


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_the_fsdp_export_loads_in_timm_and_equals_ddp(ddp, fsdp):
    assert_close(export(fsdp), export(ddp), rel=1e-5)
    models = [
        timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
        for run in (fsdp, ddp)
    ]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(
            models[0].forward_features(x), models[1].forward_features(x), rtol=1e-4, atol=1e-5
        )


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_an_fsdp_checkpoint_is_read_whole_by_one_process(ddp, fsdp):
    """``init=RUN/checkpoints/step_N`` takes an FSDP checkpoint's shards as it takes
    a DDP checkpoint's file."""
    sharded = load_weights(fsdp / "checkpoints" / f"step_{STEPS}")
    assert_close(sharded, load_weights(ddp / "checkpoints" / f"step_{STEPS}"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_fsdp_resumes_after_sigkill_to_the_uninterrupted_run(tmp_path, fsdp):
    out = tmp_path / "killed"
    cmd = launch_cmd(CRASHER, *ARGS, f"output_dir={out}", config="fsdp.yaml", port=free_port())
    proc = start(cmd, STEP_SLEEP="0.3")
    wait_for(out / "checkpoints" / "step_10" / "loop_state.json")
    kill_machine(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "checkpoints" / f"step_{STEPS}").exists()
    again = run(
        launch_cmd(CRASHER, *ARGS, f"output_dir={out}", config="fsdp.yaml", port=free_port())
    )
    assert "resumed from" in again and "at step 10" in again
    assert losses(out) == losses(fsdp)  # the steps after the checkpoint are the same computation
    assert_close(export(out), export(fsdp), rel=0.0)


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_fsdp_compiled_training_equals_ddp(ddp, tmp_path):
    out = tmp_path / "compiled"
    run(
        launch_cmd(
            WORKER,
            *ARGS,
            f"output_dir={out}",
            "train.compile=true",
            config="fsdp.yaml",
            port=free_port(),
        )
    )
    assert json.loads((out / "derived.json").read_text())["distributed"]["type"] == "fsdp"
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(losses(out), losses(ddp), strict=True))


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_fsdp_fine_tunes(ddp, tmp_path):
    out = tmp_path / "finetuned"
    args = [
        "mode=finetune",
        f"encoder={ddp}",
        f"output_dir={out}",
        "data.num_workers=0",
        "finetune.max_steps=4",
        "finetune.batch_size=4",
        "finetune.mixed_precision=no",
        "finetune.cpu_threads=1",
    ]
    run(launch_cmd(str(ROOT / "finetune.py"), *args, config="fsdp.yaml", port=free_port()))
    assert json.loads((out / "derived.json").read_text())["distributed"]["type"] == "fsdp"
    assert json.loads((out / "results.json").read_text())["steps"] == 4
    assert list((out / "checkpoints" / "step_4" / "pytorch_model_fsdp_0").glob("*.distcp"))
    # gathered from the shards
    clf = timm.create_model(f"local-dir:{out / 'last'}", pretrained=True)
    assert clf.head.weight.shape[0] == 10


@pytest.mark.slow
@pytest.mark.xdist_group("machines")
def test_two_machines_on_one_host_end_with_the_single_machine_weights(ddp, tmp_path):
    out = tmp_path / "two"
    run_two_machines(WORKER, out)
    assert json.loads((out / "derived.json").read_text())["distributed"]["machines"] == 2
    assert_close(export(out), export(ddp), rel=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("machines")
def test_sigterm_to_one_machine_stops_both_at_one_step_and_they_resume_exactly(ddp, tmp_path):
    out = tmp_path / "stopped"
    procs = two_machines(CRASHER, out, "train.checkpoint_every=100", STEP_SLEEP="0.3")
    wait_for(out / "metrics.jsonl")
    while len(losses(out)) < 3:
        time.sleep(0.05)
    # machine 1's launcher only, as a scheduler would stop that node
    procs[1].send_signal(signal.SIGTERM)
    results = [finish(p, 120) for p in procs]
    stops = {
        line.split("after step ")[1].split()[0]
        for _, _, err in results
        for line in err.splitlines()
        if "stopped by SIGTERM" in line
    }
    assert all(code != 0 for code, _, _ in results) and len(stops) == 1, results[1][2][-3000:]
    step = int(stops.pop())
    assert (
        sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{step}"] and step < STEPS
    )
    assert f"at step {step}" in run_two_machines(CRASHER, out, "train.checkpoint_every=100")[0]
    assert_close(export(out), export(ddp), rel=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("machines")
def test_a_machine_that_dies_stops_the_other_within_the_timeout_and_both_resume(ddp, tmp_path):
    out = tmp_path / "died"
    procs = two_machines(CRASHER, out, "train.dist_timeout=30", STEP_SLEEP="0.3")
    wait_for(out / "checkpoints" / "step_10" / "loop_state.json")
    kill_machine(procs[1], signal.SIGKILL)
    tic = time.time()
    code, _, err = finish(procs[0], 120)
    assert code != 0 and time.time() - tic < 60, err[-3000:]
    assert "train.dist_timeout=30" in err and "Relaunch every machine" in err, err[-3000:]
    assert "at step 10" in run_two_machines(CRASHER, out, "train.dist_timeout=30")[0]
    assert_close(export(out), export(ddp), rel=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("machines")
def test_a_machine_that_stops_answering_stops_the_other_at_the_timeout(tmp_path):
    out = tmp_path / "hung"
    procs = two_machines(CRASHER, out, "train.dist_timeout=10", STEP_SLEEP="0.3")
    wait_for(out / "checkpoints" / "step_10" / "loop_state.json")
    kill_machine(procs[1], signal.SIGSTOP)  # alive, connections open, never answering
    tic = time.time()
    try:
        code, _, err = finish(procs[0], 120)
    finally:
        kill_machine(procs[1], signal.SIGKILL)
        procs[1].wait(timeout=60)
    # (a collective may start just before the stop)
    assert code != 0 and 9 <= time.time() - tic < 60, err[-3000:]
    assert "train.dist_timeout=10" in err and "Timed out" in err, err[-3000:]


@pytest.mark.slow
@pytest.mark.xdist_group("machines")
def test_torchrun_restarts_a_crashed_job_which_resumes_by_itself(ddp, tmp_path):
    out = tmp_path / "restarted"
    mark = tmp_path / "crashed"
    cmd = torchrun(CRASHER, *ARGS, f"output_dir={out}", processes=2, restarts=1)
    stdout = run(
        cmd,
        CRASH_AT_STEP="13",
        CRASH_RANK="1",
        CRASH_MARK=str(mark),
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    assert mark.read_text() == "13"  # it did crash once
    assert "at step 10" in stdout
    assert_close(export(out), export(ddp), rel=1e-6)


@pytest.fixture
def one_process_group(monkeypatch):
    """A 1-process gloo group in this process, as ``torchrun --nproc_per_node 1`` would make it."""
    # (unset, Accelerate sets it for good)
    env = {
        "ACCELERATE_USE_CPU": "true",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    reset_accelerate()
    # the group's last references can sit in reference cycles (Accelerate's state, FSDP's
    # meshes): collected now, before a later test in this process forks DataLoader workers
    gc.collect()


# What ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` puts in the environment
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
}


def fsdp_env(monkeypatch):
    for k, v in FSDP_ENV.items():
        monkeypatch.setenv(k, v)


def test_restarts_through_a_shared_launcher_store_are_refused(tmp_path, monkeypatch):
    # what torchrun --max-restarts 3 gives its processes
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(
        ConfigError, match="launch it with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set"
    ):
        pretrain.train(load_config(None, [*ARGS, f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()
    # with the variable set, torchrun says so
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert (
        pretrain.train(
            load_config(None, [*ARGS, f"output_dir={tmp_path / 'run'}", "train.max_steps=1"])
        ).steps
        == 1
    )


def test_a_launch_that_asks_for_fsdp_without_a_process_group_is_refused(tmp_path, monkeypatch):
    # e.g. python pretrain.py with the variables set, or a GPU-less launch without
    # ACCELERATE_USE_CPU
    fsdp_env(monkeypatch)
    with pytest.raises(
        ConfigError, match="the launch asks for FSDP but Accelerate set up NO on cpu"
    ):
        pretrain.train(load_config(None, [*ARGS, f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["model.name=ae", "model.widths=[8,16]", "model.latent_dim=12"],
            "FSDP shards transformer blocks and model.name=ae has none",
        ),
        (["train.online_probe=true"], "train.online_probe=true does not run under FSDP"),
    ],
    ids=["no_blocks", "online_probe"],
)
def test_what_fsdp_cannot_shard_is_refused(
    tmp_path, monkeypatch, one_process_group, extra, message
):
    fsdp_env(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        pretrain.train(load_config(None, [*ARGS, f"output_dir={tmp_path / 'run'}", *extra]))


def test_one_fsdp_process_on_cpu_trains_and_records_it(tmp_path, monkeypatch, one_process_group):
    fsdp_env(monkeypatch)
    result = pretrain.train(
        load_config(None, [*ARGS, f"output_dir={tmp_path / 'run'}", "train.max_steps=2"])
    )
    derived = json.loads((tmp_path / "run" / "derived.json").read_text())["distributed"]
    assert derived["type"] == "fsdp" and derived["world_size"] == 1 and result.steps == 2
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "pytorch_model_fsdp_0").is_dir()


def test_one_fsdp_process_trains_masks_and_a_teacher(tmp_path, monkeypatch, one_process_group):
    """Under FSDP the teacher's parameters are shards (DTensors) too: it follows the student shard
    by shard, and the checkpoint holds it."""
    fsdp_env(monkeypatch)
    extra = ["model.target=teacher", "model.teacher_layers=2", "train.masks_per_image=2"]
    run = tmp_path / "run"
    result = pretrain.train(
        load_config(None, [*ARGS, f"output_dir={run}", "train.max_steps=3", *extra])
    )
    assert result.steps == 3 and (run / "checkpoints/step_3/pytorch_model_fsdp_0").is_dir()
    teacher = dict(result.model.teacher.encoder.named_parameters())
    student = dict(result.model.encoder.named_parameters())
    assert teacher.keys() == student.keys()
    assert not all(torch.equal(teacher[k], student[k]) for k in student)  # behind it

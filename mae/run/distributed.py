"""What a run really runs under (one process, DDP or FSDP), said and recorded; FSDP on CPU; a lost
peer.

Accelerate picks the distributed type from the launch. Two of its outcomes are silent, and both are
handled here:

- A launch that asks for FSDP (``ACCELERATE_USE_FSDP=true``, which ``accelerate launch`` sets from
  ``distributed_type: FSDP`` or ``--use_fsdp``) gets FSDP only for GPU-like process groups. On CPU
  processes (gloo, Accelerate's ``MULTI_CPU``) Accelerate 1.15 drops the FSDP plugin and runs plain
  DDP, with nothing said (``AcceleratorState.__init__``). PyTorch's FSDP2 (``fully_shard``) runs on
  CPU with gloo, so ``enable_fsdp`` sets the state the way Accelerate sets it on GPUs; every other
  launch that asks for FSDP and would not get it is refused.
- A process that dies leaves the others blocked in a collective. Every process group is made with
  ``train.dist_timeout`` (``finetune.dist_timeout``), and a collective that fails or times out ends
  the run with ``PeerLostError``, which names the timeout and the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    parse_flag_from_env,
)

from mae.config import ConfigError
from mae.errors import UserError
from mae.run import checkpoint as ckpt

FSDP_UNIT = "Block"  # timm's transformer block: the shard unit of configs/accelerate/fsdp.yaml
# The Accelerate releases whose AcceleratorState.__init__ _set_fsdp_state was checked against.
FSDP_ON_CPU_CHECKED = "accelerate 1.15.0 and 1.16.0"
# A backend's failed or timed-out collective: NCCL raises DistBackendError; gloo a plain
# RuntimeError whose message names its transport ("gloo/transport/tcp/pair.cc: Connection closed
# by peer", "unbound_buffer.cc: Timed out waiting 30000ms for recv operation to complete").
COLLECTIVE_FAILED = (
    "gloo/transport",
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL",
)


class PeerLostError(UserError, RuntimeError):
    """A collective failed or timed out: another process or machine of the run stopped."""

    exit_code = 1


def asks_for_fsdp() -> bool:
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def process_group_kwargs(timeout_s: int) -> InitProcessGroupKwargs:
    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))


def check_restartable() -> None:
    """Refuse a torchrun (or ``accelerate launch``) with restarts whose restarts would fail by
    chance.

    By default torchrun's agent shares its rendezvous store with the processes, and the keys of one
    attempt outlive it: a restarted process can read the previous attempt's addresses and fail to
    connect (pytorch/pytorch#135712; measured with gloo: 4 restarts in 5 failed with "Gloo
    connectFullMesh failed ... Connection refused"). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set
    for the launcher, each attempt has a store of its own (6 in 6 restarted)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError(
            f"this launch restarts up to {restarts} times, and with the launcher's shared store a "
            "restart can fail to connect (pytorch/pytorch#135712); launch it with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set"
        )


def enable_fsdp(accelerator: Accelerator, key: str) -> None:
    """Make the launch's FSDP request real, or refuse it. Called right after ``Accelerator()``,
    before anything is prepared."""
    if not asks_for_fsdp() or accelerator.distributed_type == DistributedType.FSDP:
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(
            f"the launch asks for FSDP but Accelerate set up {accelerator.distributed_type.value} "
            f"on {accelerator.device.type}, which would train unsharded; FSDP needs a process "
            "group: launch with accelerate launch --config_file configs/accelerate/fsdp.yaml "
            "(without a GPU, with ACCELERATE_USE_CPU=true)"
        )
    # from the launch's FSDP_* environment, as Accelerate builds it
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(
            f"FSDP on CPU runs FSDP2 only and the launch asks for version {plugin.fsdp_version}; "
            "set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml has it)"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    _set_fsdp_state(accelerator, plugin, key)


def _set_fsdp_state(
    accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin, key: str
) -> None:
    """Set Accelerate's state to FSDP with ``plugin``, as ``AcceleratorState.__init__`` does for a
    GPU process group.

    No public API fits: ``Accelerator(fsdp_plugin=...)`` (``AcceleratorState(fsdp_plugin=...)``)
    drops the plugin unless the process group is GPU-like (``MULTI_CPU`` is not in the list that
    gets FSDP), and no environment variable changes the distributed type it reads. This is the one
    place that overrides it, through the states' public attributes: ``PartialState`` and
    ``AcceleratorState`` are shared-state singletons (every instance is a view of one dict), and
    every ``AcceleratorState()`` copies the ``PartialState``'s values into its own, so both must
    say FSDP. The result is read back through fresh instances: an Accelerate whose states stopped
    sharing (or refuse the write) is refused with the fix instead of training unsharded."""
    why = ""
    try:
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        state = AcceleratorState()
        took = (
            PartialState().distributed_type == DistributedType.FSDP
            and state.distributed_type == DistributedType.FSDP
            and state.fsdp_plugin is plugin
            and accelerator.is_fsdp2
        )
    except (AttributeError, TypeError, ValueError) as e:
        took, why = False, f" ({type(e).__name__}: {e})"
    if not took:
        raise ConfigError(
            "FSDP on CPU sets Accelerate's state after Accelerator(), which works with "
            f"{FSDP_ON_CPU_CHECKED} but not with the installed {accelerate.__version__}{why}; "
            f"run {key} with DDP (configs/accelerate/cpu_ddp.yaml), or with FSDP on GPUs"
        )


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_shardable(accelerator: Accelerator, model: torch.nn.Module, what: str) -> None:
    """FSDP shards one unit per transformer block: refuse a model without any, naming the fix."""
    if not is_sharded(accelerator):
        return
    if not any(type(m).__name__ == FSDP_UNIT for m in model.modules()):
        raise ConfigError(
            f"FSDP shards transformer blocks and {what} has none; train it with DDP "
            "(configs/accelerate/multi_gpu.yaml, or cpu_ddp.yaml without a GPU)"
        )


def describe(accelerator: Accelerator) -> dict[str, Any]:
    """The distributed setup as recorded in ``derived.json``."""
    world = accelerator.num_processes
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    kind = "fsdp" if is_sharded(accelerator) else ("ddp" if world > 1 else "single")
    record: dict[str, Any] = {
        "type": kind,
        "backend": accelerator.state.backend if world > 1 or kind == "fsdp" else None,
        "world_size": world,
        "machines": max(1, world // max(1, per_machine)),
        "device": accelerator.device.type,
    }
    if kind == "fsdp":
        plugin = accelerator.state.fsdp_plugin
        record["fsdp_version"] = plugin.fsdp_version
        record["checkpoints"] = (
            "sharded" if plugin.state_dict_type.name == "SHARDED_STATE_DICT" else "full"
        )
    return record


def summary(record: dict[str, Any]) -> str:
    """One line for the setup printout."""
    if record["type"] == "single":
        return f"distributed: none (one process on {record['device']})"
    kind = "FSDP2" if record["type"] == "fsdp" else "DDP"
    line = (
        f"distributed: {kind} over {record['world_size']} processes on {record['machines']} machine"
        f"{'s' if record['machines'] > 1 else ''} ({record['backend']}, {record['device']})"
    )
    if record["type"] == "fsdp":
        line += f"; checkpoints {record['checkpoints']}"
    return line


@contextlib.contextmanager
def same_init_everywhere(accelerator: Accelerator, seed: int) -> Iterator[None]:
    """Every process draws the model's initial weights from the main process's seed. DDP broadcasts
    the main process's weights when it wraps the model; FSDP keeps each process's own slice of its
    own copy, so under FSDP the copies must be equal to begin with. (The main process's stream is
    the one it would have used anyway: the weights equal a DDP run's.)"""
    if not is_sharded(accelerator) or accelerator.is_main_process:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def peers_watched(
    accelerator: Accelerator, run_dir: Path, timeout_key: str, timeout_s: int
) -> Iterator[None]:
    """Turn a failed or timed-out collective into ``PeerLostError``, with the fix."""
    try:
        yield
    except RuntimeError as e:
        lost = isinstance(e, torch.distributed.DistError) or any(
            s in str(e) for s in COLLECTIVE_FAILED
        )
        if accelerator.num_processes == 1 or not lost or isinstance(e, UserError):
            raise
        # without gloo's [source.cc:line] prefix
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())
        first = text.splitlines()[0] if text else type(e).__name__
        last = ckpt.latest_checkpoint(run_dir)
        raise PeerLostError(
            f"another process of the run stopped or stopped answering ({type(e).__name__}: "
            f"{first[:200]}); a collective waits at most {timeout_key}={timeout_s} s. Relaunch "
            "every machine with the same command to resume from "
            f"{last or 'the start (no checkpoint yet)'}"
        ) from e

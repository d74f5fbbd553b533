"""The run directory's own files: ``config.yaml``, ``derived.json``, ``metrics.jsonl``, and the
check that a relaunch resumes the same run (the checkpoints themselves are
``mae.run.checkpoint``'s)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from mae.config import ConfigError, Derived, read_yaml, to_dict
from mae.run import console, distributed

# Derived values a resumed run must share with the run it continues.
RESUME_INVARIANTS = ("num_processes", "dataset_size", "effective_batch", "steps_per_epoch")
# Keys of the training section (``train`` or ``finetune``) that may change between a run and its
# resumption: they do not change what is learned up to the resume point.
SECTION_RESUMABLE = (
    "epochs",
    "max_steps",
    "log_every",
    "keep_checkpoints",
    "checkpoint_minutes",
    "cpu_threads",
    "dist_timeout",
    "log_with",
)


def resumable_keys(section: str, *extra: str) -> set[str]:
    """The dotted keys that may differ when ``section``'s run is resumed (``extra``: the job's
    own)."""
    return {
        "output_dir",
        "data.num_workers",
        # the fix a run stopped by its bad images names: raise it and launch again
        "data.max_bad_images",
        *(f"{section}.{k}" for k in SECTION_RESUMABLE),
        *extra,
    }


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(
    accelerator: Accelerator,
    run_dir: Path,
    cfg: Any,
    derived: Derived,
    resumable: set[str],
    read: Callable[[dict[str, Any]], Any],
) -> None:
    """Refuse to resume a run whose saved config (read back by ``read``) or data/process layout
    differs in anything that shapes training."""
    missing = [n for n in ("config.yaml", "derived.json") if not (run_dir / n).is_file()]
    if missing:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds checkpoints but not the run's "
            f"{' and '.join(missing)}, so whether they can be resumed cannot be checked; restore "
            "the files, or use another output_dir"
        )
    old, new = flat(to_dict(read(read_yaml(run_dir / "config.yaml")))), flat(to_dict(cfg))
    diff = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(new)
        if k not in resumable and old.get(k) != new.get(k)
    ]
    if diff:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds a run with a different config ({'; '.join(diff)}); "
            "use another output_dir, or the run's own config.yaml to resume it"
        )
    before = json.loads((run_dir / "derived.json").read_text())
    changed = [
        f"{k}: {before.get(k)} -> {getattr(derived, k)}"
        for k in RESUME_INVARIANTS
        if before.get(k) != getattr(derived, k)
    ]
    if changed:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds a run made with another data/process layout "
            f"({'; '.join(changed)}); resume it with the same number of processes and dataset, or "
            "use another output_dir"
        )
    was = before.get("distributed", {}).get("type")  # (not recorded by older runs)
    now = distributed.describe(accelerator)["type"]
    # sharded and whole checkpoints differ in kind
    if was is not None and was != now and "fsdp" in (was, now):
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds a run trained under {was} and this launch runs "
            f"{now}; its checkpoints are {'sharded' if was == 'fsdp' else 'whole'}: resume it with "
            "the launch it was made with"
        )


def start_run(
    accelerator: Accelerator,
    run_dir: Path,
    cfg: Any,
    derived: Derived,
    name: str,
    extra: dict | None = None,
) -> None:
    """Write ``config.yaml`` and ``derived.json`` (main process), with the distributed setup the run
    really has and ``extra`` records, and start the trackers."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        record = (
            dataclasses.asdict(derived)
            | {"distributed": distributed.describe(accelerator)}
            | (extra or {})
        )
        (run_dir / "derived.json").write_text(json.dumps(record, indent=1))
        console.keep()  # a run now: its console goes into train.log
    hparams = {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in flat(to_dict(cfg)).items()
    }
    # its files here
    accelerator.init_trackers(name, config=hparams, init_kwargs={"wandb": {"dir": str(run_dir)}})


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (logged after the checkpoint a run resumes from, or by an
    earlier run that never checkpointed), so every step appears once."""
    if not path.is_file():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))

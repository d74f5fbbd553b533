"""Crash-safe checkpoints in ``RUN_DIR/checkpoints/step_<N>/``.

A checkpoint is Accelerate's state (model, optimizer, RNG streams of every process) plus
``loop_state.json``. It is written to a ``tmp-step_<N>`` folder and renamed into place only
when complete, so a crash mid-save never leaves a folder that looks complete; leftovers are
removed at the next start. The newest ``keep`` complete checkpoints are kept.

Before the rename, ``manifest.json`` records each file's size and sha256. A resume verifies the
newest checkpoint against it (``verify``) and, if a file was cut short, altered or lost later (a
partial copy, a failing disk), sets that checkpoint aside as ``damaged-step_<N>`` and takes the
newest one that verifies (``set_aside_damaged``). Hashing reads every byte once, at about the
speed of reading the checkpoint back (``python bench/checkpoint_verify.py`` measures it against
loading).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from mae.errors import UserError

LOOP_STATE = "loop_state.json"
MANIFEST = "manifest.json"
PROCESS_STATE = "process_{rank}.json"
SHARDED_MODEL = "pytorch_model_fsdp_0"  # Accelerate's folder for an FSDP model's shards
_COMPLETE = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, OSError):
    """A checkpoint could not be written; the earlier ones are untouched."""

    exit_code = 1


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _COMPLETE.match(p.name)) and (p / LOOP_STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial(output_dir: str | Path) -> None:
    """Clean up after a save that never finished (main process only): delete ``tmp-`` folders; put
    back an ``old-step_N`` whose replacement was never committed."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob("tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob("old-step_*"):
            final = root / p.name.removeprefix("old-")
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:  # the crash came between setting it aside and committing its replacement
                os.replace(p, final)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    loop_state: dict[str, Any],
    keep: int,
    process_state: dict[str, Any] | None = None,
) -> Path:
    """Collective: every process must call it. Returns the completed checkpoint folder.
    ``process_state``: this process's own plain data (e.g. where its data stream stands), kept as
    ``process_{rank}.json`` and read back by ``read_process_state``."""
    root = checkpoint_root(output_dir)
    final, tmp = root / f"step_{step}", root / f"tmp-step_{step}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if process_state is not None:
            (tmp / PROCESS_STATE.format(rank=accelerator.process_index)).write_text(
                json.dumps(process_state)
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / LOOP_STATE).write_text(json.dumps({"step": step, **loop_state}, indent=1))
            write_manifest(tmp)
            _fsync_tree(tmp)
    except (OSError, RuntimeError) as e:
        # disk full, quota, permissions: the complete checkpoints stay as they are (torch.save
        # reports a failed write as a RuntimeError that says so)
        if isinstance(e, RuntimeError) and "writ" not in str(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(output_dir)
        raise CheckpointError(
            f"could not write the checkpoint of step {step} in {root} ({e}); the newest complete "
            f"one is {last or 'none'}: free space (or fix the folder) and launch again to resume "
            "from it"
        ) from e
    if accelerator.is_main_process:
        stale = root / f"old-step_{step}"
        if final.exists():  # the same step saved again (e.g. after a resume): set the old one aside
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(root)
        shutil.rmtree(stale, ignore_errors=True)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL: the model and optimizer
    files, the bulk of a checkpoint, hash on separate cores)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1, 8))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and sha256 of every file under ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = _sha256_all(files)
    entries = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": d}
        for p, d in zip(files, digests, strict=True)
    }
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify(folder: Path) -> str | None:
    """What is wrong with the checkpoint in ``folder`` against its manifest, or None when every file
    is there with its size and sha256 (a checkpoint written before manifests existed passes
    unchecked)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in files.items():  # sizes first: a cut file is found without reading anything
        size = (folder / name).stat().st_size if (folder / name).is_file() else None
        if size != entry["size"]:
            return (
                f"{name} is missing"
                if size is None
                else f"{name} has {size} of its {entry['size']} bytes"
            )
    digests = _sha256_all([folder / name for name in files])
    for (name, entry), digest in zip(files.items(), digests, strict=True):
        if digest != entry["sha256"]:
            return f"{name} has changed since it was written (sha256)"
    return None


def set_aside_damaged(output_dir: str | Path, say: Any = print) -> str | None:
    """Main process, before a resume: verify the newest complete checkpoint; while it fails, rename
    it ``damaged-step_<N>`` (kept for inspection), saying so in one line, and try the one before.
    Returns an error message when checkpoints exist but none verifies (then nothing is renamed),
    else None."""
    found = complete_checkpoints(output_dir)
    problems = []
    for path in reversed(found):
        problem = verify(path)
        if problem is None:
            for damaged, why in problems:
                os.replace(damaged, damaged.with_name(f"damaged-{damaged.name}"))
                say(f"checkpoint {damaged} is damaged ({why}); set aside as damaged-{damaged.name}")
            return None
        problems.append((path, problem))
    if not problems:
        return None
    listed = "; ".join(f"{p.name}: {why}" for p, why in problems)
    return (
        f"no checkpoint in {checkpoint_root(output_dir)} verifies ({listed}); restore the damaged "
        f"files, or move {checkpoint_root(output_dir)} away to start the run over"
    )


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore Accelerate state from ``path``; returns its loop state.

    Accelerate reads every pickled file with ``weights_only=True`` (no code runs), but a
    random-state file that fails to load is skipped with a log line, which would make the resume
    silently inexact: those files are read first here, with the reader ``load_state`` uses
    (``accelerate.utils.load``: ``torch.load`` that allows the numpy types of the RNG states), and
    a failure stops the run naming the file."""
    for f in sorted(path.glob("random_states_*.pkl")):
        try:
            accelerate_load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever the unpickler raises, the file is unusable
            raise CheckpointError(
                f"{f} cannot be read as plain data ({type(e).__name__}); it is never unpickled in "
                f"full (that could run code): delete {path} to resume from the checkpoint before "
                "it, or start in a new output_dir"
            ) from e
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as e:  # weights_only refused an object: one that would run code
        raise CheckpointError(
            f"{path} holds a file that cannot be read as plain data ({e.__class__.__name__}); it "
            f"is never unpickled in full (that could run code): delete {path} to resume from the "
            "checkpoint before it"
        ) from e
    return json.loads((path / LOOP_STATE).read_text())


def read_sharded_model(folder: Path) -> dict[str, Any] | None:
    """The whole model of an FSDP checkpoint (``torch.distributed.checkpoint`` shards), read in this
    one process; None when ``folder`` is not one. Through DCP's public converter: reading the shards
    directly needs its private planner."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    shards = folder / SHARDED_MODEL
    if not (shards / ".metadata").is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(shards), f"{tmp}/model.pt")
        return torch.load(f"{tmp}/model.pt", map_location="cpu", weights_only=True)["model"]


def read_process_state(path: Path, rank: int) -> dict[str, Any] | None:
    """What process ``rank`` gave ``save_checkpoint`` as ``process_state`` (None: nothing)."""
    f = path / PROCESS_STATE.format(rank=rank)
    return json.loads(f.read_text()) if f.is_file() else None

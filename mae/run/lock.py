"""One writer per run directory: the main process holds ``RUN_DIR/run.lock`` while it runs.

The lock is an exclusive ``fcntl.flock`` on that file, which records its holder (pid, host, start
time). The kernel drops the lock when the holder dies however it dies, so a lock whose file still
names a holder but that can be taken again is stale: it is taken over, with a line that says so.
A launch that finds the lock held is refused before it touches anything in the directory, with
one line naming the holder. (``flock`` works on local file systems and on NFSv4; Accelerate's
``ProjectConfiguration`` has no such lock, and the third-party file-lock packages would add a
dependency for these few lines.)
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mae.errors import UserError

LOCK = "run.lock"


class RunDirBusyError(UserError, RuntimeError):
    """The run directory is held by another live run."""

    exit_code = 1


class RunLock:
    """``acquire`` -> a takeover note or None (raises ``RunDirBusyError`` while held);
    ``release``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path, self.fd, self.created = run_dir, run_dir / LOCK, None, False

    def acquire(self) -> str | None:
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise RunDirBusyError(
                    f"{self.run_dir} is in use by {holder} (lock {self.path}); wait for that run "
                    "to end or stop it, or give another output_dir"
                ) from None
            # not a file a finishing holder unlinked between our open and flock
            if self._same_file(fd):
                break
            os.close(fd)
        previous = self._holder(fd)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        if previous == "nobody":
            return None
        return f"took over the stale lock {self.path}: its holder, {previous}, is no longer running"

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # before the unlock, so no one locks a file that is about to go
            os.close(self.fd)
            self.fd = None
            if self.created:  # a run that stopped before writing anything leaves no folder behind
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(fd: int) -> str:
        """'pid N on HOST since TIME' from the lock file, or 'nobody' (empty), or what it holds."""
        raw = os.pread(fd, 4096, 0).decode(errors="replace")
        if not raw.strip():
            return "nobody"
        try:
            h = json.loads(raw)
            return f"pid {h['pid']} on {h['host']} since {h['started']}"
        except (ValueError, KeyError, TypeError):
            return f"an unknown holder ({raw[:80]!r})"


@contextlib.contextmanager
def hold_run_dir(accelerator: Accelerator, run_dir: Path) -> Iterator[None]:
    """Collective: the main process holds ``run_dir``'s lock for the block; if another run holds it,
    every process raises ``RunDirBusyError`` before anything in ``run_dir`` changes."""
    lock = RunLock(run_dir)
    refused = None
    if accelerator.is_main_process:
        try:
            note = lock.acquire()
            if note:
                accelerator.print(note)
        except RunDirBusyError as e:
            refused = str(e)
    if accelerator.num_processes > 1:
        refused = broadcast_object_list([refused])[0]
    if refused is not None:
        raise RunDirBusyError(refused)
    try:
        yield
    finally:
        lock.release()

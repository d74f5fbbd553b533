"""SIGTERM / SIGINT: write a checkpoint, exit.

Schedulers announce preemption with SIGTERM (SLURM at the time limit or on preemption, Kubernetes,
``torchrun`` forwarding its own), and Ctrl-C sends SIGINT. ``StopSignals`` turns the first one
into a request that the training loop polls between optimizer steps; every process then agrees
(``requested`` is collective when there are several) so they all stop at the same step and write
the same checkpoint. A second signal of the same kind ends the process at once (the usual way).
DataLoader workers ignore both (``ignore_in_worker``): a signal sent to the whole process group
must not kill the workers the final checkpoint still needs.

Launchers give a stopping process a grace period before SIGKILL: ``accelerate launch`` of one
process 5 s, ``torchrun`` 30 s, SLURM its ``KillWait``. A slow step eats into it, so a single
process does not finish the step it is in: inside ``interruptible`` (the forward and backward) the
signal raises ``StepAbandoned``, the weights and the optimizer are still those of the last whole
step, and the runner writes that step's checkpoint at once. Several processes cannot do that (the
others would wait in the step's collectives), so they finish the step first.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType

import torch
from accelerate import Accelerator

from mae.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(UserError):
    """Stopped by a signal after writing a checkpoint; the exit code is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StepAbandoned(BaseException):
    """A stop signal came inside ``StopSignals.interruptible``: the step in flight is dropped.
    A ``BaseException``, like ``KeyboardInterrupt``, so that no library's ``except Exception``
    takes it for an error of its own."""


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT only set ``signum`` (main thread only;
    elsewhere signals keep their handlers), and say so on stderr at once: a launcher that kills
    the process before the checkpoint is written leaves that line as the last word."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._interruptible = False
        self._say = say

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signum:  # the second one: stop now, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        first = self.signum is None
        self.signum = signum
        if first and self._say is not None:
            self._say(signal.Signals(signum).name)
        if self._interruptible:
            self._interruptible = False
            raise StepAbandoned

    @contextlib.contextmanager
    def interruptible(self, allowed: bool = True) -> Iterator[None]:
        """While inside (and ``allowed``), a stop signal abandons the step (``StepAbandoned``)."""
        if self.signum is not None and allowed:  # a signal came between steps: stop before this
            raise StepAbandoned
        self._interruptible = allowed
        try:
            yield
        finally:
            self._interruptible = False

    def requested(self, accelerator: Accelerator, timed: bool = False) -> tuple[int | None, bool]:
        """The signal to stop for, and whether a checkpoint is due by the clock (``timed``: this
        process's clock says so), agreed by every process: any one's signal or clock counts (one
        collective with several processes)."""
        if accelerator.num_processes == 1:
            return self.signum, timed
        mine = torch.tensor([self.signum or 0, int(timed)], device=accelerator.device)
        signum, clock = accelerator.reduce(mine, reduction="max").tolist()
        return (int(signum) or None), bool(clock)


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM/SIGINT to the main process."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_left() -> None:
    """At exit, SIGKILL the daemonic children still running. A loader still open when the process
    ends (an error raised mid-run or in the export) keeps its workers; multiprocessing's own exit
    hook sends them SIGTERM, which they ignore (``ignore_in_worker``), then waits for them forever.
    PyTorch's SIGCHLD handler would report each killed worker as an error of its own, after the one
    that ended the run: it is set back to the default first."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


# registered after multiprocessing's exit hook (imported with torch), so it runs before it
atexit.register(_kill_workers_left)

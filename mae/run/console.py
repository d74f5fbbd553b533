"""``RUN/train.log``: what the console showed, kept with the run.

While a run holds its directory, the main process copies everything written to ``sys.stdout``
and ``sys.stderr`` into the log, appending (a resumed run continues it). Lines are held in memory
until the run has started (``keep``, called once ``config.yaml`` is written): a launch refused
before that leaves the directory as it found it. A progress bar redraws its line with carriage
returns; the log keeps each line as the terminal last showed it, so the bar's final state is there
and its hundreds of redraws are not. The one-line error a started run ends with is written too.
(Python's ``logging`` would see only what goes through it: our prints, tqdm's bar and the
libraries' warnings do not.)
"""

from __future__ import annotations

import contextlib
import datetime
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from mae.errors import UserError

LOG = "train.log"


class _Log:
    """Whole lines for ``path``: held until ``keep``, then appended as they come."""

    def __init__(self, path: Path) -> None:
        self.path, self.held, self.file = path, [f"--- {_now()}: {' '.join(sys.argv)}"], None

    def line(self, text: str) -> None:
        if self.file is None:
            self.held.append(text)
        else:
            self.file.write(text + "\n")
            self.file.flush()

    def keep(self) -> None:
        if self.file is None:
            self.file = open(self.path, "a")  # noqa: SIM115 - closed by ``close``
            for text in self.held:
                self.line(text)
            self.held = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Tee:
    """A text stream that writes through to ``stream`` and gives ``log`` whole lines."""

    def __init__(self, stream: TextIO, log: _Log) -> None:
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(line)
        return self.stream.write(text)

    def _line(self, line: str) -> None:
        shown = line.rsplit("\r", 1)[-1]  # what the terminal kept of a redrawn line
        if shown.strip():
            self.log.line(shown)

    def finish(self) -> None:
        self._line(self.pending)
        self.pending = ""

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the real stream's
        return getattr(self.stream, name)


_active: _Log | None = None


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def keep() -> None:
    """The run has started: write what was held and go on writing (no-op without a log)."""
    if _active is not None:
        _active.keep()


@contextlib.contextmanager
def console_log(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Copy the console into ``run_dir/train.log`` while inside (``enabled``: the main
    process), from ``keep`` on."""
    global _active
    if not enabled:
        yield
        return
    log = _Log(run_dir / LOG)
    out, err = sys.stdout, sys.stderr
    tees = [_Tee(out, log), _Tee(err, log)]
    sys.stdout, sys.stderr = tees  # type: ignore[assignment]
    _active = log
    try:
        yield
    except UserError as e:  # the line the command line prints, once it is out of here
        log.line(f"error: {e}")
        raise
    finally:
        for tee in tees:
            tee.finish()
        sys.stdout, sys.stderr = out, err
        _active = None
        log.close()

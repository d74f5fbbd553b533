"""``RUN/train.log``: what the console showed, kept with the run.

While a run holds its directory, the main process copies everything written to ``sys.stdout``
and ``sys.stderr`` into the log, appending (a resumed run continues it). A progress bar redraws
its line with carriage returns; the log keeps each line as the terminal last showed it, so the
bar's final state is there and its hundreds of redraws are not. The one-line error a run ends
with is written too. (Python's ``logging`` would see only what goes through it: our prints,
tqdm's bar and the libraries' warnings do not.)
"""

from __future__ import annotations

import contextlib
import datetime
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TextIO

from mae.errors import UserError

LOG = "train.log"


class _Tee:
    """A text stream that writes through to ``stream`` and keeps whole lines in ``log``."""

    def __init__(self, stream: TextIO, log: IO[str]) -> None:
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            shown = line.rsplit("\r", 1)[-1]  # what the terminal kept of a redrawn line
            if shown.strip():
                self.log.write(shown + "\n")
        self.log.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the real stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def console_log(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Copy the console into ``run_dir/train.log`` while inside (``enabled``: the main
    process)."""
    if not enabled:
        yield
        return
    with open(run_dir / LOG, "a") as log:
        log.write(
            f"--- {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)}\n"
        )
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)  # type: ignore[assignment]
        try:
            yield
        except UserError as e:  # the line the command line prints, once it is out of here
            log.write(f"error: {e}\n")
            raise
        finally:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee) and tee.pending.rsplit("\r", 1)[-1].strip():
                    log.write(tee.pending.rsplit("\r", 1)[-1] + "\n")
            sys.stdout, sys.stderr = out, err

"""The record of images that cannot be decoded, and the limit past which a job stops.

Every job that reads images (pretraining, the probes, fine-tuning, ``mae.evaluate``) follows one
policy: an undecodable image (corrupt, empty, truncated, not an image, over Pillow's
decompression-bomb limit) is skipped, recorded once in ``bad_images.jsonl`` next to the job's
results (one JSON line per file, with the first error it gave), and more than the job's
``max_bad_images`` distinct files stop it with a ``BadImagesError`` that names the first file and
the fix. How a skipped image is replaced or dropped is the reader's business (``mae.data.images``).
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any, TextIO

from mae.errors import UserError

BAD_IMAGES = "bad_images.jsonl"  # the record's name, in a run or output folder
PRESCAN = "python -m mae.prepare --check FOLDER"  # lists a folder's bad files before any run


class BadImagesError(UserError, RuntimeError):
    """More undecodable images than a job allows; a run's checkpoints up to here are kept."""

    exit_code = 1


def error_text(error: Exception) -> str:
    """``error`` as one short line for a record."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def _records(f: TextIO) -> list[dict[str, Any]]:
    out = []
    for line in f.read().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a crash mid-write: the file is still read
            continue
    return out


def log_bad_image(bad_log: Path, key: str, where: str, error: str) -> bool:
    """Record ``key`` (what names one image: its file, else its row) in ``bad_log`` unless it is
    there already; True when it was new. ``where``: the file or row shown to the user.

    The file itself decides what is recorded, not a writer's memory: DataLoader workers of every
    process append to it at once, an image is met again every epoch, and a resumed run appends to
    the record of the run before it, so a set kept per worker would miss what the others (and the
    earlier run) wrote. Each hit therefore reads the file under an exclusive lock and appends only a
    key not yet in it. Hits are rare (each bad file once an epoch, and a job stops past its
    ``max_bad_images``), so reading a few hundred lines each time costs nothing."""
    bad_log.parent.mkdir(parents=True, exist_ok=True)
    with open(bad_log, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        if any(r.get("key") == key for r in _records(f)):
            return False
        f.write(json.dumps({"key": key, "source": where, "error": error}) + "\n")
    return True


def bad_images(bad_log: Path) -> list[dict[str, Any]]:
    """The records in ``bad_log`` (``key``, ``source``, ``error``), first met first; none when
    there is no file."""
    if not bad_log.is_file():
        return []
    with open(bad_log) as f:
        return _records(f)


def count_bad_images(bad_log: Path) -> int:
    """Distinct images recorded in ``bad_log``."""
    return len({r.get("key") for r in bad_images(bad_log)})


def too_many(bad_log: Path, count: int, limit: int, key: str, then: str = "") -> BadImagesError:
    """The error of ``count`` bad images, more than ``limit`` (the setting ``key``): its message
    starts with the first file recorded and ends with the fix (``then``: what to do after it, e.g.
    launch again to resume)."""
    records = bad_images(bad_log)
    first = f"{records[0]['source']} cannot be decoded ({records[0]['error']}); " if records else ""
    return BadImagesError(
        f"{first}{count} images cannot be decoded, more than {key}={limit} allows. Fix or remove "
        f"them (listed in {bad_log}; {PRESCAN} lists a folder's), or raise {key}{then}"
    )


def count_within_limit(bad_log: Path, limit: int, key: str) -> int:
    """The number of bad images recorded in ``bad_log``; past ``limit`` (the setting ``key``), the
    ``too_many`` error."""
    count = count_bad_images(bad_log)
    if count > limit:
        raise too_many(bad_log, count, limit, key)
    return count

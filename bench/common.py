"""What the timing scripts in bench/ share: their common options, the summary of repeated timings,
the machine recorded beside a result, and writing the result.

``budget.py`` and ``sweep.py`` do not import this module: they only launch other processes, and
importing torch here would have them hold its memory for the hours their runs train (``flops.py``
counts a recipe's FLOPs for them in a process of its own).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def add_out(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out``: the results JSON, ``bench/results/NAME`` unless given."""
    parser.add_argument("--out", default=str(RESULTS / name))


def add_step_comparison(
    parser: argparse.ArgumentParser, settings: Mapping[str, Any], steps: int, warmup: int
) -> None:
    """The options of a side-by-side timing of training steps (``vs_hf.round_robin`` reads the
    batch and the last three): ``--setting`` (a key of ``settings``, default tiny), ``--batch``,
    ``--threads``, ``--device`` (default: cuda where a GPU is visible), ``--repeats`` rounds of
    ``--steps`` steps (default ``steps``) after ``--warmup`` untimed ones (default ``warmup``)."""
    parser.add_argument("--setting", choices=sorted(settings), default="tiny")
    parser.add_argument("--batch", type=int, help="default: per setting and device (see SETTINGS)")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads on CPU"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=steps, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=warmup)


def torch_device(name: str) -> torch.device:
    """``--device`` as a torch device; exits with an error when it is cuda and no GPU is visible."""
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no GPU is visible")
    return torch.device(name)


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of repeated timings, and the timings themselves."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median of each key's repeated timings."""
    return {key: statistics.median(values) for key, values in samples.items()}


def rate_header(width: int) -> str:
    """The titles of ``rate_cells``' three columns."""
    return " ".join(f"{title:>{width}}" for title in ("img/s", "min", "max"))


def rate_cells(rates: Sequence[float], width: int) -> str:
    """Median, min and max of repeated images/s to one decimal, each right-aligned in ``width``."""
    s = summary(rates)
    return " ".join(f"{s[key]:>{width}.1f}" for key in ("median", "min", "max"))


def device_description(device: torch.device, threads: int) -> str:
    """What ran the steps: the GPU's name, or how many CPU threads."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} CPU threads"


def timestamp() -> str:
    """Now in local time with its UTC offset, to the second: the date recorded beside a result."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: str | Path, result: Mapping[str, Any]) -> None:
    """``result`` as indented JSON at ``path`` (its folder made when missing); says so."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def step_flops(model: torch.nn.Module, cfg: Any, device: torch.device) -> float:
    """FLOPs of one training forward + backward of ``model`` per image (attention counted as
    matmuls; with the model's masks per image and its teacher's forward, where it has them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mae.run import hardware
    from mae.run.hardware import set_attention

    probe = copy.deepcopy(model)
    set_attention(probe, "math")
    images = torch.randn(2, cfg.data.channels, *cfg.data.hw, device=device)
    limit, hardware.MATH_MAX_TOKENS = hardware.MATH_MAX_TOKENS, 1 << 30  # every sequence as matmuls
    try:
        with FlopCounterMode(display=False) as counter:
            probe.set_step(0)
            probe(images).loss.backward()
    finally:
        hardware.MATH_MAX_TOKENS = limit
    return counter.get_total_flops() / len(images)

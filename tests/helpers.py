"""Shared test code: paths, tiny-model overrides, synthetic datasets and launch helpers.

Test files import from here; none imports another test file or ``conftest``
(tests/test_layout.py)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
from accelerate.state import AcceleratorState, GradientState, PartialState
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"

# A tiny MAE (2 blocks of width 32 on 16x16 images, patch 4) that trains in milliseconds.
TINY_ARCH = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.decoder_embed_dim=16",
    "model.decoder_depth=1",
    "model.decoder_num_heads=2",
]
TINY = [
    *TINY_ARCH,
    "data.image_size=16",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.log_every=5",
    "train.recon_images=2",
]


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; drop them so the next Accelerator starts clean."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def write_image_folder(
    root: Path, classes: int = 3, per_class: int = 8, size: int = 20, modes=("RGB",)
) -> Path:
    """An image folder of class subfolders; images cycle through ``modes`` (RGB, L, RGBA, P...)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            img = Image.fromarray(arr, "RGB").convert(modes[i % len(modes)])
            img.save(d / f"{i}.png")
    return root


def colour_folder(root, per_class=20, size=16):
    """Three classes told apart by colour only (plus pixel noise): linearly separable for any sane
    encoder. ``size``: one side, or (height, width)."""
    rng = np.random.default_rng(0)
    h, w = (size, size) if isinstance(size, int) else size
    for c, rgb in enumerate([(220, 40, 40), (40, 200, 40), (40, 40, 220)]):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.png")
    return root


def png(rgb, size=16) -> bytes:
    """PNG bytes of a ``size`` x ``size`` image of colour ``rgb`` plus noise seeded by colour."""
    rng = np.random.default_rng(sum(rgb))
    a = np.clip(np.array(rgb)[None, None] + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(
        np.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def parquet_stream(root, shards=4, per_shard=12, bad=()) -> str:
    """``shards`` parquet files of distinct images; ``label`` is each image's own id (0..N-1)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        ids = range(s * per_shard, (s + 1) * per_shard)
        rows = [
            {
                "image": {
                    "bytes": b"not an image" if i in bad else png((i * 5 % 256, i * 11 % 256, 90)),
                    "path": f"img_{i}.png",
                },
                "label": i,
            }
            for i in ids
        ]
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(root / f"train-{s:05d}-of-{shards:05d}.parquet")
        )
    return str(root)


def metric_write_then(step: int, action: Callable[[], None]) -> Callable[..., None]:
    """A stand-in for ``MetricLog.write`` that writes as ever, then runs ``action`` once the line of
    optimizer step ``step`` is written: a run stopped (an exception, a signal) at a known step."""
    from mae.runner import MetricLog

    real_write = MetricLog.write

    def write(self, at, *args):
        out = real_write(self, at, *args)
        if at == step:
            action()
        return out

    return write


def env_without_accelerate() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}


def accelerate_launch(
    script: str, *args: str, processes: int = 1, multi: bool = False
) -> list[str]:
    """An ``accelerate launch`` command line, every launcher default spelled out (no warnings)."""
    flags = ["--multi_gpu", "--main_process_port", str(free_port())] if multi else []
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *flags,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        script,
        *args,
    ]


def torchrun(script: str, *args: str, processes: int, restarts: int = 0) -> list[str]:
    """A ``torchrun --standalone`` command line (``restarts``: its ``--max-restarts``)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "--max-restarts",
        str(restarts),
        script,
        *args,
    ]


def start_session(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``cmd`` from the repository root in a session (process group) of its own, so that a test can
    signal or kill it whole; its output captured as text."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

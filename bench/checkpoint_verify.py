"""What checking a checkpoint against its manifest costs next to loading it (default: ViT-B/16 MAE).

    python bench/checkpoint_verify.py  # ViT-B/16 at 224 px, AdamW state, 3 repeats
    python bench/checkpoint_verify.py --preset vit_large_patch16

A real checkpoint (``mae.run.checkpoint.save_checkpoint``: model, AdamW moments after one step, RNG
states, loop state, manifest) is written to a temporary folder under ``--dir``; then, ``--repeats``
times each, interleaved: ``verify`` (sizes, then the sha256 of every file) and ``load_checkpoint``
(Accelerate's ``load_state`` into the model and optimizer), and the manifest's own hashing at save
time. Medians. The files are in the page cache after the save, as they are for a resume right after
a crash on the same machine; from a cold disk both read the same bytes once more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from accelerate import Accelerator
from common import ROOT, add_out, medians, write_json

sys.path.insert(0, str(ROOT))

from mae.config import derive, load_config  # noqa: E402
from mae.models import build_model  # noqa: E402
from mae.pretrain import build_optimizer  # noqa: E402
from mae.run import checkpoint  # noqa: E402


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_base_patch16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--dir",
        default=None,
        help="where the temporary checkpoint goes (default: the system's tmp)",
    )
    add_out(p, "checkpoint_verify.json")
    args = p.parse_args(argv)

    cfg = load_config(None, [f"model.preset={args.preset}", f"data.image_size={args.image_size}"])
    model = build_model(cfg)
    optimizer = build_optimizer(
        model, cfg, derive(cfg, dataset_size=cfg.train.batch_size, num_processes=1)
    )
    for (
        param
    ) in model.parameters():  # one step gives AdamW its two moments per parameter, as in training
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        save_s = timed(lambda: checkpoint.save_checkpoint(accelerator, tmp, 1, {}, keep=1))
        path = checkpoint.latest_checkpoint(tmp)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        times: dict[str, list[float]] = {"verify": [], "load": [], "hash_at_save": []}
        problems: list[str | None] = []
        for _ in range(args.repeats):
            times["verify"].append(timed(lambda: problems.append(checkpoint.verify(path))))
            times["load"].append(timed(lambda: checkpoint.load_checkpoint(accelerator, path)))
            times["hash_at_save"].append(timed(lambda: checkpoint.write_manifest(path)))
    if any(problems):
        sys.exit(f"error: the fresh checkpoint did not verify: {problems}")
    median = medians(times)
    print(
        f"{args.preset} at {args.image_size} px: a checkpoint of {size / 2**20:,.0f} MiB, "
        f"written in {save_s:.2f} s; torch {torch.__version__}"
    )
    for key, value in median.items():
        runs = ", ".join(f"{t:.2f}" for t in times[key])
        print(f"{key:<13} {value:6.2f} s  ({size / 2**20 / value:,.0f} MiB/s; runs {runs})")
    print(f"verify / load: {median['verify'] / median['load']:.2f}x")
    result = {
        "preset": args.preset,
        "image_size": args.image_size,
        "bytes": size,
        "save_s": save_s,
        "times_s": times,
        "median_s": median,
        "verify_over_load": median["verify"] / median["load"],
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

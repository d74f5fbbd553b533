"""Bit-for-bit behaviour of a change: the same short runs from two checkouts, compared.

    python bench/parity.py run --checkout ../before --out /tmp/parity/before
    python bench/parity.py run --checkout . --out /tmp/parity/after
    python bench/parity.py compare /tmp/parity/before /tmp/parity/after

``run`` trains, from ``--checkout`` (its own ``mae`` package, with this interpreter), 30 steps of
the default MAE, of MAE with CrossMAE's decoder, of the VAE and of MAE with the data on the
device, then a 30-step fine-tune, a linear probe and a kNN probe of the MAE run. ``compare``
checks that the two folders hold the same ``metrics.jsonl`` lines (the throughput left out), the
same exported and fine-tuned tensors, and the same ``results.json`` (timings left out, paths
read relative to each folder). It exits 1 on any difference. Run it alone on the machine: it
trains seven times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

STEPS = ["train.max_steps=30", "train.log_every=5", "train.log_with=[]"]
PRETRAIN = {
    "mae": [],
    "cross": ["model.decoder=cross"],
    "vae": ["model.name=vae"],
    "ondev": ["data.on_device=true"],
}
TIMING = ("seconds", "time", "per_s", "wall")


def evaluations(out: Path) -> dict[str, list[str]]:
    run = f"encoder={out / 'mae'}"
    return {
        "ft": ["mode=finetune", run, "finetune.max_steps=30", "finetune.log_with=[]"],
        "linear": ["mode=linear", run, "probe.epochs=20", "probe.warmup_epochs=2"],
        "knn": ["mode=knn", run],
    }


def run(checkout: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    jobs = [("pretrain.py", name, [*STEPS, *extra]) for name, extra in PRETRAIN.items()]
    for name, args in evaluations(out).items():
        jobs.append(("finetune.py", name, [*args, f"probe.cache_dir={out / 'cache' / name}"]))
    for script, name, args in jobs:
        cmd = [sys.executable, script, *args, f"output_dir={out / name}"]
        with open(out / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, cwd=checkout, env=env, stdout=log, stderr=log).returncode
        print(f"{name}: exit {code}")
        if code:
            sys.exit(f"{name} failed: see {out / name}.log")


def lines(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    return [untimed(v) for v in value] if isinstance(value, list) else value


def compare(before: Path, after: Path) -> bool:
    same = True
    for name in [*PRETRAIN, "ft"]:
        ok = lines(before / name / "metrics.jsonl") == lines(after / name / "metrics.jsonl")
        print(f"{name}: metrics.jsonl {'identical' if ok else 'DIFFERENT'}")
        same &= ok
    for folder in [*(f"{n}/export" for n in PRETRAIN), "ft/last", "ft/best"]:
        a = load_file(str(before / folder / "model.safetensors"))
        b = load_file(str(after / folder / "model.safetensors"))
        ok = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"{folder}: {len(a)} tensors {'identical' if ok else 'DIFFERENT'}")
        same &= ok
    for name in evaluations(before):
        a = (before / name / "results.json").read_text().replace(str(before), "OUT")
        b = (after / name / "results.json").read_text().replace(str(after), "OUT")
        ok = untimed(json.loads(a)) == untimed(json.loads(b))
        print(f"{name}: results.json {'identical' if ok else 'DIFFERENT'}")
        same &= ok
    print("identical" if same else "DIFFERENT")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runs = commands.add_parser("run", help="the runs from one checkout")
    runs.add_argument("--checkout", type=Path, default=Path("."))
    runs.add_argument("--out", type=Path, required=True, help="a folder that does not exist yet")
    pair = commands.add_parser("compare", help="two run folders, bit for bit")
    pair.add_argument("before", type=Path)
    pair.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.checkout.resolve(), args.out.resolve())
    elif not compare(args.before.resolve(), args.after.resolve()):
        sys.exit(1)


if __name__ == "__main__":
    main()

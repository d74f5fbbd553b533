"""Sweep a method's budget recipe: each variant pretrains for one wall-clock budget, then is probed.

Every variant is a recipe (by default the method's ``configs/<method>_cifar10_budget.yaml``, as in
``budget.py``; ``--recipe default``: ``pretrain.py``'s own defaults, the bundled-sample run) plus a
few ``key=value`` overrides. Like ``budget.py``, each one is first calibrated (its own steps
per second on this machine, so a slower variant gets fewer steps), pretrained for ``--budget``
seconds' worth of steps, then probed with ``finetune.py`` (linear, and kNN on the same cached
features) on the full CIFAR-10 train/test split, next to the same architecture at random init. A
stacked autoencoder gives each greedy stage a sixth of the steps, as in ``budget.py``, unless a
variant sets ``model.stage_steps``.
Finished variants are reused when the script runs again with the same ``--out``.

    python bench/sweep.py --budget 300 --out bench/results/sweep_mae \\
        --variant base --variant blr5e-4 train.blr=5e-4 --variant mask0.6 model.mask_ratio=0.6
    # the first run's defaults: pretrain on the bundled sample, probe on full CIFAR-10
    python bench/sweep.py --recipe default --pretrain-data sample --budget 240 --steps 460 \\
        --out bench/results/sweep_sample --variant base --variant blr5e-4 train.blr=5e-4

Writes ``table.md`` and ``results.json`` into ``--out`` and prints the table (``--doc FILE``: also
there, with the command line, above the file's own sections, from its first ``## `` heading on,
which are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from budget import (
    FLOPS_TITLES,
    METHODS,
    PROBE_COLUMNS,
    PROBES,
    ROOT,
    flops_cells,
    flops_per_image,
    open_record,
    probe_pair,
    recipe,
    run,
    run_size,
    stage_overrides,
    steps_per_second,
)


def relative(path: Path) -> str:
    """``path`` as seen from the repository root (the README's commands run there)."""
    return os.path.relpath(path.resolve(), ROOT)


def parse_variants(given: list[list[str]]) -> list[tuple[str, list[str]]]:
    """``--variant NAME [KEY=VALUE ...]`` (no overrides: the recipe unchanged)."""
    out = []
    for name, *overrides in given:
        bad = [o for o in overrides if "=" not in o]
        if "=" in name or "/" in name or bad:
            sys.exit(
                f"error: --variant {' '.join([name, *overrides])}: "
                "write --variant NAME [KEY=VALUE ...]"
            )
        out.append((name, overrides))
    if len({n for n, _ in out}) != len(out):
        sys.exit("error: two --variant options have the same NAME")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="mae", choices=METHODS)
    parser.add_argument("--budget", type=float, default=300, help="pretraining seconds per variant")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME [KEY=VALUE",
        help="repeat",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="the same optimizer steps for every variant instead of calibrating each (an equal-"
        "compute sweep of settings that do not change the step's cost, unaffected by other load "
        "on the machine)",
    )
    parser.add_argument(
        "--recipe",
        help="the recipe file every variant starts from (default: the method's CIFAR-10 budget "
        "recipe); 'default': pretrain.py's defaults with no --config, the bundled-sample run",
    )
    parser.add_argument(
        "--random-init",
        choices=["each", "first"],
        default="each",
        help="probe the random init of each variant's encoder, or only the first's (variants that "
        "keep the encoder's architecture and seed start from the same weights: the same numbers)",
    )
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared/data/cifar10"), help="the probes' data"
    )
    parser.add_argument(
        "--pretrain-data", help="pretraining data (default: --data); 'sample': the bundled sample"
    )
    parser.add_argument("--out", default=str(ROOT / "bench/results/sweep"))
    parser.add_argument(
        "--doc", help="also write the table, with this command line, to this Markdown file"
    )
    parser.add_argument(
        "--evaluate",
        action="append",
        choices=sorted(TASK_COLUMNS),
        default=[],
        help="also run python -m mae.evaluate TASK on every variant (first 2,000 test images; PCA "
        "fitted on 20,000 training images) and add its PSNR beside PCA's to the table; repeat for "
        "several",
    )
    parser.add_argument("--no-probes", action="store_true", help="skip the linear and kNN probes")
    args = parser.parse_args()
    base = (
        recipe(args.method)
        if args.recipe is None
        else None
        if args.recipe == "default"
        else Path(args.recipe)
    )
    if base is not None and not base.is_file():
        sys.exit(f"error: --recipe {args.recipe} is not a file; give a recipe YAML or 'default'")
    shown_recipe = "pretrain.py's defaults" if base is None else f"`{relative(base)}`"
    pretrain_data = args.pretrain_data or args.data
    if pretrain_data != "sample" and not Path(pretrain_data).is_dir():
        sys.exit(
            f"error: --pretrain-data {pretrain_data} is not a folder; "
            "give a dataset folder or 'sample'"
        )
    work, record_path, record = open_record(args.data, args.out)
    setting = {
        "budget": args.budget,
        "method": args.method,
        "recipe": shown_recipe,
        "pretrain_data": pretrain_data,
    }
    if any(record.get(k, v) != v for k, v in setting.items()):
        sys.exit(
            f"error: {work} holds a sweep of another --method, --budget, --recipe or "
            "--pretrain-data; use another --out"
        )
    record |= setting
    config = [] if base is None else ["--config", str(base)]
    rows = record.setdefault("variants", {})
    variants = parse_variants(args.variant)
    first = work / "runs" / variants[0][0] if args.random_init == "first" else None
    for name, overrides in variants:
        row = rows.get(name, {})
        if row.get("overrides") not in (None, overrides):
            sys.exit(
                f"error: variant {name!r} in {work} was run with {row['overrides']}; "
                "give this one another name"
            )
        run_dir = work / "runs" / name
        if (
            run_dir / "export"
        ).is_dir() and "steps" not in row:  # pretrained by a sweep stopped before probing
            size = run_size(run_dir)
            row |= {
                "overrides": overrides,
                **size,
                "steps_per_s": size["steps"] / args.budget,
                "wall_s": None,
            }
        if not (run_dir / "export").is_dir():
            if args.steps:
                rate, steps = args.steps / args.budget, args.steps
            else:
                rate = steps_per_second(
                    args.method, pretrain_data, work, tuple(overrides), name, config
                )
                steps = max(1, int(args.budget * rate))
            extra = [
                *overrides,
                *stage_overrides(args.method, steps, overrides),
                f"train.max_steps={steps}",
                f"output_dir={run_dir}",
                f"data.dataset={pretrain_data}",
            ]
            extra += [f"train.checkpoint_every={steps}", f"train.recon_every={steps}"]
            cmd = [sys.executable, "pretrain.py", *config, *extra]
            seconds = run(cmd, work / f"{name}.log")
            row = {
                "overrides": overrides,
                **run_size(run_dir),
                "steps_per_s": rate,
                "wall_s": seconds,
            }
        if "flops_per_image" not in row:
            row["flops_per_image"] = flops_per_image(config, overrides)
        for mode in () if args.no_probes else PROBES:
            for kind, res in probe_pair(name, run_dir, mode, args.data, work, first).items():
                row[f"{kind}_{mode}"] = res["top1"]
        for task in args.evaluate:
            row[task] = evaluate(task, run_dir, args.data, work / f"{name}_evaluate_{task}.log")
        rows[name] = row
        record_path.write_text(json.dumps(record, indent=1))
        print(f"{name}: {row}", flush=True)

    lines = [
        f"{args.method}, {args.budget:g} s of pretraining per variant ("
        + (
            f"{args.steps} steps each, the recipe's rate on an idle machine"
            if args.steps
            else "steps from each variant's measured rate"
        )
        + f"), recipe {shown_recipe} plus the overrides shown; pretrained on "
        + (
            "the bundled sample"
            if pretrain_data == "sample"
            else f"`{relative(Path(pretrain_data))}`"
        )
        + f", probed on `{relative(Path(args.data))}`.",
        "",
        f"| variant | overrides | steps | images seen | {FLOPS_TITLES} | "
        + " | ".join(t for _, t in PROBE_COLUMNS)
        + " |"
        + "".join(f" {TASK_COLUMNS[t]} |" for t in args.evaluate),
        "| --- | --- | ---: | ---: | ---: | ---: |"
        + " ---: |" * (len(PROBE_COLUMNS) + len(args.evaluate)),
    ]
    for name, r in rows.items():
        cells = [f"{100 * r[k]:.1f}%" if k in r else "–" for k, _ in PROBE_COLUMNS]
        cells += [f"{r[t][0]:.2f} / {r[t][1]:.2f}" if t in r else "–" for t in args.evaluate]
        shown = ", ".join(f"`{o}`" for o in r["overrides"]) or "(the recipe)"
        lines.append(
            f"| {name} | {shown} | {r['steps']} | {r['images']:,} | {flops_cells(r)} | "
            + " | ".join(cells)
            + " |"
        )
    table = "\n".join(lines) + "\n"
    (work / "table.md").write_text(table)
    print(table)
    if args.doc:
        command = "python bench/sweep.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_doc(Path(args.doc), f"Measured with `{command}` on a 2-core CPU.\n\n{table}")
    return 0


TASK_COLUMNS = {
    "reduce": "recon PSNR: code / PCA (dB)",
    "denoise": "denoised PSNR: model / PCA projection (dB)",
}


def evaluate(task: str, run_dir: Path, data: str, log: Path) -> tuple[float, float]:
    """``python -m mae.evaluate TASK`` on a run (its defaults: the first 2,000 test images); the
    model's PSNR and PCA's at the code's size."""
    out = run_dir / "evaluate" / task
    if not (out / "metrics.json").is_file():
        run(
            [sys.executable, "-m", "mae.evaluate", task, "--run", str(run_dir), "--dataset", data],
            log,
        )
    m = json.loads((out / "metrics.json").read_text())
    pair = (
        (m["reconstruction"]["encoder"], m["reconstruction"]["pca"])
        if task == "reduce"
        else (m["restored"], m["pca"])
    )
    return pair[0]["psnr_db"], pair[1]["psnr_db"]


def write_doc(path: Path, measured: str) -> None:
    """``measured`` (the command line and the table) into ``path``, keeping the hand-written part of
    an existing file: everything from its first ``## `` heading on."""
    old = path.read_text() if path.is_file() else ""
    start = old.find("\n## ")
    path.write_text(measured + (old[start:] if start >= 0 else ""))


if __name__ == "__main__":
    sys.exit(main())

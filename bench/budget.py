"""Every method of the project on a fixed CPU budget: pretrain, then linear probe and kNN.

For each method's recipe (``configs/<method>_cifar10_budget.yaml``; MAE:
``configs/mae_vit_tiny_cifar10_budget.yaml``, CrossMAE:
``configs/crossmae_vit_tiny_cifar10_budget.yaml``):

1. calibrate: a short run measures the optimizer steps per second of each recipe on this machine
   (median of its logged rates, start-up excluded), every method before any trains; ``--rates``
   takes them from another budget's ``results.json`` instead, so its steps are exactly proportional;
2. pretrain for ``--budget`` seconds' worth of steps (``train.max_steps`` = budget x rate; a
   stacked autoencoder gives each greedy stage a sixth of them), and time the whole run;
3. probe the export with ``finetune.py`` (linear, then kNN and kNN on standardised features on the
   same cached features) on the full train/test split, and the same architecture at random init
   (``random:RUN``) the same way; raw pixels once.

Prints one Markdown table (method, steps, images seen, pretraining wall time, linear, kNN and
standardised kNN top-1 of the pretrained and the random-init encoder) and writes it with every
number to ``--out`` (``table.md``, ``results.json``). Finished steps are reused when the script is
run again with the same settings (delete ``--out`` to start over).

    python bench/budget.py --budget 600                 # all methods, ~1.5 h on 2 cores
    python bench/budget.py --budget 300 --methods ae,dae
    # + fine-tuning: pretrained vs random init
    python bench/budget.py --budget 600 --methods mae --finetune
    python bench/budget.py --budget 300 --rates bench/results/budget/results.json \\
        --out bench/results/budget300
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("mae", "crossmae", "ae", "dae", "sparse_ae", "cae", "vae", "stacked_ae")
# configs/eval/<probe>_cifar10.yaml, on each run and its random init
PROBES = (
    "linear",
    "knn",
    "knn_standardised",
)
PROBE_TITLES = {"linear": "linear", "knn": "kNN", "knn_standardised": "kNN standardised"}
# the tables' probe columns: (results key, title), pretrained then random init
PROBE_COLUMNS = [
    (f"{kind}_{p}", ("random-init " if kind == "random" else "") + PROBE_TITLES[p])
    for kind in ("pretrained", "random")
    for p in PROBES
]


def recipe(method: str) -> Path:
    name = {"mae": "mae_vit_tiny", "crossmae": "crossmae_vit_tiny"}.get(method, method)
    return ROOT / "configs" / f"{name}_cifar10_budget.yaml"


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repo root, output to ``log``; returns the wall time. Fails loudly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    tic = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - tic


def flops_per_image(config: list[str], overrides: Sequence[str] = ()) -> float:
    """Training FLOPs per image of the run ``pretrain.py`` would make of ``config`` (its
    ``--config`` arguments) and ``overrides``: ``bench/flops.py``, in a process of its own."""
    cmd = [sys.executable, str(ROOT / "bench/flops.py"), *config, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["flops_per_image"]


def flops_cells(row: dict) -> str:
    """A table's two FLOP columns: training GFLOPs per image, and in all (images x per image)."""
    per_image = row.get("flops_per_image")
    if per_image is None:
        return "– | –"
    return f"{per_image / 1e9:.2f} | {per_image * row['images'] / 1e15:.2f}"


FLOPS_TITLES = "train GFLOPs / image | train PFLOPs"


def stage_overrides(method: str, steps: int, overrides: Sequence[str] = ()) -> list[str]:
    """A stacked autoencoder's greedy stages for a run of ``steps``: a sixth of them each (four
    stages, then end to end for the last third), unless ``overrides`` set ``model.stage_steps``;
    other methods: none."""
    if method != "stacked_ae" or any(o.startswith("model.stage_steps=") for o in overrides):
        return []
    return [f"model.stage_steps={max(1, steps // 6)}"]


def steps_per_second(
    method: str,
    data: str,
    work: Path,
    overrides: tuple[str, ...] = (),
    name: str = "",
    config: list[str] | None = None,
) -> float:
    """Optimizer steps per second of ``method``'s recipe plus ``overrides`` on this machine
    (``config``: pretrain.py's ``--config`` arguments instead of the recipe's; [] for its
    defaults)."""
    name = name or method
    config = ["--config", str(recipe(method))] if config is None else config
    out = work / f"calibrate_{name}"
    args = [
        *overrides,
        f"output_dir={out}",
        f"data.dataset={data}",
        "train.max_steps=30",
        "train.log_every=5",
    ]
    args += ["train.checkpoint_every=1000", "train.recon_every=1000"]
    # time the whole stack (the slowest stage), not the first layer alone
    if method == "stacked_ae":
        args.append("model.stage_steps=1")
    run([sys.executable, "pretrain.py", *config, *args], work / f"calibrate_{name}.log")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    batch = json.loads((out / "derived.json").read_text())["effective_batch"]
    # the first line holds start-up
    return statistics.median(r["images_per_s"] for r in lines[1:]) / batch


def calibrate(
    methods: list[str], data: str, work: Path, known: dict, rates_from: str | None
) -> dict[str, float]:
    """Steps per second of every method that has no export in ``work`` yet, all measured before any
    of them trains (so later work sharing the machine cannot skew a calibration): ``known`` (rates
    recorded by an earlier run in ``work``), else read from ``rates_from``, else measured."""
    todo = [m for m in methods if not (work / "runs" / m / "export").is_dir()]
    if rates_from is None:
        return {m: known.get(m) or steps_per_second(m, data, work) for m in todo}
    other = json.loads(Path(rates_from).read_text()).get("rates", {})
    missing = [m for m in todo if m not in other]
    if missing:
        sys.exit(
            f"error: --rates {rates_from} has no rate for {','.join(missing)}; "
            "calibrate them there first"
        )
    return {m: other[m] for m in todo}


def open_record(data: str, out: str) -> tuple[Path, Path, dict]:
    """Check ``--data``; create ``--out``; the results recorded there so far (reused on a rerun)."""
    if not Path(data).is_dir():
        sys.exit(f"error: --data {data} is not a folder; point it at the CIFAR-10 parquet copy")
    work = Path(out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "results.json"
    return work, record_path, json.loads(record_path.read_text()) if record_path.is_file() else {}


def probe(encoder: str, mode: str, data: str, out: Path, log: Path) -> dict:
    """``finetune.py`` with ``configs/eval/<mode>_cifar10.yaml`` (linear, knn or finetune),
    reused when done."""
    if not (out / "results.json").is_file():
        args = [f"encoder={encoder}", f"output_dir={out}", f"data.dataset={data}"]
        run(
            [
                sys.executable,
                "finetune.py",
                "--config",
                str(ROOT / f"configs/eval/{mode}_cifar10.yaml"),
                *args,
            ],
            log,
        )
    return json.loads((out / "results.json").read_text())


def run_size(run_dir: Path) -> dict:
    """The optimizer steps and images a finished pretraining run in ``run_dir`` took."""
    derived = json.loads((run_dir / "derived.json").read_text())
    return {
        "steps": derived["total_steps"],
        "images": derived["total_steps"] * derived["effective_batch"],
    }


def probe_pair(
    name: str, run_dir: Path, mode: str, data: str, work: Path, random_of: Path | None = None
) -> dict[str, dict]:
    """``probe`` of ``run_dir``'s encoder and of its random init: {"pretrained": results, "random":
    results}. ``random_of``: the random init of that run's encoder instead (the same architecture:
    the same numbers)."""
    sources = {"pretrained": str(run_dir), "random": f"random:{random_of or run_dir}"}
    random_name = name if random_of is None else random_of.name
    return {
        kind: probe(
            source, mode, data, work / f"eval/{n}_{kind}_{mode}", work / f"{n}_{kind}_{mode}.log"
        )
        for kind, source in sources.items()
        for n in [random_name if kind == "random" else name]
    }


def in_order(rows: dict[str, dict]) -> dict[str, dict]:
    """``rows`` in the order of ``METHODS``, whichever ran and in whatever order: a row computed
    again (its old one removed from ``results.json``) would otherwise come last."""
    return {m: rows[m] for m in METHODS if m in rows}


def budget_table(record: dict) -> str:
    """The Markdown table of a ``results.json`` record: a row per method, then any fine-tuning."""
    rows, pixels = record["methods"], record["pixels"]
    lines = [
        f"Budget: {record['budget']:g} s of pretraining per method (steps from the measured rate). "
        f"Raw pixels: linear {100 * pixels['linear']:.1f}%, kNN {100 * pixels['knn']:.1f}%, "
        f"kNN standardised {100 * pixels['knn_standardised']:.1f}%. kNN standardised: the cosine "
        "of the features less the training mean, divided by the training std "
        "(`configs/eval/knn_standardised_cifar10.yaml`).",
        "",
        f"| method | steps | images seen | {FLOPS_TITLES} | pretraining wall | "
        + " | ".join(t for _, t in PROBE_COLUMNS)
        + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(PROBE_COLUMNS),
    ]
    for method, r in rows.items():
        lines.append(
            f"| {method} | {r['steps']} | {r['images']:,} | {flops_cells(r)} | "
            + (f"{r['wall_s']:.0f} s" if r["wall_s"] is not None else "not recorded")
            + " | "
            + " | ".join(f"{100 * r[k]:.1f}%" for k, _ in PROBE_COLUMNS)
            + " |"
        )
    tuned = {m: r for m, r in rows.items() if "pretrained_finetune" in r}
    if tuned:
        lines += [
            "",
            "Fine-tuning at equal budget (`configs/eval/finetune_cifar10.yaml`, test top-1):",
            "",
        ]
        lines += [
            "| method | fine-tuning steps | from the pretrained encoder | from random init |",
            "| --- | ---: | ---: | ---: |",
        ]
        for method, r in tuned.items():
            lines.append(
                f"| {method} | {r['finetune_steps']} | {100 * r['pretrained_finetune']:.1f}% | "
                f"{100 * r['random_finetune']:.1f}% |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=600, help="pretraining seconds per method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/budget"))
    parser.add_argument(
        "--report",
        help="also run python -m mae.evaluate (reconstruct, denoise, anomaly, reduce; sample for "
        "the VAE) on every run and write the report of all methods (table + figures) into this "
        "folder",
    )
    parser.add_argument(
        "--rates",
        help="results.json of another --out: take each method's steps per second from it instead "
        "of calibrating here, so two budgets train exactly proportional steps (and may share the "
        "machine after calibration)",
    )
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="also fine-tune each token encoder (MAE, CrossMAE) and its random init with "
        "configs/eval/finetune_cifar10.yaml (the same steps for both) and add their test top-1 to "
        "the table",
    )
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"error: unknown methods {unknown}; choose from {','.join(METHODS)}")
    work, record_path, record = open_record(args.data, args.out)
    if record.get("budget") not in (None, args.budget):
        sys.exit(f"error: {work} holds results for another --budget; use another --out")
    record["budget"] = args.budget
    rows = record.setdefault("methods", {})

    pixels = {
        m: probe("pixels:32", m, args.data, work / f"eval/pixels_{m}", work / f"pixels_{m}.log")
        for m in PROBES
    }
    record["pixels"] = {m: pixels[m]["top1"] for m in pixels}
    rates = calibrate(methods, args.data, work, record.get("rates", {}), args.rates)
    record["rates"] = record.get("rates", {}) | rates
    record_path.write_text(json.dumps(record, indent=1))
    for method in methods:
        row = rows.get(method, {})
        run_dir = work / "runs" / method
        if (
            run_dir / "export"
        ).is_dir() and "steps" not in row:  # pretrained by a run stopped before probing
            row |= run_size(run_dir) | {"steps_per_s": None, "wall_s": None}
        if not (run_dir / "export").is_dir():
            rate = record["rates"][method]
            steps = max(1, int(args.budget * rate))
            extra = [
                f"train.max_steps={steps}",
                f"output_dir={run_dir}",
                f"data.dataset={args.data}",
            ]
            extra += stage_overrides(method, steps)
            seconds = run(
                [sys.executable, "pretrain.py", "--config", str(recipe(method)), *extra],
                work / f"{method}.log",
            )
            row = run_size(run_dir) | {"steps_per_s": rate, "wall_s": seconds}
        if "flops_per_image" not in row:
            row["flops_per_image"] = flops_per_image(["--config", str(recipe(method))])
        for mode in PROBES:
            for kind, res in probe_pair(method, run_dir, mode, args.data, work).items():
                row[f"{kind}_{mode}"] = res["top1"]
        # classic encoders are not timm models: probes only
        if args.finetune and method in (
            "mae",
            "crossmae",
        ):
            for kind, res in probe_pair(method, run_dir, "finetune", args.data, work).items():
                row[f"{kind}_finetune"] = res["top1"]
                row["finetune_steps"] = res["steps"]
        rows[method] = row
        record_path.write_text(json.dumps(record, indent=1))
        print(f"{method}: {row}", flush=True)
    record["methods"] = rows = in_order(rows)
    record_path.write_text(json.dumps(record, indent=1))
    table = budget_table(record)
    (work / "table.md").write_text(table)
    print(table)
    if args.report:
        write_report(work, list(rows), args.data, Path(args.report), table)
    return 0


TASKS = {
    "reconstruct": [],
    "denoise": ["--corruption", "gaussian", "--level", "0.2"],
    "anomaly": ["--normal", "0"],
    "reduce": [],
}


def relative(arg: str) -> str:
    """``arg`` with the repository's absolute path, where it holds one, made relative to it."""
    return arg.replace(str(ROOT) + "/", "")


def write_report(work: Path, methods: list[str], data: str, out: Path, table: str) -> None:
    """Every evaluate task on every run (skipping finished ones), then one report across them."""
    runs = [work / "runs" / m for m in methods]
    for run_dir in runs:
        tasks = dict(TASKS) | ({"sample": ["-n", "64"]} if run_dir.name == "vae" else {})
        for task, extra in tasks.items():
            if not (run_dir / "evaluate" / task / "metrics.json").is_file():
                cmd = [
                    sys.executable,
                    "-m",
                    "mae.evaluate",
                    task,
                    "--run",
                    str(run_dir),
                    "--dataset",
                    data,
                    *extra,
                ]
                run(cmd, work / f"{run_dir.name}_evaluate_{task}.log")
    cmd = [
        sys.executable,
        "-m",
        "mae.evaluate",
        "report",
        "--results",
        str(work / "eval"),
        "--out",
        str(out),
    ]
    run(cmd + [a for r in runs for a in ("--run", str(r))], work / "report.log")
    # run paths relative to the bench output
    body = (out / "report.md").read_text().replace(str(work) + "/", "")
    # the command as given, from the repository
    shown = " ".join(shlex.quote(relative(a)) for a in sys.argv[1:])
    (out / "report.md").write_text(
        "# Every method on CIFAR-10 at the same CPU budget\n\n"
        f"Produced by `python bench/budget.py {shown}`"
        " on a 2-core CPU; the evaluate tasks use the first 2,000 test images (anomaly: class 0 "
        "normal, scored by the model trained on all classes; denoise: Gaussian noise of std 0.2)."
        "\n\n## Pretraining and probes\n\n" + table + "\n## Evaluate tasks\n\n" + body
    )


if __name__ == "__main__":
    sys.exit(main())

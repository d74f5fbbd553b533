"""Gather evaluation results into one table: ``python -m mae.report DIR [DIR ...] [--out FILE]``.

Each DIR is an evaluation ``output_dir`` (holding ``results.json``) or a folder searched for them.
Prints a Markdown table (encoder, mode, top-1, top-5, evaluation set, ...) and, with ``--out``,
writes it to ``FILE.md`` beside ``FILE.json`` (the rows as data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("encoder", "mode", "top1", "top5", "features", "train", "eval", "eval split", "details")


def find_results(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            found.append(p / "results.json")
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
        else:
            raise FileNotFoundError(f"{p} is neither an evaluation output_dir nor a folder holding them")
    return found


def row(results: dict[str, Any], path: Path) -> dict[str, Any]:
    mode = results["mode"]
    if mode == "linear":
        details = f"batch {results['probe_batch']}, lr {results['probe_lr']:g}" + (
            "" if results.get("cached", True) else ", augmented"
        )
    elif mode == "knn":
        probe = results["config"]["probe"]
        details = f"k {probe['k']}, T {probe['temperature']}"
    else:
        best = results.get("best") or {}
        details = (
            f"{results['steps']} steps; best top1 {best.get('top1', float('nan')):.4f} at epoch {best.get('epoch')}"
        )
    return {
        "encoder": results["encoder"]["source"],
        "mode": mode,
        "top1": results["top1"],
        "top5": results["top5"],
        "features": results.get("features", results.get("config", {}).get("finetune", {}).get("global_pool", "")),
        "train": results["train_size"],
        "eval": results["eval_size"],
        "eval split": results["eval_split"],
        "details": details,
        "sha256": results["encoder"]["sha256"][:12],
        "results": str(path),
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        return row(json.loads(path.read_text()), path)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a results.json written by finetune.py ({type(e).__name__}: {e})") from e


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if c in ("top1", "top5") else "---" for c in COLUMNS) + "|",
    ]
    for r in rows:
        cells = [f"{100 * r[c]:.2f}%" if c in ("top1", "top5") else str(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mae.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="evaluation output_dirs, or folders holding them")
    parser.add_argument("--out", help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    try:
        paths = find_results(args.dirs)
        if not paths:
            raise FileNotFoundError(f"no results.json under {args.dirs}; run finetune.py first")
        rows = [_read(p) for p in paths]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

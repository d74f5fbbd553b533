"""The report of ``python -m mae.evaluate report``: one table across pretraining runs and one across
evaluation results, as ``report.md`` + ``report.json`` with the figures copied beside them.

- Runs (``--run``, directories written by ``pretrain.py``): per run, its probes (the
  ``results.json`` files found under ``--results`` whose encoder is the run, random init of it
  included) and the tasks of ``mae.evaluate`` found in ``RUN/evaluate/*/metrics.json``, with their
  figures.
- Results (``--results``, ``finetune.py`` output_dirs or folders holding them): one row per
  ``results.json`` — encoder, mode, top-1, top-5, features, sizes, evaluation split, settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mae.config import from_dict, read_yaml
from mae.errors import UserError

# shown only when some run has them
OPTIONAL_COLUMNS = {f"{k}knn_{f}" for k in ("", "random_") for f in ("centred", "standardised")}
RESULT_COLUMNS = (
    "encoder",
    "mode",
    "top1",
    "top5",
    "features",
    "train",
    "eval",
    "eval split",
    "details",
)
RUN_COLUMNS = (
    ("linear", "linear top-1"),
    ("knn", "kNN top-1"),
    ("knn_centred", "kNN top-1, centred"),
    ("knn_standardised", "kNN top-1, standardised"),
    ("random_linear", "random-init linear"),
    ("random_knn", "random-init kNN"),
    ("random_knn_centred", "random-init kNN, centred"),
    ("random_knn_standardised", "random-init kNN, standardised"),
    ("reconstruct_psnr", "recon PSNR (dB)"),
    ("reconstruct_ssim", "recon SSIM"),
    ("denoise_psnr", "denoised PSNR (dB)"),
    ("anomaly_auroc", "anomaly AUROC"),
    ("reduce_linear", "linear at equal dims: code / PCA"),
)


class ReportError(UserError, ValueError):
    """A report that cannot be made from what was given; the message says what to pass instead."""


# ------------------------------------------------------------------------------------- results.json


def find_results(paths: list[str]) -> list[Path]:
    """Every ``results.json``: in each path itself (an evaluation output_dir) or anywhere below
    it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            found.append(p / "results.json")
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
        else:
            raise ReportError(
                f"--results {p} is neither an evaluation output_dir nor a folder holding them"
            )
    return found


def result_row(results: dict[str, Any], path: Path) -> dict[str, Any]:
    """One row of the results table from a ``results.json`` written by ``finetune.py``."""
    mode = results["mode"]
    knn_features = results.get("config", {}).get("probe", {}).get("knn_features", "raw")
    if mode == "knn" and knn_features != "raw":
        # probe.knn_features: kept apart from the plain kNN of the same encoder
        mode = f"knn_{knn_features}"
    if mode == "linear":
        details = f"batch {results['probe_batch']}, lr {results['probe_lr']:g}" + (
            "" if results.get("cached", True) else ", augmented"
        )
    elif mode.startswith("knn"):
        probe = results["config"]["probe"]
        details = f"k {probe['k']}, T {probe['temperature']}"
    else:
        best = results.get("best") or {}
        details = (
            f"{results['steps']} steps; best top1 {best.get('top1', float('nan')):.4f} "
            f"at epoch {best.get('epoch')}"
        )
    return {
        "encoder": results["encoder"]["source"],
        "mode": mode,
        "top1": results["top1"],
        # top-5 says something only where there are more than 5 classes (finetune.py prints it so)
        "top5": results["top5"] if len(results["per_class"]) > 5 else None,
        "features": results.get(
            "features", results.get("config", {}).get("finetune", {}).get("global_pool", "")
        ),
        "train": results["train_size"],
        "eval": results["eval_size"],
        "eval split": results["eval_split"],
        "details": details,
        "sha256": results["encoder"]["sha256"][:12],
        "results": str(path),
    }


def read_result(path: Path) -> dict[str, Any]:
    try:
        return result_row(json.loads(path.read_text()), path)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ReportError(
            f"{path} is not a results.json written by finetune.py ({type(e).__name__}: {e})"
        ) from e


def results_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| " + " | ".join(RESULT_COLUMNS) + " |",
        "|" + "|".join("---:" if c in ("top1", "top5") else "---" for c in RESULT_COLUMNS) + "|",
    ]
    for r in rows:
        cells = [
            (f"{100 * r[c]:.2f}%" if r[c] is not None else "–")
            if c in ("top1", "top5")
            else str(r[c])
            for c in RESULT_COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------- runs


def run_row(run: Path, probes: dict[str, dict[str, float]], figures: Path) -> dict[str, Any]:
    """One run's method, steps, probe accuracies and task metrics; its figures copied into
    ``figures``."""
    if not (run / "config.yaml").is_file():
        raise ReportError(
            f"--run {run} has no config.yaml; pass run directories written by pretrain.py"
        )
    cfg = from_dict(read_yaml(run / "config.yaml"))
    derived = (
        json.loads((run / "derived.json").read_text()) if (run / "derived.json").is_file() else {}
    )
    row: dict[str, Any] = {
        "run": str(run),
        "method": cfg.model.name,
        "steps": derived.get("total_steps"),
    }
    row |= probes.get(str(run.resolve()), {})
    tasks = {
        p.parent.name: json.loads(p.read_text())
        for p in sorted(run.glob("evaluate/*/metrics.json"))
    }
    if "reconstruct" in tasks:
        row["reconstruct_psnr"] = tasks["reconstruct"]["psnr_db"]
        row["reconstruct_ssim"] = tasks["reconstruct"]["ssim"]
    if "denoise" in tasks:
        row["denoise_psnr"] = tasks["denoise"]["restored"]["psnr_db"]
        row["denoise_noisy_psnr"] = tasks["denoise"]["noisy"]["psnr_db"]
        if "pca" in tasks["denoise"]:  # the noisy image projected on PCA of the code's size
            row["pca"] = {
                "dims": tasks["denoise"]["pca_dims"],
                "denoise_psnr": tasks["denoise"]["pca"]["psnr_db"],
            }
    if "anomaly" in tasks:
        row["anomaly_auroc"] = tasks["anomaly"]["all"]["auroc"]
    if "reduce" in tasks and "linear" in tasks["reduce"]:
        row["reduce_linear"] = (
            tasks["reduce"]["linear"]["encoder"],
            tasks["reduce"]["linear"]["pca"],
        )
    if "reduce" in tasks:
        red = tasks["reduce"]
        row["pca"] = row.get("pca", {"dims": red["dims"]}) | {
            "reconstruct_psnr": red["reconstruction"]["pca"]["psnr_db"]
        }
        row["pca"] |= {k: red[k]["pca"] for k in ("linear", "knn") if k in red}
    row["figures"] = []
    for png in sorted(run.glob("evaluate/*/*.png")):
        name = f"{run.name}_{png.name}"
        shutil.copyfile(png, figures / name)
        row["figures"].append(f"figures/{name}")
    return row


def run_cell(value: Any, key: str) -> str:
    if value is None:
        return "–"
    if key == "reduce_linear":
        return f"{100 * value[0]:.1f}% / {100 * value[1]:.1f}%"
    if key in ("linear", "knn", "random_linear", "random_knn", *OPTIONAL_COLUMNS):
        return f"{100 * value:.1f}%"
    return value if isinstance(value, str) else f"{value:.2f}" if "psnr" in key else f"{value:.3f}"


def runs_markdown(rows: list[dict[str, Any]]) -> list[str]:
    columns = [
        (k, t) for k, t in RUN_COLUMNS if k not in OPTIONAL_COLUMNS or any(k in r for r in rows)
    ]
    lines = [
        "| method | steps | " + " | ".join(title for _, title in columns) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for r in rows:
        cells = [run_cell(r.get(k), k) for k, _ in columns]
        lines.append(f"| {r['method']} | {r['steps'] or '–'} | " + " | ".join(cells) + " |")
    baselines = pca_rows(rows)
    for pca in baselines:
        cells = [
            run_cell(pca.get(k), k) + ("†" if k in ("linear", "knn") and k in pca else "")
            for k, _ in columns
        ]
        lines.append(f"| PCA-{pca['dims']} (pixels) | – | " + " | ".join(cells) + " |")
    if baselines:
        lines += [
            "",
            "PCA rows: as many components as the codes, fitted on the training images of "
            "`mae.evaluate reduce`; reconstruction is the projection of the test images, denoising "
            "the projection of the noisy ones. † linear and kNN of the PCA codes by `reduce`'s own "
            "probes (fitted on its training images, tested on its test images), not "
            "`finetune.py`'s full split.",
        ]
    lines += ["", "Figures:", ""]
    for r in rows:
        links = ", ".join(
            f"[{Path(f).stem.removeprefix(Path(r['run']).name + '_')}]({f})" for f in r["figures"]
        )
        lines.append(f"- {r['method']} (`{r['run']}`): {links or 'none'}")
    return lines


def pca_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One PCA baseline per code size among ``rows``: the values of the first run of that size that
    has them (PCA depends on the data and the size alone, not the run)."""
    found: dict[int, dict[str, Any]] = {}
    for r in rows:
        if "pca" in r:
            found.setdefault(r["pca"]["dims"], {}).update(
                {k: v for k, v in r["pca"].items() if v is not None}
            )
    return [found[d] for d in sorted(found)]


# ------------------------------------------------------------------------------------------- report


def write_report(runs: list[str], results: list[str], out: Path) -> str:
    """``out/report.md`` and ``out/report.json`` (``{"runs": [...], "results": [...]}``) from the
    run directories ``runs`` and the ``results.json`` files under ``results``; returns the
    Markdown."""
    if not runs and not results:
        raise ReportError(
            "report needs --run RUN_DIR (pretraining runs) or --results DIR (finetune.py results)"
        )
    paths = find_results(results)
    if results and not paths:
        raise ReportError(f"no results.json under --results {results}; run finetune.py first")
    result_rows = [read_result(p) for p in paths]
    probes: dict[str, dict[str, float]] = {}  # resolved run dir -> {mode or random_mode: top1}
    for r in result_rows:
        fresh = r["encoder"].startswith("random:")
        key = str(Path(r["encoder"].removeprefix("random:")).resolve())
        probes.setdefault(key, {})[("random_" if fresh else "") + r["mode"]] = r["top1"]
    out.mkdir(parents=True, exist_ok=True)
    if runs:
        (out / "figures").mkdir(exist_ok=True)
    run_rows = [run_row(run, probes, out / "figures") for run in map(Path, runs)]
    lines = runs_markdown(run_rows) if run_rows else []
    if result_rows:
        lines += ([""] if lines else []) + [
            "Probes and fine-tunes (one row per `results.json`):",
            "",
        ]
        lines += results_markdown(result_rows)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps({"runs": run_rows, "results": result_rows}, indent=1)
    )
    return text

"""The tasks of ``python -m mae.evaluate`` (``mae/evaluate.py`` is the command line, light enough
for ``--help`` to answer at once; this module loads the models, the data and the figures). What
each task measures is told there."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from mae.config import Config, DataConfig
from mae.data.bad_images import BAD_IMAGES, bad_images, count_within_limit
from mae.data.holdout import evaluation_rows
from mae.data.images import ImageDataset, eval_transform, kept
from mae.data.loading import label_column, load_splits
from mae.errors import EvaluateError
from mae.eval.metrics import detection_scores, image_metrics, pixel_mse, psnr_summary
from mae.eval.pca import denoise, reduce
from mae.export import load_run_model
from mae.visualize import denormalize, pyplot, save_tiles

# ------------------------------------------------------------------------------------- data + model


class Evaluation:
    """A run's model in eval mode and its data, as the run preprocessed it: the rows scored and the
    rows a baseline is fitted on, never the same ones (``mae.data.holdout``, the rule
    ``finetune.py`` follows too). Undecodable images are left out, not replaced (a replacement
    would count its neighbour twice), and recorded in ``bad_log``; more than ``max_bad_images``
    (None: the run's ``data.max_bad_images``) stop the task."""

    def __init__(
        self,
        run: str,
        dataset: str | None,
        split: str | None,
        fit_split: str,
        holdout_fraction: float,
        max_images: int,
        batch: int,
        seed: int,
        bad_log: Path,
        max_bad_images: int | None = None,
    ) -> None:
        try:
            self.model, cfg = load_run_model(run)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise EvaluateError(f"--run {run}: {e}") from e
        self.model.eval()
        self.cfg: Config = cfg
        self.data: DataConfig = cfg.data  # the run's own preprocessing
        self.dataset = cfg.data.dataset if dataset is None else dataset
        self.fit_split = fit_split
        self.rows = evaluation_rows(
            load_splits(self.dataset),
            self.dataset,
            fit_split,
            split,
            holdout_fraction,
            seed,
            self.data.label_column,
            fit_key="--fit-split",
            eval_key="--split",
        )
        if self.rows.line:
            print(self.rows.line)
        self.max_images, self.batch, self.seed = max_images, batch, seed
        self.bad_log = bad_log
        self.max_bad_images = cfg.data.max_bad_images if max_bad_images is None else max_bad_images
        # the rows a task took, as indices into their split
        self.used: dict[str, list[int]] = {}

    def images(self, limit: int | None = None) -> ImageDataset:
        """The first ``limit`` (default ``--max-images``) of the rows scored."""
        n = min(len(self.rows.scored), limit or self.max_images)
        self.used["scored_indices"] = self.rows.scored_indices[:n]
        return self._image_dataset(self.rows.scored.select(range(n)), "the rows scored")

    def fit_images(self, limit: int) -> ImageDataset:
        """The first ``limit`` of the rows a baseline is fitted on."""
        n = min(len(self.rows.fit), limit)
        self.used["fit_indices"] = self.rows.fit_indices[:n]
        return self._image_dataset(self.rows.fit.select(range(n)), f"split {self.fit_split!r}")

    def class_names(self, count: int) -> list[str]:
        """The names of classes 0..``count``-1 for figures and per-class results: the label
        column's ``ClassLabel`` names (a folder's subfolder names), else the class ids."""
        column = label_column(self.rows.fit, self.data.label_column)
        feature = self.rows.fit.features.get(column) if column else None
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else []
        return [names[c] if c < len(names) else str(c) for c in range(count)]

    def _image_dataset(self, rows: datasets.Dataset, name: str) -> ImageDataset:
        return ImageDataset(
            rows,
            self.data.columns,
            eval_transform(self.data),
            bad_log=self.bad_log,
            drop_bad=True,
            name=name,
        )

    def record(self) -> dict[str, Any]:
        """How the rows were chosen, for ``metrics.json``; when held out of the fit split, also
        the rows scored and fitted on (indices into it), whose being apart is then the point."""
        held_out = "holdout_indices" in self.rows.record
        return {**self.rows.record, **(self.used if held_out else {})}

    def batches(self, data: ImageDataset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``data``'s (images, labels) batches without its undecodable images; past
        ``max_bad_images`` of them, a ``BadImagesError``."""
        for batch in DataLoader(data, batch_size=self.batch, shuffle=False, num_workers=0):
            images, labels = kept(*batch)
            count_within_limit(self.bad_log, self.max_bad_images, "--max-bad-images")
            if len(labels):
                yield images, labels

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return denormalize(x, self.data.mean, self.data.std)

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.data.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.data.std).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def grid(
        self, path: Path, panels: list[torch.Tensor], titles: list[str], rows: int = 8
    ) -> None:
        """One row per image, one column per panel (pixels in [0, 1]), each column titled."""
        stacked = torch.stack([p[:rows].clamp(0, 1) for p in panels], dim=1).flatten(0, 1)
        save_tiles(stacked, path, nrow=len(panels), titles=titles)


# ------------------------------------------------------------------------------------- tasks


def reconstruct(ev: Evaluation, out: Path, mask_ratio: float | None) -> dict[str, Any]:
    if mask_ratio is not None:
        if not hasattr(ev.model, "mask_ratio"):
            raise EvaluateError(
                f"--mask-ratio applies to MAE runs; this run is {ev.cfg.model.name!r}"
            )
        if not 0 < mask_ratio < 1:
            raise EvaluateError(f"--mask-ratio={mask_ratio} must be strictly between 0 and 1")
        ev.model.mask_ratio = mask_ratio
    torch.manual_seed(ev.seed)  # MAE's masks
    mse, ssim, first = [], [], None
    for images, _ in ev.batches(ev.images()):
        recon = ev.model.reconstruct(images)
        pixels, target = ev.to_pixels(recon), ev.to_pixels(images)
        m = image_metrics(pixels, target)
        mse.append(m["mse"])
        ssim.append(m["ssim"])
        if first is None:
            first = (images, pixels, target)
    images, pixels, target = first
    panels, titles = [pixels, target], ["reconstruction", "original"]
    if hasattr(ev.model, "mask_ratio"):  # show what the encoder saw: the visible patches
        torch.manual_seed(ev.seed)
        seen = ev.model(images)
        panels = [ev.to_pixels(images * (1 - seen.mask)), pixels, target]
        titles = ["masked input", *titles]
    ev.grid(out / "reconstruct.png", panels, titles)
    result = {
        **psnr_summary(torch.cat(mse)),
        "ssim": torch.cat(ssim).mean().item(),
        "images": len(torch.cat(mse)),
    }
    if mask_ratio is not None or hasattr(ev.model, "mask_ratio"):
        result["mask_ratio"] = ev.model.mask_ratio
    return result


def anomaly(ev: Evaluation, out: Path, normal: list[int]) -> dict[str, Any]:
    plt = pyplot()
    data = ev.images()
    if data.rows.columns.label is None:
        raise EvaluateError("anomaly needs class labels; the split has no ClassLabel column")
    torch.manual_seed(ev.seed)
    scores, labels = [], []
    for images, y in ev.batches(data):
        recon = ev.model.reconstruct(images)
        scores.append(pixel_mse(ev.to_pixels(recon), ev.to_pixels(images)))
        labels.append(y)
    s, y = torch.cat(scores), torch.cat(labels)
    present = set(y.unique().tolist())
    if not set(normal) <= present or present <= set(normal):
        raise EvaluateError(
            f"--normal {normal}: the split's classes are {sorted(present)}; name normal classes it "
            "has, and not all"
        )
    result = {
        "normal": normal,
        "score": "reconstruction MSE",
        **detection_scores(s, y, normal),
        "images": len(s),
    }
    is_normal = torch.isin(y, torch.tensor(normal))
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = torch.linspace(s.min().item(), s.max().item(), 50).tolist()
    names = ev.class_names(max(present) + 1)
    shown = ", ".join(names[c] for c in normal)
    ax.hist(s[is_normal].tolist(), bins=bins, alpha=0.6, density=True, label=f"normal: {shown}")
    ax.hist(s[~is_normal].tolist(), bins=bins, alpha=0.6, density=True, label="anomalous")
    ax.set_xlabel("reconstruction MSE")
    ax.set_ylabel("density")
    ax.set_title(f"AUROC {result['all']['auroc']:.3f}, AUPR {result['all']['aupr']:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "anomaly_scores.png", dpi=120)
    plt.close(fig)
    return result


def sample(ev: Evaluation, out: Path, n: int) -> dict[str, Any]:
    if not hasattr(ev.model, "sample"):
        raise EvaluateError(
            f"sample needs a generative model (model.name=vae); this run is {ev.cfg.model.name!r}"
        )
    g = torch.Generator().manual_seed(ev.seed)
    samples = ev.to_pixels(ev.model.sample(n, generator=g))
    save_tiles(samples, out / "samples.png", nrow=int(math.ceil(math.sqrt(n))))
    data = ev.images(limit=16)
    pairs = min(4, len(data) // 2)
    if pairs == 0:
        raise EvaluateError("sample: the split needs at least 2 images for an interpolation")
    images = torch.stack([data[i][0] for i in range(2 * pairs)])
    z = ev.model.encode(images)
    t = torch.linspace(0, 1, 8).view(1, -1, 1)
    path = z[0::2, None] * (1 - t) + z[1::2, None] * t  # (pairs, 8, latent)
    frames = ev.to_pixels(ev.model.decode(path.flatten(0, 1)))
    save_tiles(frames, out / "interpolations.png", nrow=8)
    return {"samples": n, "interpolations": pairs, "steps": 8}


# ------------------------------------------------------------------------------------- entry


def _run_task(args: argparse.Namespace, ev: Evaluation, out: Path) -> dict:
    """The task's metrics, its files written into ``out``."""
    if getattr(ev.model, "teacher", None) is not None:  # every task compares pixels
        raise EvaluateError(
            f"{args.task} needs the run's reconstructions and this run predicts teacher features "
            "(model.target=teacher), not pixels; probe its encoder with finetune.py"
        )
    if args.task == "reconstruct":
        return reconstruct(ev, out, args.mask_ratio)
    if args.task == "denoise":
        return denoise(ev, out, args.corruption, args.level, args.patch, args.fit_images)
    if args.task == "anomaly":
        try:
            normal = [int(c) for c in args.normal.split(",")]
        except ValueError as e:
            raise EvaluateError(
                f"--normal {args.normal!r}: give comma-separated class ids, e.g. 0,1"
            ) from e
        return anomaly(ev, out, normal)
    if args.task == "reduce":
        return reduce(ev, out, args.fit_images)
    return sample(ev, out, args.n)


def run(args: argparse.Namespace) -> Path:
    """Task ``args.task`` on ``args.run`` as ``python -m mae.evaluate`` parsed it: its files and
    ``metrics.json`` written into its output folder, which is returned."""
    if len(args.run) != 1:
        raise EvaluateError(f"{args.task} evaluates one run; pass --run RUN_DIR once")
    run_dir = args.run[0]
    if args.max_images <= 0 or args.batch_size <= 0 or args.fit_images <= 0:
        raise EvaluateError("--max-images, --fit-images and --batch-size must be positive")
    if not 0 < args.holdout_fraction < 1:
        raise EvaluateError(f"--holdout-fraction={args.holdout_fraction} must be in (0, 1)")
    if args.max_bad_images is not None and args.max_bad_images < 0:
        raise EvaluateError(f"--max-bad-images={args.max_bad_images}: give 0 or more")
    out = Path(args.out) if args.out else Path(run_dir) / "evaluate" / args.task
    (out / BAD_IMAGES).unlink(missing_ok=True)  # a task starts afresh: its record lists its own
    ev = Evaluation(
        run_dir,
        args.dataset,
        args.split,
        args.fit_split,
        args.holdout_fraction,
        args.max_images,
        args.batch_size,
        args.seed,
        out / BAD_IMAGES,
        args.max_bad_images,
    )
    out.mkdir(parents=True, exist_ok=True)
    result = _run_task(args, ev, out)
    record = {
        "task": args.task,
        "run": run_dir,
        "dataset": ev.dataset,
        **ev.record(),
        **result,
        "bad_images": [r["source"] for r in bad_images(ev.bad_log)],
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(result, indent=1))
    return out

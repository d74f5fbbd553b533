"""What autoencoders are used for, measured: ``python -m mae.evaluate TASK --run RUN_DIR [options]``.

Tasks (each writes ``metrics.json`` and PNGs into ``--out``, default ``RUN_DIR/evaluate/TASK``):

- ``reconstruct``: MSE, PSNR and SSIM (pixels in [0, 1]) between a split's images and their
  reconstructions, and a grid (input as the encoder saw it | reconstruction | original). For MAE
  the reconstruction keeps the visible patches and predicts the hidden ones (``--mask-ratio``).
- ``denoise``: corrupt the split (``--corruption``, ``--level``), reconstruct, PSNR before and
  after; grid (noisy | restored | clean).
- ``anomaly``: classes ``--normal`` are normal, every other class an anomaly; the score of an
  image is its reconstruction error. AUROC and AUPR (anomaly = positive) per anomalous class and
  for all of them, and the two score histograms. Train on the normal classes only with
  ``pretrain.py data.classes=[...]``, or score with a model trained on everything.
- ``reduce``: the encoder as dimensionality reduction against PCA with as many components as the
  code has: reconstruction error of both on the split, linear-probe and kNN accuracy of both
  (fitted on ``--fit-split``), and a 2-D PCA scatter of the codes coloured by class.
- ``sample`` (generative models): a grid of prior samples and latent interpolations between
  pairs of the split's images.
- ``report``: the tables of ``mae.results_table`` (runs with their probes and the tasks above;
  every ``results.json`` under ``--results``) as ``report.md`` + ``report.json`` in ``--out``.

PSNR of identical images is infinite: ``psnr_db`` is 10 log10(1 / mean MSE) over the split
(``"inf"`` when every image is reproduced exactly), ``psnr_db_mean`` the mean over the images
that differ, and ``identical`` counts the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.functional.image import structural_similarity_index_measure

from mae.config import Config, DataConfig
from mae.data.images import ImageDataset, eval_transform
from mae.data.loading import DataError, load_splits, pick_split
from mae.errors import UserError
from mae.eval_config import ProbeConfig
from mae.export import load_run_model
from mae.models.dae import corrupt_pixels
from mae.probe import accuracy, knn_scores, linear_probe
from mae.results_table import write_report
from mae.visualize import denormalize, save_tiles

TASKS = ("reconstruct", "denoise", "anomaly", "reduce", "sample", "report")


class EvaluateError(UserError, ValueError):
    """A task that cannot run as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------- metrics


def psnr_summary(mse: torch.Tensor) -> dict[str, Any]:
    """PSNR over images with per-image MSE ``mse`` (pixels in [0, 1]); identical images handled."""
    identical = mse == 0
    mean_mse = mse.mean().item()
    per_image = -10 * torch.log10(mse[~identical])
    return {
        "mse": mean_mse,
        "psnr_db": "inf" if mean_mse == 0 else -10 * math.log10(mean_mse),
        "psnr_db_mean": per_image.mean().item() if len(per_image) else "inf",
        "identical": int(identical.sum()),
    }


def pixel_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of (B, ...) tensors: (B,)."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def image_metrics(pixels: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE and SSIM of (B, C, H, W) pixels in [0, 1]."""
    mse = pixel_mse(pixels, target)
    side = min(target.shape[-2:])
    size = 11 if side >= 11 else side - (side + 1) % 2  # the usual 11x11 window, or the largest odd one that fits
    ssim = structural_similarity_index_measure(
        pixels.float(), target.float(), data_range=1.0, reduction="none", kernel_size=size
    )
    return {"mse": mse, "ssim": ssim}


def detection_scores(scores: torch.Tensor, labels: torch.Tensor, normal: list[int]) -> dict[str, Any]:
    """AUROC / AUPR of ``scores`` (higher = more anomalous), each anomalous class against the normal ones."""
    is_normal = torch.isin(labels, torch.tensor(normal))
    out: dict[str, Any] = {"per_class": {}}
    groups = {int(c): labels == c for c in labels.unique().tolist() if c not in normal}
    groups_all = {"all": ~is_normal}
    for name, positive in {**groups, **groups_all}.items():
        keep = positive | is_normal
        target = positive[keep].long()
        row = {
            "auroc": binary_auroc(scores[keep], target).item(),
            "aupr": binary_average_precision(scores[keep], target).item(),
            "count": int(positive.sum()),
        }
        if name == "all":
            out["all"] = row
        else:
            out["per_class"][str(name)] = row
    return out


def pca_fit(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), components (dims, D)) of the rows of ``x`` (N, D), by SVD of the centred data."""
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, vh[:dims]


# ---------------------------------------------------------------------------------------------- data + model


class Evaluation:
    """A run's model in eval mode and its data, as the run preprocessed it."""

    def __init__(self, run: str, dataset: str | None, split: str, max_images: int, batch: int, seed: int) -> None:
        try:
            self.model, cfg = load_run_model(run)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise EvaluateError(f"--run {run}: {e}") from e
        self.model.eval()
        self.cfg: Config = cfg
        self.data: DataConfig = cfg.data if dataset is None else dataclasses.replace(cfg.data, dataset=dataset)
        self.splits = load_splits(self.data)
        self.split, self.max_images, self.batch, self.seed = split, max_images, batch, seed

    def images(self, split: str | None = None, limit: int | None = None) -> ImageDataset:
        name = split or self.split
        ds = pick_split(self.splits, self.data, name, "--split")
        n = min(len(ds), limit or self.max_images)
        return ImageDataset(ds.select(range(n)), self.data, eval_transform(self.data))

    def batches(self, data: ImageDataset):
        return DataLoader(data, batch_size=self.batch, shuffle=False, num_workers=0)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return denormalize(x, self.data.mean, self.data.std)

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.data.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.data.std).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def grid(self, path: Path, panels: list[torch.Tensor], rows: int = 8) -> None:
        """One row per image, one column per panel (pixels in [0, 1])."""
        stacked = torch.stack([p[:rows].clamp(0, 1) for p in panels], dim=1).flatten(0, 1)
        save_tiles(stacked, path, nrow=len(panels))


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported only by the tasks that plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------- tasks


def reconstruct(ev: Evaluation, out: Path, mask_ratio: float | None) -> dict[str, Any]:
    if mask_ratio is not None:
        if not hasattr(ev.model, "mask_ratio"):
            raise EvaluateError(f"--mask-ratio applies to MAE runs; this run is {ev.cfg.model.name!r}")
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
    panels = [pixels, target]
    if hasattr(ev.model, "mask_ratio"):  # show what the encoder saw: the visible patches
        torch.manual_seed(ev.seed)
        seen = ev.model(images)
        panels = [ev.to_pixels(images * (1 - seen.mask)), pixels, target]
    ev.grid(out / "reconstruct.png", panels)
    result = {**psnr_summary(torch.cat(mse)), "ssim": torch.cat(ssim).mean().item(), "images": len(torch.cat(mse))}
    if mask_ratio is not None or hasattr(ev.model, "mask_ratio"):
        result["mask_ratio"] = ev.model.mask_ratio
    return result


def denoise(ev: Evaluation, out: Path, corruption: str, level: float, patch: int) -> dict[str, Any]:
    if level < 0 or (corruption != "gaussian" and level > 1):
        raise EvaluateError(f"--level={level}: a std >= 0 for gaussian, a fraction in [0, 1] otherwise")
    torch.manual_seed(ev.seed)
    before, after, first = [], [], None
    for images, _ in ev.batches(ev.images()):
        clean = ev.to_pixels(images)
        noisy = corrupt_pixels(clean, corruption, level, patch).clamp(0, 1)
        restored = ev.to_pixels(ev.model.reconstruct(ev.from_pixels(noisy)))
        before.append(pixel_mse(noisy, clean))
        after.append(pixel_mse(restored, clean))
        if first is None:
            first = [noisy, restored, clean]
    ev.grid(out / "denoise.png", first)
    return {
        "corruption": corruption,
        "level": level,
        "noisy": psnr_summary(torch.cat(before)),
        "restored": psnr_summary(torch.cat(after)),
        "images": len(torch.cat(after)),
    }


def anomaly(ev: Evaluation, out: Path, normal: list[int]) -> dict[str, Any]:
    plt = _pyplot()
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
            f"--normal {normal}: the split's classes are {sorted(present)}; name normal classes it has, and not all"
        )
    result = {"normal": normal, "score": "reconstruction MSE", **detection_scores(s, y, normal), "images": len(s)}
    is_normal = torch.isin(y, torch.tensor(normal))
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = torch.linspace(s.min().item(), s.max().item(), 50).tolist()
    ax.hist(s[is_normal].tolist(), bins=bins, alpha=0.6, density=True, label=f"normal {normal}")
    ax.hist(s[~is_normal].tolist(), bins=bins, alpha=0.6, density=True, label="anomalous")
    ax.set_xlabel("reconstruction MSE")
    ax.set_ylabel("density")
    ax.set_title(f"AUROC {result['all']['auroc']:.3f}, AUPR {result['all']['aupr']:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "anomaly_scores.png", dpi=120)
    plt.close(fig)
    return result


def reduce(ev: Evaluation, out: Path, fit_split: str, fit_images: int) -> dict[str, Any]:
    plt = _pyplot()

    def codes_and_pixels(data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, flat, recon_mse, labels = [], [], [], []
        torch.manual_seed(ev.seed)
        for images, y in ev.batches(data):
            codes.append(ev.model.encode(images).float())
            flat.append(images.flatten(1))
            recon = ev.model.reconstruct(images)
            recon_mse.append(pixel_mse(ev.to_pixels(recon), ev.to_pixels(images)))
            labels.append(y)
        return torch.cat(codes), torch.cat(flat), torch.cat(recon_mse), torch.cat(labels)

    with torch.no_grad():
        fit_codes, fit_flat, _, fit_labels = codes_and_pixels(ev.images(fit_split, fit_images))
        codes, flat, ae_mse, labels = codes_and_pixels(ev.images())
    dims = codes.shape[1]
    if dims > min(fit_flat.shape):
        raise EvaluateError(
            f"the code has {dims} dimensions; PCA needs at least as many fit images: raise --fit-images"
        )
    mean, comps = pca_fit(fit_flat, dims)
    pca_fit_codes, pca_codes = (fit_flat - mean) @ comps.T, (flat - mean) @ comps.T
    pca_recon = (pca_codes @ comps + mean).view(-1, ev.data.channels, *ev.data.hw)
    target = ev.to_pixels(flat.view_as(pca_recon))
    pca_mse = pixel_mse(ev.to_pixels(pca_recon), target)
    result: dict[str, Any] = {"dims": dims, "fit_images": len(fit_flat), "images": len(flat)}
    result["reconstruction"] = {"encoder": psnr_summary(ae_mse), "pca": psnr_summary(pca_mse)}
    if (labels >= 0).all() and (fit_labels >= 0).all():
        classes = int(max(labels.max(), fit_labels.max())) + 1
        names = [str(c) for c in range(classes)]
        probe = ProbeConfig(epochs=50, warmup_epochs=5, batch_size=min(256, len(fit_labels)))
        for name, (a, b) in {"encoder": (fit_codes, codes), "pca": (pca_fit_codes, pca_codes)}.items():
            train, test = {"features": a, "labels": fit_labels}, {"features": b, "labels": labels}
            result.setdefault("linear", {})[name] = accuracy(
                linear_probe(train, test, classes, probe, ev.seed), labels, names
            )["top1"]
            result.setdefault("knn", {})[name] = accuracy(knn_scores(train, test, classes, 20, 0.07), labels, names)[
                "top1"
            ]
    # 2-D view of the codes: their first two principal components
    c_mean, c_comps = pca_fit(codes, 2)
    xy = (codes - c_mean) @ c_comps.T
    fig, ax = plt.subplots(figsize=(5, 5))
    sc = ax.scatter(xy[:, 0].tolist(), xy[:, 1].tolist(), c=labels.tolist(), s=4, cmap="tab10")
    ax.set_title(f"codes ({dims}-d), first two principal components")
    if (labels >= 0).all():
        ax.legend(*sc.legend_elements(), fontsize=6, loc="best", title="class")
    fig.tight_layout()
    fig.savefig(out / "codes_pca.png", dpi=120)
    plt.close(fig)
    return result


def sample(ev: Evaluation, out: Path, n: int) -> dict[str, Any]:
    if not hasattr(ev.model, "sample"):
        raise EvaluateError(f"sample needs a generative model (model.name=vae); this run is {ev.cfg.model.name!r}")
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


# ---------------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mae.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=TASKS)
    parser.add_argument(
        "--run", action="append", default=[], help="a run directory written by pretrain.py (report: several)"
    )
    parser.add_argument(
        "--results", action="append", default=[], help="report: finetune.py output_dirs or folders holding them"
    )
    parser.add_argument("--out", help="output folder (default RUN/evaluate/TASK)")
    parser.add_argument("--dataset", help="data.dataset to evaluate on (default: the run's)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-images", type=int, default=2000, help="the first N images of the split")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-ratio", type=float, help="reconstruct: MAE mask ratio (default: the run's)")
    parser.add_argument("--corruption", default="gaussian", choices=("gaussian", "masking", "salt_pepper"))
    parser.add_argument("--level", type=float, default=0.2, help="denoise: noise std or fraction")
    parser.add_argument("--patch", type=int, default=1, help="denoise: side of masked squares")
    parser.add_argument("--normal", default="0", help="anomaly: comma-separated normal class ids")
    parser.add_argument("--fit-split", default="train", help="reduce: split PCA and the probes are fitted on")
    parser.add_argument("--fit-images", type=int, default=5000, help="reduce: images of --fit-split used")
    parser.add_argument("-n", type=int, default=64, help="sample: images to generate")
    args = parser.parse_args(argv)
    try:
        if args.task == "report":
            if not args.out:
                raise EvaluateError("report needs --out, the folder for report.md, report.json and the figures")
            print(write_report(args.run, args.results, Path(args.out)), end="")
            return 0
        if len(args.run) != 1:
            raise EvaluateError(f"{args.task} evaluates one run; pass --run RUN_DIR once")
        run = args.run[0]
        if args.max_images <= 0 or args.batch_size <= 0:
            raise EvaluateError("--max-images and --batch-size must be positive")
        ev = Evaluation(run, args.dataset, args.split, args.max_images, args.batch_size, args.seed)
        out = Path(args.out) if args.out else Path(run) / "evaluate" / args.task
        out.mkdir(parents=True, exist_ok=True)
        if args.task == "reconstruct":
            result = reconstruct(ev, out, args.mask_ratio)
        elif args.task == "denoise":
            result = denoise(ev, out, args.corruption, args.level, args.patch)
        elif args.task == "anomaly":
            try:
                normal = [int(c) for c in args.normal.split(",")]
            except ValueError as e:
                raise EvaluateError(f"--normal {args.normal!r}: give comma-separated class ids, e.g. 0,1") from e
            result = anomaly(ev, out, normal)
        elif args.task == "reduce":
            result = reduce(ev, out, args.fit_split, args.fit_images)
        else:
            result = sample(ev, out, args.n)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = {"task": args.task, "run": run, "split": args.split, "dataset": ev.data.dataset, **result}
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

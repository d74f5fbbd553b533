"""The ``mae.evaluate`` tasks judged against PCA with as many components as the code has: ``reduce``
(reconstruction, linear probe and kNN of the code and of PCA) and ``denoise`` (the model's
restoration and the projection of the noisy image on PCA's components).

PCA is fitted in pixel space (values in [0, 1], every channel alike) on ``--fit-images`` images of
``--fit-split`` (default 20,000 of train), by an SVD of the centred data: the best linear code of
that size, the baseline an autoencoder should beat at equal code size. It is never fitted on an
image it is scored on: where the split scored is the fit split, it fits on the rows not held out
(``mae.data.holdout``); fitted on the very images it reconstructs, PCA wins by a margin that
measures only that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mae.config.evaluation import ProbeConfig
from mae.data.images import ImageDataset
from mae.errors import UserError
from mae.eval.metrics import pixel_mse, psnr_summary
from mae.eval.probe import accuracy, knn_scores, linear_probe
from mae.models.dae import corrupt_pixels
from mae.visualize import pyplot

# ``ev`` below is an ``mae.eval.tasks.Evaluation`` (a run's model and data); that module imports
# this one, so the type is written as Any rather than imported back.
Evaluation = Any


class PCA:
    """Mean (D,) and the first ``dims`` principal components (dims, D) of the rows of
    ``x`` (N, D)."""

    def __init__(self, x: torch.Tensor, dims: int) -> None:
        if dims > min(x.shape):
            raise UserError(
                f"PCA of {dims} components needs at least {dims} fit images; raise --fit-images"
            )
        self.mean = x.mean(dim=0)
        _, _, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vh[:dims]

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.T

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, D) reconstructed from its codes: the nearest point of the components' affine
        span."""
        return self.codes(x) @ self.components + self.mean


def fit_pixel_pca(ev: Evaluation, images: int, dims: int) -> tuple[PCA, int]:
    """PCA of the first ``images`` fit rows in pixel space, and how many images it was fitted
    on (fewer than asked where the split has fewer)."""
    batches = ev.batches(ev.fit_images(images))
    pixels = torch.cat([ev.to_pixels(x).flatten(1).double() for x, _ in batches])
    return PCA(pixels, dims), len(pixels)


def code_size(ev: Evaluation) -> int:
    return int(ev.model.feature_dim)


def run_corruption(
    ev: Evaluation, corruption: str | None, level: float | None, patch: int | None
) -> tuple:
    """The corruption to evaluate, what is not given filled from the one a denoising run trained
    with (other runs, or another kind than the run's: Gaussian std 0.2, or a fraction 0.5 of single
    pixels)."""
    m = ev.cfg.model
    trained = (
        (m.corruption, m.noise_level, m.corruption_patch)
        if m.name == "dae"
        else ("gaussian", 0.2, 1)
    )
    kind = corruption or trained[0]
    fill = trained if kind == trained[0] else (kind, 0.2 if kind == "gaussian" else 0.5, 1)
    return kind, fill[1] if level is None else level, patch or fill[2]


def denoise(
    ev: Evaluation,
    out: Path,
    corruption: str | None,
    level: float | None,
    patch: int | None,
    fit_images: int,
) -> dict[str, Any]:
    corruption, level, patch = run_corruption(ev, corruption, level, patch)
    if level < 0 or (corruption != "gaussian" and level > 1):
        raise UserError(f"--level={level}: a std >= 0 for gaussian, a fraction in [0, 1] otherwise")
    pca, fitted = fit_pixel_pca(ev, fit_images, code_size(ev))
    torch.manual_seed(ev.seed)
    before, after, projected, first = [], [], [], None
    for images, _ in ev.batches(ev.images()):
        clean = ev.to_pixels(images)
        noisy = corrupt_pixels(clean, corruption, level, patch).clamp(0, 1)
        restored = ev.to_pixels(ev.model.reconstruct(ev.from_pixels(noisy)))
        by_pca = pca.project(noisy.flatten(1).double()).float().view_as(noisy).clamp(0, 1)
        before.append(pixel_mse(noisy, clean))
        after.append(pixel_mse(restored, clean))
        projected.append(pixel_mse(by_pca, clean))
        if first is None:
            first = [noisy, restored, by_pca, clean]
    ev.grid(out / "denoise.png", first, ["noisy input", "restored", "PCA", "original"])
    summary = {
        k: psnr_summary(torch.cat(v))
        for k, v in {"noisy": before, "restored": after, "pca": projected}.items()
    }
    print(
        f"denoise ({corruption} {level:g}): noisy {summary['noisy']['psnr_db']:.2f} dB, restored "
        f"{summary['restored']['psnr_db']:.2f} dB, projected on PCA-{code_size(ev)} "
        f"{summary['pca']['psnr_db']:.2f} dB"
    )
    return {
        "corruption": corruption,
        "level": level,
        "patch": patch,
        **summary,
        "pca_dims": code_size(ev),
        "fit_split": ev.fit_split,
        "fit_images": fitted,
        "images": len(torch.cat(after)),
    }


def _codes(ev: Evaluation, data: ImageDataset) -> tuple[torch.Tensor, ...]:
    """The model's codes, pixels (N, D), reconstruction MSE and labels of ``data``'s images."""
    codes, flat, recon_mse, labels = [], [], [], []
    torch.manual_seed(ev.seed)
    for images, y in ev.batches(data):
        codes.append(ev.model.encode(images).float())
        pixels = ev.to_pixels(images)
        flat.append(pixels.flatten(1).double())
        recon_mse.append(pixel_mse(ev.to_pixels(ev.model.reconstruct(images)), pixels))
        labels.append(y)
    return torch.cat(codes), torch.cat(flat), torch.cat(recon_mse), torch.cat(labels)


def reduce(ev: Evaluation, out: Path, fit_images: int) -> dict[str, Any]:
    with torch.no_grad():
        fit_codes, fit_flat, _, fit_labels = _codes(ev, ev.fit_images(fit_images))
        codes, flat, ae_mse, labels = _codes(ev, ev.images())
    dims = codes.shape[1]
    pca = PCA(fit_flat, dims)
    pca_mse = pixel_mse(pca.project(flat).clamp(0, 1), flat).float()
    result: dict[str, Any] = {
        "dims": dims,
        "fit_split": ev.fit_split,
        "fit_images": len(fit_flat),
        "images": len(flat),
    }
    result["reconstruction"] = {"encoder": psnr_summary(ae_mse), "pca": psnr_summary(pca_mse)}
    print(
        f"reconstruction PSNR: the {dims}-d code "
        f"{result['reconstruction']['encoder']['psnr_db']:.2f} dB, PCA-{dims} "
        f"{result['reconstruction']['pca']['psnr_db']:.2f} dB (fitted on {len(fit_flat)} other "
        f"images of {ev.fit_split})"
    )
    if (labels >= 0).all() and (fit_labels >= 0).all():
        classes = int(max(labels.max(), fit_labels.max())) + 1
        names = ev.class_names(classes)
        probe = ProbeConfig(epochs=50, warmup_epochs=5, batch_size=min(256, len(fit_labels)))
        features = {
            "encoder": (fit_codes, codes),
            "pca": (pca.codes(fit_flat).float(), pca.codes(flat).float()),
        }
        for name, (a, b) in features.items():
            train, test = {"features": a, "labels": fit_labels}, {"features": b, "labels": labels}
            logits = linear_probe(train, test, classes, probe, ev.seed)
            result.setdefault("linear", {})[name] = accuracy(logits, labels, names)["top1"]
            scores = knn_scores(train, test, classes, 20, 0.07)
            result.setdefault("knn", {})[name] = accuracy(scores, labels, names)["top1"]
    names = ev.class_names(int(labels.max()) + 1) if (labels >= 0).all() else None
    scatter_codes(codes, labels, out / "codes_pca.png", names)
    return result


def scatter_codes(
    codes: torch.Tensor, labels: torch.Tensor, path: Path, names: list[str] | None
) -> None:
    """2-D view of the codes: their first two principal components, coloured by class and
    labelled with the classes' ``names`` (None: unlabelled, one colour)."""
    plt = pyplot()
    xy = PCA(codes.double(), 2).codes(codes.double())
    fig, ax = plt.subplots(figsize=(5, 5))
    if names is None:
        ax.scatter(xy[:, 0].tolist(), xy[:, 1].tolist(), s=4)
    else:
        colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
        for c in labels.unique().tolist():
            at = labels == c
            ax.scatter(
                xy[at, 0].tolist(),
                xy[at, 1].tolist(),
                s=4,
                color=colours(c % colours.N),
                label=names[c],
            )
        ax.legend(fontsize=6, loc="best", title="class", markerscale=3)
    ax.set_title(f"codes ({codes.shape[1]}-d), first two principal components")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

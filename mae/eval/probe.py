"""Frozen-feature evaluation: linear probe and kNN on features extracted once and cached.

Features come from a frozen encoder (``mae.eval.encoders``) with its own deterministic eval
transform (timm's: resize, centre crop, normalise). They are cached on disk, keyed by the encoder's
weight digest and architecture, the dataset's rows and columns, the transform's values, the
pooling and the torch/timm versions, so a change to any of them extracts the features again.

- Linear probe (the MAE paper's head): ``BatchNorm1d(affine=False)`` + ``Linear``, LARS, lr = blr x
  batch / 256, linear warmup + cosine, cross-entropy; on cached features, or
  (``probe.cached=false``) on freshly augmented images passed through the frozen encoder every
  epoch.
- kNN: cosine similarity to every training feature, the ``k`` nearest vote with weight
  ``exp(similarity / temperature)``; ``probe.knn_features``: of the raw features, or less the
  training mean (centred), or also divided by the training std (standardised, as the linear head's
  BatchNorm sees them).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.data import create_transform
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mae.config import Columns, to_dict
from mae.config.evaluation import EvalConfig, ProbeConfig
from mae.data.bad_images import BAD_IMAGES, bad_images, count_within_limit, log_bad_image
from mae.data.holdout import EvalRows, evaluation_rows
from mae.data.images import EpochSampler, ImageDataset, crop_transform, kept
from mae.data.loading import DataError, dataset_fingerprint, label_column, load_splits
from mae.eval.encoders import FrozenEncoder, load_encoder

# ----------------------------------------------------------------------------------------- features


def image_dataset(
    ds: datasets.Dataset, cfg: EvalConfig, encoder: FrozenEncoder, name: str = "the dataset"
) -> ImageDataset:
    """Images converted to the encoder's channels, through its eval transform (labels: -1 when the
    split has none, which ``probe`` refuses). An undecodable image is dropped, not replaced
    (``ImageDataset``'s ``drop_bad``): a replacement would count its neighbour twice, in the kNN
    bank and in the accuracy; it is recorded in ``bad_log(cfg)`` as a row of ``name``."""
    transform = create_transform(**encoder.data_config, is_training=False)
    columns = encoder_columns(cfg, encoder)
    return ImageDataset(ds, columns, transform, bad_log=bad_log(cfg), drop_bad=True, name=name)


def bad_log(cfg: EvalConfig) -> Path:
    """Where the evaluation records its undecodable images: beside its ``results.json``."""
    return Path(cfg.output_dir) / BAD_IMAGES


def within_limit(cfg: EvalConfig) -> int:
    """The bad images recorded so far; more than ``data.max_bad_images`` stop the evaluation."""
    return count_within_limit(bad_log(cfg), cfg.data.max_bad_images, "data.max_bad_images")


def encoder_columns(cfg: EvalConfig, encoder: FrozenEncoder) -> Columns:
    """The evaluation data's columns, read in the encoder's channels."""
    channels = encoder.data_config["input_size"][0]
    return Columns(cfg.data.image_column, cfg.data.label_column, channels)


# Bump when feature extraction changes in a way the key below cannot see.
CACHE_VERSION = 1


def cache_key(
    encoder: FrozenEncoder, data: ImageDataset, source: str, split: str, pool: str
) -> str:
    """Everything the cached features depend on: the encoder (weights and architecture), the rows,
    columns and channel conversion, the transform, the pooling, and the code that ran them."""
    where = str(Path(source).resolve()) if Path(source).exists() else source
    parts = {
        "version": [CACHE_VERSION, torch.__version__, timm.__version__],
        "encoder": [encoder.sha256, encoder.arch],
        "dataset": [
            where,
            split,
            len(data),
            dataset_fingerprint(data.rows.ds),
        ],  # fingerprint of the selected rows/columns
        "columns": [data.rows.columns.image, data.rows.columns.label, data.rows.columns.mode],
        "transform": encoder.data_config,
        "pool": pool,
        "precision": encoder.precision,
        # the attention kernel (and so the rounding) follows device and precision
        "device": encoder.device.type,
        "blocks": encoder.blocks,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def extract(
    encoder: FrozenEncoder,
    data: ImageDataset,
    pool: str,
    batch_size: int,
    workers: int,
    check: Callable[[], Any] | None = None,
) -> dict:
    """Features (N, D) and labels (N,) of ``data``'s decodable images (its dropped ones left out);
    ``check`` runs after every batch (e.g. to stop past a number of bad images)."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = [], []
    for batch in tqdm(loader, desc="features", leave=False):
        images, y = kept(*batch)
        if len(y):
            feats.append(encoder.features(images, pool))
            labels.append(y)
        if check is not None:
            check()
    if not labels:
        raise DataError(f"no image of {data.rows.name} could be decoded; see {data.rows.bad_log}")
    return {"features": torch.cat(feats), "labels": torch.cat(labels)}


def cached_bad_images(path: Path) -> list[dict[str, Any]]:
    """The bad images recorded in a cache entry's metadata when its features were extracted."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("bad_images", "[]"))


def cached_features(
    encoder: FrozenEncoder, ds: datasets.Dataset, split: str, cfg: EvalConfig, pool: str
) -> tuple[dict, bool]:
    """(features (N, D) + labels (N,), whether they came from the cache). The images that could
    not be decoded are kept with the features (in the entry's metadata), so that a cached split
    records them in ``bad_log(cfg)`` as an extraction would."""
    data = image_dataset(ds, cfg, encoder, f"split {split!r}")
    path = (
        Path(cfg.probe.cache_dir).expanduser()
        / f"{cache_key(encoder, data, cfg.data.dataset, split, pool)}.safetensors"
    )
    if path.is_file():
        try:
            out, skipped = load_file(str(path)), cached_bad_images(path)
        except Exception:  # a damaged entry (e.g. a full disk): extract again
            path.unlink(missing_ok=True)
        else:
            for r in skipped:
                log_bad_image(bad_log(cfg), r["key"], r["source"], r["error"])
            within_limit(cfg)
            return out, True
    known = {r["key"] for r in bad_images(bad_log(cfg))}
    out = extract(
        encoder,
        data,
        pool,
        cfg.probe.extract_batch_size,
        cfg.data.num_workers,
        check=lambda: within_limit(cfg),
    )
    skipped = [r for r in bad_images(bad_log(cfg)) if r["key"] not in known]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(out, tmp, metadata={"bad_images": json.dumps(skipped)})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out, False


# ------------------------------------------------------------------------------------------- splits


def fit_and_eval_splits(cfg: EvalConfig) -> EvalRows:
    """The fitting rows, the evaluation rows, and a record of how the latter were chosen
    (``mae.data.holdout``: the rule ``python -m mae.evaluate`` follows too)."""
    d = cfg.data
    return evaluation_rows(
        load_splits(d.dataset),  # once: a hub id would be resolved again for every split
        d.dataset,
        d.split,
        d.eval_split,
        d.holdout_fraction,
        cfg.seed,
        d.label_column,
    )


def class_info(
    fit_ds: datasets.Dataset, eval_ds: datasets.Dataset, cfg: EvalConfig
) -> tuple[int, list[str]]:
    """(number of classes, class names); every image of both splits must carry a valid label."""
    col = label_column(fit_ds, cfg.data.label_column)
    if col is None:
        raise DataError(
            f"{cfg.data.dataset!r} has no ClassLabel column; name the labels: "
            "data.label_column=NAME"
        )
    fit_labels, eval_labels = torch.as_tensor(fit_ds[col]), torch.as_tensor(eval_ds[col])
    feature = fit_ds.features[col]
    if isinstance(feature, datasets.ClassLabel):
        num_classes, names = feature.num_classes, feature.names
    else:
        num_classes = int(max(fit_labels.max(), eval_labels.max())) + 1
        names = [str(c) for c in range(num_classes)]
    for which, labels in (("fit (data.split)", fit_labels), ("evaluation", eval_labels)):
        bad = int(((labels < 0) | (labels >= num_classes)).sum())
        if bad:
            raise DataError(
                f"the {which} split has {bad} images without a valid label (column {col!r}, "
                f"classes 0..{num_classes - 1}); choose a labelled split with data.split / "
                "data.eval_split"
            )
    return num_classes, names


# -------------------------------------------------------------------------------------------- heads


# epoch -> (features, labels) batches
Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def fit_linear_head(
    batches: Batches,
    steps_per_epoch: int,
    batch: int,
    dim: int,
    num_classes: int,
    p: ProbeConfig,
    seed: int,
) -> nn.Module:
    """The probe head (``p.head``: bn, the MAE paper's BN(affine=False) + Linear; linear, a Linear
    alone), fitted with LARS and warmup + cosine."""
    torch.manual_seed(seed)
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if p.head == "bn" else nn.Identity()
    head = nn.Sequential(norm, nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    total, warmup = p.epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch
    # LARS as in the MAE code: the trust ratio on the weight matrix, plain momentum SGD on the bias
    # (timm's Lars adapts a group only when it has weight decay, unless always_adapt is set)
    opt = Lars(
        [
            {"params": [head[1].weight], "weight_decay": p.weight_decay, "always_adapt": True},
            {"params": [head[1].bias], "weight_decay": 0.0, "always_adapt": False},
        ],
        lr=p.blr * batch / 256,
        momentum=0.9,
    )
    sched = CosineLRScheduler(
        opt,
        t_initial=max(1, total - warmup),
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    step = 0
    head.train()
    for epoch in range(p.epochs):
        for x, y in batches(epoch):
            sched.step_update(step)
            loss = F.cross_entropy(head(x), y.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


def linear_probe(
    train: dict, test: dict, num_classes: int, p: ProbeConfig, seed: int
) -> torch.Tensor:
    """Fit the head on cached features; returns logits (N_test, num_classes)."""
    x, y = train["features"], train["labels"]
    batch = min(p.batch_size, len(x))
    steps = len(x) // batch
    g = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x), generator=g)
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            yield x[idx], y[idx]

    head = fit_linear_head(batches, steps, batch, x.shape[1], num_classes, p, seed)
    with torch.no_grad():
        return head(test["features"])


def augmented_linear_probe(
    encoder: FrozenEncoder,
    ds: datasets.Dataset,
    cfg: EvalConfig,
    pool: str,
    test: dict,
    num_classes: int,
) -> torch.Tensor:
    """The paper's protocol: every epoch the training images pass, freshly cropped and flipped
    (RandomResizedCrop(0.08-1) + flip), through the frozen encoder into the head. An undecodable
    training image is replaced by the next one, with that one's label (as in pretraining)."""
    p = cfg.probe
    _, h, w = encoder.data_config["input_size"]
    mean, std = tuple(encoder.data_config["mean"]), tuple(encoder.data_config["std"])
    transform = crop_transform((h, w), (0.08, 1.0), mean, std)
    columns, name = encoder_columns(cfg, encoder), f"split {cfg.data.split!r}"
    data = ImageDataset(ds, columns, transform, cfg.seed, bad_log=bad_log(cfg), name=name)
    batch = min(p.batch_size, len(data))
    steps = len(data) // batch
    sampler = EpochSampler(len(data), steps * batch, seed=cfg.seed)
    loader = DataLoader(
        data, batch_size=batch, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=True
    )

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            chunks = images.split(p.extract_batch_size)
            yield torch.cat([encoder.features(chunk, pool) for chunk in chunks]), labels
            within_limit(cfg)

    dim = int(test["features"].shape[1])
    head = fit_linear_head(batches, steps, batch, dim, num_classes, p, cfg.seed)
    with torch.no_grad():
        return head(test["features"])


def knn_scores(
    train: dict,
    test: dict,
    num_classes: int,
    k: int,
    temperature: float,
    features: str = "raw",
    chunk: int = 512,
) -> torch.Tensor:
    """Temperature-weighted votes of the k most cosine-similar training features: (N_test, C).
    ``features``: ``raw``; ``centred`` (less the training features' mean); ``standardised`` (and
    divided by their std)."""
    mean = train["features"].float().mean(dim=0) if features != "raw" else 0.0
    scale = (
        train["features"].float().std(dim=0).clamp_min(1e-6) if features == "standardised" else 1.0
    )
    bank = F.normalize((train["features"] - mean) / scale, dim=1)
    bank_labels = train["labels"].long()
    k = min(k, len(bank))
    out = []
    for q in F.normalize((test["features"] - mean) / scale, dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (n, k), most similar first
        votes = torch.zeros(len(q), num_classes)
        # exp((s - s_max) / T): the same ranking as exp(s / T), without overflow at small T
        votes.scatter_add_(1, bank_labels[idx], ((sim - sim[:, :1]) / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def accuracy(scores: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """top-1 / top-5 (top-C when fewer classes) as fractions, and per-class top-1."""
    labels = labels.long()
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit1 = top[:, 0] == labels
    per_class = {
        name: hit1[labels == c].float().mean().item()
        for c, name in enumerate(class_names)
        if (labels == c).any()
    }
    return {
        "top1": hit1.float().mean().item(),
        "top5": (top == labels[:, None]).any(dim=1).float().mean().item(),
        "per_class": per_class,
    }


# -------------------------------------------------------------------------------------------- entry


def probe_encoder(cfg: EvalConfig) -> tuple[FrozenEncoder, str]:
    """The frozen encoder as the probes use it (on the GPU where there is one, the configured
    precision and blocks) and its pooling."""
    encoder = load_encoder(cfg.encoder, cfg.seed, cfg.num_heads).to(
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    encoder.set_precision(cfg.probe.mixed_precision)
    encoder.set_blocks(cfg.probe.blocks)
    return encoder, encoder.pool(cfg.probe.features)


def probe(cfg: EvalConfig) -> dict[str, Any]:
    """Run the configured probe; write ``results.json`` into ``output_dir`` and return it. Images
    that cannot be decoded are left out (``image_dataset``), listed in ``bad_images.jsonl`` beside
    it and named in it; ``scored`` (and ``fitted``, on cached features) count the images used."""
    encoder, pool = probe_encoder(cfg)
    bad_log(cfg).unlink(missing_ok=True)  # a probe starts afresh: its record lists its own
    rows = fit_and_eval_splits(cfg)
    if rows.line:
        print(rows.line)
    fit_ds, eval_ds, split_record = rows.fit, rows.scored, rows.record
    num_classes, names = class_info(fit_ds, eval_ds, cfg)
    test, test_cached = cached_features(encoder, eval_ds, split_record["eval_split"], cfg, pool)
    batch = min(cfg.probe.batch_size, len(fit_ds))
    settings: dict[str, Any] = {}
    if cfg.mode == "linear":
        settings = {
            "probe_batch": batch,
            "probe_lr": cfg.probe.blr * batch / 256,
            "cached": cfg.probe.cached,
            "head": cfg.probe.head,
        }
    # no training features to extract: fresh every epoch
    if cfg.mode == "linear" and not cfg.probe.cached:
        scores = augmented_linear_probe(encoder, fit_ds, cfg, pool, test, num_classes)
        train_cached = None
    else:
        train, train_cached = cached_features(encoder, fit_ds, cfg.data.split, cfg, pool)
        settings["fitted"] = len(train["labels"])
        if cfg.mode == "linear":
            scores = linear_probe(train, test, num_classes, cfg.probe, cfg.seed)
        else:
            scores = knn_scores(
                train, test, num_classes, cfg.probe.k, cfg.probe.temperature, cfg.probe.knn_features
            )
    results = {
        "mode": cfg.mode,
        **accuracy(scores, test["labels"], names),
        "top5_k": min(5, num_classes),
        **settings,
        "features": pool,
        "precision": encoder.precision,
        "blocks": encoder.blocks,
        "feature_dim": int(test["features"].shape[1]),
        "train_size": len(fit_ds),
        "eval_size": len(eval_ds),
        "scored": len(test["labels"]),
        "bad_images": [r["source"] for r in bad_images(bad_log(cfg))],
        **split_record,
        "encoder": {"source": cfg.encoder, "kind": encoder.kind, "sha256": encoder.sha256},
        "features_from_cache": {"train": train_cached, "eval": test_cached},
        "config": to_dict(cfg),
        "eval_transform": encoder.data_config,
    }
    write_results(Path(cfg.output_dir), results)
    return results


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``out/results.json``, replaced only once completely written."""
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")

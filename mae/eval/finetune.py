"""Whole-network fine-tuning (``finetune.py mode=finetune``): the MAE paper's recipe on timm parts.

The encoder becomes a classifier (``mae.eval.classifier``): a timm encoder is rebuilt with a fresh
head, global average pooling of the patch tokens followed by a trained ``fc_norm`` (the paper's;
``finetune.global_pool=token`` keeps the cls token and its pretrained norm), drop path, and
position embeddings resampled when ``finetune.image_size`` differs from the encoder's; a classic
autoencoder's ``encode`` features get a linear head and train end to end. Training: AdamW with
layer-wise lr decay (timm's param groups), lr = blr x batch / 256, warmup + cosine per step,
RandAugment + random erasing, mixup/cutmix with a soft-target loss, label smoothing, all through
Accelerate (mixed precision, processes, accumulation); the loop is ``mae.runner``'s. Every
``eval_every`` epochs: accuracy on the evaluation split, a checkpoint (resume is exact), and the
``last/`` and ``best/`` classifiers (timm's format for a timm encoder).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader

from mae import runner
from mae.config import Columns, ConfigError, Derived, derive_schedule, to_dict
from mae.config.evaluation import EvalConfig, FinetuneConfig
from mae.config.loader import build
from mae.data.bad_images import BAD_IMAGES, bad_images
from mae.data.base import Batch
from mae.data.images import DROPPED, ImageDataset
from mae.data.loaded import LoadedSource
from mae.eval.classifier import Classifier, build_classifier, save_classifier
from mae.eval.probe import accuracy, class_info, fit_and_eval_splits, write_results
from mae.hub import fetch
from mae.run.console import console_log
from mae.run.directory import check_resumable, resumable_keys, start_run
from mae.run.distributed import check_shardable, peers_watched
from mae.run.lock import hold_run_dir

# what may change when a fine-tuning run is resumed, beside the runner's own (``mae.run.directory``)
RESUMABLE = ("probe.cache_dir", "probe.extract_batch_size")


def _posterize(img: Image.Image, bits: int, **_: Any) -> Image.Image:
    """timm's posterize op, keeping its meaning for 0 bits (a black image), which Pillow >= 12
    refuses."""
    return ImageOps.posterize(img, bits) if bits >= 1 else Image.new(img.mode, img.size)


def train_transform(f: FinetuneConfig, data_config: dict[str, Any]) -> Any:
    """timm's training transform with the fine-tuning augmentation of ``f``."""
    transform = create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        scale=f.crop_scale,
        hflip=0.5 if f.hflip else 0.0,
        color_jitter=None,
        auto_augment=f.auto_augment,
        interpolation=data_config.get("interpolation", "bicubic"),
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=f.reprob,
        re_mode="pixel",
        re_count=1,
    )
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []) if isinstance(t, RandAugment) else []:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def build_optimizer(
    model: nn.Module, f: FinetuneConfig, derived: Derived, layered: bool = True
) -> torch.optim.Optimizer:
    """AdamW; with layer decay each group carries ``lr_scale`` = decay^(depth + 1 - layer), which
    timm's scheduler multiplies into the lr (head: 1, patch embedding: decay^(depth + 1)).
    ``layered``: the model has timm's layer grouping (a classic autoencoder's classifier has none:
    no decay)."""
    return create_optimizer_v2(
        model,
        opt="adamw",
        lr=derived.lr,
        weight_decay=f.weight_decay,
        betas=f.betas,
        layer_decay=f.layer_decay if f.layer_decay < 1 and layered else None,
    )


def build_mixup(f: FinetuneConfig, num_classes: int) -> Mixup | None:
    if (f.mixup == 0 and f.cutmix == 0) or f.mixup_prob == 0:
        return None
    return Mixup(
        mixup_alpha=f.mixup,
        cutmix_alpha=f.cutmix,
        prob=f.mixup_prob,
        switch_prob=f.mixup_switch_prob,
        mode="batch",
        label_smoothing=f.smoothing,
        num_classes=num_classes,
    )


def _criterion(f: FinetuneConfig, mixup: Mixup | None) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # targets already mixed and smoothed
    if f.smoothing > 0:
        return LabelSmoothingCrossEntropy(f.smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate_model(
    accelerator: Accelerator, model: nn.Module, loader: DataLoader, names: list[str]
) -> tuple[dict[str, Any], float]:
    """Accuracy (``mae.eval.probe.accuracy``) and mean cross-entropy on the evaluation split, over
    all processes; its undecodable images (labelled ``DROPPED``) are left out after the gather,
    where every process's batches still have their full size."""
    model.eval()
    logits, labels = [], []
    for images, y in loader:
        out, y = accelerator.gather_for_metrics((model(images).float(), y))
        logits.append(out.cpu())
        labels.append(y.cpu())
    model.train()
    scores, targets = torch.cat(logits), torch.cat(labels)
    scored = targets != DROPPED
    scores, targets = scores[scored], targets[scored]
    # every image once, over all processes
    result = accuracy(scores, targets, names) | {"scored": len(targets)}
    return result, nn.functional.cross_entropy(scores, targets.long()).item()


class Finetuning:
    """The runner's job for fine-tuning: mixup and the classification loss; every ``eval_every``
    epochs (and at the end) accuracy on the evaluation split, the ``last/`` and ``best/``
    classifiers and a checkpoint."""

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: EvalConfig,
        clf: Classifier,
        source: LoadedSource,
        eval_loader: DataLoader,
        derived: Derived,
        names: list[str],
    ) -> None:
        f = cfg.finetune
        self.accelerator, self.cfg, self.clf = accelerator, cfg, clf
        self.derived, self.names = derived, names
        self.run_dir = Path(cfg.output_dir)
        optimizer = build_optimizer(clf.model, f, derived, layered=clf.kind == "timm")
        self.scheduler = runner.cosine_schedule(optimizer, derived, f.min_lr)
        self.mixup = build_mixup(f, len(names))
        self.criterion = _criterion(f, self.mixup)
        self.model, optimizer, self.eval_loader = runner.prepare_with_data(
            accelerator, source, derived, clf.model, optimizer, after=(eval_loader,)
        )
        self.optimizers, self.modules = [optimizer], [self.model]
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None

    def loss(self, batch: Batch, step: int) -> runner.StepLoss:
        images, targets = batch.images, batch.labels
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.criterion(self.model(images).float(), targets)
        return runner.StepLoss(loss, loss.detach(), {})

    def after_step(self, step: int, done: bool) -> None:
        pass

    def checkpoint_due(self, step: int, done: bool) -> bool:
        """Every ``eval_every`` epochs, never sooner than ``eval_min_steps`` after the last
        evaluation (a small dataset has epochs of one step), and at the end."""
        f, epochs = self.cfg.finetune, step / self.derived.steps_per_epoch
        last = self.history[-1]["step"] if self.history else 0
        return done or (
            step % self.derived.steps_per_epoch == 0
            and round(epochs) % f.eval_every == 0
            and step - last >= f.eval_min_steps
        )

    def before_checkpoint(self, step: int) -> None:
        """Evaluate, record, and write the ``last/`` (and, when it improved, ``best/``)
        classifier."""
        acc, epochs = self.accelerator, step / self.derived.steps_per_epoch
        scores, eval_loss = evaluate_model(acc, self.model, self.eval_loader, self.names)
        self.last_eval = scores
        entry = {"epoch": epochs, "step": step, "top1": scores["top1"], "top5": scores["top5"]}
        self.history.append(entry | {"loss": eval_loss})
        acc.log(
            {"eval/top1": scores["top1"], "eval/top5": scores["top5"], "eval/loss": eval_loss}, step
        )
        # top-5 says something only where there are more than 5 classes
        top5 = f" top5 {scores['top5']:.4f}" if len(self.names) > 5 else ""
        acc.print(f"epoch {epochs:.2f}: top1 {scores['top1']:.4f}{top5}")
        improved = self.best is None or scores["top1"] > self.best["top1"]
        if improved:
            self.best = entry
        net = runner.gathered(
            acc, self.model, lambda: build_classifier(self.cfg, len(self.names)).model
        )
        if acc.is_main_process:
            save_classifier(net, self.clf, self.run_dir / "last", len(self.names))
            if improved:
                save_classifier(net, self.clf, self.run_dir / "best", len(self.names))

    def loop_state(self, step: int) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def load_loop_state(self, loop: dict[str, Any]) -> None:
        self.history, self.best = loop["history"], loop["best"]


def finetune(cfg: EvalConfig) -> dict[str, Any]:
    """Fine-tune (or resume) in ``cfg.output_dir``; returns what it writes to ``results.json``."""
    f, run_dir = cfg.finetune, Path(cfg.output_dir)
    fetch(cfg.encoder)  # a hub name that cannot be served stops here, before output_dir is made
    accelerator = runner.accelerator_for(f, run_dir)
    watched = peers_watched(accelerator, run_dir, f.key("dist_timeout"), f.dist_timeout)
    with hold_run_dir(accelerator, run_dir), watched:
        with console_log(run_dir, accelerator.is_main_process):
            return _finetune(cfg, accelerator)


def _finetune(cfg: EvalConfig, accelerator: Accelerator) -> dict[str, Any]:
    f, run_dir = cfg.finetune, Path(cfg.output_dir)
    resume_from = runner.open_run_dir(accelerator, run_dir)

    with accelerator.local_main_process_first():
        rows = fit_and_eval_splits(cfg)
    if rows.line:
        accelerator.print(rows.line)
    fit_ds, eval_ds, split_record = rows.fit, rows.scored, rows.record
    num_classes, names = class_info(fit_ds, eval_ds, cfg)
    clf = build_classifier(cfg, num_classes)  # the same initial weights on every process
    check_shardable(accelerator, clf.model, f"the {clf.kind} classifier")
    # drop path and mixup differ per process; data order does not
    set_seed(cfg.seed, device_specific=True)
    d = cfg.data
    train_set, eval_set = _datasets(cfg, clf, fit_ds, eval_ds, split_record["eval_split"])
    source = LoadedSource(
        train_set,
        d.num_workers,
        f.batch_size,
        f.accum_steps,
        cfg.seed,
        max_bad_images=d.max_bad_images,
    )
    derived = derive_schedule(f, source.size, accelerator.num_processes)
    if resume_from is not None:
        resumable = resumable_keys(f.SECTION, *RESUMABLE)
        check_resumable(accelerator, run_dir, cfg, derived, resumable, partial(build, EvalConfig))
    eval_loader = DataLoader(
        eval_set, batch_size=f.batch_size, shuffle=False, num_workers=d.num_workers
    )

    attention = runner.choose_attention(accelerator, clf.model, f.attention)
    job = Finetuning(accelerator, cfg, clf, source, eval_loader, derived, names)
    _print_setup(accelerator, cfg, clf, derived, len(eval_set), num_classes, attention)
    every = max(f.eval_every * derived.steps_per_epoch, f.eval_min_steps, 1)
    runner.checkpoint_volume_warning(
        accelerator, [job.model], derived.total_steps // every + 1, f.key("eval_every")
    )
    start_run(accelerator, run_dir, cfg, derived, "finetune")
    step = runner.Runner(accelerator, run_dir, f, derived, source, job).run(resume_from, "finetune")
    if job.last_eval is None:  # resumed at the very end: evaluate what was trained
        job.last_eval, _ = evaluate_model(accelerator, job.model, job.eval_loader, names)
    source.check_bad_images(accelerator)  # those of the last evaluation too
    results = {
        "mode": "finetune",
        **job.last_eval,
        "top5_k": min(5, num_classes),
        "best": job.best,
        "history": job.history,
        "steps": step,
        "lr": derived.lr,
        "effective_batch": derived.effective_batch,
        "train_size": len(train_set),
        "eval_size": len(eval_set),
        "bad_images": [r["source"] for r in bad_images(source.bad_log)],
        **split_record,
        "encoder": {"source": cfg.encoder, "kind": clf.kind, "sha256": clf.init["sha256"]},
        "init": clf.init,
        "classifier": {"last": str(run_dir / "last"), "best": str(run_dir / "best")},
        "config": to_dict(cfg),
        "eval_transform": clf.data_config,
    }
    if accelerator.is_main_process:
        write_results(run_dir, results)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # (ends the process group too)
    return results


def _datasets(
    cfg: EvalConfig,
    clf: Classifier,
    fit_ds: datasets.Dataset,
    eval_ds: datasets.Dataset,
    eval_name: str,
) -> tuple[ImageDataset, ImageDataset]:
    """The training and evaluation images, in the classifier's channels and transforms. An
    undecodable image is replaced in training by the next one (with that one's label), and left out
    of the evaluation (``DROPPED``: not scored); both are recorded once in RUN/bad_images.jsonl."""
    f, d, bad_log = cfg.finetune, cfg.data, Path(cfg.output_dir) / BAD_IMAGES
    columns = Columns(d.image_column, d.label_column, clf.data_config["input_size"][0])
    train_set = ImageDataset(
        fit_ds,
        columns,
        train_transform(f, clf.data_config),
        cfg.seed,
        bad_log=bad_log,
        name=f"split {d.split!r}",
    )
    if train_set.rows.columns.arrays and f.auto_augment is not None:  # RandAugment is Pillow's
        raise ConfigError(
            f"finetune.auto_augment={f.auto_augment!r} works on Pillow images and {d.dataset!r} "
            "holds arrays; set finetune.auto_augment=null"
        )
    eval_set = ImageDataset(
        eval_ds,
        columns,
        create_transform(**clf.data_config, is_training=False),
        bad_log=bad_log,
        drop_bad=True,
        name=eval_name,
    )
    return train_set, eval_set


def _print_setup(
    accelerator: Accelerator,
    cfg: EvalConfig,
    clf: Classifier,
    derived: Derived,
    eval_size: int,
    classes: int,
    attention: str,
) -> None:
    f, init = cfg.finetune, clf.init
    params = sum(p.numel() for p in clf.model.parameters() if p.requires_grad)
    resampled = init["pos_embed_resampled"]
    # global pool and layer decay are timm's; a classic encoder's are its own
    timm_model = clf.kind == "timm"
    pool = f.global_pool if timm_model else "encode()"
    accelerator.print(
        f"classifier from {cfg.encoder}: {params / 1e6:.2f}M parameters, {classes} classes, "
        f"pool {pool}; fresh {init['fresh']}, dropped {init['dropped']}"
        + (f"; pos_embed {resampled['from']} -> {resampled['to']}" if resampled else "")
        + f"\ndata {cfg.data.dataset}: {derived.dataset_size} training images, {eval_size} "
        f"evaluation images, {derived.steps_per_epoch} steps/epoch; "
        f"layer decay {f.layer_decay if timm_model else 'none'}\n"
        + runner.schedule_lines(accelerator, f, derived, attention)
    )

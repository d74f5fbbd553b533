"""Whole-network fine-tuning (``finetune.py mode=finetune``): the MAE paper's recipe on timm parts.

The encoder (any ``encoder=`` source whose encoder is a timm model) becomes a classifier: the same
architecture rebuilt with a fresh head, global average pooling of the patch tokens followed by a
trained ``fc_norm`` (the paper's; ``finetune.global_pool=token`` keeps the cls token and its
pretrained norm), drop path, and position embeddings resampled when ``finetune.image_size``
differs from the encoder's. Training: AdamW with layer-wise lr decay (timm's param groups),
lr = blr x batch / 256, warmup + cosine per step, RandAugment + random erasing, mixup/cutmix with
a soft-target loss, label smoothing, all through Accelerate (mixed precision, processes,
accumulation). Every ``eval_every`` epochs: accuracy on the evaluation split, a checkpoint
(resume is exact), and the ``last/`` and ``best/`` classifiers in timm's format.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_model_args
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mae import checkpoint as ckpt
from mae.config import ConfigError, DataConfig, Derived, EvalConfig, FinetuneConfig, derive_schedule, to_dict
from mae.config_loader import build, read_yaml
from mae.data import EpochSampler, ImageDataset, pretrain_loader
from mae.encoders import load_encoder
from mae.engine import (
    MetricLog,
    accelerator_for,
    check_finite_weights,
    check_same_run,
    choose_attention,
    cosine_schedule,
    epoch_batches,
    gathered,
    start_run,
    stop_for_signal,
    truncate_metrics,
)
from mae.export import save_timm
from mae.models import AEOutput
from mae.preemption import StopSignals
from mae.probe import accuracy, class_info, fit_and_eval_splits, write_results

# Keys that may change between a fine-tuning run and its resumption.
RESUMABLE_KEYS = {
    "output_dir",
    "finetune.epochs",
    "finetune.max_steps",
    "finetune.log_every",
    "finetune.keep_checkpoints",
    "finetune.cpu_threads",
    "data.num_workers",
    "probe.cache_dir",
    "probe.extract_batch_size",
}
# Parameters a classifier may add to or drop from its encoder's weights.
_FRESH = ("head.", "fc_norm.")  # the new classifier and its pooled-feature norm
_DROPPED = ("norm.", "fc_norm.", "head.")  # a final norm avg pooling replaces; an old head


@dataclasses.dataclass
class Classifier:
    model: nn.Module  # a timm model with a num_classes head
    data_config: dict[str, Any]  # timm's, at the fine-tuning resolution
    init: dict[str, Any]  # where the weights came from and what was changed


def build_classifier(cfg: EvalConfig, num_classes: int) -> Classifier:
    """The encoder of ``cfg.encoder`` rebuilt as a classifier, its weights loaded strictly except for
    the fresh head (and ``fc_norm``) and a final norm that average pooling replaces."""
    f = cfg.finetune
    encoder = load_encoder(cfg.encoder, cfg.seed, cfg.num_heads)
    src = encoder.module
    if encoder.kind != "timm":
        raise ConfigError(
            f"mode=finetune needs an encoder that is a timm model (an export, a run of a token model, timm:NAME); "
            f"{cfg.encoder!r} gives features through encode(): evaluate it with mode=linear or mode=knn"
        )
    args = {k: v for k, v in get_model_args(src).items() if k != "fc_norm"}  # the pooling decides fc_norm
    args |= {"num_classes": num_classes, "global_pool": f.global_pool, "drop_path_rate": f.drop_path}
    if f.global_pool == "token" and getattr(src, "cls_token", None) is None:
        raise ConfigError(f"finetune.global_pool=token: {cfg.encoder!r} has no cls token; use finetune.global_pool=avg")
    torch.manual_seed(cfg.seed)
    try:
        model = timm.create_model(src.pretrained_cfg["architecture"], pretrained=False, **args)
    except TypeError as e:  # an architecture without drop path or pooling options
        raise ConfigError(f"mode=finetune cannot rebuild {cfg.encoder!r} as a classifier ({e})") from e
    names = model.pretrained_cfg.get("classifier") or "head"
    head = tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))  # "head.", "fc.", "head.fc."
    state = {k: v for k, v in src.state_dict().items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh, dropped = (*head, *_FRESH), (*head, *_DROPPED)
    bad = [k for k in missing if not k.startswith(fresh)] + [k for k in unexpected if not k.startswith(dropped)]
    if bad:
        raise ConfigError(f"{cfg.encoder!r} does not match its classifier: parameters {bad} are missing or unexpected")
    if isinstance(model.get_classifier(), nn.Linear):  # the paper's head init
        nn.init.trunc_normal_(model.get_classifier().weight, std=2e-5)
        nn.init.zeros_(model.get_classifier().bias)
    data_config = dict(encoder.data_config)
    channels, *size = data_config["input_size"]
    resampled = None
    if f.image_size is not None and f.image_size != size[0]:
        if not hasattr(model, "set_input_size"):
            raise ConfigError(f"finetune.image_size={f.image_size}: {cfg.encoder!r} cannot change its input size")
        before = tuple(model.pos_embed.shape) if getattr(model, "pos_embed", None) is not None else None
        model.set_input_size(img_size=(f.image_size, f.image_size))  # timm resamples the position embeddings
        if before is not None:
            resampled = {"from": list(before), "to": list(model.pos_embed.shape)}
        data_config["input_size"] = (channels, f.image_size, f.image_size)
    init = {
        "source": cfg.encoder,
        "sha256": encoder.sha256,
        "fresh": sorted(missing),
        "dropped": sorted(unexpected),
        "pos_embed_resampled": resampled,
    }
    return Classifier(model, data_config, init)


def _posterize(img: Image.Image, bits: int, **_: Any) -> Image.Image:
    """timm's posterize op, keeping its meaning for 0 bits (a black image), which Pillow >= 12 refuses."""
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


def build_optimizer(model: nn.Module, f: FinetuneConfig, derived: Derived) -> torch.optim.Optimizer:
    """AdamW; with layer decay each group carries ``lr_scale`` = decay^(depth + 1 - layer), which
    timm's scheduler multiplies into the lr (head: 1, patch embedding: decay^(depth + 1))."""
    return create_optimizer_v2(
        model,
        opt="adamw",
        lr=derived.lr,
        weight_decay=f.weight_decay,
        betas=f.betas,
        layer_decay=f.layer_decay if f.layer_decay < 1 else None,
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
    """Accuracy (``mae.probe.accuracy``) and mean cross-entropy on the evaluation split, over all processes."""
    model.eval()
    logits, labels = [], []
    for images, y in loader:
        out, y = accelerator.gather_for_metrics((model(images).float(), y))
        logits.append(out.cpu())
        labels.append(y.cpu())
    model.train()
    scores, targets = torch.cat(logits), torch.cat(labels)
    result = accuracy(scores, targets, names) | {"scored": len(targets)}  # every image once, over all processes
    return result, nn.functional.cross_entropy(scores, targets.long()).item()


def finetune(cfg: EvalConfig) -> dict[str, Any]:
    """Fine-tune (or resume) in ``cfg.output_dir``; returns what it writes to ``results.json``."""
    f, run_dir = cfg.finetune, Path(cfg.output_dir)
    accelerator = accelerator_for(f, run_dir, "finetune")
    if accelerator.is_main_process:
        ckpt.remove_partial(run_dir)
    accelerator.wait_for_everyone()
    resume_from = ckpt.latest_checkpoint(run_dir)

    with accelerator.local_main_process_first():
        fit_ds, eval_ds, split_record = fit_and_eval_splits(cfg)
    num_classes, names = class_info(fit_ds, eval_ds, cfg)
    clf = build_classifier(cfg, num_classes)  # the same initial weights on every process
    set_seed(cfg.seed, device_specific=True)  # drop path and mixup differ per process; data order does not
    channels = clf.data_config["input_size"][0]
    d = cfg.data
    data_cfg = DataConfig(
        dataset=d.dataset, image_column=d.image_column, label_column=d.label_column, channels=channels,
        num_workers=d.num_workers,
    )  # fmt: skip
    train_set = ImageDataset(fit_ds, data_cfg, train_transform(f, clf.data_config), seed=cfg.seed)
    eval_set = ImageDataset(eval_ds, data_cfg, create_transform(**clf.data_config, is_training=False))
    derived = derive_schedule(f, len(train_set), accelerator.num_processes, "finetune")
    if resume_from is not None:
        saved = build(EvalConfig, read_yaml(run_dir / "config.yaml"))
        check_same_run(run_dir, to_dict(saved), to_dict(cfg), RESUMABLE_KEYS, derived)
    sampler = EpochSampler(len(train_set), derived.steps_per_epoch * derived.effective_batch, seed=cfg.seed)
    loader = pretrain_loader(train_set, sampler, data_cfg, f.batch_size)
    eval_loader = DataLoader(eval_set, batch_size=f.batch_size, shuffle=False, num_workers=d.num_workers)

    model = clf.model
    attention = choose_attention(accelerator, model, f.attention)
    optimizer = build_optimizer(model, f, derived)
    scheduler = cosine_schedule(optimizer, derived, f.min_lr)
    mixup = build_mixup(f, num_classes)
    criterion = _criterion(f, mixup)
    model, optimizer, loader, eval_loader = accelerator.prepare(model, optimizer, loader, eval_loader)
    _print_setup(accelerator, cfg, clf, derived, len(eval_set), num_classes, attention)

    start_run(accelerator, run_dir, cfg, derived, "finetune")

    step, history, best = 0, [], None
    if resume_from is not None:
        loop = ckpt.load_checkpoint(accelerator, resume_from)
        step, history, best = loop["step"], loop["history"], loop["best"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if accelerator.is_main_process:
        truncate_metrics(run_dir / "metrics.jsonl", step)
    log = MetricLog(accelerator, run_dir / "metrics.jsonl", step, derived.effective_batch)
    bar = tqdm(total=derived.total_steps, initial=step, disable=not accelerator.is_main_process, desc="finetune")
    last_eval: dict[str, Any] | None = None

    def save(step: int) -> None:
        ckpt.save_checkpoint(accelerator, run_dir, step, {"history": history, "best": best}, f.keep_checkpoints)

    with StopSignals() as stop, bar:  # SIGTERM/SIGINT: a checkpoint at the end of the step, then exit
        while step < derived.total_steps:
            for images, labels in epoch_batches(accelerator, loader, step, derived, f.accum_steps):
                targets = labels
                if mixup is not None:
                    images, targets = mixup(images, labels)
                with accelerator.accumulate(model):
                    loss = criterion(model(images).float(), targets)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        scheduler.step_update(step)
                        if f.clip_grad is not None:
                            accelerator.clip_grad_norm_(model.parameters(), f.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                log.add(AEOutput(loss=loss.detach()))
                if not accelerator.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                done = step >= derived.total_steps
                if step % f.log_every == 0 or done:
                    log.line(step, derived, optimizer, bar, run_dir)
                epochs_done = step / derived.steps_per_epoch
                evaluated = done or (step % derived.steps_per_epoch == 0 and round(epochs_done) % f.eval_every == 0)
                if evaluated:
                    check_finite_weights(model, step, run_dir)
                    scores, eval_loss = evaluate_model(accelerator, model, eval_loader, names)
                    last_eval = scores
                    entry = {"epoch": epochs_done, "step": step, "top1": scores["top1"], "top5": scores["top5"]}
                    history.append(entry | {"loss": eval_loss})
                    accelerator.log(
                        {"eval/top1": scores["top1"], "eval/top5": scores["top5"], "eval/loss": eval_loss}, step
                    )
                    accelerator.print(f"epoch {epochs_done:.2f}: top1 {scores['top1']:.4f} top5 {scores['top5']:.4f}")
                    improved = best is None or scores["top1"] > best["top1"]
                    if improved:
                        best = entry
                    net = gathered(accelerator, model, lambda: build_classifier(cfg, num_classes).model)
                    if accelerator.is_main_process:
                        tag = f"finetuned_{num_classes}cls"
                        save_timm(net, run_dir / "last", clf.data_config, tag)
                        if improved:
                            save_timm(net, run_dir / "best", clf.data_config, tag)
                    save(step)
                signum = None if done else stop.requested(accelerator)
                if signum is not None:
                    stop_for_signal(
                        accelerator, step, derived.total_steps, run_dir, signum, None if evaluated else save
                    )
                if log.last_step == step:  # evaluation and checkpoints do not count against the next line's images/s
                    log.restart_clock()
                if done:
                    break
    if last_eval is None:  # resumed at the very end: evaluate what was trained
        last_eval, _ = evaluate_model(accelerator, model, eval_loader, names)
    results = {
        "mode": "finetune",
        **last_eval,
        "top5_k": min(5, num_classes),
        "best": best,
        "history": history,
        "steps": step,
        "lr": derived.lr,
        "effective_batch": derived.effective_batch,
        "train_size": len(train_set),
        "eval_size": len(eval_set),
        **split_record,
        "encoder": {"source": cfg.encoder, "kind": "timm", "sha256": clf.init["sha256"]},
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


def _print_setup(
    accelerator: Accelerator,
    cfg: EvalConfig,
    clf: Classifier,
    derived: Derived,
    eval_size: int,
    classes: int,
    attention: str,
) -> None:
    f = cfg.finetune
    params = sum(p.numel() for p in clf.model.parameters() if p.requires_grad)
    init = clf.init
    accelerator.print(
        f"classifier from {cfg.encoder}: {params / 1e6:.2f}M parameters, {classes} classes, pool {f.global_pool}; "
        f"fresh {init['fresh']}, dropped {init['dropped']}"
        + (
            f"; pos_embed {init['pos_embed_resampled']['from']} -> {init['pos_embed_resampled']['to']}"
            if init["pos_embed_resampled"]
            else ""
        )  # fmt: skip
        + f"\ndata {cfg.data.dataset}: {derived.dataset_size} training images, {eval_size} evaluation images, "
        f"{derived.steps_per_epoch} steps/epoch\n"
        f"effective batch {derived.effective_batch}; lr {derived.lr:.3g} = blr {f.blr:g} x {derived.effective_batch} "
        f"/ 256; layer decay {f.layer_decay}; {derived.total_steps} steps, {derived.warmup_steps} warmup; "
        f"mixed precision {accelerator.mixed_precision}; attention {attention}; device {accelerator.device}"
        + (f" ({torch.get_num_threads()} threads)" if accelerator.device.type == "cpu" else "")
    )

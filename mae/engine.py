"""The Accelerate training loop: step, log, checkpoint, resume, export.

The engine never knows which autoencoder it trains: it calls ``model(images) -> AEOutput`` and
back-propagates ``loss``. One optimizer step consumes ``train.accum_steps`` micro-batches on
every process (Accelerate averages gradients across processes and accumulates locally).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torchvision.utils import save_image
from tqdm.auto import tqdm

from mae import checkpoint as ckpt
from mae.config import (
    Config,
    ConfigError,
    Derived,
    FinetuneConfig,
    TrainConfig,
    derive,
    from_dict,
    read_yaml,
    to_dict,
)
from mae.data import (
    DataError,
    EpochSampler,
    ImageDataset,
    count_bad_images,
    eval_transform,
    load_split,
    pretrain_loader,
    pretrain_transform,
)
from mae.device_data import DecodedImages, DeviceAugment, key_loader
from mae.errors import UserError
from mae.export import export_model
from mae.hardware import resolve_attention, resolve_precision, set_attention, tune_cpu_allocator
from mae.interop import infer_architecture, load_into, load_weights
from mae.models import MODELS, AEOutput, Autoencoder, build_model
from mae.online_probe import OnlineProbe
from mae.preemption import Preempted, StopSignals
from mae.streaming import ImageStream, StreamBatches, load_stream, stream_size
from mae.visualize import denormalize, save_recon_grid

# Keys that may change between a run and its resumption (they do not change what is learned
# up to the resume point).
RESUMABLE_KEYS = {
    "output_dir",
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.compile",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.recon_every",
    "train.recon_images",
    "data.num_workers",
    "train.cpu_threads",
}
# Derived values a resumed run must share with the run it continues.
RESUME_INVARIANTS = ("num_processes", "dataset_size", "effective_batch", "steps_per_epoch")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the weights stopped being finite; nothing was saved after it happened."""

    exit_code = 1


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    export_dir: Path
    steps: int
    model: Autoencoder  # the trained model, unwrapped, on this process


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(run_dir: Path, cfg: Config, derived: Derived) -> None:
    """Refuse to resume a run whose saved config or data/process layout differs in anything that
    shapes training."""
    missing = [n for n in ("config.yaml", "derived.json") if not (run_dir / n).is_file()]
    if missing:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds checkpoints but not the run's {' and '.join(missing)}, so whether "
            "they can be resumed cannot be checked; restore the files, or use another output_dir"
        )
    saved = from_dict(read_yaml(run_dir / "config.yaml"))
    check_same_run(run_dir, to_dict(saved), to_dict(cfg), RESUMABLE_KEYS, derived)


def check_same_run(run_dir: Path, old_cfg: dict, new_cfg: dict, resumable: set[str], derived: Derived) -> None:
    """The saved config (as a dict) and ``derived.json`` of ``run_dir`` against the ones about to run."""
    old, new = flat(old_cfg), flat(new_cfg)
    diff = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if k not in resumable and old.get(k) != new.get(k)
    ]
    if diff:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds a run with a different config ({'; '.join(diff)}); "
            "use another output_dir, or the run's own config.yaml to resume it"
        )
    before = json.loads((run_dir / "derived.json").read_text())
    changed = [
        f"{k}: {before.get(k)} -> {getattr(derived, k)}"
        for k in RESUME_INVARIANTS
        if before.get(k) != getattr(derived, k)
    ]
    if changed:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} holds a run made with another data/process layout ({'; '.join(changed)}); "
            "resume it with the same number of processes and dataset, or use another output_dir"
        )


def build_optimizer(model: Autoencoder, cfg: Config, derived: Derived) -> torch.optim.Optimizer:
    # timm excludes biases, norms (ndim <= 1) and model.no_weight_decay() from weight decay,
    # and skips frozen parameters (the fixed position embeddings).
    t = cfg.train
    return create_optimizer_v2(model, opt="adamw", lr=derived.lr, weight_decay=t.weight_decay, betas=t.betas)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, derived: Derived) -> CosineLRScheduler:
    return cosine_schedule(optimizer, derived, cfg.train.min_lr)


def cosine_schedule(optimizer: torch.optim.Optimizer, derived: Derived, min_lr: float) -> CosineLRScheduler:
    """Linear warmup from 0, then half-cosine to min_lr; the lr is a pure function of the step
    (times each group's ``lr_scale``, e.g. from layer decay)."""
    return CosineLRScheduler(
        optimizer,
        t_initial=derived.total_steps - derived.warmup_steps,
        lr_min=min_lr,
        warmup_t=derived.warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def _describe(m: Any) -> str:
    if m.name != "mae":
        return m.name
    return f"mae ViT {m.embed_dim}x{m.depth}/{m.patch_size}, decoder {m.decoder_embed_dim}x{m.decoder_depth}" + (
        f" ({m.preset})" if m.preset else ""
    )


def _print_setup(accelerator: Accelerator, cfg: Config, derived: Derived, params: int, attention: str) -> None:
    t = cfg.train
    accelerator.print(
        f"model {_describe(cfg.model)}: {params / 1e6:.2f}M trainable parameters\n"
        f"data {cfg.data.dataset}[{cfg.data.split}]: {derived.dataset_size} images, "
        f"{derived.steps_per_epoch} steps/epoch\n"
        f"effective batch {derived.effective_batch} = {t.batch_size} per process x {t.accum_steps} accumulation "
        f"x {derived.num_processes} processes; lr {derived.lr:.3g} = blr {t.blr:g} x {derived.effective_batch} / 256\n"
        f"{derived.total_steps} steps ({derived.total_steps / derived.steps_per_epoch:.2f} epochs), "
        f"{derived.warmup_steps} warmup; mixed precision {accelerator.mixed_precision}; attention {attention}"
        f"{' (torch.compile)' if t.compile else ''}; "
        f"device {accelerator.device}"
        + (f" ({torch.get_num_threads()} threads)" if accelerator.device.type == "cpu" else "")
    )


def make_accelerator(cfg: Config) -> Accelerator:
    idle = getattr(MODELS[cfg.model.name], "has_unused_parameters", False)  # e.g. greedy layer-wise stages
    return accelerator_for(cfg.train, Path(cfg.output_dir), "train", find_unused_parameters=idle)


def _accelerate_device() -> torch.device:
    """The device type Accelerate will pick, known before it starts (it fixes the precision at start)."""
    gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return torch.device("cuda" if gpu else "cpu")


def accelerator_for(
    t: TrainConfig | FinetuneConfig, run_dir: Path, key: str, find_unused_parameters: bool = False
) -> Accelerator:
    """Accelerate with the section's precision and accumulation, logging into ``run_dir``; on CPU,
    the torch threads split between the processes of this machine."""
    accelerator = Accelerator(
        mixed_precision=resolve_precision(t.mixed_precision, _accelerate_device()),
        gradient_accumulation_steps=t.accum_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # N copies of one run, each alone: N times the same work
        raise ConfigError(
            f"{launched} processes were launched but they do not form one group ({accelerator.num_processes} "
            "seen by Accelerate); without a GPU launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "(or configs/accelerate/cpu_ddp.yaml)"
        )
    if accelerator.device.type == "cpu":
        tune_cpu_allocator()
        if t.mixed_precision == "fp16":  # Accelerate would silently run fp32
            raise ConfigError(f"{key}.mixed_precision=fp16 needs a GPU; on CPU use {key}.mixed_precision=bf16 or no")
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by torchrun / accelerate launch
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(t.cpu_threads or max(1, cores // local_processes))
    return accelerator


def choose_attention(accelerator: Accelerator, model: torch.nn.Module, requested: str) -> str:
    """Set the attention core of ``model``'s timm blocks for this device and precision (``mae.hardware``);
    returns what was chosen, or 'none' for a model without attention."""
    kind = resolve_attention(requested, accelerator.device, accelerator.mixed_precision)
    return kind if set_attention(model, kind) else "none"


def start_run(accelerator: Accelerator, run_dir: Path, cfg: Any, derived: Derived, name: str) -> None:
    """Write ``config.yaml`` and ``derived.json`` (main process) and start the trackers."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (run_dir / "derived.json").write_text(json.dumps(dataclasses.asdict(derived), indent=1))
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat(to_dict(cfg)).items()}
    accelerator.init_trackers(name, config=hparams)


def epoch_batches(accelerator: Accelerator, loader: Any, step: int, derived: Derived, accum_steps: int) -> Any:
    """The micro-batches of the epoch holding optimizer step ``step``, from that step on."""
    epoch, within = divmod(step, derived.steps_per_epoch)
    # through Accelerate's loader: it keeps its own epoch counter and passes it to the sampler
    loader.set_epoch(epoch)
    if within:  # resume mid-epoch: skip the micro-batches already consumed
        return accelerator.skip_first_batches(loader, within * accum_steps)
    return loader


def to_device(batches: Any, device: torch.device) -> Any:
    """A stream's batches (read by this process itself) moved to ``device``."""
    for batch in batches:
        yield tuple(x.to(device, non_blocking=True) for x in batch)


BAD_IMAGES = "bad_images.jsonl"


class MetricLog:
    """Running sums between log lines -> ``metrics.jsonl`` (main process) and Accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, path: Path, step: int, images_per_step: int) -> None:
        self.accelerator, self.path, self.images_per_step = accelerator, path, images_per_step
        self.loss = torch.zeros((), device=accelerator.device)
        self.terms: dict[str, torch.Tensor] = {}
        self.count, self.last_step, self.bad_images = 0, step, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.tic = time.perf_counter()

    def add(self, out: AEOutput) -> None:
        self.loss += out.loss.detach()
        for k, v in out.terms.items():
            self.terms[k] = self.terms.get(k, 0) + v.float().to(self.loss.device)  # reduced across processes
        self.count += 1

    def mean_loss(self) -> float:
        """Mean loss over micro-batches and processes since the last line (collective)."""
        return self.accelerator.reduce(self.loss, reduction="mean").item() / self.count

    def line(self, step: int, derived: Derived, optimizer: torch.optim.Optimizer, bar: tqdm, run_dir: Path) -> None:
        """Collective: the mean loss since the last line (stopping the run if it is not finite), written
        with the lr (the largest group's: layer decay scales the others) and shown on the bar."""
        loss = self.mean_loss()
        if not math.isfinite(loss):
            raise non_finite_error(f"loss became {loss}", step, run_dir)
        lr = max(g["lr"] for g in optimizer.param_groups)
        self.write(step, step / derived.steps_per_epoch, loss, lr)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def check_bad_images(self, bad_log: Path, limit: int) -> None:
        """Collective: the main process's count of distinct undecodable images, the same on every
        process; past ``limit`` the run stops (before any later checkpoint), else a new count is reported."""
        acc = self.accelerator
        seen = count_bad_images(bad_log) if acc.is_main_process else 0
        count = int(acc.reduce(torch.tensor(seen, device=acc.device), reduction="sum").item())
        if count > limit:
            raise BadImagesError(
                f"{count} images could not be decoded (data.max_bad_images={limit}); they are listed in {bad_log}: "
                "fix or remove them, or raise data.max_bad_images, and launch again to resume"
            )
        if count != self.bad_images:
            self.bad_images = count
            acc.print(f"\n{count} undecodable images skipped so far (each replaced by the next one; see {bad_log})")

    def write(self, step: int, epoch: float, loss: float, lr: float) -> dict[str, float]:
        """Collective: every process calls it."""
        mean = {k: self.accelerator.reduce(v, reduction="mean").item() / self.count for k, v in self.terms.items()}
        seconds = time.perf_counter() - self.tic
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "images_per_s": (step - self.last_step) * self.images_per_step / seconds,
            **{f"terms/{k}": v for k, v in mean.items()},
        }
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.loss.zero_()
        self.terms.clear()
        self.count, self.last_step = 0, step
        return record


def train(cfg: Config) -> RunResult:
    """Pretrain (or resume) the run in ``cfg.output_dir``; the encoder is exported at the end."""
    run_dir = Path(cfg.output_dir)
    t = cfg.train
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        ckpt.remove_partial(run_dir)
    accelerator.wait_for_everyone()
    resume_from = ckpt.latest_checkpoint(run_dir)
    set_seed(t.seed, device_specific=True)  # model-side randomness per process; MAE masks come with each sample

    streaming = cfg.data.streaming
    with accelerator.local_main_process_first():  # one process per machine builds the datasets cache
        split = load_stream(cfg.data) if streaming else load_split(cfg.data)
    bad_log = run_dir / BAD_IMAGES
    noise = (cfg.data.image_size // cfg.model.patch_size) ** 2 if cfg.model.name == "mae" else None
    transform = pretrain_transform(cfg.data)
    if streaming:
        rank, world = accelerator.process_index, accelerator.num_processes
        dataset = ImageStream(split, cfg.data, transform, t.seed, rank, world, noise, bad_log)
        derived = derive(cfg, stream_size(split, cfg.data, cfg.data.split), world)
    else:
        if cfg.data.on_device:  # decoded once; augmented on the device by ``DeviceAugment`` below
            dataset = DecodedImages(split, cfg.data, bad_log)
        else:
            dataset = ImageDataset(split, cfg.data, transform, t.seed, noise, bad_log)
        derived = derive(cfg, len(dataset), accelerator.num_processes)
    if resume_from is not None:
        check_resumable(run_dir, cfg, derived)
    if streaming:
        loader = StreamBatches(dataset, cfg.data, t.batch_size, accelerator.num_processes)
    else:
        sampler = EpochSampler(len(dataset), derived.steps_per_epoch * derived.effective_batch, seed=t.seed)
        loader = (
            key_loader(dataset, sampler, t.batch_size)
            if cfg.data.on_device
            else pretrain_loader(dataset, sampler, cfg.data, t.batch_size)
        )

    model = build_model(cfg)
    if cfg.init is not None and resume_from is None:  # a resumed run has its own weights
        state = load_weights(cfg.init)
        done = load_into(model, state, cfg.init)
        guessed = [k for k in infer_architecture(cfg.init, state).guessed if k.endswith("heads")]
        heads = ", ".join(f"model.{k}={getattr(cfg.model, k)}" for k in guessed)
        accelerator.print(
            f"init from {cfg.init}: {done['loaded']} tensors"
            + (f"; head counts are not recorded in the file, used {heads}" if guessed else "")
            + (f"; fresh: {len(done['fresh'])} decoder tensors" if done["fresh"] else "")
            + (
                f"; position embeddings for the new grid: {sorted(done['pos_embed_regrid'])}"
                if done["pos_embed_regrid"]
                else ""
            )
        )
    optimizer = build_optimizer(model, cfg, derived)
    scheduler = build_scheduler(optimizer, cfg, derived)
    if streaming:  # each process reads its own part of the stream (mae.streaming), not through Accelerate
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    probe, probe_optimizer = _online_probe(accelerator, cfg, dataset, model)
    nets = [model] if probe is None else [model, probe]
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    # compiled apart from what Accelerate holds, so checkpoints keep the plain parameter names
    forward = torch.compile(model) if t.compile else model
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _print_setup(accelerator, cfg, derived, params, choose_attention(accelerator, net, t.attention))
    augment = None
    if cfg.data.on_device:
        augment = DeviceAugment(dataset, cfg.data, t.seed, noise, accelerator.device)
        accelerator.print(
            f"data on {accelerator.device}: {tuple(augment.images.shape)} uint8 "
            f"({augment.images.numel() / 2**20:.0f} MiB), decoded in {dataset.decode_s:.1f} s; augmented there, "
            "no loader workers (data.num_workers is not used)"
        )

    start_run(accelerator, run_dir, cfg, derived, "pretrain")

    step = 0
    if resume_from is not None:
        step = ckpt.load_checkpoint(accelerator, resume_from)["step"]
        if streaming:
            position = ckpt.read_process_state(resume_from, accelerator.process_index)
            if position is None:
                raise ConfigError(
                    f"{resume_from} holds no stream position (it was written with data.streaming=false); resume "
                    "with data.streaming=false or use another output_dir"
                )
            loader.load_state_dict(position, str(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if accelerator.is_main_process:
        truncate_metrics(run_dir / "metrics.jsonl", step)

    # fixed images for reconstruction grids: the first ones of the split, deterministic transform
    shown = (
        datasets.Dataset.from_list(list(split.take(t.recon_images)), features=split.features) if streaming else split
    )
    recon_set = ImageDataset(shown, cfg.data, eval_transform(cfg.data))
    recon_images = torch.stack([recon_set[i][0] for i in range(min(t.recon_images, len(recon_set)))])

    log = MetricLog(accelerator, run_dir / "metrics.jsonl", step, derived.effective_batch)
    bar = tqdm(total=derived.total_steps, initial=step, disable=not accelerator.is_main_process, desc="pretrain")

    def save(step: int) -> None:
        check_finite_weights(model, step, run_dir)
        position = loader.state_dict() if streaming else None  # where this process's stream stands
        loop = {"epoch": step / derived.steps_per_epoch}
        ckpt.save_checkpoint(accelerator, run_dir, step, loop, t.keep_checkpoints, process_state=position)

    with StopSignals() as stop, bar, contextlib.ExitStack() as cleanup:  # SIGTERM/SIGINT: checkpoint, then exit
        if streaming:
            cleanup.callback(loader.close)  # however the loop ends, the stream's workers stop with it
        while step < derived.total_steps:
            batches = (
                to_device(loader, accelerator.device)
                if streaming
                else epoch_batches(accelerator, loader, step, derived, t.accum_steps)
            )
            if augment is not None:
                batches = augment.batches(batches)
            for images, labels, *noise in batches:
                net.set_step(step)  # schedules inside the model (e.g. a KL warm-up) follow the optimizer step
                with accelerator.accumulate(*nets):
                    out = forward(images, noise=noise[0]) if noise else forward(images)  # MAE: each sample's own mask
                    loss = out.loss
                    if probe is not None:
                        if out.features is None:
                            raise ConfigError(
                                f"train.online_probe=true: model.name={cfg.model.name!r} returns no features"
                            )
                        probe_loss, probe_acc = probe(out.features, labels)
                        out.terms |= {"probe_loss": probe_loss.detach(), "probe_acc": probe_acc}
                        loss = loss + probe_loss  # separate parameters: the sum only saves a backward call
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        scheduler.step_update(step)  # lr for the step being taken
                        if t.clip_grad is not None:
                            accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if probe_optimizer is not None:
                        probe_optimizer.step()
                        probe_optimizer.zero_grad(set_to_none=True)
                log.add(out)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                done = step >= derived.total_steps
                if step % t.log_every == 0 or step % t.checkpoint_every == 0 or done:
                    log.line(step, derived, optimizer, bar, run_dir)
                    log.check_bad_images(bad_log, cfg.data.max_bad_images)
                if step % t.recon_every == 0 or done:
                    _recon(accelerator, model, recon_images, cfg, run_dir / f"recon_{step}.png")

                saved = step % t.checkpoint_every == 0 or done
                if saved:
                    save(step)
                signum = None if done else stop.requested(accelerator)
                if signum is not None:
                    stop_for_signal(accelerator, step, derived.total_steps, run_dir, signum, None if saved else save)
                if log.last_step == step:  # grids and checkpoints do not count against the next line's images/s
                    log.restart_clock()
                if done:
                    break
    export_dir = run_dir / "export"
    model = gathered(accelerator, model, lambda: build_model(cfg))
    if accelerator.is_main_process:
        export_model(model, cfg, export_dir)
        accelerator.print(f"exported to {export_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(run_dir, export_dir, step, model)


def gathered(accelerator: Accelerator, model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The trained model as a plain module, to write files from. Under FSDP its shards are gathered
    (``accelerator.get_state_dict``, a collective: every process calls it) into a fresh copy from
    ``build`` on the main process; elsewhere it is the unwrapped model itself."""
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    if accelerator.distributed_type != DistributedType.FSDP:
        return net
    state = accelerator.get_state_dict(model)  # full tensors on the main process
    if not accelerator.is_main_process:
        return net
    with torch.random.fork_rng(devices=[]):  # building seeds; training's random streams go on untouched
        full = build()
    full.load_state_dict(state)
    return full


def _online_probe(
    accelerator: Accelerator, cfg: Config, dataset: ImageDataset | ImageStream, model: torch.nn.Module
) -> tuple[torch.nn.Module | None, torch.optim.Optimizer | None]:
    if not cfg.train.online_probe:
        return None, None
    if cfg.train.mixed_precision == "fp16":
        # one GradScaler would serve two optimizers (double unscaling with clipping, two updates per step)
        raise ConfigError("train.online_probe=true does not work with train.mixed_precision=fp16; use bf16 or no")
    features = dataset.features if isinstance(dataset, ImageStream) else dataset.ds.features
    feature = features.get(dataset.label_col) if dataset.label_col else None
    if not isinstance(feature, datasets.ClassLabel):
        raise DataError(
            "train.online_probe=true needs a ClassLabel column (it gives the number of classes) and the dataset "
            "has none; name one with data.label_column=NAME or set train.online_probe=false"
        )
    probe = OnlineProbe(accelerator.unwrap_model(model).feature_dim, feature.num_classes)
    return accelerator.prepare(probe, probe.optimizer())


def stop_for_signal(
    accelerator: Accelerator, step: int, total: int, run_dir: Path, signum: int, save: Callable[[int], None] | None
) -> None:
    """Collective: ``save`` the checkpoint of ``step`` (None: it was just written), then ``Preempted``."""
    if save is not None:
        save(step)
    accelerator.end_training()
    raise Preempted(
        f"stopped by {signal.Signals(signum).name} after step {step} of {total}; checkpoint "
        f"{run_dir}/checkpoints/step_{step} written: launch the same command again to resume",
        signum,
    )


class BadImagesError(UserError, RuntimeError):
    """More undecodable images than ``data.max_bad_images``; checkpoints up to here are kept."""

    exit_code = 1


def check_finite_weights(model: torch.nn.Module, step: int, run_dir: Path) -> None:
    """A finite loss can still come with an update that overflowed; never checkpoint such weights.
    (Replicas are identical, so every process reaches the same verdict.)"""
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise non_finite_error(f"weights became non-finite ({bad})", step, run_dir)


def non_finite_error(what: str, step: int, run_dir: Path) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{what} by step {step}; stopped without saving. Last good checkpoint: "
        f"{ckpt.latest_checkpoint(run_dir) or 'none'}. Lower train.blr or set train.clip_grad, then relaunch to resume."
    )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (logged after the checkpoint a run resumes from, or by an
    earlier run that never checkpointed), so every step appears once."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _recon(accelerator: Accelerator, model: torch.nn.Module, images: torch.Tensor, cfg: Config, path: Path) -> None:
    """Write a reconstruction grid (main process), leaving every RNG stream untouched. Under FSDP
    every process runs the forward (it gathers the shards: a collective); only the main one writes."""
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if not (accelerator.is_main_process or sharded):
        return
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    was_training = net.training
    net.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), accelerator.autocast():
        torch.manual_seed(cfg.train.seed)  # the same masks in every grid of the run
        images = images.to(accelerator.device)
        out = net(images)
        if not accelerator.is_main_process:
            net.train(was_training)
            return
        save_recon_grid(path, images, out, cfg.data.mean, cfg.data.std)
        if hasattr(net, "sample") and not sharded:  # a generative model: a grid of prior samples beside it
            samples = net.sample(len(images) * 4).float().cpu()
            save_image(denormalize(samples, cfg.data.mean, cfg.data.std), str(path.with_name(
                path.name.replace("recon_", "samples_"))), nrow=len(images), padding=2, pad_value=1.0)  # fmt: skip
    net.train(was_training)

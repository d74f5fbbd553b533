"""Pretraining: an autoencoder of any family trained by the step runner, its encoder exported at
the end.

The runner never knows which autoencoder it trains: the job calls ``model(images) -> AEOutput``
and back-propagates ``loss``. One optimizer step consumes ``train.accum_steps`` micro-batches on
every process (Accelerate averages gradients across processes and accumulates locally).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2

from mae.config import Config, ConfigError, Derived, derive, from_dict
from mae.data.base import Batch, DataSource
from mae.data.images import ImageDataset, eval_transform
from mae.data.loading import DataError
from mae.data.sources import build_source
from mae.export import export_model, trained_record
from mae.interop import infer_architecture, load_into, load_weights
from mae.models import MODELS, Autoencoder, build_model
from mae.online_probe import OnlineProbe
from mae.run.console import console_log
from mae.run.directory import check_resumable, resumable_keys, start_run
from mae.run.distributed import check_shardable, is_sharded, peers_watched, same_init_everywhere
from mae.run.lock import hold_run_dir
from mae.runner import (
    Runner,
    StepLoss,
    accelerator_for,
    checkpoint_volume_warning,
    choose_attention,
    cosine_schedule,
    gathered,
    open_run_dir,
    prepare_with_data,
    schedule_lines,
)
from mae.visualize import denormalize, save_recon_grid, save_tiles, shown_channels

BAD_IMAGES = "bad_images.jsonl"
# what may change when a pretraining run is resumed, beside the runner's own (``mae.run.directory``)
RESUMABLE = ("train.compile", "train.checkpoint_every", "train.recon_every", "train.recon_images")


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    export_dir: Path
    steps: int
    model: Autoencoder  # the trained model, unwrapped, on this process


def build_optimizer(
    model: Autoencoder, cfg: Config, derived: Derived, fused: bool = False
) -> torch.optim.Optimizer:
    # timm excludes biases, norms (ndim <= 1) and model.no_weight_decay() from weight decay, and
    # skips frozen parameters (the fixed position embeddings). ``fused``: torch's one-kernel AdamW.
    t = cfg.train
    extra = {"fused": True} if fused else {}
    return create_optimizer_v2(
        model, opt="adamw", lr=derived.lr, weight_decay=t.weight_decay, betas=t.betas, **extra
    )


def describe_model(m: Any) -> str:
    if m.name != "mae":
        return m.name
    return (
        f"mae ViT {m.embed_dim}x{m.depth}/{m.patch_size}, "
        f"decoder {m.decoder_embed_dim}x{m.decoder_depth}" + (f" ({m.preset})" if m.preset else "")
    )


def load_init(accelerator: Accelerator, model: Autoencoder, cfg: Config) -> None:
    """Starting weights from ``cfg.init`` (a fresh run only: a resumed run has its own)."""
    state = load_weights(cfg.init)
    done = load_into(model, state, cfg.init)
    guessed = [k for k in infer_architecture(cfg.init, state).guessed if k.endswith("heads")]
    heads = ", ".join(f"model.{k}={getattr(cfg.model, k)}" for k in guessed)
    regrid = done["pos_embed_regrid"]
    accelerator.print(
        f"init from {cfg.init}: {done['loaded']} tensors"
        + (f"; head counts are not recorded in the file, used {heads}" if guessed else "")
        + (f"; fresh: {len(done['fresh'])} decoder tensors" if done["fresh"] else "")
        + (
            " (the file's decoder is of the other kind: model.decoder)"
            if done["other_decoder"]
            else ""
        )
        + (f"; position embeddings for the new grid: {sorted(regrid)}" if regrid else "")
    )


class Pretraining:
    """The runner's job for pretraining: the autoencoder's loss (and the online probe's), grids of
    reconstructions, checkpoints every ``train.checkpoint_every`` steps."""

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: Config,
        model: torch.nn.Module,
        source: DataSource,
        derived: Derived,
    ) -> None:
        t = cfg.train
        self.accelerator, self.cfg, self.derived = accelerator, cfg, derived
        self.run_dir = Path(cfg.output_dir)
        # torch's one-kernel AdamW on a GPU: 1.3% more images/s for the compiled ViT-B/16 step on an
        # H200 (bench/vs_hf.py --optimizers foreach fused); the same update up to rounding. Kept off
        # under FSDP, whose sharded parameters it was not measured with, and on CPU, so CPU runs
        # stay bit-identical.
        fused = accelerator.device.type == "cuda" and not is_sharded(accelerator)
        self.optimizers = [build_optimizer(model, cfg, derived, fused=fused)]
        self.scheduler = cosine_schedule(self.optimizers[0], derived, t.min_lr)
        self.model, self.optimizers[0] = prepare_with_data(
            accelerator, source, derived, model, self.optimizers[0]
        )
        self.probe = self._online_probe(source)
        self.modules = [self.model] if self.probe is None else [self.model, self.probe]
        self.net = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # compiled apart from what Accelerate holds, so checkpoints keep the plain parameter names
        self.forward = torch.compile(self.model) if t.compile else self.model
        # fixed images for reconstruction grids, across the classes; deterministic transform
        rows = source.grid_rows(t.recon_images)
        shown = ImageDataset(rows, cfg.data.columns, eval_transform(cfg.data))
        self.recon_images = torch.stack([shown[i][0] for i in range(len(shown))])
        self.arrays = shown.rows.columns.arrays  # grids of arrays are stretched to their range

    def _online_probe(self, source: DataSource) -> torch.nn.Module | None:
        if not self.cfg.train.online_probe:
            return None
        if self.cfg.train.mixed_precision == "fp16":
            # one GradScaler would serve two optimizers (double unscaling with clipping, two updates
            # per step)
            raise ConfigError(
                "train.online_probe=true does not work with train.mixed_precision=fp16; "
                "use bf16 or no"
            )
        if is_sharded(self.accelerator):  # Accelerate's FSDP2 prepares one model with its optimizer
            raise ConfigError(
                "train.online_probe=true does not run under FSDP; set train.online_probe=false"
            )
        feature = source.label_feature
        if not isinstance(feature, datasets.ClassLabel):
            raise DataError(
                "train.online_probe=true needs a ClassLabel column (it gives the number of "
                "classes) and the dataset has none; name one with data.label_column=NAME or set "
                "train.online_probe=false"
            )
        probe = OnlineProbe(
            self.accelerator.unwrap_model(self.model).feature_dim, feature.num_classes
        )
        probe, optimizer = self.accelerator.prepare(probe, probe.optimizer())
        self.optimizers.append(optimizer)
        return probe

    def loss(self, batch: Batch, step: int) -> StepLoss:
        # schedules inside the model (e.g. a KL warm-up) follow the optimizer step
        self.net.set_step(step)
        if batch.noise is None:
            out = self.forward(batch.images)
        else:  # MAE: each sample's own mask, drawn by the source
            out = self.forward(batch.images, noise=batch.noise)
        loss = out.loss
        if self.probe is not None:
            if out.features is None:
                raise ConfigError(
                    f"train.online_probe=true: model.name={self.cfg.model.name!r} returns no "
                    "features"
                )
            probe_loss, probe_acc = self.probe(out.features, batch.labels)
            out.terms |= {"probe_loss": probe_loss.detach(), "probe_acc": probe_acc}
            loss = loss + probe_loss  # separate parameters: the sum only saves a backward call
        return StepLoss(loss, out.loss, out.terms)

    def after_step(self, step: int, done: bool) -> None:
        if step % self.cfg.train.recon_every == 0 or done:
            self._recon(self.run_dir / f"recon_{step}.png")

    def checkpoint_due(self, step: int, done: bool) -> bool:
        return step % self.cfg.train.checkpoint_every == 0 or done

    def before_checkpoint(self, step: int) -> None:
        pass

    def loop_state(self, step: int) -> dict[str, Any]:
        return {"epoch": step / self.derived.steps_per_epoch}

    def load_loop_state(self, loop: dict[str, Any]) -> None:
        pass

    def _recon(self, path: Path) -> None:
        """Write a reconstruction grid (main process), leaving every RNG stream untouched. Under
        FSDP every process runs the forward (it gathers the shards: a collective); only the main
        one writes."""
        acc, net, cfg = self.accelerator, self.net, self.cfg
        sharded = is_sharded(acc)
        if not (acc.is_main_process or sharded):
            return
        was_training = net.training
        net.eval()
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), acc.autocast():
            torch.manual_seed(cfg.train.seed)  # the same masks in every grid of the run
            images = self.recon_images.to(acc.device)
            out = net(images)
            if acc.is_main_process and out.recon is not None:  # teacher targets: no pixels
                save_recon_grid(path, images, out, cfg.data, self.arrays)
                # a generative model: prior samples beside it
                if hasattr(net, "sample") and not sharded:
                    samples = net.sample(len(images) * 4).float().cpu()
                    tiles = shown_channels(
                        denormalize(samples, cfg.data.mean, cfg.data.std), cfg.data.grid_channels
                    )
                    save_tiles(
                        tiles,
                        path.with_name(path.name.replace("recon_", "samples_")),
                        nrow=len(images),
                    )
        net.train(was_training)


def summary_line(run_dir: Path, step: int, seconds: float, export_dir: Path) -> str:
    """The run's last line: its steps, this launch's training time, the last logged loss, and
    where the encoder went."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    loss = f"final loss {json.loads(lines[-1])['loss']:.4f}" if lines else "no loss logged"
    minutes, rest = divmod(round(seconds), 60)
    return (
        f"done: {step} steps ({minutes}:{rest:02d} of training), {loss}; exported to {export_dir}"
    )


def describe_masks(cfg: Config, derived: Derived) -> str | None:
    """A line for masks per image and teacher targets, when the run uses either."""
    m, k = cfg.model, cfg.train.masks_per_image
    parts = []
    if k > 1:
        parts.append(
            f"{k} masks per image: {k * derived.effective_batch} masked views per optimizer "
            f"step; the batch and the lr count the {derived.effective_batch} images"
        )
    if m.target == "teacher":
        parts.append(
            f"targets: an EMA teacher's top {m.teacher_layers} blocks, decay {m.ema_decay:g} -> "
            f"{m.ema_end_decay:g} over {m.ema_anneal_steps} steps, once per image"
        )
    return "; ".join(parts) or None


def train(cfg: Config) -> RunResult:
    """Pretrain (or resume) the run in ``cfg.output_dir``, holding its lock; the encoder is
    exported at the end."""
    run_dir, t = Path(cfg.output_dir), cfg.train
    # e.g. greedy layer-wise stages
    idle = MODELS[cfg.model.name].unused_parameters
    accelerator = accelerator_for(t, run_dir, find_unused_parameters=idle)
    watched = peers_watched(accelerator, run_dir, t.key("dist_timeout"), t.dist_timeout)
    with hold_run_dir(accelerator, run_dir), watched:
        with console_log(run_dir, accelerator.is_main_process):
            return _train(cfg, accelerator)


def _train(cfg: Config, accelerator: Accelerator) -> RunResult:
    run_dir, t = Path(cfg.output_dir), cfg.train
    resume_from = open_run_dir(accelerator, run_dir)
    # model-side randomness per process; MAE masks come with each sample
    set_seed(t.seed, device_specific=True)

    h, w, p = *cfg.data.hw, cfg.model.patch_size
    noise = (h // p) * (w // p) if cfg.model.name == "mae" else None
    rank, world = accelerator.process_index, accelerator.num_processes
    data = build_source(
        cfg, rank, world, run_dir / BAD_IMAGES, noise, accelerator.local_main_process_first
    )
    source = data.source
    # data.mean=auto: the measured statistics
    cfg = dataclasses.replace(cfg, data=data.config)
    derived = derive(cfg, source.size, accelerator.num_processes)
    if resume_from is not None:
        check_resumable(
            accelerator, run_dir, cfg, derived, resumable_keys(t.SECTION, *RESUMABLE), from_dict
        )

    with same_init_everywhere(accelerator, t.seed):
        model = build_model(cfg)
    check_shardable(accelerator, model, f"model.name={cfg.model.name}")
    if cfg.init is not None and resume_from is None:  # a resumed run has its own weights
        load_init(accelerator, model, cfg)
    job = Pretraining(accelerator, cfg, model, source, derived)
    params = sum(p.numel() for p in job.model.parameters() if p.requires_grad)
    attention = choose_attention(accelerator, job.net, t.attention)
    accelerator.print(
        f"model {describe_model(cfg.model)}: {params / 1e6:.2f}M trainable parameters\n"
        f"data {cfg.data.dataset}[{cfg.data.split}]: {derived.dataset_size} images, "
        f"{derived.steps_per_epoch} steps/epoch\n"
        + schedule_lines(accelerator, t, derived, attention, t.compile)
    )
    if (about_data := source.describe()) is not None:
        accelerator.print(about_data)
    if (about_masks := describe_masks(cfg, derived)) is not None:
        accelerator.print(about_masks)
    checkpoints = derived.total_steps // t.checkpoint_every + 1
    checkpoint_volume_warning(accelerator, [job.model], checkpoints, "train.checkpoint_every")
    stats = {} if data.stats is None else {"data_stats": data.stats}
    start_run(accelerator, run_dir, cfg, derived, "pretrain", stats)
    tic = time.perf_counter()
    step = Runner(accelerator, run_dir, t, derived, source, job).run(resume_from, "pretrain")
    seconds = time.perf_counter() - tic

    export_dir = run_dir / "export"
    model = gathered(accelerator, job.model, lambda: build_model(cfg))
    if accelerator.is_main_process:
        trained = trained_record(step, dataclasses.asdict(derived))
        export_model(model, cfg, export_dir, trained)
        accelerator.print(summary_line(run_dir, step, seconds, export_dir))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(run_dir, export_dir, step, model)

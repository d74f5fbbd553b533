"""The one step loop, shared by pretraining and fine-tuning.

The runner owns what every training run does the same way: micro-batches through Accelerate's
gradient accumulation, the lr as a pure function of the optimizer step, gradient clipping, the
non-finite stop, metric lines, checkpoints, SIGTERM/SIGINT, resume and the images/s clock. It knows
nothing of models or kinds of data: a ``Job`` gives the loss of a batch (and what to do after a
step or before a checkpoint), a ``DataSource`` gives the batches from an optimizer step on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    parse_flag_from_env,
)
from timm.scheduler import CosineLRScheduler
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from mae.config import ConfigError, Derived
from mae.config.pretraining import warmup_steps
from mae.config.training import TRACKERS, TrainingSettings
from mae.data.base import Batch, DataSource
from mae.errors import UserError
from mae.run import checkpoint as ckpt
from mae.run import distributed
from mae.run.directory import truncate_metrics
from mae.run.hardware import resolve_attention, resolve_precision, set_attention, tune_cpu_allocator
from mae.run.signals import Preempted, StepAbandoned, StopSignals


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the weights stopped being finite; nothing was saved after it happened."""

    exit_code = 1


class StepLoss(NamedTuple):
    backward: torch.Tensor  # what is back-propagated
    logged: torch.Tensor  # what ``metrics.jsonl`` reports as the loss
    terms: dict[str, torch.Tensor]  # detached parts, logged as ``terms/NAME``


class Job(Protocol):
    """What differs between pretraining and fine-tuning: the loss, and what happens around steps."""

    model: torch.nn.Module  # prepared: clipped, checked finite before every checkpoint
    modules: list[torch.nn.Module]  # accumulated together (the model, and e.g. an online probe)
    optimizers: list[torch.optim.Optimizer]  # stepped together; the first follows ``scheduler``
    scheduler: CosineLRScheduler

    def loss(self, batch: Batch, step: int) -> StepLoss: ...

    def after_step(self, step: int, done: bool) -> None: ...  # e.g. reconstruction grids

    def checkpoint_due(self, step: int, done: bool) -> bool: ...

    def before_checkpoint(self, step: int) -> None: ...  # e.g. evaluation, classifiers

    def loop_state(self, step: int) -> dict[str, Any]: ...  # kept in the checkpoint

    def load_loop_state(self, loop: dict[str, Any]) -> None: ...


def open_run_dir(accelerator: Accelerator, run_dir: Path) -> Path | None:
    """Collective: clear what an interrupted checkpoint left and set damaged checkpoints aside (main
    process); the newest complete checkpoint that verifies, to resume from; None for a fresh run."""
    problem = None
    if accelerator.is_main_process:
        ckpt.remove_partial(run_dir)
        problem = ckpt.set_aside_damaged(run_dir, accelerator.print)
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise ckpt.CheckpointError(problem)
    return ckpt.latest_checkpoint(run_dir)


def _accelerate_device() -> torch.device:
    """The device type Accelerate will pick, known before it starts (it fixes the precision at
    start)."""
    gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return torch.device("cuda" if gpu else "cpu")


def trackers(t: TrainingSettings) -> list[str]:
    """The section's ``log_with``, each tracker's package checked: Accelerate would drop a missing
    one with a log line and train on without it."""
    missing = [name for name in t.log_with if importlib.util.find_spec(TRACKERS[name]) is None]
    if missing:
        key = t.key("log_with")
        raise ConfigError(
            f"{key}={list(t.log_with)}: {', '.join(missing)} is not installed; pip install "
            f"{' '.join(TRACKERS[m] for m in missing)}, or leave it out of {key}"
        )
    return list(t.log_with)


def accelerator_for(
    t: TrainingSettings, run_dir: Path, find_unused_parameters: bool = False
) -> Accelerator:
    """Accelerate with the section's precision and accumulation, logging into ``run_dir``; on CPU,
    the torch threads split between the processes of this machine."""
    distributed.check_restartable()
    accelerator = Accelerator(
        mixed_precision=resolve_precision(t.mixed_precision, _accelerate_device()),
        gradient_accumulation_steps=t.accum_steps,
        log_with=trackers(t) or None,
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tb")
        ),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
            distributed.process_group_kwargs(t.dist_timeout),
        ],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # N copies of one run, each alone: N times the work
        raise ConfigError(
            f"{launched} processes were launched but they do not form one group "
            f"({accelerator.num_processes} seen by Accelerate); without a GPU launch with "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "(or configs/accelerate/cpu_ddp.yaml)"
        )
    distributed.enable_fsdp(accelerator, t.SECTION)
    if accelerator.device.type == "cpu":
        tune_cpu_allocator()
        if t.mixed_precision == "fp16":  # Accelerate would silently run fp32
            key = t.key("mixed_precision")
            raise ConfigError(f"{key}=fp16 needs a GPU; on CPU use {key}=bf16 or no")
        # set by torchrun / accelerate launch
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if hasattr(os, "sched_getaffinity"):
            cores = len(os.sched_getaffinity(0))
        else:
            cores = os.cpu_count() or 1
        torch.set_num_threads(t.cpu_threads or max(1, cores // local_processes))
    return accelerator


def choose_attention(accelerator: Accelerator, model: torch.nn.Module, requested: str) -> str:
    """Set the attention core of ``model``'s timm blocks for this device and precision
    (``mae.run.hardware``); returns what was chosen, or 'none' for a model without attention."""
    kind = resolve_attention(requested, accelerator.device, accelerator.mixed_precision)
    return kind if set_attention(model, kind) else "none"


def prepare_with_data(
    accelerator: Accelerator,
    source: DataSource,
    derived: Derived,
    *objects: Any,
    after: tuple[Any, ...] = (),
) -> list[Any]:
    """``objects`` (model, optimizers), the source's loader and ``after`` (e.g. an evaluation
    loader) through one ``accelerator.prepare`` call, in that order (DeepSpeed, for one, infers its
    batch size from the loaders it sees with the model); the source keeps its prepared loader.
    Returns the prepared ``objects`` and ``after``."""
    loader = source.loader_for(derived)
    loaders = [] if loader is None else [loader]
    prepared = accelerator.prepare(*objects, *loaders, *after)
    prepared = list(prepared) if isinstance(prepared, (tuple, list)) else [prepared]
    n = len(objects)
    source.attach(accelerator, derived, prepared[n] if loaders else None)
    return prepared[:n] + prepared[n + len(loaders) :]


def cosine_schedule(
    optimizer: torch.optim.Optimizer, derived: Derived, min_lr: float
) -> CosineLRScheduler:
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


def schedule_lines(
    accelerator: Accelerator,
    t: TrainingSettings,
    derived: Derived,
    attention: str,
    compiled: bool = False,
) -> str:
    """The derived batch, lr and schedule, and where it runs: the setup printout's common part."""
    threads = f" ({torch.get_num_threads()} threads)" if accelerator.device.type == "cpu" else ""
    batch, epochs = derived.effective_batch, derived.total_steps / derived.steps_per_epoch
    return (
        f"effective batch {batch} = {t.batch_size} per process x {t.accum_steps} accumulation "
        f"x {derived.num_processes} processes; "
        f"lr {derived.lr:.3g} = blr {t.blr:g} x {batch} / 256\n"
        f"{derived.total_steps} steps ({epochs:.2f} epochs), {derived.warmup_steps} warmup"
        f"{_capped(t, derived)}; "
        f"mixed precision {accelerator.mixed_precision}; attention {attention}"
        f"{' (torch.compile)' if compiled else ''}; device {accelerator.device}{threads}\n"
        + distributed.summary(distributed.describe(accelerator))
    )


def _capped(t: TrainingSettings, derived: Derived) -> str:
    """Why the warm-up is shorter than ``warmup_epochs`` asks, when the cap made it so."""
    asked = warmup_steps(t, derived.steps_per_epoch, derived.total_steps, capped=False)
    if derived.warmup_steps >= asked:
        return ""
    return f" (capped at {t.warmup_cap:g} of the run by {t.key('warmup_cap')}; {asked} asked)"


# a run that would write more checkpoint bytes than this gets a line at start
CHECKPOINT_VOLUME_WARNING = 5 * 1024**3


def checkpoint_volume_warning(
    accelerator: Accelerator, modules: list[torch.nn.Module], count: int, key: str
) -> None:
    """One line when ``count`` checkpoints of ``modules`` (weights and AdamW's two moments, in
    their dtypes) add up past ``CHECKPOINT_VOLUME_WARNING``: a cadence set for a large dataset
    meeting a small one writes gigabytes for minutes of training. ``key``: the cadence to raise."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    size = sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in params)
    if count * size > CHECKPOINT_VOLUME_WARNING:
        accelerator.print(
            f"warning: this run writes {count} checkpoints of {size / 1024**3:.2f} GB "
            f"({count * size / 1024**3:.1f} GB in all); raise {key} to write fewer"
        )


class MetricLog:
    """Running sums between log lines -> ``metrics.jsonl`` (main process) and Accelerate's
    trackers."""

    def __init__(
        self, accelerator: Accelerator, path: Path, step: int, images_per_step: int
    ) -> None:
        self.accelerator, self.path, self.images_per_step = accelerator, path, images_per_step
        self.loss = torch.zeros((), device=accelerator.device)
        self.terms: dict[str, torch.Tensor] = {}
        self.count, self.last_step, self.clock_step = 0, step, step
        self.restart_clock()

    def restart_clock(self) -> None:
        self.tic = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """Collective: the running sums since the last line, averaged over processes (as a line
        would average them), for a checkpoint written between lines."""
        acc = self.accelerator
        return {
            "loss": acc.reduce(self.loss.clone(), reduction="mean").item(),
            "terms": {
                k: acc.reduce(v.clone(), reduction="mean").item() for k, v in self.terms.items()
            },
            "count": self.count,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The sums of ``state_dict`` (None: a fresh start, or a checkpoint taken at a line)."""
        if not state or state["count"] == 0:
            return
        self.loss.fill_(state["loss"])
        dev = self.loss.device
        self.terms = {k: torch.tensor(v, device=dev) for k, v in state["terms"].items()}
        self.count, self.last_step = state["count"], state["last_step"]

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        self.loss += loss.detach()
        for k, v in terms.items():  # summed here, reduced across processes when written
            self.terms[k] = self.terms.get(k, 0) + v.float().to(self.loss.device)
        self.count += 1

    def mean_loss(self) -> float:
        """Collective: the mean loss over micro-batches and processes since the last line."""
        return self.accelerator.reduce(self.loss, reduction="mean").item() / self.count

    def line(
        self, step: int, derived: Derived, loss: float, optimizer: torch.optim.Optimizer, bar: tqdm
    ) -> None:
        """Collective: ``loss`` written with the lr (the largest group's: layer decay scales the
        others) and shown on the bar."""
        lr = max(g["lr"] for g in optimizer.param_groups)
        self.write(step, step / derived.steps_per_epoch, loss, lr)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def write(self, step: int, epoch: float, loss: float, lr: float) -> dict[str, Any]:
        """Collective: every process calls it."""
        mean = {
            k: self.accelerator.reduce(v, reduction="mean").item() / self.count
            for k, v in self.terms.items()
        }
        seconds = time.perf_counter() - self.tic
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "images_per_s": (step - self.clock_step) * self.images_per_step / seconds,
            **{f"terms/{k}": v for k, v in mean.items()},
        }
        self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.loss.zero_()
        self.terms.clear()
        self.count, self.last_step, self.clock_step = 0, step, step
        return record


class Runner:
    """Train ``job`` on ``source`` from a step to ``derived.total_steps``, in ``run_dir``, by the
    training settings of ``section`` (pretraining's ``train``, fine-tuning's ``finetune``)."""

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        section: TrainingSettings,
        derived: Derived,
        source: DataSource,
        job: Job,
    ) -> None:
        self.accelerator, self.run_dir = accelerator, run_dir
        self.section, self.derived = section, derived
        self.source, self.job = source, job
        self.saved_at = 0.0  # time.monotonic() of the last checkpoint (or of the start)
        self._acc_step = 0  # Accelerate's micro-step count before the micro-batch in flight

    def _resume(self, path: Path | None) -> tuple[int, dict[str, Any] | None]:
        """Restore the checkpoint at ``path`` (None: a fresh run) and return its step and the
        running metric sums it kept (``MetricLog.state_dict``); metric lines past it are
        dropped."""
        step, sums = 0, None
        if path is not None:
            loop = ckpt.load_checkpoint(self.accelerator, path)
            step = loop["step"]
            state = ckpt.read_process_state(path, self.accelerator.process_index)
            self.source.load_state_dict(state, str(path))
            self.job.load_loop_state(loop)
            sums = loop.get("metric_log")
            self.accelerator.print(f"resumed from {path} at step {step}")
        if self.accelerator.is_main_process:
            truncate_metrics(self.run_dir / "metrics.jsonl", step)
        return step, sums

    def run(self, resume_from: Path | None, desc: str) -> int:
        """Resume from checkpoint ``resume_from`` (None: from the start), then loop; returns the
        last step taken. SIGTERM/SIGINT: a checkpoint of the last whole step, then
        ``Preempted``."""
        acc, derived = self.accelerator, self.derived
        step, sums = self._resume(resume_from)
        log = MetricLog(acc, self.run_dir / "metrics.jsonl", step, derived.effective_batch)
        log.load_state_dict(sums)
        shown = acc.is_main_process
        bar = tqdm(total=derived.total_steps, initial=step, disable=not shown, desc=desc)
        # a single process drops the step in flight on a signal (mae.run.signals); several
        # finish it together, and so does accumulation (its first micro-batches are logged)
        single = acc.num_processes == 1 and self.section.accum_steps == 1
        say = self._say_stopping if shown else None
        self.saved_at = time.monotonic()
        # however the loop ends, the data's workers stop with it
        with StopSignals(say) as stop, bar, contextlib.closing(self.source):
            try:
                while step < derived.total_steps:
                    for batch in self.source.batches(step):
                        self._micro_step(batch, step, log, stop.interruptible(single))
                        if not acc.sync_gradients:
                            continue
                        step += 1
                        bar.update(1)
                        if self._after_step(step, log, bar, stop):
                            break
            except StepAbandoned:
                acc.step = self._acc_step  # Accelerate's micro-step count, as the step found it
                self.save(step, log)
                self.stop_for_signal(step, stop.signum or signal.SIGTERM)
        return step

    def _say_stopping(self, name: str) -> None:
        """Said from the signal handler, at once: what is kept if the launcher kills us first."""
        latest = ckpt.latest_checkpoint(self.run_dir)
        print(
            f"\n{name}: stopping; writing a checkpoint of the last whole step (if the process is "
            f"killed first, the run resumes from {latest or 'the start'})",
            file=sys.stderr,
            flush=True,
        )

    def _micro_step(
        self,
        batch: Batch,
        step: int,
        log: MetricLog,
        interruptible: contextlib.AbstractContextManager[None],
    ) -> None:
        """One micro-batch; a signal may drop it only inside ``interruptible``: the forward and
        backward, which leave the weights and the optimizer untouched."""
        acc, job = self.accelerator, self.job
        self._acc_step = acc.step
        with acc.accumulate(*job.modules):
            with interruptible:
                out = job.loss(batch, step)
                acc.backward(out.backward)
            if acc.sync_gradients:
                job.scheduler.step_update(step)  # lr for the step being taken
                if self.section.clip_grad is not None:
                    acc.clip_grad_norm_(job.model.parameters(), self.section.clip_grad)
            for optimizer in job.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        log.add(out.logged, out.terms)

    def _after_step(self, step: int, log: MetricLog, bar: tqdm, stop: StopSignals) -> bool:
        """Log, the job's own work, checkpoint and signals after optimizer step ``step``; True at
        the end."""
        done = step >= self.derived.total_steps
        due = self.job.checkpoint_due(step, done)
        # a line at every due checkpoint, so that a resumed run logs exactly what an unbroken one
        # does (the checkpoints a signal or the clock asks for carry the running sums instead)
        if step % self.section.log_every == 0 or due or done:
            loss = log.mean_loss()
            if not math.isfinite(loss):
                raise non_finite_error(f"loss became {loss}", step, self.run_dir, self.section)
            log.line(step, self.derived, loss, self.job.optimizers[0], bar)
            self.source.check_bad_images(self.accelerator)
        self.job.after_step(step, done)
        if due:
            self.save(step, log, job_first=True)
        minutes = self.section.checkpoint_minutes
        timed = minutes is not None and time.monotonic() - self.saved_at >= 60 * minutes
        signum, timed = (None, False) if done else stop.requested(self.accelerator, timed)
        if signum is not None or (timed and not due):
            if not due:  # else it was just written
                self.save(step, log)
            if signum is not None:
                self.stop_for_signal(step, signum)
        if log.last_step == step:  # grids, evaluation and checkpoints don't count against images/s
            log.restart_clock()
        return done

    def save(self, step: int, log: MetricLog, job_first: bool = False) -> None:
        """Collective: the checkpoint of ``step``; with ``job_first`` (a due checkpoint, not one a
        signal or the clock asked for) the job's own work before it."""
        check_finite_weights(self.accelerator, self.job.model, step, self.run_dir, self.section)
        if job_first:
            self.job.before_checkpoint(step)
        ckpt.save_checkpoint(
            self.accelerator,
            self.run_dir,
            step,
            {**self.job.loop_state(step), "metric_log": log.state_dict()},
            self.section.keep_checkpoints,
            process_state=self.source.state_dict(),
        )
        self.saved_at = time.monotonic()

    def stop_for_signal(self, step: int, signum: int) -> None:
        """Collective, after the checkpoint of ``step`` is written: ``Preempted``."""
        self.accelerator.end_training()
        raise Preempted(
            f"stopped by {signal.Signals(signum).name} after step {step} of "
            f"{self.derived.total_steps}; checkpoint {self.run_dir}/checkpoints/step_{step} "
            "written: launch the same command again to resume",
            signum,
        )


def check_finite_weights(
    accelerator: Accelerator,
    model: torch.nn.Module,
    step: int,
    run_dir: Path,
    section: TrainingSettings,
) -> None:
    """Collective under FSDP: a finite loss can still come with an update that overflowed; never
    checkpoint such weights. (DDP replicas are identical, so every process reaches the same
    verdict; FSDP processes hold different slices, so they agree on the first bad one any of them
    found.)"""
    params = (
        (n, p.to_local() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()
    )
    bad = next((n for n, p in params if not torch.isfinite(p).all()), None)
    if distributed.is_sharded(accelerator):
        bad = next((b for b in gather_object([bad]) if b is not None), None)
    if bad is not None:
        raise non_finite_error(f"weights became non-finite ({bad})", step, run_dir, section)


def non_finite_error(
    what: str, step: int, run_dir: Path, section: TrainingSettings
) -> NonFiniteLossError:
    """The stop of a diverging run, naming the keys of the section it trains by."""
    return NonFiniteLossError(
        f"{what} by step {step}; stopped without saving. Last good checkpoint: "
        f"{ckpt.latest_checkpoint(run_dir) or 'none'}. Lower {section.key('blr')} or set "
        f"{section.key('clip_grad')}, then relaunch to resume."
    )


def gathered(
    accelerator: Accelerator, model: torch.nn.Module, build: Callable[[], torch.nn.Module]
) -> torch.nn.Module:
    """The trained model as a plain module, to write files from. Under FSDP its shards are
    gathered (``accelerator.get_state_dict``, a collective: every process calls it) into a fresh
    copy from ``build`` on the main process; elsewhere it is the unwrapped model itself."""
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    if not distributed.is_sharded(accelerator):
        return net
    state = accelerator.get_state_dict(model)  # full tensors on the main process
    if not accelerator.is_main_process:
        return net
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    # building draws seeds; training's random streams go on untouched
    with torch.random.fork_rng(devices=devices):
        full = build()
    full.load_state_dict(state)
    return full

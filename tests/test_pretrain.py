"""End-to-end behaviour of the training loop on a tiny MAE and the bundled sample."""

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY, colour_folder, write_image_folder
from PIL import Image
from safetensors.torch import load_file

from mae import pretrain, runner
from mae.config import ConfigError, load_config
from mae.run import checkpoint
from mae.run.checkpoint import complete_checkpoints, latest_checkpoint


def run(tmp_path, name, *extra):
    return pretrain.train(load_config(None, [*TINY, f"output_dir={tmp_path / name}", *extra]))


class Crash(Exception):
    pass


def test_loss_falls_and_run_dir_is_complete(tmp_path, capsys):
    result = run(tmp_path, "r", "train.max_steps=30", "train.blr=1e-2", "train.checkpoint_every=10")
    d = result.run_dir
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    # the run's last line sums it up
    last = capsys.readouterr().out.strip().splitlines()[-1]
    loss = f"{lines[-1]['loss']:.4f}"
    assert re.fullmatch(
        rf"done: 30 steps \(\d+:\d\d of training\), final loss {loss}; exported to .*", last
    )
    assert last.endswith(str(d / "export"))
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert all(r["images_per_s"] > 0 and "terms/mse" in r for r in lines)
    assert [p.name for p in complete_checkpoints(d)] == ["step_20", "step_30"]  # keep_checkpoints=2
    assert (d / "recon_30.png").is_file() and (d / "config.yaml").is_file()
    grid = np.asarray(Image.open(d / "recon_30.png").convert("RGB"))
    # 2 images x (masked | reconstruction | original), 16-px tiles enlarged 6x to 96 px,
    # 2-px padding, under a 16-px strip of column titles
    assert grid.shape == (16 + 2 + 2 * (96 + 2), 2 + 3 * (96 + 2), 3)
    tile = grid[18 : 18 + 96, 2 * 98 + 2 : 2 * 98 + 2 + 96]  # the first original
    # nearest neighbour
    assert (tile == np.repeat(np.repeat(tile[::6, ::6], 6, axis=0), 6, axis=1)).all()
    for column in range(3):  # a title, in dark text on white, over every column
        strip = grid[:16, 2 + column * 98 : 2 + column * 98 + 96]
        assert (strip.min(axis=2) < 100).any() and (strip == 255).mean() > 0.5
    # the console, kept: the setup, the bar's last state (not its redraws) and the summary line
    log = (d / "train.log").read_text()
    assert "\r" not in log and log.count("pretrain: 100%") == 1, log
    assert "data sample[train]: 3000 images" in log and log.rstrip().endswith(last)
    derived = json.loads((d / "derived.json").read_text())
    single = {"type": "single", "backend": None, "world_size": 1, "machines": 1, "device": "cpu"}
    assert derived["distributed"] == single
    assert (
        derived["effective_batch"] == 8
        and derived["total_steps"] == 30
        and derived["lr"] == pytest.approx(1e-2 * 8 / 256)
    )
    assert list((d / "tb").rglob("events.out.tfevents*"))
    assert (result.export_dir / "model.safetensors").is_file()


def test_lr_schedule_warmup_then_cosine(tmp_path):
    # 3000 // 8 = 375 steps/epoch -> 8 warmup steps (under the cap: 0.5 of 20 steps)
    result = run(
        tmp_path,
        "r",
        "train.max_steps=20",
        "train.log_every=1",
        "train.warmup_epochs=0.02",
        "train.warmup_cap=0.5",
        "train.min_lr=1e-6",
        "train.blr=2.56e-2",
    )
    lrs = [json.loads(x)["lr"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    peak = 2.56e-2 * 8 / 256
    assert lrs[0] == 0.0  # step 1 uses lr(0) = 0, as the official code does
    assert lrs[7] == pytest.approx(peak * 7 / 8)
    assert lrs[8] == pytest.approx(peak)  # warmup done, start of the cosine
    assert lrs[8] > lrs[13] > lrs[19] > 1e-6


def _steps_and_losses(run_dir):
    return [
        (r["step"], r["loss"])
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    ]


@pytest.mark.parametrize(
    "where, save_at, crash_at, extra",
    [
        # mid-epoch of the first epoch (sample: 375 steps/epoch), gradient accumulation
        ("sample", 10, 13, ["train.accum_steps=2"]),
        # a 48-image folder (6 steps/epoch): the checkpoint and the crash fall in later epochs,
        # workers on, and the online probe (a second model and optimizer in the checkpoint)
        ("folder", 8, 11, ["data.num_workers=2", "train.online_probe=true"]),
        # the split decoded on the device, augmented there: crops, masks from (seed, epoch, index)
        (
            "folder",
            8,
            11,
            [
                "data.on_device=true",
                "data.image_size=20",
                "train.accum_steps=2",
                "train.online_probe=true",
            ],
        ),
        # several masks per image and a teacher (in the checkpoint, followed once per step)
        (
            "sample",
            6,
            9,
            [
                "train.masks_per_image=2",
                "model.target=teacher",
                "model.teacher_layers=2",
                "train.accum_steps=2",
            ],
        ),
        # CrossMAE's decoder: the predicted subset comes from the same per-sample noise as the mask
        (
            "sample",
            6,
            9,
            [
                "model.decoder=cross",
                "model.reconstruct_ratio=0.25",
                "model.decoder_features=weighted",
            ],
        ),
    ],
)
def test_exact_resume_after_crash(tmp_path, monkeypatch, where, save_at, crash_at, extra):
    """A 20-step run killed after a checkpoint and relaunched ends with the same weights, optimizer
    state and logged losses as a 20-step run that was never interrupted."""
    if where == "folder":
        extra = [
            *extra,
            f"data.dataset={write_image_folder(tmp_path / 'imgs', classes=3, per_class=16)}",
        ]
    common = [
        "train.max_steps=20",
        f"train.checkpoint_every={save_at}",
        "train.blr=1e-2",
        "train.log_every=1",
        *extra,
    ]
    straight = run(tmp_path, "straight", *common)

    real_save = checkpoint.save_checkpoint
    calls = []

    def save_then_crash(accelerator, output_dir, step, loop_state, keep, **kwargs):
        path = real_save(accelerator, output_dir, step, loop_state, keep, **kwargs)
        calls.append(step)
        if step == save_at:  # die a few steps after the checkpoint; those steps are lost
            real_after = pretrain.Pretraining.after_step

            def after_step_then_crash(self, step, done):
                real_after(self, step, done)
                if step == crash_at:
                    raise Crash

            monkeypatch.setattr(pretrain.Pretraining, "after_step", after_step_then_crash)
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run(tmp_path, "resumed", *common, f"train.recon_every={crash_at}")
    assert calls == [save_at] and latest_checkpoint(tmp_path / "resumed").name == f"step_{save_at}"
    assert _steps_and_losses(tmp_path / "resumed")[-1][0] == crash_at
    monkeypatch.undo()
    resumed = run(tmp_path, "resumed", *common, f"train.recon_every={crash_at}")
    assert resumed.steps == 20

    a = load_file(str(straight.run_dir / "checkpoints/step_20/model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints/step_20/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if where == "folder":  # the probe's state resumed too
        pa = load_file(str(straight.run_dir / "checkpoints/step_20/model_1.safetensors"))
        pb = load_file(str(resumed.run_dir / "checkpoints/step_20/model_1.safetensors"))
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    oa = torch.load(straight.run_dir / "checkpoints/step_20/optimizer.bin", weights_only=True)
    ob = torch.load(resumed.run_dir / "checkpoints/step_20/optimizer.bin", weights_only=True)
    for k, s in oa["state"].items():
        assert torch.equal(s["exp_avg_sq"], ob["state"][k]["exp_avg_sq"])
    # every step logged once, with the same loss as the uninterrupted run
    assert _steps_and_losses(resumed.run_dir) == _steps_and_losses(straight.run_dir)
    assert [s for s, _ in _steps_and_losses(resumed.run_dir)] == list(range(1, 21))
    # and training did move the weights
    init = pretrain.build_model(load_config(None, TINY)).state_dict()
    assert not torch.equal(a["decoder_pred.weight"], init["decoder_pred.weight"])


def test_resume_refuses_another_data_layout(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", classes=2, per_class=16)
    run(tmp_path, "r", "train.max_steps=2", f"data.dataset={folder}")
    write_image_folder(tmp_path / "imgs", classes=3, per_class=16)  # the folder grew
    with pytest.raises(
        ConfigError,
        match=r"another data/process layout \(dataset_size: 32 -> 48; steps_per_epoch: 4 -> 6\)",
    ):
        run(tmp_path, "r", "train.max_steps=4", f"data.dataset={folder}")


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    real = pretrain.build_optimizer

    def poisoned(model, cfg, derived, **kwargs):
        opt = real(model, cfg, derived, **kwargs)
        step, count = opt.step, iter(range(10**6))

        def step_then_poison(*a, **k):
            out = step(*a, **k)
            # the 4th update overflows; the loss of step 4 (before it) was finite
            if next(count) == 3:
                model.decoder_pred.bias.data.fill_(float("inf"))
            return out

        opt.step = step_then_poison
        return opt

    monkeypatch.setattr(pretrain, "build_optimizer", poisoned)
    with pytest.raises(
        runner.NonFiniteLossError,
        match=r"weights became non-finite \(decoder_pred.bias\) by step 4.*step_2",
    ):
        run(tmp_path, "r", "train.max_steps=6", "train.checkpoint_every=2")
    assert latest_checkpoint(tmp_path / "r").name == "step_2"
    assert not (tmp_path / "r/export").exists()


def test_resume_refuses_a_different_config(tmp_path):
    run(tmp_path, "r", "train.max_steps=2")
    with pytest.raises(
        ConfigError,
        match=r"different config \(model.mask_ratio: 0.75 -> 0.5; model.reconstruct_ratio",
    ):
        run(tmp_path, "r", "train.max_steps=4", "model.mask_ratio=0.5")


def test_checkpoints_without_the_runs_config_are_refused_not_resumed(tmp_path):
    """A run folder emptied while its process was stopping keeps a checkpoint but no config.yaml."""
    run(tmp_path, "r", "train.max_steps=2", "train.checkpoint_every=2")
    (tmp_path / "r/config.yaml").unlink()
    saved = (tmp_path / "r/checkpoints/step_2/model.safetensors").read_bytes()
    with pytest.raises(
        ConfigError, match=r"holds checkpoints but not the run's config.yaml.*another output_dir"
    ):
        run(tmp_path, "r", "train.max_steps=4")
    assert (tmp_path / "r/checkpoints/step_2/model.safetensors").read_bytes() == saved


def test_resume_can_extend_a_finished_run(tmp_path):
    run(tmp_path, "r", "train.max_steps=3")
    result = run(tmp_path, "r", "train.max_steps=5")
    assert result.steps == 5 and latest_checkpoint(result.run_dir).name == "step_5"


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    common = ["train.checkpoint_every=5", "train.max_steps=20"]
    run(tmp_path, "r", *common, "train.max_steps=10")  # a good run up to step 10
    export_before = (tmp_path / "r/export/model.safetensors").read_bytes()

    import mae.models.mae as mae_model

    real_mse = mae_model.masked_mse
    calls = iter(range(10**6))
    monkeypatch.setattr(
        mae_model, "masked_mse", lambda *a: real_mse(*a) * (float("nan") if next(calls) >= 2 else 1)
    )
    with pytest.raises(
        runner.NonFiniteLossError,
        match=r"loss became nan by step 15.*step_10.*Lower train.blr or set train.clip_grad",
    ):
        run(tmp_path, "r", *common)  # resumes at 10; the loss turns NaN at step 13
    assert latest_checkpoint(tmp_path / "r").name == "step_10"
    assert (tmp_path / "r/export/model.safetensors").read_bytes() == export_before


def test_bf16_autocast_runs_on_cpu(tmp_path, monkeypatch):
    dtypes = []
    real_build = pretrain.build_model

    def build_and_watch(cfg):
        model = real_build(cfg)
        model.encoder.blocks[0].attn.qkv.register_forward_hook(
            lambda m, i, o: dtypes.append(o.dtype)
        )
        return model

    monkeypatch.setattr(pretrain, "build_model", build_and_watch)
    result = run(tmp_path, "r", "train.max_steps=2", "train.mixed_precision=bf16")
    assert dtypes and set(dtypes) == {torch.bfloat16}
    # master weights stay fp32
    assert result.model.encoder.blocks[0].attn.qkv.weight.dtype == torch.float32


def test_fp16_on_cpu_is_refused_not_silently_fp32(tmp_path):
    with pytest.raises(
        ConfigError, match="fp16 needs a GPU; on CPU use train.mixed_precision=bf16"
    ):
        run(tmp_path, "r", "train.max_steps=2", "train.mixed_precision=fp16")
    assert not (tmp_path / "r").exists()


def test_cpu_threads_default_to_all_cores_despite_launcher_pin(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        # what `accelerate launch` exports on a CPU-only machine
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        run(tmp_path, "a", "train.max_steps=1")
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        run(tmp_path, "b", "train.max_steps=1", "train.cpu_threads=1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_gradient_clipping_is_applied(tmp_path):
    """With a vanishing clip norm, Adam's update m / (sqrt(v) + eps) shrinks
    by orders of magnitude."""
    torch.manual_seed(0)  # what train.seed=0 gives the model's initialisation
    init = pretrain.build_model(load_config(None, TINY)).state_dict()["decoder_pred.weight"]

    def moved(*extra):
        result = run(
            tmp_path,
            "_".join(extra) or "plain",
            "train.max_steps=3",
            "train.blr=1.0",
            "train.weight_decay=0",
            *extra,
        )
        return (result.model.decoder_pred.weight.detach() - init).abs().max().item()

    assert moved("train.clip_grad=1e-12") < 0.01 * moved()


def test_online_probe_learns_and_never_touches_the_autoencoder(tmp_path):
    folder = colour_folder(tmp_path / "colours", per_class=16)
    common = [
        f"data.dataset={folder}",
        "train.max_steps=30",
        "train.blr=1e-2",
        "train.log_every=10",
    ]
    plain = run(tmp_path, "plain", *common)
    probed = run(tmp_path, "probed", *common, "train.online_probe=true")
    a = load_file(str(plain.run_dir / "checkpoints/step_30/model.safetensors"))
    b = load_file(str(probed.run_dir / "checkpoints/step_30/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical pretraining with the probe on
    lines = [json.loads(x) for x in (probed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (
        lines[-1]["terms/probe_acc"] > 0.6
        and lines[-1]["terms/probe_loss"] < lines[0]["terms/probe_loss"]
    )
    assert "terms/probe_acc" not in json.loads(
        (plain.run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    )


def test_online_probe_needs_labels(tmp_path):
    import datasets
    import numpy as np

    (tmp_path / "d").mkdir()
    rows = {"image": [np.zeros((16, 16, 3), np.uint8)] * 16}
    datasets.Dataset.from_dict(
        rows, features=datasets.Features({"image": datasets.Image()})
    ).to_parquet(tmp_path / "d/train-00000-of-00001.parquet")
    from mae.data.loading import DataError

    with pytest.raises(DataError, match="train.online_probe=true needs a ClassLabel column"):
        run(
            tmp_path,
            "r",
            f"data.dataset={tmp_path / 'd'}",
            "train.max_steps=2",
            "train.online_probe=true",
        )


def test_online_probe_ignores_unlabelled_rows_and_refuses_fp16():
    from mae.online_probe import OnlineProbe

    probe = OnlineProbe(4, 3)
    feats = torch.randn(4, 4)
    loss, acc = probe(feats, torch.tensor([0, -1, 2, -1]))
    assert torch.isfinite(loss) and 0 <= acc.item() <= 1
    loss, acc = probe(feats, torch.full((4,), -1))
    assert loss.item() == 0.0 and loss.requires_grad
    cfg = load_config(None, [*TINY, "train.online_probe=true", "train.mixed_precision=fp16"])
    with pytest.raises(
        ConfigError, match="online_probe=true does not work with train.mixed_precision=fp16"
    ):
        # refused before the data is read
        pretrain.Pretraining._online_probe(SimpleNamespace(cfg=cfg), None)


@pytest.mark.slow  # torch.compile: over a minute of compiling on 2 CPU cores
def test_compiled_run_matches_eager_and_resumes_without_compiling(tmp_path, monkeypatch):
    compiled_calls = []
    real_compile = torch.compile

    def spy(model, *args, **kwargs):
        compiled_calls.append(model)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(pretrain.torch, "compile", spy)
    common = (
        "train.max_steps=4",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.mixed_precision=no",
    )
    eager = run(tmp_path, "eager", *common)
    assert not compiled_calls
    compiled = run(tmp_path, "compiled", *common, "train.compile=true")
    assert len(compiled_calls) == 1
    (steps, a), (steps_c, b) = (
        zip(*_steps_and_losses(r.run_dir), strict=True) for r in (eager, compiled)
    )
    assert steps == steps_c == (1, 2, 3, 4)
    assert b == pytest.approx(a, rel=1e-4)  # the same function, only fused differently
    # checkpoints hold the plain parameter names, so either setting resumes the other's run
    names = [
        set(load_file(r.run_dir / "checkpoints/step_4/model.safetensors"))
        for r in (eager, compiled)
    ]
    assert names[0] == names[1] and not any("_orig_mod" in k for k in names[1])
    resumed = run(tmp_path, "compiled", *common[1:], "train.max_steps=6")
    assert resumed.steps == 6 and len(compiled_calls) == 1


def test_log_with_passes_accelerates_trackers_through(tmp_path, monkeypatch):
    """W&B in offline mode beside TensorBoard; a tracker not installed is refused with the fix."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run(tmp_path, "r", "train.max_steps=10", "train.log_with=[tensorboard,wandb]")
    # W&B's own record of the run
    runs = list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    # both metric lines (steps 5, 10)
    assert len(runs) == 1 and runs[0].read_bytes().count(b"images_per_s") >= 2
    assert list((result.run_dir / "tb").rglob("events.out.tfevents*"))
    # as without the package
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="wandb is not installed; pip install wandb"):
        run(tmp_path, "s", "train.max_steps=1", "train.log_with=[wandb]")

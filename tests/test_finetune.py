"""Full fine-tuning: classifier construction, layer decay, augmentation, training, resume."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from helpers import (
    ROOT,
    TINY,
    accelerate_launch,
    colour_folder,
    env_without_accelerate,
    metric_write_then,
    reset_accelerate,
)
from PIL import Image
from safetensors.torch import load_file

from mae import pretrain, runner
from mae.config import Columns, ConfigError, DataConfig, derive_schedule, load_config
from mae.config.evaluation import FinetuneConfig, load_eval_config
from mae.data.images import ImageDataset
from mae.data.loading import load_split
from mae.eval import finetune as ft
from mae.eval.encoders import load_encoder
from mae.run import checkpoint
from mae.run.signals import Preempted


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    pretrain.train(load_config(None, [*TINY, f"output_dir={out}", "train.max_steps=3"]))
    reset_accelerate()  # the first test to use it may want another precision
    return out


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("colours") / "c")


def ft_cfg(tmp_path, *overrides):
    return load_eval_config(
        None,
        [
            f"output_dir={tmp_path / 'ft'}",
            "mode=finetune",
            "data.num_workers=0",
            "finetune.log_every=1",
            "finetune.eval_min_steps=0",  # the tests' epochs are a few steps each
            *overrides,
        ],
    )


def test_classifier_keeps_every_pretrained_weight(tmp_path, run_dir):
    encoder = load_encoder(str(run_dir)).module.state_dict()
    clf = ft.build_classifier(ft_cfg(tmp_path, f"encoder={run_dir}"), num_classes=3)
    state = clf.model.state_dict()
    # avg pooling: the final norm is replaced by a fresh, trained fc_norm
    # (never a frozen random one)
    assert clf.init["fresh"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert clf.init["dropped"] == ["norm.bias", "norm.weight"]
    for k, v in encoder.items():
        if not k.startswith("norm."):
            assert torch.equal(state[k], v), k
    assert torch.equal(state["fc_norm.weight"], torch.ones(32)) and state["head.weight"].shape == (
        3,
        32,
    )
    assert state["head.weight"].std() < 1e-4  # the paper's head init (std 2e-5)
    assert clf.model.fc_norm.weight.requires_grad and clf.model.pos_embed.requires_grad
    # finetune.drop_path, last block
    assert clf.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    x = torch.randn(2, 3, 16, 16)
    assert clf.model(x).shape == (2, 3)

    token = ft.build_classifier(
        ft_cfg(tmp_path, f"encoder={run_dir}", "finetune.global_pool=token"), 3
    )
    assert token.init["fresh"] == ["head.bias", "head.weight"] and token.init["dropped"] == []
    assert torch.equal(token.model.state_dict()["norm.weight"], encoder["norm.weight"])


def test_position_embeddings_are_resampled_to_the_fine_tuning_size(tmp_path, run_dir):
    clf = ft.build_classifier(
        ft_cfg(tmp_path, f"encoder={run_dir}", "finetune.image_size=24"), num_classes=3
    )
    # 4x4 -> 6x6 patches + cls
    assert clf.init["pos_embed_resampled"] == {
        "from": [1, 17, 32],
        "to": [1, 37, 32],
    }
    assert clf.data_config["input_size"] == (3, 24, 24)
    before = load_encoder(str(run_dir)).module.pos_embed
    assert torch.equal(clf.model.pos_embed[:, :1], before[:, :1])  # the cls position is kept as is
    assert clf.model(torch.randn(1, 3, 24, 24)).shape == (1, 3)


def test_layer_decay_scales_each_block(tmp_path, run_dir):
    cfg = ft_cfg(
        tmp_path, f"encoder={run_dir}", "finetune.layer_decay=0.5", "finetune.warmup_epochs=1"
    )
    clf = ft.build_classifier(cfg, num_classes=3)
    derived = derive_schedule(cfg.finetune, 1000, 1)
    opt = ft.build_optimizer(clf.model, cfg.finetune, derived)
    sched = runner.cosine_schedule(opt, derived, cfg.finetune.min_lr)
    sched.step_update(derived.warmup_steps)  # the peak
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(clf.model.named_parameters())
    peak = derived.lr
    # depth 2: head and fc_norm at 1, blocks.1 at 0.5, blocks.0 at 0.25, embeddings at 0.125
    assert lr_of[id(named["head.weight"])] == pytest.approx(peak)
    assert lr_of[id(named["fc_norm.weight"])] == pytest.approx(peak)
    assert lr_of[id(named["blocks.1.mlp.fc1.weight"])] == pytest.approx(peak * 0.5)
    assert lr_of[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(peak * 0.25)
    assert lr_of[id(named["patch_embed.proj.weight"])] == pytest.approx(peak * 0.125)
    assert lr_of[id(named["pos_embed"])] == pytest.approx(peak * 0.125)
    # weight decay on matrices only
    assert (
        wd_of[id(named["blocks.0.attn.qkv.weight"])] == 0.05
        and wd_of[id(named["blocks.0.norm1.weight"])] == 0
    )


def test_posterize_at_zero_bits_is_black_not_an_error():
    f = FinetuneConfig()
    transform = ft.train_transform(
        f, {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    )
    ops = [op for t in transform.transforms if isinstance(t, ft.RandAugment) for op in t.ops]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize and all(op.aug_fn is ft._posterize for op in posterize)
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize[0].aug_fn(img, 0).getextrema() == ((0, 0),) * 3
    assert posterize[0].aug_fn(img, 1).getpixel((0, 0)) == (128, 0, 0)


def test_timm_augmentation_is_a_function_of_the_sample(tmp_path):
    """RandAugment and random erasing draw from Python's and NumPy's RNGs: each (epoch, index) gets
    the same images whatever came before, and the caller's streams are left alone."""
    import random

    import numpy as np

    f = FinetuneConfig()
    cfg = DataConfig(image_size=32)
    transform = ft.train_transform(
        f, {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    )
    ds = ImageDataset(load_split(cfg), cfg.columns, transform, seed=3)
    random.seed(1)
    np.random.seed(1)
    first = [ds[(2, i)][0] for i in range(6)]
    r, n = random.random(), np.random.rand()
    again = [ds[(2, i)][0] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(ds[(3, 0)][0], first[0])  # another epoch, another augmentation
    random.seed(1)
    np.random.seed(1)
    _ = [ds[(2, i)] for i in range(6)]
    assert random.random() == r and np.random.rand() == n


def test_finetuning_learns_and_exports_timm_classifiers(tmp_path, run_dir, colours):
    cfg = ft_cfg(
        tmp_path,
        f"encoder={run_dir}",
        f"data.dataset={colours}",
        "data.holdout_fraction=0.25",
        "finetune.epochs=12",
        "finetune.batch_size=8",
        "finetune.blr=2e-2",
        "finetune.warmup_epochs=1",
        "finetune.mixup=0",
        "finetune.cutmix=0",
        "finetune.auto_augment=null",
        "finetune.reprob=0",
        "finetune.eval_every=4",
    )
    res = ft.finetune(cfg)
    assert res["top1"] > 0.9  # chance: 1/3
    assert res["eval_split"] == "holdout of train" and res["eval_size"] == res["scored"] == 15
    assert res["train_size"] == 45
    assert [h["epoch"] for h in res["history"]] == [4, 8, 12] and res["steps"] == 12 * 5
    assert res["best"]["top1"] == max(h["top1"] for h in res["history"])
    assert (
        res["lr"] == 2e-2 * 8 / 256
        and res["encoder"]["sha256"] == load_encoder(str(run_dir)).sha256
    )
    out = tmp_path / "ft"
    saved = json.loads((out / "results.json").read_text())
    assert saved["top1"] == res["top1"] and set(saved["per_class"]) == {"c0", "c1", "c2"}
    # the last classifier, loaded by timm alone, scores what the run reported
    model = timm.create_model(f"local-dir:{out / 'last'}", pretrained=True).eval()
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 16, 16)
    held = ft.fit_and_eval_splits(cfg).scored
    images = ImageDataset(held, Columns(), timm.data.create_transform(**data))
    x = torch.stack([images[i][0] for i in range(len(images))])
    y = torch.tensor([images[i][1] for i in range(len(images))])
    with torch.no_grad():
        top1 = (model(x).argmax(1) == y).float().mean().item()
    assert top1 == pytest.approx(res["top1"])
    # metrics: training lines and evaluation lines
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 61))
    assert lines[-1]["loss"] < lines[0]["loss"]


class Crash(Exception):
    pass


def test_exact_resume_after_crash(tmp_path, run_dir, colours, monkeypatch):
    """Full augmentation (RandAugment, erasing, mixup/cutmix, drop path): a run killed mid-epoch and
    relaunched ends with the weights and evaluation history of an uninterrupted one."""
    common = [
        f"encoder={run_dir}",
        f"data.dataset={colours}",
        "finetune.epochs=3",
        "finetune.batch_size=8",
        "finetune.warmup_epochs=1",
        "finetune.blr=1e-2",
        "finetune.keep_checkpoints=1",
    ]
    straight = ft.finetune(ft_cfg(tmp_path / "a", *common))

    def crash():
        raise Crash()

    # 54 training images, 6 steps per epoch: step 10 is after the epoch-1 checkpoint, mid-epoch 2
    monkeypatch.setattr(runner.MetricLog, "write", metric_write_then(10, crash))
    with pytest.raises(Crash):
        ft.finetune(ft_cfg(tmp_path / "b", *common))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "b/ft/checkpoints").iterdir()] == ["step_6"]
    resumed = ft.finetune(ft_cfg(tmp_path / "b", *common))
    assert resumed["history"] == straight["history"] and resumed["steps"] == 18
    a = load_file(str(tmp_path / "a/ft/last/model.safetensors"))
    b = load_file(str(tmp_path / "b/ft/last/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [
        json.loads(line) for line in (tmp_path / "b/ft/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in lines] == list(range(1, 19))
    # a different recipe in the same output_dir is refused
    with pytest.raises(ConfigError, match="finetune.blr"):
        ft.finetune(ft_cfg(tmp_path / "b", *common[:-2], "finetune.blr=1e-3"))

    # SIGTERM mid-epoch: the step ends, a checkpoint of it is written, the relaunch ends identically
    sigterm = metric_write_then(10, lambda: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(runner.MetricLog, "write", sigterm)
    with pytest.raises(Preempted, match="stopped by SIGTERM after step 10 of 18") as stopped:
        ft.finetune(ft_cfg(tmp_path / "c", *common))
    monkeypatch.undo()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert [p.name for p in (tmp_path / "c/ft/checkpoints").iterdir()] == ["step_10"]
    resumed = ft.finetune(ft_cfg(tmp_path / "c", *common))
    c = load_file(str(tmp_path / "c/ft/last/model.safetensors"))
    assert resumed["history"] == straight["history"] and all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.batch_size=7"], "must be even for mixup"),
        (["finetune.layer_decay=0"], "finetune.layer_decay"),
        (["encoder=pixels:16"], "needs an encoder with weights to train"),
        (["finetune.reprob=2"], "finetune.reprob"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, run_dir, overrides, message):
    args = [
        "finetune.py",
        "mode=finetune",
        f"encoder={run_dir}",
        f"output_dir={tmp_path / 'x'}",
        *overrides,
    ]
    proc = subprocess.run(["python", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")


@pytest.mark.slow
def test_two_cpu_processes_fine_tune_and_evaluate_every_image_once(tmp_path, run_dir, colours):
    out = tmp_path / "ddp"
    args = [
        "mode=finetune",
        f"encoder={run_dir}",
        f"output_dir={out}",
        f"data.dataset={colours}",
        "data.num_workers=0",
        "data.holdout_fraction=0.25",
        "finetune.epochs=2",
        "finetune.batch_size=4",
    ]
    env = {**env_without_accelerate(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = accelerate_launch(str(Path(ROOT) / "finetune.py"), *args, processes=2, multi=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("top1:") == 1  # printed once, by the main process
    res = json.loads((out / "results.json").read_text())
    derived = json.loads((out / "derived.json").read_text())
    assert (
        derived["num_processes"] == 2 and derived["effective_batch"] == 8 and res["steps"] == 2 * 5
    )
    # 15 held-out images, 8 per process with padding: gathered without duplicates
    assert res["eval_size"] == 15 and res["scored"] == 15


def test_cnn_encoders_get_their_own_classifier(tmp_path):
    clf = ft.build_classifier(ft_cfg(tmp_path, "encoder=timm:test_resnet"), num_classes=5)
    assert clf.init["fresh"] == ["fc.bias", "fc.weight"] and clf.init["dropped"] == []
    assert clf.model(torch.randn(2, *clf.data_config["input_size"])).shape == (2, 5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_fine_tuning_runs_on_cpu_and_fp16_is_refused(tmp_path, run_dir, colours, precision):
    args = [
        f"encoder={run_dir}",
        f"data.dataset={colours}",
        "finetune.max_steps=3",
        "finetune.batch_size=8",
    ]
    cfg = ft_cfg(tmp_path, *args, f"finetune.mixed_precision={precision}")
    if precision == "fp16":
        with pytest.raises(ConfigError, match="finetune.mixed_precision=fp16 needs a GPU"):
            ft.finetune(cfg)
        return
    res = ft.finetune(cfg)
    assert res["steps"] == 3 and len(res["history"]) == 1 and 0 <= res["top1"] <= 1


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_classic_autoencoders_fine_tune_their_encode_features(tmp_path, colours, name):
    run = tmp_path / name
    arch = [
        "data.image_size=16",
        "model.widths=[8,16]",
        "model.latent_dim=12",
        "data.num_workers=0",
    ]
    pretrain.train(
        load_config(
            None,
            [
                f"model.name={name}",
                *arch,
                "train.max_steps=2",
                "train.batch_size=8",
                f"data.dataset={colours}",
                f"output_dir={run}",
            ],
        )
    )
    reset_accelerate()
    before = load_encoder(str(run)).module.state_dict()
    cfg = ft_cfg(
        tmp_path,
        f"encoder={run}",
        f"data.dataset={colours}",
        "data.holdout_fraction=0.25",
        "finetune.epochs=6",
        "finetune.batch_size=8",
        "finetune.blr=5e-2",
        "finetune.warmup_epochs=1",
        "finetune.mixup=0",
        "finetune.cutmix=0",
        "finetune.auto_augment=null",
        "finetune.reprob=0",
        "finetune.eval_every=3",
    )
    res = ft.finetune(cfg)
    assert res["encoder"]["kind"] == "autoencoder" and res["top1"] > 0.9  # chance: 1/3
    assert res["init"]["fresh"] == ["head.bias", "head.weight"]
    frozen = res["init"]["frozen"]  # what encode() does not reach: the decoder, never trained here
    assert (
        frozen
        and all(not k.startswith("encoder.") for k in frozen)
        and res["init"]["dropped"] == []
    )
    after = load_file(tmp_path / "ft" / "last" / "model.safetensors")
    meta = json.loads((tmp_path / "ft" / "last" / "classifier.json").read_text())
    assert meta["num_classes"] == 3 and meta["encoder_arch"]["run_model"]["name"] == name
    assert all(torch.equal(after[f"autoencoder.{k}"], before[k]) for k in frozen)
    trained = [
        k
        for k in before
        if k not in frozen and not torch.equal(after[f"autoencoder.{k}"], before[k])
    ]
    assert trained and all(k.startswith("encoder.") or k in after for k in trained)
    clf = ft.build_classifier(cfg, 3)
    clf.model.load_state_dict(after)
    assert clf.model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_a_diverging_fine_tune_names_the_finetune_keys(tmp_path, run_dir, colours, monkeypatch):
    real = ft._criterion

    def poisoned(f, mixup):
        criterion = real(f, mixup)
        return lambda logits, targets: criterion(logits, targets) * float("nan")

    monkeypatch.setattr(ft, "_criterion", poisoned)
    cfg = ft_cfg(
        tmp_path,
        f"encoder={run_dir}",
        f"data.dataset={colours}",
        "finetune.batch_size=8",
        "finetune.max_steps=2",
    )
    with pytest.raises(runner.NonFiniteLossError) as stopped:
        ft.finetune(cfg)
    message = str(stopped.value)
    assert message.startswith("loss became nan by step 1; stopped without saving")
    assert "Lower finetune.blr or set finetune.clip_grad, then relaunch" in message
    assert "train." not in message


def test_the_non_finite_message_names_the_keys_of_the_section_it_trains_by(tmp_path):
    pretraining = load_config(None, []).train
    for section, prefix in ((pretraining, "train"), (FinetuneConfig(), "finetune")):
        message = str(runner.non_finite_error("loss became inf", 3, tmp_path, section))
        assert message == (
            "loss became inf by step 3; stopped without saving. Last good checkpoint: none. "
            f"Lower {prefix}.blr or set {prefix}.clip_grad, then relaunch to resume."
        )


def test_a_small_dataset_is_not_evaluated_after_every_step(tmp_path, run_dir, colours):
    """An epoch of one step: 50 steps, default cadence. One evaluation (at the end), one
    checkpoint, not fifty."""
    cfg = ft_cfg(
        tmp_path,
        f"encoder={run_dir}",
        f"data.dataset={colours}",
        "data.holdout_fraction=0.25",
        "finetune.eval_min_steps=100",  # the default, which ft_cfg lowers
        "finetune.epochs=50",
        "finetune.batch_size=45",  # the whole fit split: one step per epoch
        "finetune.mixup=0",
        "finetune.cutmix=0",
        "finetune.auto_augment=null",
    )
    res = ft.finetune(cfg)
    assert res["steps"] == 50 and [h["step"] for h in res["history"]] == [50]
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "ft")] == ["step_50"]

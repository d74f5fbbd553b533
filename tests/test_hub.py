"""Pretrained weights by name (``hf-hub:ORG/NAME``, ``timm:NAME.TAG``) from a Hugging Face cache,
offline; and the official ImageNet recipes of configs/eval/, run small.

Each test fills a cache of its own in huggingface_hub's layout (content-addressed blobs, the
snapshot's files as links to them, refs/main naming the commit) and points huggingface_hub at it,
offline: what a machine without network sees after ``hf download`` filled its cache elsewhere."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers import (
    ROOT,
    TINY,
    TINY_ARCH,
    colour_folder,
    free_port,
    metric_write_then,
    reset_accelerate,
)
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from mae import pretrain, runner
from mae.config import ConfigError, derive_schedule, load_config
from mae.config.evaluation import load_eval_config
from mae.eval import finetune as ft
from mae.eval import probe as probe_mod
from mae.eval.encoders import load_encoder
from mae.interop import load_pretrain_config
from mae.models import build_model

pytest.importorskip(
    "transformers", reason="transformers (dev extra) is needed for Hugging Face ViTMAE repositories"
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MAE_REPO = "tiny-org/vit-mae-tiny"  # a ViTMAE repository, as facebook/vit-mae-base is one
# timm's smallest ViT with pretrained weights (hub repo timm/test_vit.r160_in1k)
TIMM_TAG = "test_vit.r160_in1k"
# a tiny pretraining run whose architecture comes from init=
RUN = [k for k in TINY if k not in TINY_ARCH]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in place of the user's, offline."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_repo(cache: Path, repo: str, files: Path) -> Path:
    """The files of folder ``files`` as huggingface_hub keeps a downloaded snapshot of ``repo``; its
    snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    for d in (root / "blobs", root / "refs", snapshot):
        d.mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for f in sorted(files.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs" / blob).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)
    return snapshot


@pytest.fixture
def mae_repo(tmp_path, hub_cache):
    """A tiny MAE saved as a Hugging Face ViTMAE folder and its files cached as hf-hub:MAE_REPO."""
    from mae.export import save_hf

    cfg = load_config(None, TINY)
    torch.manual_seed(7)
    model = build_model(cfg).eval()
    save_hf(model, cfg, tmp_path / "hf_folder")
    cache_repo(hub_cache, MAE_REPO, tmp_path / "hf_folder")
    return tmp_path / "hf_folder", model


@pytest.fixture
def timm_weights(tmp_path, hub_cache):
    """A seeded test_vit (with its 1000-class head, as published) cached as timm/TIMM_TAG;
    its weights file."""
    torch.manual_seed(3)
    model = timm.create_model("test_vit")
    files = tmp_path / "timm_files"
    files.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, files / "model.safetensors"
    )
    cache_repo(hub_cache, f"timm/{TIMM_TAG}", files)
    return files / "model.safetensors"


def first_step(tmp_path, name, *overrides):
    """Pretrain one step; (the resolved config, the step's loss, the weights after it)."""
    out = tmp_path / name
    cfg = load_pretrain_config(None, [*RUN, f"output_dir={out}", "train.max_steps=1", *overrides])
    pretrain.train(cfg)
    reset_accelerate()
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    return cfg, loss, load_file(str(out / "checkpoints/step_1/model.safetensors"))


def assert_same_run(a, b):
    (cfg_a, loss_a, weights_a), (cfg_b, loss_b, weights_b) = a, b
    assert cfg_a.model == cfg_b.model and loss_a == loss_b
    assert weights_a.keys() == weights_b.keys() and all(
        torch.equal(weights_a[k], weights_b[k]) for k in weights_a
    )


def test_init_from_a_hub_name_is_init_from_its_folder(tmp_path, mae_repo):
    folder, model = mae_repo
    by_name = first_step(tmp_path, "by_name", f"init=hf-hub:{MAE_REPO}")
    assert_same_run(by_name, first_step(tmp_path, "by_folder", f"init={folder}"))
    # the repository's config.json
    assert (by_name[0].model.embed_dim, by_name[0].model.depth) == (
        32,
        2,
    )
    # a revision pins the commit
    cfg = load_pretrain_config(None, [*RUN, f"init=hf-hub:{MAE_REPO}@{COMMIT}"])
    assert cfg.model == by_name[0].model


def test_a_hub_name_is_an_encoder_source(mae_repo):
    folder, model = mae_repo
    by_name, by_folder = load_encoder(f"hf-hub:{MAE_REPO}"), load_encoder(str(folder))
    x = torch.randn(3, 3, 16, 16)
    assert by_name.sha256 == by_folder.sha256 and torch.equal(
        by_name.features(x, "cls"), by_folder.features(x, "cls")
    )
    assert torch.allclose(by_name.features(x, "cls"), model.encode(x), atol=1e-6)
    assert load_encoder(f"random:hf-hub:{MAE_REPO}").sha256 != by_name.sha256


def test_a_repository_without_safetensors_is_read_from_its_pytorch_model_bin(
    tmp_path, hub_cache, mae_repo
):
    folder, _ = mae_repo
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (pickled / name).write_bytes((folder / name).read_bytes())
    torch.save(load_file(str(folder / "model.safetensors")), pickled / "pytorch_model.bin")
    cache_repo(hub_cache, "tiny-org/vit-mae-pickled", pickled)
    encoder = load_encoder("hf-hub:tiny-org/vit-mae-pickled")
    assert encoder.sha256 == load_encoder(str(folder)).sha256


def test_a_timm_tag_loads_its_cached_weights_and_a_bare_name_stays_random(tmp_path, timm_weights):
    encoder = load_encoder(f"timm:{TIMM_TAG}")
    # the same weights as a timm export folder (config.json + model.safetensors), loaded by timm
    reference = timm.create_model("test_vit")
    reference.load_state_dict(load_file(str(timm_weights)))
    timm.models.save_for_hf(reference, str(tmp_path / "export"), safe_serialization=True)
    exported = load_encoder(str(tmp_path / "export"))
    x = torch.randn(2, 3, 160, 160)
    assert torch.equal(encoder.features(x, "cls"), exported.features(x, "cls"))
    assert torch.equal(encoder.features(x, "avg"), exported.features(x, "avg"))
    assert encoder.data_config["input_size"] == (3, 160, 160) and encoder.data_config["mean"] == (
        0.5,
        0.5,
        0.5,
    )
    random_init = load_encoder("timm:test_vit")
    assert random_init.sha256 != encoder.sha256 and not torch.allclose(
        random_init.features(x, "cls"), encoder.features(x, "cls")
    )


def test_init_from_a_timm_tag_is_init_from_its_weights_file_with_timms_head_count(
    tmp_path, timm_weights
):
    # test_vit: width 64 in 2 heads; a weights file alone would get 64 channels per head (1 head)
    arch = [
        "data.image_size=64",
        "model.decoder_embed_dim=16",
        "model.decoder_depth=1",
        "model.decoder_num_heads=2",
    ]
    by_name = first_step(tmp_path, "by_name", f"init=timm:{TIMM_TAG}", *arch)
    assert (by_name[0].model.embed_dim, by_name[0].model.depth, by_name[0].model.num_heads) == (
        64,
        6,
        2,
    )
    by_file = first_step(tmp_path, "by_file", f"init={timm_weights}", "model.num_heads=2", *arch)
    assert_same_run(by_name, by_file)
    assert load_pretrain_config(None, [f"init={timm_weights}", *arch]).model.num_heads == 1


def one_line_error(call, *match):
    with pytest.raises(ConfigError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(m in message for m in match), message
    return message


def test_an_empty_cache_is_one_line_naming_it_and_how_to_fill_it(hub_cache, monkeypatch):
    fill = ("not in the Hugging Face cache", str(hub_cache), "HF_HUB_OFFLINE=1", "HF_HUB_CACHE")
    one_line_error(
        lambda: load_pretrain_config(None, ["init=hf-hub:facebook/vit-mae-base"]),
        *fill,
        "`hf download facebook/vit-mae-base`",
    )
    one_line_error(
        lambda: load_encoder(f"timm:{TIMM_TAG}"), *fill, f"`hf download timm/{TIMM_TAG}`"
    )
    one_line_error(lambda: load_encoder("hf-hub:facebook/vit-mae-base@v1"), "--revision v1")
    # online, but the hub cannot be reached (a closed port): the same line, without the offline note
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    message = one_line_error(
        lambda: load_encoder("hf-hub:facebook/vit-mae-base"), str(hub_cache), "cannot be reached"
    )
    assert "HF_HUB_OFFLINE" not in message


@pytest.mark.parametrize(
    "source, message",
    [
        ("timm:not_a_model.foo", "timm has no model 'not_a_model'"),
        (
            "timm:test_vit.nope",
            "timm has no pretrained weights 'test_vit.nope'; test_vit's tags: r160_in1k",
        ),
        ("hf-hub:facebook", "give a Hugging Face repository as hf-hub:ORG/NAME"),
        ("hf-hub:a/b/c", "give a Hugging Face repository as hf-hub:ORG/NAME"),
        ("hf-hub:facebook/vit-mae-base@", "give a Hugging Face repository as hf-hub:ORG/NAME"),
        (f"hf-hub:timm/{TIMM_TAG}", "is not a Hugging Face ViTMAE repository"),  # a timm repository
    ],
)
def test_a_bad_name_is_one_clear_line(timm_weights, source, message):
    one_line_error(lambda: load_encoder(source), message)
    one_line_error(lambda: load_pretrain_config(None, [f"init={source}"]), message)


def test_init_needs_a_timm_tag():
    one_line_error(
        lambda: load_pretrain_config(None, ["init=timm:test_vit"]),
        "names no weights",
        "timm:NAME.TAG",
    )


@pytest.mark.slow
def test_an_uncached_name_stops_the_entry_points_before_they_write(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache")}
    commands = [
        ["pretrain.py", "init=hf-hub:facebook/vit-mae-base", f"output_dir={tmp_path / 'run'}"],
        [
            "finetune.py",
            "mode=finetune",
            f"encoder=timm:{TIMM_TAG}",
            f"output_dir={tmp_path / 'ft'}",
        ],
    ]
    for args in commands:
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
        assert proc.stderr.strip().count("\n") == 0 and str(tmp_path / "empty_cache") in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()


# ------------------------------------------------------------------------------------------ recipes

RECIPES = Path(ROOT) / "configs" / "eval"


class Stop(Exception):
    pass


@pytest.fixture
def colours(tmp_path):
    return colour_folder(tmp_path / "colours")


@pytest.mark.parametrize("size", ["base", "large"])
def test_the_fine_tuning_recipes_run_small_and_resume(tmp_path, mae_repo, colours, size):
    recipe = RECIPES / f"finetune_imagenet_vit_{size}.yaml"
    # the documented command line, scaled down: the tiny hub encoder, the colour folder, 3 short
    # epochs on a CPU
    small = [
        f"encoder=hf-hub:{MAE_REPO}",
        f"data.dataset={colours}",
        "data.num_workers=0",
        "finetune.epochs=3",
        "finetune.warmup_epochs=1",
        "finetune.batch_size=8",
        "finetune.accum_steps=1",
        "finetune.mixed_precision=no",
        "finetune.keep_checkpoints=1",
        "finetune.eval_min_steps=0",  # evaluate after every 6-step epoch, as the recipe would
    ]
    as_written = load_eval_config(recipe, [f"encoder=hf-hub:{MAE_REPO}"])
    # ImageNet-1k, 8 processes
    on_one_node = derive_schedule(as_written.finetune, 1_281_167, 8)
    assert on_one_node.effective_batch == 1024 and on_one_node.lr == as_written.finetune.blr * 4

    def cfg(name):
        return load_eval_config(recipe, [*small, f"output_dir={tmp_path / name}"])

    straight = ft.finetune(cfg("a"))

    def stop():
        raise Stop()

    # 54 training images, 6 steps per epoch: step 10 is after the epoch-1 checkpoint, mid-epoch 2
    # (the hub cache's patches stay)
    with (
        pytest.MonkeyPatch.context() as patch,
        pytest.raises(Stop),
    ):
        patch.setattr(runner.MetricLog, "write", metric_write_then(10, stop))
        ft.finetune(cfg("b"))
    assert [p.name for p in (tmp_path / "b/checkpoints").iterdir()] == ["step_6"]
    resumed = ft.finetune(cfg("b"))
    assert resumed["history"] == straight["history"] and resumed["steps"] == straight["steps"] == 18
    a, b = (load_file(str(tmp_path / name / "last/model.safetensors")) for name in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("size", ["base", "large"])
def test_the_linear_probe_recipes_run_small_and_rerun_to_the_same_result(
    tmp_path, mae_repo, colours, size
):
    recipe = RECIPES / f"linear_imagenet_vit_{size}.yaml"
    small = [
        f"encoder=hf-hub:{MAE_REPO}",
        f"data.dataset={colours}",
        "data.num_workers=0",
        "probe.epochs=3",
        "probe.warmup_epochs=1",
        "probe.batch_size=16",
        "probe.extract_batch_size=16",
        "probe.mixed_precision=no",
        f"probe.cache_dir={tmp_path / 'features'}",
    ]

    def cfg(name):
        return load_eval_config(recipe, [*small, f"output_dir={tmp_path / name}"])

    straight = probe_mod.probe(cfg("a"))
    assert straight["features"] == "cls" and straight["config"]["probe"]["cached"] is False
    real_fit = probe_mod.fit_linear_head

    def fit_then_stop(batches, *args):
        def stopping(epoch):
            if epoch == 1:  # mid-fit, after the first epoch
                raise Stop()
            yield from batches(epoch)

        return real_fit(stopping, *args)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Stop):
        patch.setattr(probe_mod, "fit_linear_head", fit_then_stop)
        probe_mod.probe(cfg("b"))
    # a probe keeps no checkpoint: run again, it fits from the start, its evaluation features
    # from the cache
    again = probe_mod.probe(cfg("b"))
    assert again["features_from_cache"]["eval"] is True
    assert (again["top1"], again["per_class"]) == (straight["top1"], straight["per_class"])

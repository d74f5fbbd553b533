"""Real-world inputs: non-square images (data.image_size=[H, W]) and arrays of any channel count
(a column of arrays, a folder of .npy files) with data.mean=auto."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import timm
import torch
import yaml
from helpers import TINY_ARCH, colour_folder, reset_accelerate
from PIL import Image

from mae import pretrain
from mae.config import ConfigError, load_config
from mae.config.evaluation import load_eval_config
from mae.data.arrays import ArrayError
from mae.eval import finetune as ft
from mae.eval.encoders import load_encoder
from mae.eval.probe import probe
from mae.export import main as export_main

COMMON = [
    *TINY_ARCH,
    "data.num_workers=0",
    "train.batch_size=8",
    "train.recon_images=2",
    "train.log_every=1",
]


def rect_folder(root, per_class=12, h=60, w=40):
    """Three colour classes of h x w (portrait) images."""
    return colour_folder(root, per_class, (h, w))


def band_arrays(channels, dtype, per_class=12, size=16, seed=0):
    """Three classes of (C, H, W) arrays told apart by which third of the bands is bright."""
    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 1.0
    out = []
    for c in range(3):
        for _ in range(per_class):
            a = rng.uniform(0.05, 0.2, (channels, size, size)) * top
            a[c * channels // 3 : (c + 1) * channels // 3] += 0.5 * top
            out.append((a.astype(dtype), c))
    return out


def npy_folder(root, arrays):
    for i, (a, c) in enumerate(arrays):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        np.save(root / f"class_{c}" / f"{i}.npy", a)
    return root


@pytest.fixture(scope="module")
def rect_run(tmp_path_factory):
    data = rect_folder(tmp_path_factory.mktemp("rect") / "d")
    out = tmp_path_factory.mktemp("rect_run") / "r"
    overrides = [*COMMON, "data.image_size=[48,32]", "model.patch_size=8", f"data.dataset={data}"]
    res = pretrain.train(load_config(None, [*overrides, f"output_dir={out}", "train.max_steps=4"]))
    reset_accelerate()
    return res, data


def test_a_48x32_run_pretrains_and_exports_an_encoder_timm_loads_with_the_same_features(rect_run):
    res, _ = rect_run
    assert res.model.grid == (6, 4) and res.model.encoder.pos_embed.shape == (1, 25, 32)
    config = json.loads((res.export_dir / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 48, 32]
    model = timm.create_model(f"local-dir:{res.export_dir}", pretrained=True).eval()
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), res.model.eval().encode(x), atol=1e-5)
    # the sin-cos grid is the rectangular one: its row half changes along H, its column half along W
    pos = res.model.encoder.pos_embed[0, 1:].view(6, 4, 32)
    assert torch.equal(pos[0, :, 16:], pos[0, :1, 16:].expand(4, -1)) and not torch.equal(
        pos[0, 0], pos[0, 1]
    )
    assert len(load_encoder(str(res.run_dir)).data_config["input_size"]) == 3


def test_a_48x32_encoder_probes(rect_run, tmp_path):
    res, data = rect_run
    cfg = load_eval_config(
        None,
        [
            f"output_dir={tmp_path / 'eval'}",
            "mode=knn",
            f"encoder={res.run_dir}",
            f"data.dataset={data}",
            "data.holdout_fraction=0.25",
            "data.num_workers=0",
            f"probe.cache_dir={tmp_path / 'cache'}",
        ],
    )
    result = probe(cfg)
    assert tuple(result["eval_transform"]["input_size"]) == (3, 48, 32)
    assert result["top1"] > 0.5  # three colour classes; chance 1/3


def test_a_48x32_encoder_fine_tunes_at_64x48(rect_run, tmp_path):
    res, data = rect_run
    cfg = load_eval_config(
        None,
        [
            f"output_dir={tmp_path / 'ft'}",
            "mode=finetune",
            f"encoder={res.run_dir}",
            f"data.dataset={data}",
            "data.holdout_fraction=0.25",
            "data.num_workers=0",
            "finetune.image_size=[64,48]",
            "finetune.epochs=1",
            "finetune.batch_size=8",
            "finetune.auto_augment=null",
            "finetune.mixup=0",
            "finetune.cutmix=0",
        ],
    )
    clf = ft.build_classifier(cfg, num_classes=3)
    # 6x4 -> 8x6 patches
    assert clf.init["pos_embed_resampled"] == {
        "from": [1, 25, 32],
        "to": [1, 49, 32],
    }
    assert clf.data_config["input_size"] == (3, 64, 48)
    reset_accelerate()
    out = ft.finetune(cfg)
    assert out["steps"] == 27 // 8
    model = timm.create_model(f"local-dir:{tmp_path / 'ft' / 'last'}", pretrained=True)
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 3)


@pytest.mark.parametrize("name", ["ae", "vae", "stacked_ae"])
def test_classic_autoencoders_train_on_48x32(tmp_path, name):
    data = rect_folder(tmp_path / "d", per_class=4)
    cfg = load_config(
        None,
        [
            *COMMON,
            f"model.name={name}",
            "data.image_size=[48,32]",
            f"data.dataset={data}",
            f"output_dir={tmp_path / 'r'}",
            "train.max_steps=2",
            "model.stage_steps=1",
        ],
    )
    res = pretrain.train(cfg)
    x = torch.randn(2, 3, 48, 32)
    assert res.model.eval()(x).recon.shape == x.shape and res.model.encode(x).shape == (2, 128)


def test_the_hugging_face_export_of_a_non_square_run_is_refused_in_one_line(
    rect_run, tmp_path, capsys
):
    res, _ = rect_run
    assert export_main([str(res.run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "square position grids only" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("size", ["[48,30]", "[30,48]"])
def test_a_height_or_width_not_divisible_by_the_patch_is_refused(size):
    with pytest.raises(ConfigError, match=r"not divisible by model.patch_size=8"):
        load_config(None, [f"data.image_size={size}", "model.patch_size=8"])


def expected_stats(arrays, scale):
    stack = np.stack([a for a, _ in arrays]).astype(np.float64) / scale
    return stack.mean(axis=(0, 2, 3)), stack.std(axis=(0, 2, 3))


def pretrain_and_probe(tmp_path, dataset, channels, extra=()):
    out = tmp_path / "r"
    cfg = load_config(
        None,
        [
            *COMMON,
            "data.image_size=16",
            f"data.channels={channels}",
            "data.mean=auto",
            f"data.dataset={dataset}",
            f"output_dir={out}",
            "train.max_steps=3",
            *extra,
        ],
    )
    res = pretrain.train(cfg)
    reset_accelerate()
    probe_cfg = load_eval_config(
        None,
        [
            f"output_dir={tmp_path / 'eval'}",
            "mode=linear",
            f"encoder={out}",
            f"data.dataset={dataset}",
            "data.holdout_fraction=0.25",
            "data.num_workers=0",
            f"probe.cache_dir={tmp_path / 'cache'}",
            "probe.epochs=30",
            "probe.warmup_epochs=3",
            "probe.batch_size=9",
            "probe.blr=20",
        ],
    )
    return res, probe(probe_cfg)


def test_six_channel_uint16_arrays_pretrain_with_measured_statistics_and_probe(tmp_path):
    arrays = band_arrays(6, np.uint16)
    res, result = pretrain_and_probe(tmp_path, npy_folder(tmp_path / "npy", arrays), 6)
    mean, std = expected_stats(arrays, 65535.0)
    stats = json.loads((res.run_dir / "derived.json").read_text())["data_stats"]
    assert stats["images"] == 36 and np.allclose(stats["mean"], mean, atol=2e-6)
    assert np.allclose(stats["std"], std, atol=2e-6)
    exported = json.loads((res.export_dir / "config.json").read_text())["pretrained_cfg"]
    assert exported["input_size"] == [6, 16, 16] and np.allclose(exported["mean"], mean, atol=2e-6)
    assert res.model.encoder.patch_embed.proj.weight.shape[1] == 6
    assert Image.open(res.run_dir / "recon_3.png").mode == "RGB"  # three of the six bands
    assert result["top1"] > 0.6  # chance 1/3
    reset_accelerate()
    tune = [
        f"output_dir={tmp_path / 'ft'}",
        "mode=finetune",
        f"encoder={res.run_dir}",
        "finetune.epochs=1",
        f"data.dataset={tmp_path / 'npy'}",
        "data.holdout_fraction=0.25",
        "data.num_workers=0",
        "finetune.batch_size=8",
    ]
    with pytest.raises(ConfigError, match="holds arrays; set finetune.auto_augment=null"):
        ft.finetune(load_eval_config(None, tune))
    reset_accelerate()
    assert ft.finetune(load_eval_config(None, [*tune, "finetune.auto_augment=null"]))["steps"] == 3


def test_thirteen_channel_float32_column_pretrains_and_probes(tmp_path):
    arrays = band_arrays(13, np.float32, seed=1)
    features = datasets.Features(
        {
            "image": datasets.Array3D((13, 16, 16), "float32"),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"image": [a for a, _ in arrays], "label": [c for _, c in arrays]}, features
    )
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    res, result = pretrain_and_probe(tmp_path, tmp_path / "pq", 13, ["data.grid_channels=[3,7,11]"])
    mean, _ = expected_stats(arrays, 1.0)
    assert np.allclose(
        json.loads((res.run_dir / "derived.json").read_text())["data_stats"]["mean"],
        mean,
        atol=2e-6,
    )
    assert result["top1"] > 0.6


def test_resuming_an_auto_statistics_run_measures_the_same(tmp_path):
    arrays = band_arrays(6, np.uint16, per_class=4)
    data = npy_folder(tmp_path / "npy", arrays)
    args = [
        *COMMON,
        "data.image_size=16",
        "data.channels=6",
        "data.mean=auto",
        f"data.dataset={data}",
        f"output_dir={tmp_path / 'r'}",
        "train.checkpoint_every=1",
        "train.max_steps=2",
    ]

    class Stop(Exception):
        pass

    def stop_after_first_checkpoint(self, step, *a, **k):
        raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain.Pretraining, "after_step", stop_after_first_checkpoint)
        with pytest.raises(Stop):
            pretrain.train(load_config(None, args))
    reset_accelerate()
    recorded = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["data"]
    # the measured values, not "auto"
    assert len(recorded["mean"]) == 6 and len(recorded["std"]) == 6
    # data.mean=auto again: measured equal, so it resumes
    res = pretrain.train(load_config(None, args))
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert res.steps == 2 and [x["step"] for x in lines] == [1, 2]
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["data"] == recorded


@pytest.mark.parametrize("bad", ["channels", "nan", "inf"])
def test_bad_arrays_are_refused_in_one_line_before_anything_is_written(tmp_path, bad):
    arrays = band_arrays(6, np.float32, per_class=4)
    a, c = arrays[5]
    arrays[5] = (
        {"channels": a[:5], "nan": np.where(a > 0.6, np.nan, a), "inf": a * np.inf}[bad],
        c,
    )
    data = npy_folder(tmp_path / "npy", arrays)
    out = tmp_path / "r"
    cfg = load_config(
        None,
        [
            *COMMON,
            "data.image_size=16",
            "data.channels=6",
            f"data.dataset={data}",
            f"output_dir={out}",
            "train.max_steps=2",
        ],
    )
    message = {
        "channels": r"shape \(5, 16, 16\): no axis of data.channels=6",
        "nan": "NaN or infinite",
    }
    with pytest.raises(ArrayError, match=message.get(bad, "NaN or infinite")) as e:
        pretrain.train(cfg)
    assert (
        "\n" not in str(e.value)
        and "image 5 of the dataset (" in str(e.value)
        and "5.npy)" in str(e.value)
    )
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


def test_arrays_with_a_channel_axis_last_are_read_as_channels(tmp_path):
    from mae.data.arrays import to_tensor

    a = np.arange(2 * 3 * 6, dtype=np.uint8).reshape(2, 3, 6)  # (H, W, C) with C=6
    x = to_tensor(a, 6, "test")
    assert x.shape == (6, 2, 3) and torch.equal(
        x * 255, torch.from_numpy(np.moveaxis(a, -1, 0)).float()
    )
    with pytest.raises(ArrayError, match="no axis of data.channels=4"):
        to_tensor(a, 4, "array 0")


def test_on_device_data_crops_to_48x32(tmp_path):
    data = rect_folder(tmp_path / "d", per_class=4, h=40, w=24)  # stored at most the training size
    cfg = load_config(
        None,
        [
            *COMMON,
            "data.image_size=[48,32]",
            "model.patch_size=8",
            f"data.dataset={data}",
            "data.on_device=true",
            f"output_dir={tmp_path / 'r'}",
            "train.max_steps=2",
        ],
    )
    res = pretrain.train(cfg)
    assert res.steps == 2 and res.model.grid == (6, 4)
    # wider than 32: a downscale, refused
    big = rect_folder(tmp_path / "big", per_class=4, h=40, w=40)
    with pytest.raises(Exception, match=r"at most data.image_size=\(48, 32\)"):
        pretrain.train(
            load_config(
                None,
                [
                    *COMMON,
                    "data.image_size=[48,32]",
                    f"data.dataset={big}",
                    "data.on_device=true",
                    f"output_dir={tmp_path / 'r2'}",
                ],
            )
        )


def test_images_take_one_three_or_four_channels_and_arrays_any(tmp_path):
    from mae.data.images import ImageColumns
    from mae.data.loading import DataError, load_split

    images = rect_folder(tmp_path / "d", per_class=1)
    cfg = load_config(None, [f"data.dataset={images}", "data.channels=2"]).data
    with pytest.raises(DataError, match="data.channels=2 is not supported for images"):
        ImageColumns(load_split(cfg), cfg.columns)
    arrays = npy_folder(tmp_path / "npy", band_arrays(2, np.uint8, per_class=1))
    cfg = load_config(None, [f"data.dataset={arrays}", "data.channels=2"]).data
    assert ImageColumns(load_split(cfg), cfg.columns).arrays

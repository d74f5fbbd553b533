"""data.decoder=dali: NVIDIA DALI's CPU backend decodes, crops and normalises with
the Pillow path's draws."""

import io
import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import (
    ROOT,
    TINY,
    accelerate_launch,
    env_without_accelerate,
    metric_write_then,
    reset_accelerate,
)
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2

from mae import pretrain, runner
from mae.config import IMAGENET_STD, ConfigError, derive, load_config
from mae.data import dali
from mae.data.images import ImageDataset, augment_transform
from mae.data.loading import DataError, load_split
from mae.data.sources import build_source
from mae.runner import prepare_with_data

pytest.importorskip(
    "nvidia.dali", reason='NVIDIA DALI is an optional extra: pip install -e ".[dali]"'
)

SIZE = 32


class Stop(Exception):
    pass


def jpeg(a: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def jpeg_shards(root, texture=False, count=40, seed=0):
    """``count`` JPEGs of random sizes 40-90 px in one parquet shard, ``label`` each image's own id.
    Smooth ones whose colour encodes the position (red: x, green: y), so that a box off by a pixel
    moves every value a little and a wrong box or flip by tens of levels; or a texture of random
    4-px blobs (``texture``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        h, w = rng.integers(40, 91, 2)
        if texture:
            blobs = Image.fromarray(
                rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
            )
            a = np.asarray(blobs.resize((w, h), Image.Resampling.BILINEAR))
        else:
            x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
            a = np.stack([x, y, np.full_like(x, 6 * i)], -1).astype(np.uint8)
        rows.append({"image": {"bytes": jpeg(a, quality=90 if texture else 95)}, "label": i})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    root.mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(
        str(root / "train-00000-of-00001.parquet")
    )
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return jpeg_shards(tmp_path_factory.mktemp("dali") / "shards")


def data_config(root, *extra):
    return load_config(
        None, [f"data.dataset={root}", f"data.image_size={SIZE}", "data.decoder=dali", *extra]
    ).data


def through_dali(cfg, items):
    """``EncodedImages`` items as DALI's (B, C, H, W) normalised crops, on the CPU."""
    augment = dali.DaliAugment(cfg, len(items), 1, torch.device("cpu"))
    (batch,) = augment.batches([dali.collate(items)])
    return batch.images


# DALI's float output against Pillow's rounded bytes: 0.5 level from the rounding alone; a box off
# by a pixel or a wrong flip moves the gradient by several to hundreds of levels. Texture: the two
# cubic resamplers differ a little.
@pytest.mark.parametrize(
    "texture, mean, largest", [(False, 0.3, 1.5), (True, 0.4, 8)], ids=["gradient", "texture"]
)
def test_dali_draws_the_pillow_paths_crops_flips_and_noise_and_its_pixels_are_within_a_level(
    shards, tmp_path, monkeypatch, texture, mean, largest
):
    cfg = data_config(jpeg_shards(tmp_path / "texture", texture=True) if texture else shards)
    ds = load_split(cfg)
    boxes = []  # every box torchvision's RandomResizedCrop draws, in order
    make_params = v2.RandomResizedCrop.make_params

    def recorded(self, flat_inputs):
        params = make_params(self, flat_inputs)
        boxes.append([params["left"], params["top"], params["width"], params["height"]])
        return params

    monkeypatch.setattr(v2.RandomResizedCrop, "make_params", recorded)
    pillow = ImageDataset(ds, cfg.columns, augment_transform(cfg), seed=3, noise_length=5)
    keys = [(epoch, i) for epoch in range(5) for i in range(len(ds))]
    expected = [pillow[k] for k in keys]
    pillow_boxes, boxes[:] = list(boxes), []
    encoded = dali.EncodedImages(ds, cfg, seed=3, noise_length=5)
    items = [encoded[k] for k in keys]
    assert boxes == pillow_boxes  # the same crops, drawn by torchvision from the header's size
    draws = np.stack([draws for _, draws, _, _ in items])
    # flips half the time
    assert draws[:, :4].tolist() == pillow_boxes and 0.3 < draws[:, 4].mean() < 0.7
    for (_, _, label, noise), (_, pillow_label, pillow_noise) in zip(items, expected, strict=True):
        assert label == pillow_label and torch.equal(noise, pillow_noise)  # the same masks

    images = through_dali(cfg, items)
    assert images.shape == (len(keys), 3, SIZE, SIZE) and images.dtype == torch.float32
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    diff = (images - torch.stack([x for x, *_ in expected])).abs() * std * 255  # in 0-255 levels
    print(
        f"DALI against Pillow, {len(keys)} crops to {SIZE} px: "
        f"mean {diff.mean():.2f}, max {diff.max():.2f} levels"
    )
    assert diff.mean() < mean and diff.max() < largest, (diff.mean(), diff.max())


def test_a_constant_colour_comes_out_as_its_normalised_value(tmp_path):
    colour = np.array([200, 90, 30], dtype=np.uint8)
    (tmp_path / "c0").mkdir()
    for i, (h, w) in enumerate([(50, 70), (81, 43), (64, 64)]):
        Image.fromarray(np.broadcast_to(colour, (h, w, 3)).copy()).save(
            tmp_path / "c0" / f"{i}.png"
        )
    for extra in ([], ["data.mean=[0.1,0.2,0.3]", "data.std=[0.5,0.25,0.125]"]):
        cfg = data_config(tmp_path, *extra)
        encoded = dali.EncodedImages(load_split(cfg), cfg, seed=0, noise_length=None)
        images = through_dali(cfg, [encoded[(0, i)] for i in range(3)])
        expected = (torch.tensor(colour / 255) - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
        assert torch.allclose(
            images, expected.float().view(1, 3, 1, 1).expand_as(images), atol=1e-4
        )


def sources(root, *extra):
    """The training source of ``root`` for one process, prepared as pretraining prepares it."""
    cfg = load_config(None, [*TINY, f"data.dataset={root}", f"data.image_size={SIZE}", *extra])
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    bad_log = root.parent / "bad.jsonl"
    source = build_source(cfg, 0, 1, bad_log, noise_length=(SIZE // 16) ** 2).source
    prepare_with_data(accelerator, source, derive(cfg, source.size, 1))
    return source


def test_dali_batches_come_in_the_loaded_order_and_resume_at_the_step(shards):
    # 40 images: 5 steps of 2 micro-batches an epoch
    extra = [
        "train.accum_steps=2",
        "train.batch_size=4",
    ]
    try:
        pillow = list(sources(shards, *extra).batches(5))  # epoch 1
        whole = sources(shards, *extra, "data.decoder=dali")
        assert whole.describe().startswith(
            "data decoded, cropped and normalised by DALI on the CPU"
        )
        epoch = list(whole.batches(5))
        # 3 steps into epoch 1, the bytes and draws from two loader workers
        resumed = list(
            sources(shards, *extra, "data.decoder=dali", "data.num_workers=2").batches(8)
        )
    finally:
        reset_accelerate()
    assert len(epoch) == len(pillow) == 10 and len(resumed) == 4
    for batch, ref in zip(epoch, pillow, strict=True):
        # LoadedSource's order and masks
        assert torch.equal(batch.labels, ref.labels) and torch.equal(batch.noise, ref.noise)
        levels = (
            (batch.images - ref.images).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        )
        # the same crops and flips, normalised alike
        assert levels.mean() < 0.3 and levels.max() < 1.5
    for a, b in zip(epoch[6:], resumed, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.noise, b.noise)


def test_dali_is_refused_without_the_package_and_with_on_device_or_streaming(shards, monkeypatch):
    for extra in ("data.on_device=true", "data.streaming=true"):
        with pytest.raises(ConfigError, match="data.decoder=dali is for the loaded split"):
            load_config(None, ["data.decoder=dali", extra])
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if it were not installed
    with pytest.raises(DataError, match=r'pip install -e "\.\[dali\]"') as e:
        sources(shards, "data.decoder=dali")
    assert "\n" not in str(e.value)


def test_a_format_dali_does_not_decode_is_refused_with_the_fix(tmp_path):
    (tmp_path / "c0").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "c0" / "0.gif")
    cfg = data_config(tmp_path)
    with pytest.raises(DataError, match="python -m mae.prepare"):
        dali.EncodedImages(load_split(cfg), cfg, seed=0, noise_length=None)[0]


def test_pretraining_with_dali_trains_and_resumes_exactly_after_a_stop(
    shards, tmp_path, monkeypatch
):
    common = [
        *TINY,
        f"data.dataset={shards}",
        "data.decoder=dali",
        # 40 images of batch 8: 5 steps an epoch; the checkpoint at 4, the stop at 6
        "train.max_steps=10",
        "train.checkpoint_every=4",
        "train.log_every=1",
    ]

    def run(name):
        try:
            return pretrain.train(load_config(None, [*common, f"output_dir={tmp_path / name}"]))
        finally:
            reset_accelerate()

    straight = run("straight")

    def stop():
        raise Stop

    monkeypatch.setattr(runner.MetricLog, "write", metric_write_then(6, stop))
    with pytest.raises(Stop):
        run("resumed")
    monkeypatch.undo()
    resumed = run("resumed")

    def losses(result):
        return [
            (r["step"], r["loss"])
            for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
        ]

    assert resumed.steps == straight.steps == 10 and losses(resumed) == losses(straight)
    assert all(np.isfinite(loss) for _, loss in losses(straight))
    a = load_file(str(straight.run_dir / "checkpoints/step_10/model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints/step_10/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_with_dali_end_where_one_process_with_the_same_global_batch_ends(
    shards, tmp_path
):
    """2 processes x batch 4 (gloo) against 1 x batch 8: each process decodes its own share of every
    global batch (LoadedSource's split), with the same crops and masks per sample; the weights
    agree."""
    args = [
        *TINY,
        f"data.dataset={shards}",
        "data.decoder=dali",
        "train.mixed_precision=no",
        "train.max_steps=4",
        "train.blr=1e-2",
        "train.checkpoint_every=4",
    ]
    env = {**env_without_accelerate(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for name, processes, batch in (("one", 1, 8), ("two", 2, 4)):
        cmd = accelerate_launch(
            str(ROOT / "pretrain.py"),
            *args,
            f"train.batch_size={batch}",
            f"output_dir={tmp_path / name}",
            processes=processes,
            multi=processes > 1,
        )
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = (
        load_file(str(tmp_path / name / "checkpoints/step_4/model.safetensors"))
        for name in ("one", "two")
    )
    for k in a:
        # its key part's gradient is rounding noise (tests/test_resilience.py)
        if not k.endswith("attn.qkv.bias"):
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    losses = [
        [
            json.loads(x)["loss"]
            for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("one", "two")
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)

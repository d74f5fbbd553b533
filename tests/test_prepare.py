"""Cheaper data: pre-resized shards (python -m mae.prepare), JPEG draft decoding
(data.decoder=pillow_draft), uint8 batches from the workers, normalised where they arrive."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, reset_accelerate
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from mae import pretrain
from mae.config import load_config
from mae.data.bad_images import count_bad_images
from mae.data.images import ImageDataset, augment_transform, eval_transform
from mae.data.loaded import split_normalisation
from mae.data.loading import load_split
from mae.prepare import main as prepare_main

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def save(image: Image.Image, path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def colour_image(rgb, size, mode="RGB", seed=0) -> Image.Image:
    """``size`` (width, height) of colour ``rgb`` plus mild noise, in ``mode``."""
    noise = np.random.default_rng(seed).integers(-15, 15, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).convert(mode)


def mixed_folder(root):
    """train/ and test/ splits of three colour classes: PNG, JPEG, grayscale, RGBA, small and large,
    one JPEG stored sideways with an EXIF orientation, and one file that is not an image."""
    for c, rgb in enumerate(COLOURS):
        for i, (size, mode, fmt) in enumerate(
            [
                ((60, 40), "RGB", "PNG"),
                ((20, 10), "RGB", "JPEG"),
                ((50, 50), "L", "PNG"),
                ((40, 30), "RGBA", "PNG"),
            ]
        ):
            save(
                colour_image(rgb, size, mode, seed=i),
                root / "train" / f"c{c}" / f"{i}.{fmt.lower()}",
                format=fmt,
            )
        save(colour_image(rgb, (48, 36), seed=9), root / "test" / f"c{c}" / "0.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x32, shown turned by 90 degrees: 32x64
    save(
        colour_image(COLOURS[0], (64, 32)),
        root / "train" / "c0" / "turned.jpg",
        exif=exif.tobytes(),
    )
    (root / "train" / "c1" / "broken.png").write_bytes(b"not an image at all")
    return root


def run_prepare(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mae.prepare", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def decoded_size(image: dict) -> tuple[str, str, tuple[int, int]]:
    opened = Image.open(io.BytesIO(image["bytes"]))
    return opened.format, opened.mode, opened.size


def test_prepare_writes_capped_jpeg_shards_with_labels_splits_and_a_manifest(tmp_path):
    src, out = mixed_folder(tmp_path / "src"), tmp_path / "out"
    args = [
        str(src),
        str(out),
        "--max-side",
        "32",
        "--quality",
        "85",
        "--workers",
        "2",
        "--shard-size",
        "5",
    ]
    assert prepare_main(args) == 0
    source = datasets.load_dataset(str(src))
    written = datasets.load_dataset(str(out))
    assert sorted(written) == ["test", "train"]
    assert written["train"].features["label"].names == ["c0", "c1", "c2"]
    assert sorted(p.name for p in (out / "data").iterdir())[:3] == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
    ]
    raw = written["train"].cast_column("image", datasets.Image(decode=False))
    originals = source["train"].cast_column("image", datasets.Image(decode=False))
    kept = [r for r in originals if not r["image"]["path"].endswith("broken.png")]
    assert len(raw) == len(kept) == 13  # 12 + the turned one; the broken file skipped
    for row, orig in zip(raw, kept, strict=True):
        fmt, mode, size = decoded_size(row["image"])
        # as datasets shows it: EXIF turn applied
        full = datasets.Image().decode_example(orig["image"]).size
        assert fmt == "JPEG" and max(size) == min(32, max(full)), (orig, size)
        # aspect kept (turned: 32x64 -> 16x32)
        assert abs(size[0] / size[1] - full[0] / full[1]) < 0.1
        assert mode == ("L" if orig["image"]["path"].endswith("2.png") else "RGB")
        assert row["label"] == orig["label"]
        mean = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")).mean((0, 1))
        if mode == "RGB":  # each image still has its class's colour: rows and labels stay together
            assert np.abs(mean - COLOURS[row["label"]]).max() < 20
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["max_side"] == 32
        and manifest["quality"] == 85
        and len(manifest["fingerprint"]) == 64
    )
    assert manifest["splits"]["train"]["images"] == 13 and manifest["splits"]["test"]["images"] == 3
    assert [s["source"].endswith("broken.png") for s in manifest["splits"]["train"]["skipped"]] == [
        True
    ]


def test_prepare_runs_from_a_checkout_that_was_never_installed(tmp_path, monkeypatch):
    # the package's metadata is absent (python -m mae.prepare from a plain checkout): the
    # manifest says so
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    out = tmp_path / "out"
    assert (
        prepare_main(
            [str(mixed_folder(tmp_path / "src")), str(out), "--max-side", "16", "--workers", "1"]
        )
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["version"] is None


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


def test_prepare_refuses_shards_of_another_source_and_is_a_no_op_for_the_same(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for root, rgb in ((a, COLOURS[0]), (b, COLOURS[1])):
        for i in range(4):
            save(colour_image(rgb, (40, 30), seed=i), root / "c0" / f"{i}.png")
    assert prepare_main([str(a), str(out), "--max-side", "16", "--workers", "1"]) == 0
    before, manifest = shard_bytes(out), (out / "manifest.json").read_text()

    # as a process: its exit code
    refused = run_prepare(b, out, "--max-side", "16", "--workers", "1")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and str(a) in lines[0], refused.stderr
    assert shard_bytes(out) == before and (out / "manifest.json").read_text() == manifest

    assert prepare_main([str(a), str(out), "--max-side", "16", "--workers", "1"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").read_text() == manifest  # not rewritten

    assert (
        prepare_main([str(b), str(out), "--max-side", "16", "--workers", "1", "--overwrite"]) == 0
    )
    assert json.loads((out / "manifest.json").read_text())["source"] == str(b)
    assert shard_bytes(out) != before

    foreign = tmp_path / "foreign"
    (foreign / "keep.txt").parent.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert prepare_main([str(a), str(foreign), "--max-side", "16", "--workers", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (foreign / "keep.txt").read_text() == "mine"


def test_a_30_step_pretraining_run_reads_the_shards(tmp_path):
    src, out = tmp_path / "src", tmp_path / "shards"
    for c, rgb in enumerate(COLOURS):
        for i in range(8):
            save(colour_image(rgb, (40, 30), seed=i), src / f"c{c}" / f"{i}.png")
    assert prepare_main([str(src), str(out), "--max-side", "24", "--workers", "1"]) == 0
    cfg = load_config(
        None, [*TINY, f"data.dataset={out}", "train.max_steps=30", f"output_dir={tmp_path / 'run'}"]
    )
    try:
        result = pretrain.train(cfg)
    finally:
        reset_accelerate()
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 30 and lines[-1]["step"] == 30 and np.isfinite(lines[-1]["loss"])
    assert json.loads((result.run_dir / "derived.json").read_text())["dataset_size"] == 24


def gradient_jpegs(root, count=12, size=(160, 120)):
    """Smooth JPEGs whose colour encodes the position (red: x, green: y): a crop box off by a pixel
    at the draft scale changes every pixel of the crop by a few levels, a wrong box by tens."""
    x, y = np.meshgrid(np.linspace(0, 255, size[0]), np.linspace(0, 255, size[1]))
    for i in range(count):
        a = np.stack([x, y, np.full_like(x, 20 * i)], -1).astype(np.uint8)
        save(Image.fromarray(a), root / f"c{i % 2}" / f"{i}.jpg", quality=95)
    return root


def test_draft_decoding_draws_the_exact_paths_crops_flips_and_noise_within_a_few_levels(tmp_path):
    root = gradient_jpegs(tmp_path / "jpegs")
    overrides = [f"data.dataset={root}", "data.image_size=32", "data.crop_scale=[0.5,1.0]"]
    exact_cfg = load_config(None, overrides).data
    draft_cfg = load_config(None, [*overrides, "data.decoder=pillow_draft"]).data
    ds = load_split(exact_cfg)
    exact = ImageDataset(
        ds, exact_cfg.columns, augment_transform(exact_cfg), seed=3, noise_length=5
    )
    draft = ImageDataset(
        ds, draft_cfg.columns, augment_transform(draft_cfg), seed=3, noise_length=5
    )
    std = torch.tensor(exact_cfg.std).view(3, 1, 1)
    drafted, diffs = 0, []
    for epoch in range(2):
        for i in range(len(ds)):
            (a, label_a, noise_a), (b, label_b, noise_b) = exact[(epoch, i)], draft[(epoch, i)]
            # the same draws, in the same order
            assert torch.equal(noise_a, noise_b) and label_a == label_b
            diff = ((a - b).abs() * std * 255).flatten()
            drafted += bool(diff.max() > 0)  # a crop decoded whole is the exact one, bit for bit
            diffs.append(diff)
    d = torch.cat(diffs)
    assert drafted >= len(diffs) // 2  # 160x120 to 32: most crops decode at 1/2 or less
    print(f"drafted {drafted}/{len(diffs)}, mean {d.mean():.2f}, max {d.max():.1f} levels")
    # a wrong box or flip: tens of levels
    assert d.mean() < 1.0 and d.max() < 6, (
        d.mean(),
        d.max(),
    )


def test_a_draft_decoding_run_trains_and_draws_its_reconstruction_grid(tmp_path):
    """The grid's images come from the split the loader reads undecoded, decoded again for it."""
    root = gradient_jpegs(tmp_path / "jpegs", count=8)
    overrides = [*TINY, f"data.dataset={root}", "data.decoder=pillow_draft", "train.max_steps=2"]
    try:
        result = pretrain.train(load_config(None, [*overrides, f"output_dir={tmp_path / 'run'}"]))
    finally:
        reset_accelerate()
    assert result.steps == 2 and (result.run_dir / "recon_2.png").is_file()


def test_draft_decoding_replaces_a_truncated_jpeg_and_logs_it(tmp_path):
    root = gradient_jpegs(tmp_path / "jpegs", count=4)
    whole = (root / "c0" / "0.jpg").read_bytes()
    # its header reads, its data does not
    (root / "c0" / "0.jpg").write_bytes(whole[: len(whole) // 3])
    cfg = load_config(
        None, [f"data.dataset={root}", "data.image_size=32", "data.decoder=pillow_draft"]
    ).data
    ds = load_split(cfg)
    log = tmp_path / "bad.jsonl"
    data = ImageDataset(ds, cfg.columns, augment_transform(cfg), bad_log=log)
    paths = [r["path"] for r in ds.cast_column("image", datasets.Image(decode=False))["image"]]
    first = next(i for i, path in enumerate(paths) if path.endswith("c0/0.jpg"))
    x, _ = data[first]
    assert x.shape == (3, 32, 32) and count_bad_images(log) == 1
    with pytest.raises(Exception, match="cannot be decoded"):
        ImageDataset(ds, cfg.columns, augment_transform(cfg))[first]


def test_workers_hand_over_uint8_that_batch_normalisation_turns_into_the_whole_transforms_values(
    tmp_path,
):
    root = gradient_jpegs(tmp_path / "jpegs", count=8)
    cfg = load_config(None, [f"data.dataset={root}", "data.image_size=16"]).data
    ds = load_split(cfg)
    head, normalise = split_normalisation(augment_transform(cfg))
    whole = default_collate(
        [ImageDataset(ds, cfg.columns, augment_transform(cfg), 1, 4)[(2, i)] for i in range(8)]
    )
    part = default_collate([ImageDataset(ds, cfg.columns, head, 1, 4)[(2, i)] for i in range(8)])
    assert part[0].dtype == torch.uint8 and whole[0].dtype == torch.float32
    assert torch.equal(normalise(part[0]), whole[0]) and torch.equal(part[2], whole[2])
    assert split_normalisation(eval_transform(cfg))[1] is not None
    assert (
        split_normalisation(v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))[1]
        is None
    )

"""data.on_device: the split decoded once into uint8, augmented batch-wise where the model runs."""

import math

import numpy as np
import pytest
import torch
from helpers import write_image_folder
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mae.config import ConfigError, load_config
from mae.data.images import EpochSampler
from mae.data.loading import DataError, load_split
from mae.data.on_device import (
    CROP_TRIES,
    DecodedImages,
    DeviceAugment,
    crop_boxes,
    key_loader,
    resized_crops,
    splitmix64,
    uniforms,
)

MASK64 = (1 << 64) - 1


def reference_splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_splitmix64_matches_the_unsigned_reference_through_wraparound():
    xs = [0, 1, 7, 123456789, 2**62 + 5, 2**63 - 1, -1, -(2**63)]
    got = splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert [g & MASK64 for g in got] == [reference_splitmix64(x & MASK64) for x in xs]


def test_uniforms_depend_on_seed_epoch_and_index_only():
    keys = torch.tensor([[e, i] for e in range(3) for i in range(4000)])
    u = uniforms(5, keys, 50)
    assert u.shape == (12000, 50) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    # a sample's numbers do not depend on the batch it is drawn in, nor on how many are drawn
    perm = torch.randperm(len(keys))
    assert torch.equal(uniforms(5, keys[perm], 50), u[perm])
    assert torch.equal(uniforms(5, keys[:10], 20), u[:10, :20])
    # other seeds, epochs or indices draw other numbers
    assert not torch.equal(uniforms(6, keys[:10], 50), u[:10])
    assert (u[:4000] != u[4000:8000]).float().mean() > 0.99  # epoch 0 vs epoch 1, same indices


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_crop_boxes_follow_random_resized_crop(height, width):
    n, scale = 20000, (0.2, 1.0)
    boxes = crop_boxes(
        uniforms(0, torch.stack([torch.zeros(n), torch.arange(n)], 1).long(), 4 * CROP_TRIES),
        height,
        width,
        scale,
    )
    top, left, h, w = boxes.unbind(1)
    assert (
        (top >= 0).all()
        and (left >= 0).all()
        and (top + h <= height).all()
        and (left + w <= width).all()
    )
    assert torch.equal(boxes, boxes.round())  # integer pixel boxes, as torchvision's
    torch.manual_seed(0)
    rrc, blank = v2.RandomResizedCrop(8, scale=scale), torch.zeros(3, height, width)
    ref = torch.tensor(
        [
            [p["top"], p["left"], p["height"], p["width"]]
            for p in (rrc.make_params([blank]) for _ in range(n))
        ]
    ).float()
    for ours, theirs in (
        (h * w, ref[:, 2] * ref[:, 3]),
        (h / w, ref[:, 2] / ref[:, 3]),
        (top, ref[:, 0]),
    ):
        assert ours.mean().item() == pytest.approx(theirs.mean().item(), rel=0.03)
        assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.06)


def test_crop_boxes_fall_back_to_the_centre_crop_like_torchvision():
    # scale (1, 1) of a 10x40 image: no 3/4..4/3 box of that area fits, so the 4/3 centre crop
    u = torch.rand(5, 4 * CROP_TRIES)
    boxes = crop_boxes(u, 10, 40, (1.0, 1.0))
    torch.manual_seed(0)
    p = v2.RandomResizedCrop(8, scale=(1.0, 1.0)).make_params([torch.zeros(3, 10, 40)])
    expected = torch.tensor([p["top"], p["left"], p["height"], p["width"]], dtype=torch.float32)
    assert torch.equal(boxes, expected.expand(5, 4))


def smooth_image(size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (1, 3, size // 4, size // 4), generator=g).float()
    return (
        torch.nn.functional.interpolate(coarse, size=size, mode="bilinear").round().to(torch.uint8)
    )


@pytest.mark.parametrize("size", [(32, 32), (224, 224), (48, 32)])
def test_resized_crops_match_pillow_bicubic_and_flip_exactly(size):
    img, box = smooth_image(), torch.tensor([[3.0, 5.0, 20.0, 24.0]])
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    ours = resized_crops(img, box, torch.tensor([False]), size, mean, std)[0]
    pil = Image.fromarray(img[0].permute(1, 2, 0).numpy())
    ref = TF.resized_crop(pil, 3, 5, 20, 24, list(size), interpolation=v2.InterpolationMode.BICUBIC)
    ref = TF.normalize(
        TF.to_dtype(TF.to_image(ref), torch.float32, scale=True), mean.tolist(), std.tolist()
    )
    diff = ((ours - ref) * std.view(3, 1, 1)).abs()  # in [0, 1] pixel units
    assert diff.mean() < 0.008 and diff.max() < 0.12
    flipped = resized_crops(img, box, torch.tensor([True]), size, mean, std)[0]
    assert torch.allclose(flipped, ours.flip(-1), atol=1e-5)
    assert not torch.allclose(flipped, ours, atol=0.05)


def test_decoded_images_hold_the_pixels_and_labels(tmp_path):
    root = write_image_folder(
        tmp_path / "imgs", classes=2, per_class=3, size=12, modes=("RGB", "L")
    )
    cfg = load_config(None, [f"data.dataset={root}", "data.image_size=16"]).data
    split = load_split(cfg)
    data = DecodedImages(split, cfg)
    assert data.images.shape == (6, 3, 12, 12) and data.images.dtype == torch.uint8
    for i in range(6):
        expected = np.asarray(split[i]["image"].convert("RGB"))
        assert np.array_equal(data.images[i].permute(1, 2, 0).numpy(), expected)
    assert data.labels.tolist() == split["label"]
    [(keys, labels)] = data.__getitems__([(2, 4), (2, 1)])
    assert keys.tolist() == [[2, 4], [2, 1]] and labels.tolist() == [
        split["label"][4],
        split["label"][1],
    ]


def test_decoded_images_refuse_mixed_sizes_and_large_images(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=1, per_class=2, size=12)
    Image.new("RGB", (14, 12)).save(root / "class_0" / "odd.png")
    cfg = load_config(None, [f"data.dataset={root}", "data.image_size=16"]).data
    with pytest.raises(DataError, match="every image the same size"):
        DecodedImages(load_split(cfg), cfg)
    # a crop would shrink
    big = write_image_folder(tmp_path / "big", classes=1, per_class=2, size=20)
    cfg = load_config(None, [f"data.dataset={big}", "data.image_size=16"]).data
    with pytest.raises(DataError, match="at most data.image_size=16"):
        DecodedImages(load_split(cfg), cfg)


def test_on_device_and_streaming_are_refused_together():
    with pytest.raises(ConfigError, match="choose one of them"):
        load_config(None, ["data.on_device=true", "data.streaming=true"])


def test_a_split_too_large_to_hold_is_refused_before_decoding(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=1, per_class=4, size=12)
    cfg = load_config(None, [f"data.dataset={root}", "data.image_size=16"]).data
    with pytest.raises(DataError, match="set data.on_device=false"):
        DecodedImages(load_split(cfg), cfg, max_bytes=4 * 12 * 12 * 3 - 1)
    assert (
        DecodedImages(load_split(cfg), cfg, max_bytes=4 * 12 * 12 * 3).images.numel()
        == 4 * 12 * 12 * 3
    )


def test_a_sample_is_augmented_alike_in_any_batch(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=8, size=16)
    cfg = load_config(None, [f"data.dataset={root}", "data.image_size=16"]).data
    data = DecodedImages(load_split(cfg), cfg)
    augment = DeviceAugment(data, cfg, seed=3, noise_length=16, device=torch.device("cpu"))
    loader = key_loader(data, EpochSampler(len(data), 16, seed=0), batch_size=4)
    batches = [augment(keys, labels) for keys, labels in loader]
    keys = torch.cat([k for k, _ in loader])
    images = torch.cat([b.images for b in batches])
    labels = torch.cat([b.labels for b in batches])
    noise = torch.cat([b.noise for b in batches])
    assert (
        images.shape == (16, 3, 16, 16)
        and noise.shape == (16, 16)
        and labels.tolist() == data.labels[keys[:, 1]].tolist()
    )
    # the same keys in another order and batch size: each sample gets the same crop, flip and mask
    order = torch.randperm(16)
    again = augment(keys[order], data.labels[keys[order, 1]])
    assert torch.allclose(again.images, images[order], atol=1e-6)
    assert torch.equal(again.noise, noise[order])
    # normalised with the config's statistics: roughly zero-mean pixels
    assert abs(images.mean().item()) < 0.5 and math.isfinite(images.std().item())
    # another epoch draws other crops
    other = augment(keys + torch.tensor([1, 0]), labels=data.labels[keys[:, 1]])
    assert not torch.allclose(other.images, images, atol=1e-3)

import datasets
import numpy as np
import pytest
import torch
from helpers import write_image_folder

from mae.config import load_config
from mae.data.images import EpochSampler, ImageDataset, augment_transform, eval_transform
from mae.data.loading import DataError, image_column, label_column, load_split


def data_cfg(*overrides):
    return load_config(None, ["data.image_size=16", *overrides]).data


def test_sample_ships_balanced_train_and_test():
    cfg = data_cfg()
    for split, per_class in (("train", 300), ("test", 100)):
        ds = load_split(cfg, split)
        assert (
            label_column(ds, cfg.label_column) == "label"
            and image_column(ds, cfg.image_column) == "image"
        )
        counts = np.bincount(ds["label"], minlength=10)
        assert counts.tolist() == [per_class] * 10
    assert ds.features["label"].names[0] == "airplane"


def test_image_folder_with_mixed_modes_becomes_configured_channels(tmp_path):
    root = write_image_folder(tmp_path / "imgs", modes=("RGB", "L", "RGBA", "P"))
    for channels in (1, 3):
        cfg = data_cfg(
            f"data.dataset={root}",
            f"data.channels={channels}",
            f"data.mean={[0.5] * channels}",
            f"data.std={[0.5] * channels}",
        )
        ds = load_split(cfg)
        assert len(ds) == 24 and label_column(ds, cfg.label_column) == "label"
        item = ImageDataset(ds, cfg.columns, augment_transform(cfg))
        shapes = {tuple(item[i][0].shape) for i in range(4)}
        assert shapes == {(channels, 16, 16)}


def test_parquet_shards_like_a_hub_repo(tmp_path):
    rows = {"picture": [np.full((8, 8, 3), i, np.uint8) for i in range(6)], "y": [0, 1, 2, 0, 1, 2]}
    features = datasets.Features(
        {"picture": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    (tmp_path / "data").mkdir()
    ds.to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    ds.select(range(3)).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    cfg = data_cfg(f"data.dataset={tmp_path}")
    train = load_split(cfg)
    assert len(train) == 6 and len(load_split(cfg, "test")) == 3
    assert (
        image_column(train, cfg.image_column) == "picture"
        and label_column(train, cfg.label_column) == "y"
    )
    x, y = ImageDataset(train, cfg.columns, eval_transform(cfg))[4]
    assert x.shape == (3, 16, 16) and y == 1


def test_named_and_missing_columns(tmp_path):
    ds = datasets.Dataset.from_dict({"pixels": [[1, 2]], "label": [0]})
    cfg = data_cfg()
    with pytest.raises(DataError, match="has no Image feature.*data.image_column=NAME"):
        image_column(ds, cfg.image_column)
    with pytest.raises(DataError, match="data.image_column='img' is not a column"):
        image_column(ds, data_cfg("data.image_column=img").image_column)
    # a plain int column is not a ClassLabel: no labels, fine for pretraining
    assert label_column(ds, cfg.label_column) is None
    assert (
        label_column(ds, data_cfg("data.label_column=label").label_column) == "label"
    )  # but it may be named
    with pytest.raises(DataError, match="data.image_column='label' holds .* not images"):
        image_column(ds, data_cfg("data.image_column=label").image_column)
    with pytest.raises(
        DataError, match="data.label_column='pixels' holds .* not integer class labels"
    ):
        label_column(ds, data_cfg("data.label_column=pixels").label_column)


def test_bad_split_and_dataset(tmp_path):
    with pytest.raises(
        DataError, match=r"data.split='validation' does not exist.*\['test', 'train'\]"
    ):
        load_split(data_cfg("data.split=validation"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        load_split(data_cfg(f"data.dataset={tmp_path / 'f.txt'}"))


def test_augmentation_is_a_function_of_seed_epoch_index():
    cfg = data_cfg()
    ds = ImageDataset(load_split(cfg), cfg.columns, augment_transform(cfg), seed=3)
    a = ds[(0, 5)][0]
    torch.manual_seed(123)  # the global RNG does not matter ...
    assert torch.equal(a, ds[(0, 5)][0])
    state = torch.random.get_rng_state()
    assert not torch.equal(a, ds[(1, 5)][0])  # ... the epoch does
    assert torch.equal(state, torch.random.get_rng_state())  # and the global RNG is left untouched


def test_epoch_sampler_is_seeded_and_cut_to_whole_steps():
    s = EpochSampler(10, 8, seed=1)
    first = list(s)
    assert len(first) == 8 and first == list(s) and all(e == 0 for e, _ in first)
    assert len({i for _, i in first}) == 8
    s.set_epoch(1)
    second = list(s)
    assert [i for _, i in second] != [i for _, i in first] and all(e == 1 for e, _ in second)


def test_a_samples_seed_is_the_same_in_every_process_and_for_numpy_integers():
    import os
    import subprocess
    import sys

    import numpy as np

    from mae.data.images import sample_seed

    here = sample_seed(7, 2, 123)
    # another interpreter with another hash salt: ints hash alike whatever PYTHONHASHSEED is
    code = "from mae.data.images import sample_seed; print(sample_seed(7, 2, 123))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert int(other.stdout) == here
    assert sample_seed(np.int64(7), np.int32(2), 123) == here
    assert sample_seed(7, 2, 124) != here


def test_grid_rows_go_across_the_classes_of_a_sorted_folder():
    """Reconstruction grids of a folder sorted by class show every class, the same rows every
    time; without labels, rows evenly spaced through the split."""
    from types import SimpleNamespace

    from mae.data.base import DataSource

    labels = [0] * 5 + [1] * 5 + [2] * 5
    ds = datasets.Dataset.from_dict({"label": labels, "i": list(range(15))})

    def source(label_column):
        view = SimpleNamespace(split=ds, label_column=label_column)
        view.first_rows = lambda n: DataSource.first_rows(view, n)
        return view

    rows = DataSource.grid_rows(source("label"), 7)
    assert rows["label"] == [0, 1, 2, 0, 1, 2, 0] and rows["i"] == [0, 5, 10, 1, 6, 11, 2]
    every = DataSource.grid_rows(source("label"), 40)["i"]
    assert every == sorted(range(15), key=lambda i: (i % 5, i))
    assert DataSource.grid_rows(source(None), 3)["i"] == [0, 7, 14]

"""Frozen-feature evaluation: kNN, linear probe, feature cache, encoder sources, finetune.py."""

import json
import subprocess
import sys
from dataclasses import replace

import datasets
import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, colour_folder

from mae import evaluate, pretrain
from mae.config import ConfigError, DataConfig, load_config
from mae.config.evaluation import ProbeConfig, load_eval_config
from mae.data.loading import load_split
from mae.eval.encoders import load_encoder, weights_sha256
from mae.eval.probe import (
    accuracy,
    cached_features,
    extract,
    image_dataset,
    knn_scores,
    linear_probe,
    probe,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    pretrain.train(load_config(None, [*TINY, f"output_dir={out}", "train.max_steps=3"]))
    return out


def eval_cfg(tmp_path, *overrides):
    return load_eval_config(
        None,
        [
            f"output_dir={tmp_path / 'eval'}",
            f"probe.cache_dir={tmp_path / 'cache'}",
            "data.num_workers=0",
            *overrides,
        ],
    )


def test_knn_on_one_hot_features_is_perfect():
    labels = torch.arange(5).repeat(4)
    bank = {"features": torch.nn.functional.one_hot(labels, 5).float(), "labels": labels}
    queries = torch.tensor([3, 0, 4, 1, 2, 2])
    query = {"features": torch.nn.functional.one_hot(queries, 5).float() * 2.5, "labels": queries}
    # k > images per class: other classes vote too
    scores = knn_scores(bank, query, 5, k=10, temperature=0.07)
    assert accuracy(scores, queries, list("abcde"))["top1"] == 1.0
    # no overflow to inf at a tiny temperature
    tiny_t = knn_scores(bank, query, 5, k=10, temperature=1e-4)
    assert torch.isfinite(tiny_t).all() and tiny_t.argmax(1).tolist() == queries.tolist()


def test_knn_votes_are_temperature_weighted():
    bank = {
        "features": torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]]),
        "labels": torch.tensor([0, 1, 1]),
    }
    query = {"features": torch.tensor([[1.0, 0.0]]), "labels": torch.tensor([0])}
    # one very close neighbour of class 0 beats two far ones of class 1 at a low temperature ...
    assert knn_scores(bank, query, 2, k=3, temperature=0.05).argmax().item() == 0
    # ... and loses to them when votes are nearly equal
    assert knn_scores(bank, query, 2, k=3, temperature=100.0).argmax().item() == 1


def test_centred_and_standardised_knn_tell_apart_what_plain_cosine_cannot_see():
    # two classes of all-positive codes that differ in how strongly every unit is on (0.8x or 1.2x a
    # common pattern, as sigmoid codes' overall activation does): the same direction, so the cosine
    # of the raw codes is blind to the class; less the training mean they point in opposite
    # directions
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(64, generator=g) * 0.8 + 0.2

    def features(n):
        labels = torch.arange(2).repeat(n // 2)
        x = torch.tensor([0.8, 1.2])[labels, None] * pattern + 0.02 * torch.randn(
            n, 64, generator=g
        )
        return {"features": x, "labels": labels}

    bank, query = features(400), features(200)
    names = ["a", "b"]
    plain = accuracy(knn_scores(bank, query, 2, k=20, temperature=0.07), query["labels"], names)[
        "top1"
    ]
    for features in ("centred", "standardised"):
        scores = knn_scores(bank, query, 2, k=20, temperature=0.07, features=features)
        assert accuracy(scores, query["labels"], names)["top1"] > 0.99, features
    assert plain < 0.7, plain
    # features already centred on the training mean: the same votes either way
    mean = bank["features"].mean(0)
    for d in (bank, query):
        d["features"] = d["features"] - mean
    again = knn_scores(bank, query, 2, k=20, temperature=0.07)
    assert torch.allclose(
        again, knn_scores(bank, query, 2, k=20, temperature=0.07, features="centred"), atol=1e-4
    )


def test_linear_probe_separates_gaussian_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(4).repeat_interleave(50)
    feats = centres[labels] + torch.randn(200, 16, generator=g)
    train, test = (
        {"features": feats[::2], "labels": labels[::2]},
        {"features": feats[1::2], "labels": labels[1::2]},
    )
    logits = linear_probe(
        train, test, 4, ProbeConfig(batch_size=32, epochs=100, warmup_epochs=5, blr=100.0), seed=0
    )
    assert accuracy(logits, test["labels"], list("abcd"))["top1"] > 0.95


def test_bn_head_ignores_feature_scale_and_the_plain_head_does_not():
    # one informative feature on a scale of 1e-3 beside 15 noise features on a scale of 1: the BN
    # head normalises each feature and finds it; a plain linear head at the same lr barely moves
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat_interleave(200)
    feats = torch.randn(400, 16, generator=g)
    feats[:, 0] = (labels * 2.0 - 1.0 + 0.3 * torch.randn(400, generator=g)) * 1e-3
    train, test = (
        {"features": feats[::2], "labels": labels[::2]},
        {"features": feats[1::2], "labels": labels[1::2]},
    )
    p = ProbeConfig(batch_size=32, epochs=60, warmup_epochs=5, blr=100.0)
    bn = accuracy(linear_probe(train, test, 2, p, seed=0), test["labels"], ["a", "b"])["top1"]
    plain = accuracy(
        linear_probe(train, test, 2, replace(p, head="linear"), seed=0), test["labels"], ["a", "b"]
    )["top1"]
    assert bn > 0.95
    assert plain < 0.75


def test_top5_differs_from_top1_with_many_classes():
    scores = torch.arange(8, dtype=torch.float32).repeat(3, 1)  # ranking 7, 6, 5, 4, 3, ...
    out = accuracy(scores, torch.tensor([7, 4, 1]), [str(i) for i in range(8)])
    assert out["top1"] == pytest.approx(1 / 3) and out["top5"] == pytest.approx(2 / 3)


def test_accuracy_known_answers():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    out = accuracy(scores, torch.tensor([0, 1, 1, 0]), ["x", "y", "z"])
    assert out["top1"] == 0.5 and out["top5"] == 1.0  # top-3 here: fewer than 5 classes
    assert out["per_class"] == {"x": 0.5, "y": 0.5}


def test_cache_is_exact_and_never_stale(tmp_path, run_dir):
    cfg = eval_cfg(tmp_path, f"encoder={run_dir}")
    enc = load_encoder(cfg.encoder)

    ds = load_split(DataConfig(), "test").select(range(40))
    first, hit1 = cached_features(enc, ds, "test", cfg, "cls")
    again, hit2 = cached_features(enc, ds, "test", cfg, "cls")
    assert (hit1, hit2) == (False, True)
    fresh = extract(enc, image_dataset(ds, cfg, enc), "cls", 16, 0)
    assert torch.equal(again["features"], fresh["features"]) and torch.equal(
        again["labels"], fresh["labels"]
    )
    assert cached_features(enc, ds, "test", cfg, "avg")[1] is False  # another pooling
    assert cached_features(enc, ds.select(range(30)), "test", cfg, "cls")[1] is False  # other rows
    enc.data_config = {**enc.data_config, "mean": (0.5, 0.5, 0.5)}  # another transform
    assert cached_features(enc, ds, "test", cfg, "cls")[1] is False
    changed = load_encoder(cfg.encoder)
    with torch.no_grad():
        changed.module.blocks[0].mlp.fc1.weight[0, 0] += 1e-3
    changed.sha256 = weights_sha256(changed.module)
    assert changed.sha256 != enc.sha256
    assert cached_features(changed, ds, "test", cfg, "cls")[1] is False  # another encoder


def test_bf16_features_are_close_to_fp32_and_cached_apart(tmp_path, run_dir):
    """probe.mixed_precision=bf16: autocast features (written-out attention on CPU) within bf16
    rounding of fp32, under their own cache entry."""
    cfg = eval_cfg(tmp_path, f"encoder={run_dir}")
    ds = load_split(DataConfig(), "test").select(range(32))
    full, half = load_encoder(cfg.encoder), load_encoder(cfg.encoder)
    assert (full.set_precision("no"), half.set_precision("bf16")) == ("no", "bf16")
    assert type(half.module.blocks[0].attn).__name__ == "MathAttention"
    a, hit_a = cached_features(full, ds, "test", cfg, "cls")
    b, hit_b = cached_features(half, ds, "test", cfg, "cls")
    assert (hit_a, hit_b) == (False, False)  # one entry each
    assert not torch.equal(a["features"], b["features"])  # really computed in bf16
    cos = torch.nn.functional.cosine_similarity(a["features"], b["features"])
    assert cos.min() > 0.999, cos.min()
    assert cached_features(half, ds, "test", cfg, "cls")[1] is True


def test_features_of_several_blocks_are_concatenated_last_block_last(run_dir, tmp_path):
    enc = load_encoder(str(run_dir))
    x = torch.randn(3, 3, 16, 16)
    one = {pool: enc.features(x, pool) for pool in ("cls", "avg")}
    enc.set_blocks(2)
    for pool, last in one.items():
        both = enc.features(x, pool)
        assert both.shape == (3, 2 * last.shape[1])
        # the last block: the encoder's own output
        torch.testing.assert_close(both[:, last.shape[1] :], last)
        assert not torch.allclose(both[:, : last.shape[1]], last)  # the block before it
    with pytest.raises(ConfigError, match="has 2 blocks; use at most 2"):
        enc.set_blocks(3)
    classic = tmp_path / "ae"
    pretrain.train(
        load_config(None, [*TINY, "model.name=ae", f"output_dir={classic}", "train.max_steps=1"])
    )
    with pytest.raises(ConfigError, match="probe.blocks=2 needs a transformer encoder"):
        load_encoder(str(classic)).set_blocks(2)


def test_avg_features_are_the_mean_of_normalised_patch_tokens(run_dir):
    enc = load_encoder(str(run_dir))
    x = torch.randn(2, 3, 16, 16)
    tokens = enc.module.forward_features(x)  # timm: final norm applied
    assert torch.allclose(enc.features(x, "avg"), tokens[:, 1:].mean(1))
    assert torch.allclose(enc.features(x, "cls"), enc.module(x))  # the export's own pooled output
    assert enc.pool("default") == "cls"


def test_linear_probe_end_to_end_on_colours_with_holdout(tmp_path, run_dir, monkeypatch):
    folder = colour_folder(tmp_path / "colours")
    cfg = eval_cfg(
        tmp_path,
        f"encoder=random:{run_dir}",
        f"data.dataset={folder}",
        "probe.batch_size=16",
        "probe.epochs=100",
        "probe.blr=100",
        "probe.warmup_epochs=2",
        "data.holdout_fraction=0.25",
    )
    encoder = load_encoder(cfg.encoder)
    weights = {k: v.clone() for k, v in encoder.module.state_dict().items()}
    # the very instance evaluated
    monkeypatch.setattr("mae.eval.probe.load_encoder", lambda source, seed, heads: encoder)
    res = probe(cfg)
    assert res["top1"] > 0.9  # chance is 1/3
    assert (
        res["eval_split"] == "holdout of train"
        and res["eval_size"] == 15
        and res["train_size"] == 45
    )
    assert set(res["per_class"]) == {"c0", "c1", "c2"} and res["top5_k"] == 3
    assert res["probe_batch"] == 16 and res["probe_lr"] == 100 * 16 / 256
    saved = json.loads((tmp_path / "eval/results.json").read_text())
    # top-3 of 3 classes always holds the right one
    assert saved["top1"] == res["top1"] and saved["top5"] == 1.0
    assert saved["config"]["probe"]["epochs"] == 100 and len(saved["holdout_indices_sha256"]) == 64
    # the probe never touched the encoder
    assert all(torch.equal(v, encoder.module.state_dict()[k]) for k, v in weights.items())
    assert not any(p.requires_grad for p in encoder.module.parameters())
    assert saved["encoder"]["sha256"] == weights_sha256(encoder.module)


def test_cache_follows_the_label_column(tmp_path, run_dir):
    rows = {
        "img": [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(6)],
        "fine": [0, 1, 2, 0, 1, 2],
        "coarse": [1, 1, 0, 0, 1, 0],
    }
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine": datasets.ClassLabel(num_classes=3),
            "coarse": datasets.ClassLabel(num_classes=2),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    enc = load_encoder(str(run_dir))
    fine, _ = cached_features(
        enc, ds, "train", eval_cfg(tmp_path, "encoder=x", "data.label_column=fine"), "cls"
    )
    coarse, hit = cached_features(
        enc, ds, "train", eval_cfg(tmp_path, "encoder=x", "data.label_column=coarse"), "cls"
    )
    assert (
        not hit
        and coarse["labels"].tolist() == [1, 1, 0, 0, 1, 0]
        and fine["labels"].tolist() == [0, 1, 2] * 2
    )


def test_cnn_encoders_work_too(tmp_path):
    # BatchNorm buffers (0-d tensors) in the digest, timm's own pooling
    enc = load_encoder("timm:resnet10t")
    assert len(enc.sha256) == 64 and enc.default_pool == "avg"
    assert enc.features(torch.randn(2, 3, 32, 32), "avg").shape == (2, 512)


def test_unlabelled_evaluation_split_is_refused(tmp_path, run_dir):
    from mae.data.loading import DataError

    rows = {"image": [np.zeros((8, 8, 3), np.uint8)] * 4, "label": [0, 1, 0, 1]}
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    (tmp_path / "d").mkdir()
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(
        tmp_path / "d/train-00000-of-00001.parquet"
    )
    datasets.Dataset.from_dict({**rows, "label": [-1] * 4}, features=feats).to_parquet(
        tmp_path / "d/test-00000-of-00001.parquet"
    )
    with pytest.raises(DataError, match="evaluation split has 4 images without a valid label"):
        probe(
            eval_cfg(
                tmp_path,
                f"encoder={run_dir}",
                f"data.dataset={tmp_path / 'd'}",
                "data.eval_split=test",
            )
        )
    # by default an unlabelled test split is passed over for a holdout
    res = probe(
        eval_cfg(
            tmp_path,
            f"encoder={run_dir}",
            f"data.dataset={tmp_path / 'd'}",
            "mode=knn",
            "data.holdout_fraction=0.5",
        )
    )
    assert res["eval_split"] == "holdout of train" and res["eval_size"] == 2


@pytest.mark.slow
def test_command_line_knn_on_sample(tmp_path, run_dir):
    out = tmp_path / "knn"
    cmd = [
        sys.executable,
        "finetune.py",
        f"encoder={run_dir}",
        "mode=knn",
        f"output_dir={out}",
        f"probe.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(
        line.split(": ", 1)
        for line in proc.stdout.splitlines()
        if line.startswith(("top1", "top5"))
    )
    res = json.loads((out / "results.json").read_text())
    assert float(lines["top1"]) == pytest.approx(res["top1"], abs=1e-4)
    assert res["eval_split"] == "test" and res["train_size"] == 3000 and res["eval_size"] == 1000
    assert res["top1"] > 0.15  # 10 classes; even 3 steps of pretraining keep colour statistics

    # the report gathers it into a table
    assert (
        evaluate.main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "report")])
        == 0
    )
    rows = json.loads((tmp_path / "report/report.json").read_text())["results"]
    assert len(rows) == 1 and rows[0]["encoder"] == str(run_dir) and rows[0]["top1"] == res["top1"]
    assert rows[0]["top5"] == res["top5"] and rows[0]["details"] == "k 20, T 0.07"
    table = (tmp_path / "report/report.md").read_text().splitlines()
    assert f"| {run_dir} | knn | {100 * res['top1']:.2f}% |" in table[-1]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/results.json").write_text("{}")
    assert (
        evaluate.main(
            ["report", "--results", str(tmp_path / "bad"), "--out", str(tmp_path / "bad")]
        )
        == 2
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "encoder=None is invalid"),
        (["encoder=/no/such/dir"], "is not an export directory"),
        (["encoder=timm:not_a_model"], "timm has no model 'not_a_model'"),
        (
            ["encoder=x", "mode=lin"],
            "mode='lin' is invalid; choose one of ['linear', 'knn', 'finetune']",
        ),
        (["encoder=x", "probe.warmup_epochs=90"], "probe.warmup_epochs=90 is invalid"),
        (
            ["encoder=x", "data.eval_split=train"],
            "data.eval_split='train' is invalid; it must be another split",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        probe(eval_cfg(tmp_path, *overrides))


def test_pixel_baseline_is_the_normalised_image():
    enc = load_encoder("pixels:8")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(enc.features(x, enc.pool("default")), x.flatten(1))
    assert enc.data_config["input_size"] == (3, 8, 8)
    with pytest.raises(ConfigError, match="give the image size in pixels"):
        load_encoder("pixels:big")


def test_augmented_probe_fits_through_the_frozen_encoder(tmp_path, run_dir, monkeypatch):
    """probe.cached=false: no training features cached; every epoch the crops pass the encoder."""
    folder = colour_folder(tmp_path / "colours")
    cfg = eval_cfg(
        tmp_path,
        f"encoder=random:{run_dir}",
        f"data.dataset={folder}",
        "probe.cached=false",
        "probe.batch_size=16",
        "probe.epochs=60",
        "probe.blr=100",
        "probe.warmup_epochs=2",
        "data.holdout_fraction=0.25",
    )
    encoder = load_encoder(cfg.encoder)
    calls = []
    real = encoder.features
    monkeypatch.setattr(encoder, "features", lambda x, pool: calls.append(len(x)) or real(x, pool))
    monkeypatch.setattr("mae.eval.probe.load_encoder", lambda source, seed, heads: encoder)
    res = probe(cfg)
    assert (
        res["top1"] > 0.9 and res["cached"] is False and res["features_from_cache"]["train"] is None
    )
    # 45 training images, batch 16: 2 full batches per epoch, 60 epochs, plus one pass over the 15
    # held out
    assert sum(calls) == 60 * 2 * 16 + 15
    # only the evaluation features
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

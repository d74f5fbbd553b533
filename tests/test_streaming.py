"""data.streaming=true: the split read as a `datasets` stream, sharded per process and worker,
resumed exactly."""

import json
import signal

import pytest
import torch
from helpers import TINY, parquet_stream, reset_accelerate
from safetensors.torch import load_file

from mae import pretrain
from mae.config import load_config
from mae.data.bad_images import BadImagesError
from mae.data.images import augment_transform
from mae.data.loading import DataError, load_stream
from mae.data.streamed import ImageStream
from mae.run.signals import Preempted, StopSignals

EXACT = [
    *TINY,
    "train.mixed_precision=no",
    "train.log_every=1",
    "data.streaming=true",
    "data.shuffle_buffer=16",
]


def stream_run(out, data, *extra):
    return load_config(
        None,
        [
            *EXACT,
            f"data.dataset={data}",
            "data.label_column=label",
            "data.stream_size=48",
            f"output_dir={out}",
            *extra,
        ],
    )


@pytest.mark.slow
def test_processes_and_workers_read_disjoint_parts_that_cover_every_epoch(tmp_path):
    data = parquet_stream(tmp_path / "data")
    cfg = load_config(None, [*EXACT, f"data.dataset={data}", "data.label_column=label"]).data
    seen = []
    for rank in range(2):
        stream = ImageStream(load_stream(cfg), cfg, augment_transform(cfg), 0, rank, 2)
        items = iter(stream)
        seen.append([next(items) for _ in range(48)])  # two epochs of this process's 24
    for epoch in range(2):
        ids = [int(x[1]) for part in seen for x in part[24 * epoch : 24 * (epoch + 1)]]
        # the two processes split each epoch between them
        assert sorted(ids) == list(range(48)), epoch
    first = [int(x[1]) for x in seen[0][:24]]
    second = [int(x[1]) for x in seen[0][24:]]
    assert first != second  # reshuffled per epoch (files move between processes too)
    tags = torch.stack([x[-1] for x in seen[0]])
    assert tags[:24, 1].eq(0).all() and tags[24:, 1].eq(1).all()  # (worker, epoch, examples read)


@pytest.mark.slow
def test_stopped_mid_epoch_and_mid_round_the_resumed_stream_ends_bit_identical(
    tmp_path, monkeypatch
):
    """2 workers (4 files), batch 8, epochs of 24 per worker: 9 steps cross epochs. A SIGTERM after
    step 5 (an odd batch count: the worker round robin is mid-round) and a relaunch end with the
    weights of the uninterrupted run, and every step logs the same loss."""
    data = parquet_stream(tmp_path / "data")
    args = ("train.max_steps=9", "train.checkpoint_every=4", "data.num_workers=2")
    pretrain.train(stream_run(tmp_path / "ref", data, *args))
    reset_accelerate()

    calls = {"n": 0}

    def after_five(self, accelerator, timed=False):
        calls["n"] += 1
        return (signal.SIGTERM if calls["n"] == 5 else None), timed

    monkeypatch.setattr(StopSignals, "requested", after_five)
    with pytest.raises(Preempted, match="after step 5"):
        pretrain.train(stream_run(tmp_path / "cut", data, *args))
    reset_accelerate()
    state = json.loads((tmp_path / "cut/checkpoints/step_5/process_0.json").read_text())
    assert state["batches"] == 5 and set(state["workers"]) == {"0", "1"}
    monkeypatch.undo()
    pretrain.train(stream_run(tmp_path / "cut", data, *args))

    ref, cut = (
        load_file(str(tmp_path / d / "checkpoints/step_9/model.safetensors"))
        for d in ("ref", "cut")
    )
    assert all(torch.equal(ref[k], cut[k]) for k in ref)
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("ref", "cut")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 9


def test_a_stream_resumes_only_with_its_worker_layout(tmp_path):
    data = parquet_stream(tmp_path / "data")
    pretrain.train(
        stream_run(
            tmp_path / "run",
            data,
            "train.max_steps=2",
            "train.checkpoint_every=2",
            "data.num_workers=2",
        )
    )
    reset_accelerate()
    with pytest.raises(
        DataError, match=r"1 processes x data.num_workers=2 .* launch with 1 processes and"
    ):
        pretrain.train(
            stream_run(tmp_path / "run", data, "train.max_steps=4", "data.num_workers=1")
        )


def test_an_epoch_needs_a_size_when_the_stream_does_not_say(tmp_path):
    data = parquet_stream(tmp_path / "data", shards=1)
    cfg = load_config(
        None,
        [*EXACT, f"data.dataset={data}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1"],
    )
    with pytest.raises(DataError, match=r"give it as data.stream_size=N"):
        pretrain.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_undecodable_images_in_a_stream_are_skipped_counted_and_limited(tmp_path):
    data = parquet_stream(tmp_path / "data", shards=2, bad=(3, 17))
    out = tmp_path / "run"
    pretrain.train(stream_run(out, data, "train.max_steps=5", "train.checkpoint_every=5"))
    logged = [json.loads(x) for x in (out / "bad_images.jsonl").read_text().splitlines()]
    assert {r["source"] for r in logged} == {"img_3.png", "img_17.png"}
    reset_accelerate()
    with pytest.raises(
        BadImagesError, match=r"img_\d+.png cannot be decoded .* 2 images cannot be decoded"
    ):
        pretrain.train(
            stream_run(tmp_path / "strict", data, "train.max_steps=5", "data.max_bad_images=1")
        )


@pytest.mark.slow
def test_a_worker_whose_files_hold_no_usable_row_stops_the_run_with_the_fix(tmp_path):
    """data.classes keeps one image, in the first file: the second worker's files give nothing in a
    whole epoch. Without the check the loop would wait for that worker forever."""
    data = parquet_stream(tmp_path / "data")
    cfg = stream_run(
        tmp_path / "run", data, "train.max_steps=2", "data.num_workers=2", "data.classes=[0]"
    )
    with pytest.raises(
        DataError, match=r"no decodable image in a whole epoch .* lower data.num_workers"
    ):
        pretrain.train(cfg)
    assert not (tmp_path / "run/checkpoints/step_2").exists()

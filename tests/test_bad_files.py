"""One policy for images that cannot be decoded, in every job: skipped, recorded once per file with
its first error, and past the job's limit an error whose first line names a file and the fix; and
``python -m mae.prepare --check`` listing them before any run."""

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Image as ImageFeature
from helpers import colour_folder, reset_accelerate
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mae import evaluate, pretrain
from mae.cli import main as cli_main
from mae.config import load_config
from mae.config.evaluation import EvalConfig, load_eval_config
from mae.data.bad_images import BAD_IMAGES, bad_images, log_bad_image
from mae.data.loading import DataError
from mae.errors import user_message
from mae.eval import finetune as ft
from mae.eval.probe import probe
from mae.prepare import main as prepare_main

pytestmark = pytest.mark.xdist_group("bad_files")  # one pretrained run shared by the module
BAD = {"corrupt.jpg", "empty.png", "truncated.jpg"}


def bad_folder(root: Path) -> Path:
    """Three colour classes of 8 images, and in each class one file no reader can decode: random
    bytes named .jpg, an empty .png, the first half of a valid JPEG."""
    colour_folder(root, per_class=8)
    rng = np.random.default_rng(1)
    (root / "c0/corrupt.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (root / "c1/empty.png").write_bytes(b"")
    jpeg = root / "c2/truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    return root


def recorded(folder: Path) -> list[str]:
    """The file names in ``folder``'s bad-image record, one per line as written."""
    return [Path(r["source"]).name for r in bad_images(folder / BAD_IMAGES)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return bad_folder(tmp_path_factory.mktemp("bad") / "data")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """A tiny VAE pretrained on the folder: 27 images, batch 8, three epochs, two loader workers
    that each meet the bad files every epoch."""
    out = tmp_path_factory.mktemp("run") / "vae"
    args = [
        "model.name=vae",
        "data.image_size=16",
        "model.widths=[8,16]",
        "model.latent_dim=8",
        f"data.dataset={data}",
        "data.num_workers=2",
        "train.batch_size=8",
        "train.max_steps=9",
        "train.log_every=3",
        "train.recon_images=2",
        f"output_dir={out}",
    ]
    pretrain.train(load_config(None, args))
    reset_accelerate()
    return out


def test_pretraining_skips_and_records_each_bad_file_once(run):
    assert (run / "export").is_dir()
    assert sorted(recorded(run)) == sorted(BAD)  # 3 epochs, 2 workers: still once each
    errors = {Path(r["source"]).name: r["error"] for r in bad_images(run / BAD_IMAGES)}
    assert errors["truncated.jpg"].startswith("OSError")


def eval_cfg(tmp_path: Path, data: Path, run: Path, *overrides: str) -> EvalConfig:
    return load_eval_config(
        None,
        [
            f"encoder={run}",
            f"data.dataset={data}",
            f"output_dir={tmp_path / 'eval'}",
            f"probe.cache_dir={tmp_path / 'cache'}",
            "data.num_workers=0",
            "data.holdout_fraction=0.25",
            "probe.epochs=3",
            "probe.warmup_epochs=1",
            *overrides,
        ],
    )


def test_probes_leave_bad_images_out_and_record_them_cached_or_not(tmp_path, data, run):
    for mode in ("linear", "knn"):  # knn: both splits' features from the cache
        res = probe(eval_cfg(tmp_path, data, run, f"mode={mode}"))
        assert sorted(recorded(tmp_path / "eval")) == sorted(BAD)
        assert sorted(Path(p).name for p in res["bad_images"]) == sorted(BAD)
        assert res["train_size"] + res["eval_size"] == 27
        # every decodable image scored or fitted once, none counted twice
        assert res["scored"] + res["fitted"] == 24
        assert res["features_from_cache"]["eval"] is (mode == "knn")
    # the paper's protocol: fresh training images each epoch, a bad one replaced
    res = probe(eval_cfg(tmp_path, data, run, "probe.cached=false", "probe.batch_size=8"))
    assert sorted(recorded(tmp_path / "eval")) == sorted(BAD)


def test_fine_tuning_skips_bad_images_and_scores_only_good_ones(tmp_path, data, run):
    cfg = eval_cfg(
        tmp_path,
        data,
        run,
        "mode=finetune",
        "finetune.epochs=2",
        "finetune.batch_size=8",
        "finetune.warmup_epochs=1",
        "finetune.mixup=0",
        "finetune.cutmix=0",
        "finetune.auto_augment=null",
        "finetune.log_every=1",
    )
    try:
        res = ft.finetune(cfg)
    finally:
        reset_accelerate()
    assert sorted(recorded(tmp_path / "eval")) == sorted(BAD)
    assert sorted(Path(p).name for p in res["bad_images"]) == sorted(BAD)
    held = ft.fit_and_eval_splits(cfg).scored
    files = {
        Path(r["path"]).name for r in held.cast_column("image", ImageFeature(decode=False))["image"]
    }
    assert res["eval_size"] == len(held) and res["scored"] == len(held) - len(BAD & files)


@pytest.mark.parametrize(
    "task, args",
    [
        ("reconstruct", []),
        ("reduce", ["--fit-split", "train"]),
        ("denoise", ["--fit-split", "train"]),
        ("anomaly", ["--normal", "0"]),
    ],
)
def test_every_evaluate_task_leaves_bad_images_out(tmp_path, run, task, args):
    """Scored on a test split holding the bad files (fitted, where a task fits, on a clean
    train split)."""
    both = tmp_path / "both"
    colour_folder(both / "train", per_class=8)
    bad_folder(both / "test")
    out = tmp_path / task
    argv = [task, "--run", str(run), "--dataset", str(both), "--out", str(out), *args]
    assert evaluate.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(recorded(out)) == sorted(BAD)
    assert sorted(Path(p).name for p in metrics["bad_images"]) == sorted(BAD)
    assert metrics["images"] == 24


def first_error_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("error: "))


def test_past_the_limit_the_first_line_names_a_file_and_the_fix(tmp_path, data, run, capsys):
    overrides = [
        f"encoder={run}",
        f"data.dataset={data}",
        f"output_dir={tmp_path / 'eval'}",
        f"probe.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=2",  # the error is met in a worker process
        "data.max_bad_images=1",
        "mode=knn",
    ]
    code = cli_main("probe", EvalConfig, load_eval_config, probe, overrides)
    line = first_error_line(capsys.readouterr().err)
    assert code == 1
    assert any(f"{name} cannot be decoded" in line for name in BAD), line
    assert "more than data.max_bad_images=1" in line and "raise data.max_bad_images" in line
    assert "python -m mae.prepare --check FOLDER" in line
    out, both = tmp_path / "reconstruct", tmp_path / "both"
    colour_folder(both / "train", per_class=2)
    bad_folder(both / "test")  # scored: the test split, whose 3 bad files are one too many
    code = evaluate.main(
        ["reconstruct", "--run", str(run), "--dataset", str(both), "--out", str(out)]
        + ["--max-bad-images", "2"]
    )
    line = first_error_line(capsys.readouterr().err)
    assert code == 1 and "3 images cannot be decoded, more than --max-bad-images=2" in line
    assert any(f"{name} cannot be decoded" in line for name in BAD), line


def test_the_pre_scan_lists_the_bad_files(tmp_path, data, capsys):
    assert prepare_main(["--check", str(data)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert sorted(Path(line.split(": ")[0]).name for line in lines[:-1]) == sorted(BAD)
    assert lines[-1] == f"3 of 27 image files under {data} cannot be decoded"
    clean = colour_folder(tmp_path / "clean", per_class=2)
    assert prepare_main(["--check", str(clean)]) == 0
    assert capsys.readouterr().out == f"all 6 image files under {clean} decode\n"
    # the same listing from a pool of processes, for a big folder
    many = colour_folder(tmp_path / "many", per_class=100, size=4)
    (many / "c1/empty.png").write_bytes(b"")
    assert prepare_main(["--check", str(many), "--workers", "2"]) == 1
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{many / 'c1/empty.png'}: ")


def _log_keys(args: tuple[Path, int]) -> None:
    log, worker = args
    for k in range(100):
        log_bad_image(log, f"file_{k}", f"file_{k}", f"error seen by {worker}")


def test_concurrent_writers_record_each_key_once(tmp_path):
    """Four processes meet the same 100 files at once (as loader workers meet a bad file every
    epoch); without the lock around read-then-append about 8 keys are written twice."""
    log = tmp_path / BAD_IMAGES
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_log_keys, [(log, w) for w in range(4)], chunksize=1)
    keys = [r["key"] for r in bad_images(log)]
    assert sorted(keys) == sorted(f"file_{k}" for k in range(100))


class Broken(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        raise DataError("image 3 is broken; remove it")


def test_an_error_raised_in_a_loader_worker_reads_as_its_own_message():
    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(caught.value).startswith("Caught DataError in DataLoader worker process 0")
    assert user_message(caught.value) == "image 3 is broken; remove it"
    assert user_message(DataError("plain")) == "plain"

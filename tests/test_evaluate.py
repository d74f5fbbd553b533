"""python -m mae.evaluate: known answers for the metrics, and every task end to end on tiny data."""

import json
import math

import pytest
import torch
from helpers import colour_folder, reset_accelerate

from mae import pretrain
from mae.config import load_config
from mae.data.loading import DataError, load_split
from mae.eval.metrics import detection_scores, image_metrics, psnr_summary
from mae.eval.pca import PCA
from mae.evaluate import main


def test_psnr_of_identical_images_is_infinite_and_handled():
    assert psnr_summary(torch.zeros(3)) == {
        "mse": 0.0,
        "psnr_db": "inf",
        "psnr_db_mean": "inf",
        "identical": 3,
    }
    mixed = psnr_summary(torch.tensor([0.0, 0.01, 0.0001]))
    assert mixed["identical"] == 1 and mixed["psnr_db_mean"] == pytest.approx(30.0)  # (20 + 40) / 2
    assert mixed["psnr_db"] == pytest.approx(-10 * math.log10(0.0101 / 3))
    x = torch.rand(2, 3, 16, 16)
    m = image_metrics(x, x)
    assert torch.equal(m["mse"], torch.zeros(2)) and torch.allclose(m["ssim"], torch.ones(2))
    # an 8x8 window fits too
    assert (image_metrics(torch.rand(2, 3, 8, 8), x[:, :, :8, :8])["ssim"] < 0.5).all()


def test_perfectly_separated_scores_give_auroc_and_aupr_one():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    scores = torch.tensor([0.1, 0.2, 0.15, 0.9, 0.8, 0.7, 0.95, 0.75])
    out = detection_scores(scores, labels, normal=[0])
    assert out["all"] == {"auroc": 1.0, "aupr": 1.0, "count": 5}
    assert set(out["per_class"]) == {"1", "2"} and out["per_class"]["1"]["auroc"] == 1.0
    flipped = detection_scores(-scores, labels, normal=[0])
    assert flipped["all"]["auroc"] == 0.0


def test_pca_reconstruction_error_is_the_sum_of_the_discarded_eigenvalues():
    torch.manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    pca = PCA(x, 2)
    comps, recon = pca.components, pca.project(x)
    eig = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)  # descending
    assert ((x - recon).pow(2).sum(1).mean()).item() == pytest.approx(
        eig[2:].sum().item(), rel=1e-9
    )
    assert torch.allclose(comps @ comps.T, torch.eye(2, dtype=torch.float64), atol=1e-10)


def test_data_classes_keeps_only_those_labels():
    ds = load_split(load_config(None, ["data.classes=[2,7]"]).data)
    assert set(ds["label"]) == {2, 7} and len(ds) == 600  # 300 per class in the sample
    with pytest.raises(DataError, match="selects no image"):
        load_split(load_config(None, ["data.classes=[42]"]).data)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    folder = colour_folder(root / "colours")
    out = root / "vae"
    args = [
        "model.name=vae",
        "data.image_size=16",
        "model.widths=[8,16]",
        "model.latent_dim=8",
        f"data.dataset={folder}",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.recon_images=2",
        f"output_dir={out}",
    ]
    pretrain.train(load_config(None, args))
    reset_accelerate()
    return out


def run_task(tmp_path, run, task, *args):
    out = tmp_path / task
    assert main([task, "--run", str(run), "--split", "train", "--out", str(out), *args]) == 0
    return json.loads((out / "metrics.json").read_text()), out


def test_every_task_end_to_end(tmp_path, vae_run):
    # --split train is the fit split: every task scores the 6 images held out of its 60
    rec, out = run_task(tmp_path, vae_run, "reconstruct")
    assert rec["images"] == 6 and (out / "reconstruct.png").is_file()
    assert (
        rec["eval_split"] == "holdout of train" and rec["scored_indices"] == rec["holdout_indices"]
    )
    # psnr_db is 10 log10(1 / the split's mean MSE), of pixels in [0, 1]
    assert rec["psnr_db"] == pytest.approx(-10 * math.log10(rec["mse"]), rel=1e-12)
    assert 0 < rec["mse"] < 1 and rec["ssim"] < 1
    den, out = run_task(
        tmp_path, vae_run, "denoise", "--corruption", "salt_pepper", "--level", "0.3"
    )
    assert (
        den["noisy"]["mse"] > 0
        and den["restored"]["psnr_db"] != "inf"
        and (out / "denoise.png").is_file()
    )
    assert den["pca_dims"] == 8 and den["pca"]["mse"] > 0  # the noisy image projected on PCA-8
    # PCA fitted on the 54 others, the true count (--fit-images asks up to 20,000)
    assert den["fit_images"] == len(den["fit_indices"]) == 54 and den["images"] == 6
    assert not set(den["fit_indices"]) & set(den["scored_indices"])
    ano, out = run_task(tmp_path, vae_run, "anomaly", "--normal", "0")
    assert set(ano["per_class"]) == {"1", "2"}
    # AUROC is P(anomalous score > normal score) (ties counting half): the AUROC of both anomalous
    # classes together is their count-weighted mean; float32 sums leave ~1e-7 per term
    per_class = ano["per_class"].values()
    weighted = sum(c["auroc"] * c["count"] for c in per_class) / ano["all"]["count"]
    assert ano["all"]["count"] == sum(c["count"] for c in per_class)
    assert ano["all"]["auroc"] == pytest.approx(weighted, abs=1e-5)
    assert (out / "anomaly_scores.png").is_file()
    red, out = run_task(tmp_path, vae_run, "reduce", "--fit-split", "train")
    assert (
        red["dims"] == 8
        and set(red["linear"]) == {"encoder", "pca"}
        and set(red["knn"]) == {"encoder", "pca"}
    )
    assert red["reconstruction"]["pca"]["mse"] < 0.2 and (out / "codes_pca.png").is_file()
    smp, out = run_task(tmp_path, vae_run, "sample", "-n", "9")
    assert (smp["samples"], smp["interpolations"], smp["steps"], smp["task"]) == (9, 3, 8, "sample")
    assert (out / "samples.png").is_file() and (out / "interpolations.png").is_file()


def test_both_tools_hold_out_the_same_images_and_fit_on_none_of_them(tmp_path, vae_run, capsys):
    """A folder without a test split: at their defaults, python -m mae.evaluate and finetune.py
    hold out the same images of train, each says so in one line, and PCA (and reduce's probes)
    fit only on the others."""
    from mae.config.evaluation import load_eval_config
    from mae.eval.probe import fit_and_eval_splits, probe

    out = tmp_path / "reduce"
    assert main(["reduce", "--run", str(vae_run), "--out", str(out)]) == 0
    red = json.loads((out / "metrics.json").read_text())
    folder = red["dataset"]
    line = (
        f"no test or validation split in {folder}: holding out 10% of train "
        "(6 of 60 images, stratified, seed 0)"
    )
    assert capsys.readouterr().out.splitlines().count(line) == 1
    held = red["holdout_indices"]
    assert red["eval_split"] == "holdout of train" and red["scored_indices"] == held
    assert red["images"] == 6 and red["fit_split"] == "train"
    assert red["fit_images"] == len(red["fit_indices"]) == 54  # not the 20,000 asked
    assert not set(red["fit_indices"]) & set(held) and len(set(red["fit_indices"])) == 54
    common = [f"encoder={vae_run}", f"data.dataset={folder}", "data.num_workers=0"]
    cfg = load_eval_config(
        None,
        [*common, "mode=knn", f"output_dir={tmp_path / 'knn'}", f"probe.cache_dir={tmp_path}"],
    )
    probe(cfg)
    assert capsys.readouterr().out.splitlines().count(line) == 1
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert res["holdout_indices"] == held and res["eval_size"] == 6 and res["train_size"] == 54
    assert res["holdout_indices_sha256"] == red["holdout_indices_sha256"]
    # the linear probe and fine-tuning take their rows from the same call
    for mode in ("linear", "finetune"):
        rows = fit_and_eval_splits(load_eval_config(None, [*common, f"mode={mode}"]))
        assert rows.record["holdout_indices"] == held and rows.line == line


def test_bad_requests_are_one_clear_line(tmp_path, vae_run, capsys):
    assert (
        main(
            [
                "anomaly",
                "--run",
                str(vae_run),
                "--split",
                "train",
                "--normal",
                "0,1,2",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "not all" in capsys.readouterr().err
    assert (
        main(["reconstruct", "--run", str(vae_run), "--mask-ratio", "0.5", "--out", str(tmp_path)])
        == 2
    )
    assert "applies to MAE runs" in capsys.readouterr().err
    assert main(["reconstruct", "--run", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_report_gathers_probes_and_tasks_per_run(tmp_path, vae_run):
    from mae.config.evaluation import load_eval_config
    from mae.eval.probe import probe

    assert (
        main(["reconstruct", "--run", str(vae_run), "--split", "train", "--max-images", "16"]) == 0
    )
    assert main(["anomaly", "--run", str(vae_run), "--split", "train", "--normal", "1"]) == 0
    for task in ("reduce", "denoise"):
        assert main([task, "--run", str(vae_run), "--split", "train", "--fit-images", "40"]) == 0
    folder = json.loads((vae_run / "evaluate/reconstruct/metrics.json").read_text())["dataset"]
    for source in (str(vae_run), f"random:{vae_run}"):
        name = "random" if source.startswith("random") else "run"
        overrides = [
            f"encoder={source}",
            "mode=knn",
            f"data.dataset={folder}",
            "data.num_workers=0",
        ]
        overrides += [
            f"output_dir={tmp_path / 'probes' / name}",
            f"probe.cache_dir={tmp_path / 'cache'}",
        ]
        probe(load_eval_config(None, overrides))
    reset_accelerate()
    out = tmp_path / "report"
    assert (
        main(
            [
                "report",
                "--run",
                str(vae_run),
                "--results",
                str(tmp_path / "probes"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads((out / "report.json").read_text())["runs"]
    knn = json.loads((tmp_path / "probes/run/results.json").read_text())["top1"]
    rec = json.loads((vae_run / "evaluate/reconstruct/metrics.json").read_text())
    assert rows[0]["method"] == "vae" and rows[0]["knn"] == knn and "random_knn" in rows[0]
    ano = json.loads((vae_run / "evaluate/anomaly/metrics.json").read_text())
    assert rows[0]["reconstruct_psnr"] == rec["psnr_db"]
    assert rows[0]["anomaly_auroc"] == ano["all"]["auroc"]
    table = (out / "report.md").read_text()
    assert f"| vae | 6 | – | {100 * knn:.1f}% |" in table
    assert all((out / f).is_file() for f in rows[0]["figures"]) and len(rows[0]["figures"]) == 4
    # the PCA baseline's row: reconstruction and denoising by projection, linear and kNN from reduce
    red = json.loads((vae_run / "evaluate/reduce/metrics.json").read_text())
    den = json.loads((vae_run / "evaluate/denoise/metrics.json").read_text())
    pca_row = next(
        line for line in table.splitlines() if line.startswith("| PCA-8 (pixels) |")
    ).split(" | ")
    assert pca_row[6] == f"{red['reconstruction']['pca']['psnr_db']:.2f}"
    assert (
        pca_row[8] == f"{den['pca']['psnr_db']:.2f}"
        and pca_row[2] == f"{100 * red['linear']['pca']:.1f}%†"
    )
    # and one row per results.json
    results = json.loads((out / "report.json").read_text())["results"]
    assert sorted(r["encoder"] for r in results) == [str(vae_run), f"random:{vae_run}"]
    # 3 classes: top-5 would always hold the right one, so it is not shown
    assert (
        all(r["top5"] is None for r in results)
        and f"| {vae_run} | knn | {100 * knn:.2f}% | – |" in table
    )
    # a kNN on standardised features is a column of its own, beside the plain one
    std_dir = tmp_path / "probes" / "run_standardised"
    overrides = [
        f"encoder={vae_run}",
        "mode=knn",
        "probe.knn_features=standardised",
        f"data.dataset={folder}",
    ]
    overrides += [
        "data.num_workers=0",
        f"output_dir={std_dir}",
        f"probe.cache_dir={tmp_path / 'cache'}",
    ]
    probe(load_eval_config(None, overrides))
    reset_accelerate()
    assert (
        main(
            [
                "report",
                "--run",
                str(vae_run),
                "--results",
                str(tmp_path / "probes"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    row = json.loads((out / "report.json").read_text())["runs"][0]
    assert (
        row["knn"] == knn
        and row["knn_standardised"] == json.loads((std_dir / "results.json").read_text())["top1"]
    )
    assert "| kNN top-1, standardised |" in (out / "report.md").read_text()
    assert main(["report", "--run", str(tmp_path), "--out", str(out)]) == 2  # not a run
    assert main(["report", "--out", str(out)]) == 2  # neither runs nor results


def test_denoise_defaults_to_the_corruption_the_run_trained_with(tmp_path):
    folder = colour_folder(tmp_path / "colours", per_class=6)
    out = tmp_path / "dae"
    args = [
        "model.name=dae",
        "model.corruption=masking",
        "model.noise_level=0.25",
        "model.corruption_patch=2",
        "data.image_size=16",
        "model.widths=[8,16]",
        "model.latent_dim=8",
        f"data.dataset={folder}",
        "data.num_workers=0",
        "train.batch_size=6",
        "train.max_steps=2",
        "train.recon_images=2",
        f"output_dir={out}",
    ]
    pretrain.train(load_config(None, args))
    reset_accelerate()
    den, _ = run_task(tmp_path, out, "denoise", "--fit-images", "18")
    assert (den["corruption"], den["level"], den["patch"]) == ("masking", 0.25, 2)
    other, _ = run_task(tmp_path, out, "denoise", "--fit-images", "18", "--corruption", "gaussian")
    # another kind: its own
    assert (other["corruption"], other["level"], other["patch"]) == (
        "gaussian",
        0.2,
        1,
    )
    finer, _ = run_task(tmp_path, out, "denoise", "--fit-images", "18", "--patch", "1")
    assert (finer["corruption"], finer["level"], finer["patch"]) == ("masking", 0.25, 1)

"""Helpers of the benchmark scripts in bench/ (the scripts themselves are run by hand)."""

import argparse
import datetime
import json
import sys

import pytest
import torch
from helpers import ROOT, TINY

sys.path.insert(0, str(ROOT / "bench"))

from budget import budget_table, flops_per_image, in_order, stage_overrides  # noqa: E402
from common import (  # noqa: E402
    add_out,
    add_step_comparison,
    device_description,
    medians,
    rate_cells,
    rate_header,
    summary,
    timestamp,
    torch_device,
    write_json,
)
from sweep import write_doc  # noqa: E402


def test_a_rerun_sweep_rewrites_its_table_and_keeps_the_written_sections(tmp_path):
    doc = tmp_path / "sweep.md"
    write_doc(doc, "Measured with `a`.\n\n| old |\n")
    doc.write_text(doc.read_text() + "\n## What it says\n\nThe old table says this.\n")
    write_doc(doc, "Measured with `b`.\n\n| new |\n")
    assert (
        doc.read_text()
        == "Measured with `b`.\n\n| new |\n\n## What it says\n\nThe old table says this.\n"
    )


def _row(top1: float) -> dict:
    probes = {
        f"{kind}_{mode}": top1
        for kind in ("pretrained", "random")
        for mode in ("linear", "knn", "knn_standardised")
    }
    return {"steps": 10, "images": 1280, "wall_s": 5.0} | probes


def test_a_method_pretrained_again_keeps_its_place_in_the_budget_table():
    # sparse_ae's row was removed from results.json and computed again: the dict now holds it last
    rows = in_order({"ae": _row(0.5), "cae": _row(0.3), "sparse_ae": _row(0.4)})
    assert list(rows) == ["ae", "sparse_ae", "cae"]
    pixels = {"linear": 0.387, "knn": 0.454, "knn_standardised": 0.461}
    table = budget_table({"budget": 300.0, "pixels": pixels, "methods": rows})
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in body] == ["| ae", "| sparse_ae", "| cae"]
    # a row from before FLOPs were counted shows none
    assert body[1] == "| sparse_ae | 10 | 1,280 | – | – | 5 s | " + " | ".join(["40.0%"] * 6) + " |"
    # 1,280 images of 500 GFLOPs each: 0.64 PFLOPs in all
    rows["ae"]["flops_per_image"] = 5e11
    table = budget_table({"budget": 300.0, "pixels": pixels, "methods": rows})
    assert "| ae | 10 | 1,280 | 500.00 | 0.64 | 5 s |" in table
    assert "Budget: 300 s" in table and "linear 38.7%" in table


def test_a_stacked_sweep_gives_each_greedy_stage_a_sixth_of_its_steps_unless_a_variant_sets_it():
    assert stage_overrides("stacked_ae", 2104) == ["model.stage_steps=350"]
    assert stage_overrides("stacked_ae", 2104, ["model.stage_steps=175", "train.blr=1e-3"]) == []
    assert stage_overrides("stacked_ae", 3) == ["model.stage_steps=1"]
    assert stage_overrides("ae", 2104) == []


def test_the_summary_of_repeated_timings_is_their_median_min_and_max():
    assert summary([3.0, 1.0, 2.0]) == {
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "samples": [3.0, 1.0, 2.0],
    }
    # the middle value, not the mean (4.33 and 4.25 here); of an even count, the middle two's mean
    assert summary([10.0, 1.0, 2.0])["median"] == 2.0
    assert summary([4.0, 1.0, 2.0, 10.0])["median"] == 3.0
    assert medians({"a": [3.0, 1.0, 2.0], "b": [10.0, 30.0]}) == {"a": 2.0, "b": 20.0}


def test_rate_cells_line_up_under_their_titles():
    assert rate_header(6) == " img/s    min    max"
    assert rate_cells([3.0, 1.04, 2.0], 6) == "   2.0    1.0    3.0"
    assert rate_cells([1234.56], 8) == "  1234.6   1234.6   1234.6"


def test_a_written_result_reads_back_equal_and_its_folder_is_made(tmp_path, capsys):
    result = {"settings": {"batch": 256, "device": "2 CPU threads"}, "median": {"ours-fp32": 1.5}}
    path = tmp_path / "not" / "yet" / "result.json"
    write_json(str(path), result)
    assert json.loads(path.read_text()) == result
    assert path.read_text().endswith("}\n")
    assert capsys.readouterr().out == f"wrote {path}\n"


def test_out_defaults_to_the_results_folder():
    parser = argparse.ArgumentParser()
    add_out(parser, "x.json")
    assert parser.parse_args([]).out == str(ROOT / "bench" / "results" / "x.json")
    assert parser.parse_args(["--out", "y.json"]).out == "y.json"


def test_a_step_comparison_takes_its_own_defaults_and_only_its_settings():
    parser = argparse.ArgumentParser()
    add_step_comparison(parser, {"tiny": (), "base": ()}, steps=3, warmup=2)
    # --threads and --device default to what this machine has
    defaults = {
        k: v for k, v in vars(parser.parse_args([])).items() if k not in ("threads", "device")
    }
    assert defaults == {"setting": "tiny", "batch": None, "repeats": 5, "steps": 3, "warmup": 2}
    assert parser.parse_args(["--setting", "base", "--steps", "7"]).steps == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["--setting", "large"])


def test_cuda_without_a_gpu_is_an_error_that_names_the_option(monkeypatch):
    assert torch_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda but no GPU is visible"):
        torch_device("cuda")


def test_the_machine_recorded_beside_a_result():
    assert device_description(torch.device("cpu"), 3) == "3 CPU threads"
    stamp = datetime.datetime.fromisoformat(timestamp())
    assert stamp.tzinfo is not None and stamp.microsecond == 0
    assert abs((datetime.datetime.now().astimezone() - stamp).total_seconds()) < 60


def test_the_flops_column_counts_masks_per_image_and_the_teacher():
    """K masks cost K passes of the encoder and decoder (the patch embedding and the targets are
    computed once per image, so a little under K times); a teacher adds its forward over the whole
    image. FlopCounterMode: no noise moves these numbers."""
    one, two, teacher = (
        flops_per_image([], [*TINY, *extra])
        for extra in (
            [],
            ["train.masks_per_image=2"],
            ["model.target=teacher", "model.teacher_layers=2"],
        )
    )
    assert one < two < 2 * one
    assert teacher > one

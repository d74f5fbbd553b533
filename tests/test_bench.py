"""Helpers of the benchmark scripts in bench/ (the scripts themselves are run by hand)."""

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from budget import budget_table, in_order, stage_overrides  # noqa: E402
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
    assert body[1] == "| sparse_ae | 10 | 1,280 | 5 s | " + " | ".join(["40.0%"] * 6) + " |"
    assert "Budget: 300 s" in table and "linear 38.7%" in table


def test_a_stacked_sweep_gives_each_greedy_stage_a_sixth_of_its_steps_unless_a_variant_sets_it():
    assert stage_overrides("stacked_ae", 2104) == ["model.stage_steps=350"]
    assert stage_overrides("stacked_ae", 2104, ["model.stage_steps=175", "train.blr=1e-3"]) == []
    assert stage_overrides("stacked_ae", 3) == ["model.stage_steps=1"]
    assert stage_overrides("ae", 2104) == []

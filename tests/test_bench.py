"""Helpers of the benchmark scripts in bench/ (the scripts themselves are run by hand)."""

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from sweep import write_doc  # noqa: E402


def test_a_rerun_sweep_rewrites_its_table_and_keeps_the_written_sections(tmp_path):
    doc = tmp_path / "sweep.md"
    write_doc(doc, "Measured with `a`.\n\n| old |\n")
    doc.write_text(doc.read_text() + "\n## What it says\n\nThe old table says this.\n")
    write_doc(doc, "Measured with `b`.\n\n| new |\n")
    assert doc.read_text() == "Measured with `b`.\n\n| new |\n\n## What it says\n\nThe old table says this.\n"

"""The one hold-out rule (mae.data.holdout): which rows are fitted on and which are scored."""

import hashlib
import json

import datasets
import pytest

from mae.data.holdout import evaluation_rows, random_holdout, stratified_holdout
from mae.data.loading import DataError


def splits(**sizes_and_labels) -> datasets.DatasetDict:
    """Splits of rows that carry their own id; ``name=[labels]`` (ClassLabel) or ``name=N`` (no
    labels)."""
    out = {}
    for name, spec in sizes_and_labels.items():
        if isinstance(spec, int):
            out[name] = datasets.Dataset.from_dict({"id": list(range(spec))})
        else:
            features = datasets.Features(
                {"id": datasets.Value("int64"), "label": datasets.ClassLabel(num_classes=3)}
            )
            rows = {"id": list(range(len(spec))), "label": spec}
            out[name] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(out)


def test_stratified_holdout_is_seeded_and_keeps_proportions():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    fit, held = stratified_holdout(labels, 0.1, seed=3)
    assert sorted(fit + held) == list(range(100)) and not set(fit) & set(held)
    assert [sum(labels[i] == c for i in held) for c in range(3)] == [5, 3, 2]
    assert stratified_holdout(labels, 0.1, seed=3) == (fit, held)
    assert stratified_holdout(labels, 0.1, seed=4)[1] != held
    small = [0, 0, 1, 1, 1, 2]
    # a big fraction still leaves every class a fit image
    fit, held = stratified_holdout(small, 0.75, seed=0)
    assert {small[i] for i in fit} == {0, 1, 2} and {small[i] for i in held} == {0, 1}


def test_random_holdout_is_seeded_and_leaves_both_parts_non_empty():
    fit, held = random_holdout(202, 0.1, seed=0)
    assert len(held) == 20 and sorted(fit + held) == list(range(202))
    assert random_holdout(202, 0.1, seed=0) == (fit, held) and random_holdout(202, 0.1, 1) != (
        fit,
        held,
    )
    assert random_holdout(2, 0.01, 0)[1] != [] and random_holdout(2, 0.99, 0)[0] != []


def test_without_a_test_split_a_stratified_share_is_held_out_and_recorded():
    labels = [0] * 10 + [1] * 10 + [2] * 10
    rows = evaluation_rows(splits(train=labels), "FOLDER", "train", None, 0.1, 0)
    assert rows.line == (
        "no test or validation split in FOLDER: holding out 10% of train "
        "(3 of 30 images, stratified, seed 0)"
    )
    held = rows.record["holdout_indices"]
    assert held == rows.scored_indices == sorted(rows.scored["id"]) and len(held) == 3
    assert sorted({labels[i] for i in held}) == [0, 1, 2]  # one of each class
    assert rows.fit_indices == sorted(rows.fit["id"]) and not set(held) & set(rows.fit_indices)
    assert sorted(held + rows.fit_indices) == list(range(30))
    assert rows.record == {
        "eval_split": "holdout of train",
        "holdout_fraction": 0.1,
        "holdout_seed": 0,
        "holdout_size": 3,
        "holdout_stratified": True,
        "holdout_indices": held,
        "holdout_indices_sha256": hashlib.sha256(json.dumps(held).encode()).hexdigest(),
    }


def test_unlabelled_data_is_held_out_at_random():
    rows = evaluation_rows(splits(train=202), "FOLDER", "train", None, 0.1, 0)
    assert rows.line.endswith(
        "holding out 10% of train (20 of 202 images, random, no labels, seed 0)"
    )
    assert rows.record["holdout_indices"] == random_holdout(202, 0.1, 0)[1]
    assert rows.record["holdout_stratified"] is False and len(rows.fit) == 182


def test_a_test_split_is_scored_whole_and_nothing_is_held_out():
    dsd = splits(train=[0, 1, 2] * 4, test=[0, 1, 2])
    rows = evaluation_rows(dsd, "FOLDER", "train", None, 0.1, 0)
    assert rows.line is None and rows.record == {"eval_split": "test"}
    assert (len(rows.fit), len(rows.scored)) == (12, 3) and rows.scored_indices == [0, 1, 2]
    # an unlabelled test split (labels -1) of labelled data is passed over
    dsd["test"] = (
        dsd["test"].cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1})
    )
    rows = evaluation_rows(dsd, "FOLDER", "train", None, 0.25, 0)
    assert rows.line.startswith("no labelled test or validation split in FOLDER: holding out 25%")


def test_asking_to_score_the_fit_split_holds_out_of_it():
    dsd = splits(train=[0, 1, 2] * 10, test=[0, 1, 2])
    rows = evaluation_rows(
        dsd, "D", "train", "train", 0.1, 0, fit_key="--fit-split", eval_key="--split"
    )
    assert rows.line.startswith("--split=train is the split fitted on (--fit-split): holding out")
    assert rows.record["eval_split"] == "holdout of train" and len(rows.scored) == 3
    # the same rows as without a test split: one rule, whatever led to it
    alone = evaluation_rows(splits(train=[0, 1, 2] * 10), "D", "train", None, 0.1, 0)
    assert rows.record["holdout_indices"] == alone.record["holdout_indices"]
    with pytest.raises(DataError, match="leaves none to score"):
        evaluation_rows(splits(train=1), "D", "train", None, 0.1, 0)

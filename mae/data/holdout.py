"""Which rows an evaluation fits on and which it scores: the one rule that ``finetune.py`` and
``python -m mae.evaluate`` share, so that the two never disagree on what was held out.

The scored split is the one asked for. With none asked, it is the dataset's ``test``, else its
``validation``, each passed over when the fit split is labelled and this one's labels are missing
(hub test splits often come with every label -1). With neither, or when the split asked for is the
fit split itself, a seeded share of the fit split is held out: stratified by class where there are
labels, at random otherwise. Whatever is fitted (a probe, a classifier, PCA) then never sees an
image it is scored on, and two tools given the same folder, fraction and seed hold out the same
rows. The held-out rows are recorded with their digest, so a result says exactly what it scored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from mae.data.loading import DataError, label_column, pick_split


@dataclass(frozen=True)
class EvalRows:
    """The rows fitted on and the rows scored, and how they were chosen."""

    fit: datasets.Dataset
    scored: datasets.Dataset
    fit_indices: list[int]  # rows of the fit split, as indices into it
    # rows scored, as indices into their split (into the fit split when held out of it)
    scored_indices: list[int]
    record: dict[str, Any]  # for results.json: eval_split, and holdout_* when rows were held out
    line: str | None  # what was held out and why, for the console; None when nothing was


def evaluation_rows(
    splits: datasets.DatasetDict,
    source: str,
    fit_split: str,
    eval_split: str | None,
    fraction: float,
    seed: int,
    label: str | None = None,
    *,
    fit_key: str = "data.split",
    eval_key: str = "data.eval_split",
) -> EvalRows:
    """The fit and scored rows of dataset ``source`` (its ``splits``). ``eval_split`` None: the
    default above; ``label``: the label column (None: the first ClassLabel); ``fit_key`` and
    ``eval_key`` name the settings that chose the splits, for messages."""
    fit = pick_split(splits, source, fit_split, fit_key)
    if eval_split is None:
        eval_split = default_eval_split(splits, fit, fit_split, label)
        unlabelled = {"test", "validation"} & set(splits) - {fit_split}
        why = f"no {'labelled ' if unlabelled else ''}test or validation split in {source}"
    else:
        why = f"{eval_key}={eval_split} is the split fitted on ({fit_key})"
    if eval_split is None or eval_split == fit_split:
        return hold_out(fit, fit_split, fraction, seed, label, why)
    scored = pick_split(splits, source, eval_split, eval_key)
    return EvalRows(
        fit,
        scored,
        list(range(len(fit))),
        list(range(len(scored))),
        {"eval_split": eval_split},
        None,
    )


def default_eval_split(
    splits: datasets.DatasetDict, fit: datasets.Dataset, fit_split: str, label: str | None
) -> str | None:
    """``test``, else ``validation``, other than the fit split; one without labels only when the
    fit split has none either (a probe could not score it). None: there is neither."""
    wanted = label_column(fit, label)
    for name in ("test", "validation"):
        if name == fit_split or name not in splits:
            continue
        ds = splits[name]
        if wanted is None or (wanted in ds.column_names and len(ds) and max(ds[wanted]) >= 0):
            return name
    return None


def hold_out(
    ds: datasets.Dataset, split: str, fraction: float, seed: int, label: str | None, why: str
) -> EvalRows:
    """``fraction`` of ``ds`` (split ``split``) held out, seeded; ``why`` opens the line that says
    so."""
    col = label_column(ds, label)
    if col is None:
        fit, held = random_holdout(len(ds), fraction, seed)
    else:
        fit, held = stratified_holdout(ds[col], fraction, seed)
    if not held:
        raise DataError(
            f"{why}, and holding out {fraction:g} of the {len(ds)} images of {split!r} leaves none "
            "to score; give a larger fraction or a dataset with a test split"
        )
    how = "stratified" if col is not None else "random, no labels"
    line = (
        f"{why}: holding out {100 * fraction:g}% of {split} ({len(held)} of {len(ds)} images, "
        f"{how}, seed {seed})"
    )
    record = {
        "eval_split": f"holdout of {split}",
        "holdout_fraction": fraction,
        "holdout_seed": seed,
        "holdout_size": len(held),
        "holdout_stratified": col is not None,
        "holdout_indices": held,
        "holdout_indices_sha256": hashlib.sha256(json.dumps(held).encode()).hexdigest(),
    }
    return EvalRows(ds.select(fit), ds.select(held), fit, held, record, line)


def stratified_holdout(
    labels: list[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded split of indices keeping class proportions: (fit, held out). Every class with at least
    two images keeps one in each part."""
    rng = np.random.default_rng(seed)
    labels_np = np.asarray(labels)
    fit, held = [], []
    for c in np.unique(labels_np):
        idx = rng.permutation(np.flatnonzero(labels_np == c))
        n = _held_count(len(idx), fraction)
        held.extend(idx[:n].tolist())
        fit.extend(idx[n:].tolist())
    return sorted(fit), sorted(held)


def random_holdout(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(size)``: (fit, held out), each non-empty from two images on."""
    idx = np.random.default_rng(seed).permutation(size)
    n = _held_count(size, fraction)
    return sorted(idx[n:].tolist()), sorted(idx[:n].tolist())


def _held_count(size: int, fraction: float) -> int:
    """Images held out of ``size``: the fraction rounded, at least one, and one left to fit."""
    return min(size - 1, max(1, round(fraction * size))) if size > 1 else 0

"""What autoencoders are used for, measured:
``python -m mae.evaluate TASK --run RUN_DIR [options]``.

Tasks (each writes ``metrics.json`` and PNGs into ``--out``, default ``RUN_DIR/evaluate/TASK``):

- ``reconstruct``: MSE, PSNR and SSIM (pixels in [0, 1]) between the scored images and their
  reconstructions, and a grid (input as the encoder saw it | reconstruction | original). For MAE
  the reconstruction keeps the visible patches and predicts the hidden ones (``--mask-ratio``).
- ``denoise``: corrupt the split (``--corruption``, ``--level``; default the corruption a denoising
  run trained with, else Gaussian std 0.2), reconstruct, PSNR before and after, and of the noisy
  image projected on PCA with as many components as the code; grid (noisy | restored | PCA | clean).
- ``anomaly``: classes ``--normal`` are normal, every other class an anomaly; the score of an
  image is its reconstruction error. AUROC and AUPR (anomaly = positive) per anomalous class and
  for all of them, and the two score histograms. Train on the normal classes only with
  ``pretrain.py data.classes=[...]``, or score with a model trained on everything.
- ``reduce``: the encoder as dimensionality reduction against PCA with as many components as the
  code has (``mae.eval.pca``, pixel space): reconstruction PSNR of both on the split (printed
  side by side), linear-probe and kNN accuracy of both (fitted on ``--fit-split``), and a 2-D PCA
  scatter of the codes coloured by class.
- ``sample`` (generative models): a grid of prior samples and latent interpolations between
  pairs of the split's images.
- ``report``: the tables of ``mae.eval.report`` (runs with their probes and the tasks above;
  every ``results.json`` under ``--results``) as ``report.md`` + ``report.json`` in ``--out``.

The rows scored are those of ``--split``; by default ``test``, else ``validation``, else a seeded
holdout of ``--fit-split``, which is also what ``--split`` naming the fit split means, so that a
baseline is never fitted on an image it is scored on. The rule and its defaults are
``finetune.py``'s (``mae.data.holdout``): for the same folder both hold out the same images, say
so in one line, and record the held-out indices in their results.

An image that cannot be decoded is left out of every task, listed once in ``bad_images.jsonl`` in
``--out`` and named in ``metrics.json``; more than ``--max-bad-images`` (default: the run's
``data.max_bad_images``) stop the task with exit code 1.

PSNR of identical images is infinite: ``psnr_db`` is 10 log10(1 / mean MSE) over the split
(``"inf"`` when every image is reproduced exactly), ``psnr_db_mean`` the mean over the images
that differ, and ``identical`` counts the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mae.config.evaluation import EvalConfig, EvalDataConfig
from mae.errors import EvaluateError, UserError, user_message

TASKS = ("reconstruct", "denoise", "anomaly", "reduce", "sample", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mae.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("task", choices=TASKS)
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        help="a run directory written by pretrain.py (report: several)",
    )
    parser.add_argument(
        "--results",
        action="append",
        default=[],
        help="report: finetune.py output_dirs or folders holding them",
    )
    parser.add_argument("--out", help="output folder (default RUN/evaluate/TASK)")
    parser.add_argument("--dataset", help="data.dataset to evaluate on (default: the run's)")
    parser.add_argument(
        "--split",
        help="the split scored (default: test, else validation, else a holdout of --fit-split; "
        "--fit-split itself: a holdout of it)",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=EvalDataConfig.holdout_fraction,
        help="the share of --fit-split held out to score when it is the split scored "
        "(finetune.py's data.holdout_fraction)",
    )
    parser.add_argument(
        "--max-images", type=int, default=2000, help="the first N images of the rows scored"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    # finetune.py's default: the same seed holds out the same images
    parser.add_argument("--seed", type=int, default=EvalConfig.seed)
    parser.add_argument(
        "--max-bad-images",
        type=int,
        help="undecodable images skipped before the task stops (default: the run's "
        "data.max_bad_images)",
    )
    parser.add_argument(
        "--mask-ratio", type=float, help="reconstruct: MAE mask ratio (default: the run's)"
    )
    parser.add_argument(
        "--corruption",
        choices=("gaussian", "masking", "salt_pepper"),
        help="denoise: default the run's own (a dae run's model.corruption), else gaussian",
    )
    parser.add_argument(
        "--level", type=float, help="denoise: noise std or fraction (default the run's, else 0.2)"
    )
    parser.add_argument(
        "--patch", type=int, help="denoise: side of masked squares (default the run's, else 1)"
    )
    parser.add_argument("--normal", default="0", help="anomaly: comma-separated normal class ids")
    parser.add_argument(
        "--fit-split",
        default=EvalDataConfig.split,
        help="the split baselines fit on (reduce, denoise: PCA and probes), and the one held out "
        "of where there is no test split; never on a row scored",
    )
    parser.add_argument(
        "--fit-images",
        type=int,
        default=20000,
        help="reduce, denoise: the first N of --fit-split's rows that are not scored",
    )
    parser.add_argument("-n", type=int, default=64, help="sample: images to generate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.task == "report":
            from mae.eval.report import write_report

            if not args.out:
                raise EvaluateError(
                    "report needs --out, the folder for report.md, report.json and the figures"
                )
            print(write_report(args.run, args.results, Path(args.out)), end="")
            return 0
        # the models, the data and the figures, loaded once the command line is known good
        from mae.eval import tasks

        out = tasks.run(args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return e.exit_code
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate an encoder:
``[accelerate launch] finetune.py [--config FILE] encoder=SOURCE [dotted.key=value ...]``.

``mode=linear`` (default) fits a linear probe on frozen features, ``mode=knn`` a kNN classifier,
``mode=finetune`` trains the whole network with a classifier head (the MAE paper's recipe; use
``accelerate launch`` for several processes). Each writes ``results.json`` (top-1, top-5, per-class
accuracy, config, encoder digest) into ``output_dir`` and prints one line per metric. SOURCE: an
export dir, a run dir, hf-hub:ORG/NAME (a Hugging Face ViTMAE repository), timm:NAME.TAG (timm's
pretrained weights; timm:NAME alone: random init), random:DIR (the same architecture at random init)
or pixels:SIZE (raw pixels; probes only). See docs/evaluation.md and docs/interop.md.
"""

import sys

from mae.cli import main
from mae.config.evaluation import EvalConfig, load_eval_config


def run(cfg: EvalConfig) -> None:
    # torch, datasets: only once the config is known to be valid
    if cfg.mode == "finetune":
        from mae.eval.finetune import finetune

        results = finetune(cfg)
    else:
        from mae.eval.probe import probe

        results = probe(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        # top-5 says something only where there are more than 5 classes
        for key in ("top1", "top5") if len(results["per_class"]) > 5 else ("top1",):
            print(f"{key}: {results[key]:.4f}")
        print(f"results: {cfg.output_dir}/results.json")


if __name__ == "__main__":
    description = __doc__.split("\n\n")[0]
    sys.exit(main(description, EvalConfig, load_eval_config, run, sys.argv[1:]))

"""Encoder export in timm's own format: ``model.safetensors`` + ``config.json``.

``timm.create_model("local-dir:EXPORT_DIR", pretrained=True)`` builds the matching
``VisionTransformer`` and loads the weights strictly. The export is written to a temporary
folder and swapped in only when complete, so a failure never destroys an earlier export.

Command line: ``python -m mae.export RUN_DIR [--checkpoint PATH] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

from mae.config import Config, from_dict, read_yaml, to_dict
from mae.data.images import timm_data_config
from mae.interop import to_hf
from mae.model_card import write_card
from mae.models import build_model
from mae.run import checkpoint as ckpt


def export_encoder(
    model: torch.nn.Module, cfg: Config, out_dir: str | Path, trained: dict | None = None
) -> Path:
    """Write ``model.encoder`` (a timm model) with the run's preprocessing into ``out_dir``, and
    with ``trained`` (steps, epochs, images, effective batch) its model card
    (``mae.model_card``)."""
    encoder = model.encoder
    if not hasattr(encoder, "pretrained_cfg"):
        raise TypeError(
            f"{type(encoder).__name__} is not a timm model; it cannot be exported in timm's format"
        )
    d = cfg.data
    data_config = timm_data_config(d.channels, d.hw, d.mean, d.std)
    card = None if trained is None else (lambda tmp: write_card(tmp, cfg, trained))
    tag = f"mae_{cfg.model.preset or 'custom'}"
    return save_timm(encoder, out_dir, data_config, tag, card)


def export_model(
    model: torch.nn.Module, cfg: Config, out_dir: str | Path, trained: dict | None = None
) -> Path:
    """A run's export: timm's format when the encoder is a timm model (MAE); otherwise the project's
    own — the whole autoencoder's weights (``model.safetensors``, decoder included) beside the run's
    ``config.yaml`` — which ``finetune.py encoder=`` and ``mae.export.load_run_model`` read."""
    if hasattr(model.encoder, "pretrained_cfg"):
        return export_encoder(model, cfg, out_dir, trained)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    return replace_dir(Path(out_dir), write)


def trained_record(steps: int, derived: dict) -> dict:
    """What a model card says of a run's length: its steps, epochs, images and batch
    (``derived``: the run's ``derived.json``)."""
    return {
        "steps": steps,
        "epochs": steps / derived["steps_per_epoch"],
        "images": derived["dataset_size"],
        "effective_batch": derived["effective_batch"],
    }


def run_trained(run_dir: Path, checkpoint: str | None) -> dict | None:
    """``trained_record`` of the checkpoint ``python -m mae.export`` reads (None for a folder
    that is not a run with checkpoints)."""
    folder = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir)
    derived = run_dir / "derived.json"
    if folder is None or not derived.is_file() or not (folder / ckpt.LOOP_STATE).is_file():
        return None
    steps = json.loads((folder / ckpt.LOOP_STATE).read_text())["step"]
    return trained_record(steps, json.loads(derived.read_text()))


def save_timm(
    model: torch.nn.Module,
    out_dir: str | Path,
    data_config: dict,
    tag: str,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """``save_for_hf`` into a temporary folder (``extra`` adds to it), swapped in for ``out_dir``
    only once complete."""

    def write(tmp: Path) -> None:
        save_for_hf(
            model,
            str(tmp),
            safe_serialization=True,
            model_config={"pretrained_cfg": {"tag": tag, "license": None}},
            data_config=data_config,
        )
        if extra is not None:
            extra(tmp)

    return replace_dir(Path(out_dir), write)


def replace_dir(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """``write`` a temporary sibling folder, then swap it in: an earlier ``out_dir`` survives any
    failure."""
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    if not out_dir.exists() and old.exists():  # an earlier swap died between its two renames
        os.replace(old, out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    readable_as_umask_allows(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def readable_as_umask_allows(folder: Path) -> None:
    """Give every file in ``folder`` the mode a plain new file gets (0644 under the usual umask
    022): safetensors writes its files 0600, which keeps an export from the rest of a group."""
    umask = os.umask(0)  # reading it means setting it: put back at once
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def load_run_model(
    run_dir: str | Path, checkpoint: str | Path | None = None
) -> tuple[torch.nn.Module, Config]:
    """Rebuild a run's model from its ``config.yaml`` and load weights strictly: from
    ``checkpoint``, else the folder's own ``model.safetensors`` (a project export), else the newest
    checkpoint."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no config.yaml; pass a run directory written by pretrain.py"
        )
    cfg = from_dict(read_yaml(config_file))
    if checkpoint:
        path = Path(checkpoint)
    elif (
        run_dir / "model.safetensors"
    ).is_file():  # a project export (config.yaml + model.safetensors)
        path = run_dir
    else:
        path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(
            f"{run_dir} has no complete checkpoint; train it first or pass --checkpoint"
        )
    model = build_model(cfg)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model, cfg


def save_hf(model: torch.nn.Module, cfg: Config, folder: Path) -> None:
    """The Hugging Face folder: the model (``save_pretrained``) and its image processor, as the
    published facebook/vit-mae-* repos have it (ViTImageProcessor: bicubic resize to the run's size,
    /255, the run's mean and std), so
    ``transformers.pipeline("image-feature-extraction", model=folder)`` takes it as it is. (The
    processor resizes to the run's size, where the project's evaluation transform resizes to cover
    it, keeping the aspect ratio, and crops the centre: the same for images of the run's aspect
    ratio.)"""
    from transformers import ViTImageProcessor
    from transformers.image_utils import PILImageResampling

    to_hf(model, cfg).save_pretrained(str(folder))
    height, width = cfg.data.hw
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": height, "width": width},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(cfg.data.mean),
        image_std=list(cfg.data.std),
    )
    processor.save_pretrained(str(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mae.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", help="a run directory written by pretrain.py")
    parser.add_argument(
        "--checkpoint", help="checkpoint folder (default: the run's newest complete one)"
    )
    parser.add_argument(
        "--out",
        help="export folder (default: RUN_DIR/export, or RUN_DIR/export_hf for --format hf)",
    )
    parser.add_argument(
        "--format",
        choices=("timm", "hf"),
        default="timm",
        help="timm: the encoder in timm's format (classic autoencoders: the project's); "
        "hf: an MAE as a Hugging Face ViTMAEForPreTraining folder (save_pretrained), decoder "
        "included (CrossMAE: its encoder, a ViTMAEModel)",
    )
    args = parser.parse_args(argv)
    try:
        model, cfg = load_run_model(args.run_dir, args.checkpoint)
        if args.format == "hf":
            if cfg.model.name != "mae":
                raise ValueError(
                    f"--format hf needs an MAE run; {args.run_dir} is model.name={cfg.model.name}"
                )
            out = Path(args.out or Path(args.run_dir) / "export_hf")
            replace_dir(out, lambda tmp: save_hf(model, cfg, tmp))
        else:
            trained = run_trained(Path(args.run_dir), args.checkpoint)
            out = export_model(model, cfg, args.out or Path(args.run_dir) / "export", trained)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported encoder to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

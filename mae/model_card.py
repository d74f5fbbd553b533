"""The model card written with every timm export: ``EXPORT_DIR/README.md`` in the Hugging Face
card format (YAML metadata, then Markdown), so that ``huggingface_hub.ModelCard.load`` reads it and
the folder can be pushed to the Hub as it is.

It says what was trained, on what and for how long (steps, epochs, images: numbers that a resumed
run and an uninterrupted one share, so their exports stay byte for byte equal), and how to load
the encoder in timm and in transformers. Probe numbers are listed when the caller has them, else
the command that measures them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from mae.config import Config


def _method(cfg: Config) -> str:
    m, k = cfg.model, cfg.train.masks_per_image
    decoder = "CrossMAE's cross-attention decoder" if m.decoder == "cross" else "MAE's decoder"
    target = "an EMA teacher's features" if m.target == "teacher" else "pixels"
    masks = f", {k} masks per image" if k > 1 else ""
    return f"masked autoencoder ({decoder}, {target} at the hidden patches{masks})"


def card(cfg: Config, trained: dict[str, Any], probes: dict[str, float] | None = None) -> str:
    """The card's text for an encoder trained by ``cfg``; ``trained``: ``steps``, ``epochs``,
    ``images`` (the dataset's size) and ``effective_batch``; ``probes``: top-1 by probe name."""
    m, d = cfg.model, cfg.data
    hub_dataset = "/" in d.dataset and not Path(d.dataset).exists()
    data = ModelCardData(
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        tags=["mae", "masked-autoencoder", "vision-transformer", "self-supervised"],
        datasets=[d.dataset] if hub_dataset else None,
    )
    h, w = d.hw
    name = m.preset or f"ViT {m.embed_dim}x{m.depth}/{m.patch_size}"
    lines = [
        f"# {name}: a ViT encoder pretrained as a {_method(cfg)}",
        "",
        "Pretrained with the `mae` toolkit and exported in timm's format (`model.safetensors`, "
        "`config.json`). The decoder is not part of this folder.",
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| data | `{d.dataset}` split `{d.split}`: {trained['images']:,} images at {h}x{w} px, "
        f"{d.channels} channel{'s' if d.channels > 1 else ''} |",
        f"| length | {trained['steps']:,} optimizer steps of {trained['effective_batch']} images "
        f"({trained['epochs']:.2f} epochs) |",
        f"| encoder | patch {m.patch_size}, width {m.embed_dim}, {m.depth} blocks, "
        f"{m.num_heads} heads |",
        f"| masking | {m.mask_ratio:g} of the patches hidden |",
        f"| optimizer | AdamW, blr {cfg.train.blr:g}, weight decay {cfg.train.weight_decay:g} |",
        "",
        "## Evaluation",
        "",
    ]
    if probes:
        lines += [f"- {k}: {100 * v:.1f}% top-1" for k, v in probes.items()]
    else:
        lines += [
            "Not measured at export. A kNN probe of this folder:",
            "",
            "```bash",
            "python finetune.py mode=knn encoder=EXPORT_DIR data.dataset=YOUR_LABELLED_DATA",
            "```",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import timm",
        "",
        "# local-dir:EXPORT_DIR, or hf-hub:ORG/NAME once pushed to the Hub",
        'encoder = timm.create_model("local-dir:EXPORT_DIR", pretrained=True)',
        "features = encoder(images)  # (B, width): the class token, after the final norm",
        "```",
        "",
        "In transformers: `python -m mae.export RUN_DIR --format hf` writes the run as a "
        "`ViTMAEForPreTraining` folder, which `transformers.ViTMAEModel.from_pretrained` reads "
        "(with `mask_ratio=0.0` to see every patch).",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n").content


def write_card(
    folder: Path, cfg: Config, trained: dict[str, Any], probes: dict[str, float] | None = None
) -> None:
    (folder / "README.md").write_text(card(cfg, trained, probes))

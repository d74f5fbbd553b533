"""Frozen encoders for evaluation, from wherever they come: an export, a run, timm, or random init.

Sources (the ``encoder=`` key of ``finetune.py``):

- ``EXPORT_DIR`` — ``model.safetensors`` + ``config.json`` in timm's format (an MAE export), or
  ``model.safetensors`` + ``config.yaml`` (the project's format: a classic autoencoder's export),
  or a Hugging Face ViTMAE ``save_pretrained`` folder (converted by ``mae.interop.from_hf``);
- ``RUN_DIR`` — a pretraining run: its ``export/``, or its newest checkpoint when it has none;
- ``WEIGHTS`` — an official MAE ``.pth`` (``{"model": state_dict}``, read with
  ``weights_only=True``), a ViT ``.safetensors`` file or a checkpoint folder: built as the project's
  MAE with the architecture read off the file (``mae.interop.infer_architecture``) and loaded
  strictly; its input size is the one its position embeddings were made for;
- ``hf-hub:ORG/NAME[@REVISION]`` — a Hugging Face ViTMAE repository
  (``hf-hub:facebook/vit-mae-base``), from the Hugging Face cache (``mae.hub``: fetched into it
  when the hub can be reached), then as its folder;
- ``timm:NAME.TAG`` — timm's pretrained weights of that tag (``timm:vit_base_patch16_224.mae``),
  from the same cache (``mae.hub``), with timm's preprocessing for them;
- ``timm:NAME`` (no tag) — a timm architecture with its own random initialisation (sized to nothing:
  its default input size);
- ``random:DIR`` — the architecture of an export or run directory with fresh weights: a run's
  model is built as pretraining builds it (same initialisation scheme, ``seed``), an export's by
  timm. This is the "same encoder at random init" baseline.
- ``pixels:SIZE`` — no encoder: the image resized to SIZE x SIZE (RGB), normalised and
  flattened. The raw-pixel baseline.

``parse_source`` reads a source once into an ``EncoderSource`` record (a folder by the format its
files declare), and ``LOADERS`` maps each kind of source to the function that loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from mae.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError, from_dict, read_yaml
from mae.data.images import timm_data_config
from mae.export import load_run_model
from mae.hub import TIMM_PREFIX, is_timm_pretrained, local_path, timm_pretrained
from mae.interop import (
    architecture_config,
    folder_config,
    from_hf,
    infer_architecture,
    is_hf_folder,
    load_into,
    load_weights,
)
from mae.models import build_model
from mae.run.hardware import resolve_attention, resolve_precision, set_attention


@dataclass
class FrozenEncoder:
    """An encoder in eval mode with no gradients, and what is needed to feed and identify it."""

    module: nn.Module
    source: str
    kind: str  # "timm": features from forward_features; "autoencoder": from the project's encode()
    data_config: dict[str, Any]  # timm's: input_size, mean, std, interpolation, crop_pct
    default_pool: str  # "cls" | "avg" | "encode"
    arch: str  # what the weights do not say: timm name + model args, or the run's model config
    sha256: str
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    precision: str = "no"  # "no" (fp32) | "bf16" (autocast), as ``set_precision`` resolved it
    blocks: int = 1  # features of the last ``blocks`` blocks, concatenated (``set_blocks``)

    def to(self, device: torch.device) -> FrozenEncoder:
        self.module.to(device)
        self.device = device
        return self

    def set_precision(self, requested: str) -> str:
        """Compute features in ``requested`` precision (``auto``: bf16 where this device computes
        it natively, as for training; ``mae.run.hardware``), with the attention core that is fast
        for it."""
        self.precision = resolve_precision(requested, self.device)
        set_attention(self.module, resolve_attention("auto", self.device, self.precision))
        return self.precision

    def set_blocks(self, blocks: int) -> None:
        """Concatenate the pooled features of the last ``blocks`` transformer blocks, each
        normalised as the encoder's own output is (final norm; ``fc_norm`` after average pooling
        when the model has one), as DINO's and iBOT's linear probes do; 1 is the encoder's output
        alone."""
        if blocks > 1 and (
            self.kind != "timm" or not hasattr(self.module, "forward_intermediates")
        ):
            raise ConfigError(
                f"probe.blocks={blocks} needs a transformer encoder with intermediate outputs; "
                f"{self.source} gives one feature vector: use probe.blocks=1"
            )
        depth = len(getattr(self.module, "blocks", ()))
        if depth and blocks > depth:
            raise ConfigError(
                f"probe.blocks={blocks}: {self.source} has {depth} blocks; use at most {depth}"
            )
        self.blocks = blocks

    @torch.no_grad()
    def features(self, images: torch.Tensor, pool: str) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) float on the CPU. ``pool``: cls token, mean of patch tokens, or
        the model's own."""
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        ):
            return self._features(images.to(self.device), pool).float().cpu()

    def _features(self, images: torch.Tensor, pool: str) -> torch.Tensor:
        if self.kind == "autoencoder":
            return self.module.encode(images)
        if self.blocks > 1:
            outs = self.module.forward_intermediates(
                images,
                indices=self.blocks,
                norm=True,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
            )
            fc_norm = getattr(self.module, "fc_norm", None) if pool == self.default_pool else None
            pooled = [
                prefix[:, 0] if pool == "cls" else patches.mean(dim=1) for patches, prefix in outs
            ]
            # the model's own avg head norms after pooling
            if fc_norm is not None and pool == "avg":
                pooled = [fc_norm(f) for f in pooled]
            return torch.cat(pooled, dim=1)
        tokens = self.module.forward_features(images)
        if tokens.ndim != 3:  # a CNN: timm's own pooling, without the classifier
            return self.module.forward_head(tokens, pre_logits=True)
        # the model's own pooling, with its own head norm (fc_norm, attention pool)
        if pool == self.default_pool:
            return self.module.forward_head(tokens, pre_logits=True)
        if pool == "cls":
            return tokens[:, 0]
        # the mean of the *normalised* patch tokens: the pretrained final norm, no random fc_norm
        return tokens[:, getattr(self.module, "num_prefix_tokens", 0) :].mean(dim=1)

    def pool(self, requested: str) -> str:
        """Resolve ``probe.features``; 'default' means what the encoder was made for."""
        if requested == "default":
            return self.default_pool
        if self.kind == "autoencoder":
            raise ConfigError(
                f"probe.features={requested!r} needs a token encoder; {self.source} gives "
                "features through its encode(): use probe.features=default"
            )
        if requested == "cls" and getattr(self.module, "cls_token", None) is None:
            raise ConfigError(
                f"probe.features=cls: {self.source} has no cls token; use probe.features=avg"
            )
        return requested


def weights_sha256(module: nn.Module) -> str:
    """Digest of every tensor of the state dict (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _freeze(
    module: nn.Module, source: str, kind: str, data_config: dict, default_pool: str, arch: Any
) -> FrozenEncoder:
    module.eval().requires_grad_(False)
    arch_text = json.dumps(arch, sort_keys=True, default=str)
    return FrozenEncoder(
        module, source, kind, data_config, default_pool, arch_text, weights_sha256(module)
    )


def _timm_pool(model: nn.Module) -> str:
    return {"token": "cls", "avg": "avg"}.get(getattr(model, "global_pool", ""), "avg")


def _timm_encoder(model: nn.Module, source: str) -> FrozenEncoder:
    arch = {
        "timm": model.pretrained_cfg.get("architecture"),
        "args": getattr(model, "pretrained_model_args", None),
    }
    arch["repr"] = repr(model)  # layer structure; heads and the like sit in model_args above
    return _freeze(
        model, source, "timm", resolve_data_config({}, model=model), _timm_pool(model), arch
    )


def _model_encoder(model: nn.Module, cfg: Any, source: str) -> FrozenEncoder:
    """A project model's encoder, fed as its config preprocesses images."""
    d = cfg.data
    # the run's own input size and normalisation
    data_config = timm_data_config(d.channels, d.hw, d.mean, d.std)
    arch = {
        "run_model": dataclasses.asdict(cfg.model),
        "image_size": d.image_size,
        "channels": d.channels,
    }
    encoder = model.encoder
    if hasattr(encoder, "pretrained_cfg"):  # a timm model: token features, both poolings
        return _freeze(encoder, source, "timm", data_config, _timm_pool(encoder), arch)
    return _freeze(model, source, "autoencoder", data_config, "encode", arch)


class Pixels(nn.Module):
    """The identity encoder: normalised pixels, flattened (the raw-pixel baseline)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


# ------------------------------------------------------------------------------------------ sources

PIXELS_PREFIX = "pixels:"
RANDOM_PREFIX = "random:"
_WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class EncoderSource:
    """An ``encoder=`` source, parsed once (``parse_source``); ``LOADERS[kind]`` loads it.

    ``kind``: ``pixels`` (``pixels:SIZE``), ``timm_pretrained`` (``timm:NAME.TAG``),
    ``timm_random`` (``timm:NAME``), ``hf_folder`` (a Hugging Face ViTMAE folder, an ``hf-hub:``
    name's included), ``timm_export``, ``project_export`` (config.yaml + model.safetensors),
    ``run`` (config.yaml: built from it, its newest checkpoint loaded) or ``weights`` (a weights
    file or checkpoint folder)."""

    kind: str
    # the image size in pixels (pixels), the timm model name (timm_*), else the folder or file
    location: str
    fresh: bool  # random:SOURCE — the architecture of SOURCE with fresh weights
    text: str  # the source as given: names the encoder in its records and errors


def parse_source(text: str) -> EncoderSource:
    """What ``text`` (see the module docstring) names. A folder is recognised by the format its
    files declare: a Hugging Face folder by its config.json's ``model_type``, a timm export by its
    config.json's ``architecture`` (and model.safetensors), a run or project export by its
    config.yaml. A run's own ``export/`` stands for the run, unless fresh weights are asked for.
    An ``hf-hub:`` name is fetched into the Hugging Face cache (``mae.hub``)."""
    if text.startswith(PIXELS_PREFIX):
        size = text.removeprefix(PIXELS_PREFIX)
        if not size.isdigit() or int(size) <= 0:
            raise ConfigError(f"encoder={text!r}: give the image size in pixels, e.g. pixels:32")
        return EncoderSource("pixels", size, False, text)
    # NAME.TAG: timm's pretrained weights, through the Hugging Face cache
    if is_timm_pretrained(text):
        return EncoderSource("timm_pretrained", text.removeprefix(TIMM_PREFIX), False, text)
    if text.startswith(TIMM_PREFIX):
        name = text.removeprefix(TIMM_PREFIX)
        if not timm.is_model(name):
            raise ConfigError(
                f"encoder={text!r}: timm has no model {name!r}; see timm.list_models()"
            )
        return EncoderSource("timm_random", name, False, text)
    fresh = text.startswith(RANDOM_PREFIX)
    # an hf-hub: name is its snapshot folder in the cache
    path = local_path(text.removeprefix(RANDOM_PREFIX))
    kind = _path_kind(path)
    if kind in ("run", "project_export") and not fresh:
        export = path / "export"
        # what the run exported, in either format
        if (exported := _path_kind(export)) in ("timm_export", "project_export"):
            path, kind = export, exported
    if kind is None:
        raise ConfigError(
            f"encoder={text!r} is not an export directory (config.json + model.safetensors), a "
            "run directory (config.yaml), a weights file (.pth, .safetensors) or checkpoint "
            "folder, hf-hub:ORG/NAME, timm:NAME[.TAG], random:SOURCE or pixels:SIZE"
        )
    return EncoderSource(kind, str(path), fresh, text)


def _path_kind(path: Path) -> str | None:
    """The kind of source the folder or file ``path`` is, by its files; None for none."""
    if is_hf_folder(path):
        return "hf_folder"
    if "architecture" in folder_config(path) and (path / _WEIGHTS_FILE).is_file():
        return "timm_export"
    if (path / "config.yaml").is_file():
        return "project_export" if (path / _WEIGHTS_FILE).is_file() else "run"
    if _is_weights(path):  # an official .pth, a .safetensors file, a checkpoint folder
        return "weights"
    return None


def _is_weights(path: Path) -> bool:
    """A weights file, or a folder of weights alone (a checkpoint folder: no config beside them)."""
    if path.is_file():
        return True
    configs = (path / "config.json").is_file() or (path / "config.yaml").is_file()
    return (path / _WEIGHTS_FILE).is_file() and not configs


# ------------------------------------------------------------------------------------------ loaders


def _pixels_encoder(source: EncoderSource, seed: int, num_heads: int | None) -> FrozenEncoder:
    size = int(source.location)
    data = timm_data_config(3, (size, size), IMAGENET_MEAN, IMAGENET_STD)
    return _freeze(Pixels(), source.text, "autoencoder", data, "encode", {"pixels": size})


def _timm_pretrained_encoder(
    source: EncoderSource, seed: int, num_heads: int | None
) -> FrozenEncoder:
    return _timm_encoder(timm_pretrained(source.text), source.text)


def _timm_random_encoder(source: EncoderSource, seed: int, num_heads: int | None) -> FrozenEncoder:
    torch.manual_seed(seed)
    model = timm.create_model(source.location, pretrained=False, num_classes=0)
    return _timm_encoder(model, source.text)


def _timm_export_encoder(source: EncoderSource, seed: int, num_heads: int | None) -> FrozenEncoder:
    torch.manual_seed(seed)
    model = timm.create_model(f"local-dir:{source.location}", pretrained=not source.fresh)
    return _timm_encoder(model, source.text)


def _run_encoder(source: EncoderSource, seed: int, num_heads: int | None) -> FrozenEncoder:
    """A run's (or a project export's) own model, of any family."""
    if source.fresh:
        cfg = from_dict(read_yaml(Path(source.location) / "config.yaml"))
        torch.manual_seed(seed)
        model = build_model(cfg)
    else:
        model, cfg = load_run_model(source.location)
    return _model_encoder(model, cfg, source.text)


def _hf_encoder(source: EncoderSource, seed: int, num_heads: int | None) -> FrozenEncoder:
    """A Hugging Face ViTMAE folder: converted to the project's MAE (``mae.interop.from_hf``); its
    timm encoder is what is probed or fine-tuned (``random:``: the same architecture at MAE's
    init)."""
    model, cfg = from_hf(Path(source.location))
    if source.fresh:
        torch.manual_seed(seed)
        model = build_model(cfg)
    return _model_encoder(model, cfg, source.text)


def _weights_encoder(source: EncoderSource, seed: int, num_heads: int | None) -> FrozenEncoder:
    """A weights file or checkpoint folder (``mae.interop``): the project's MAE of its
    architecture."""
    path = Path(source.location)
    state = load_weights(path)
    cfg = architecture_config(infer_architecture(path, state), num_heads)
    torch.manual_seed(seed)
    model = build_model(cfg)
    if not source.fresh:
        load_into(model, state, str(path))
    return _model_encoder(model, cfg, source.text)


# Every kind of source and how it loads: (source, seed of fresh weights, num_heads of a weights
# file) -> its frozen encoder
LOADERS: dict[str, Callable[[EncoderSource, int, int | None], FrozenEncoder]] = {
    "pixels": _pixels_encoder,
    "timm_pretrained": _timm_pretrained_encoder,
    "timm_random": _timm_random_encoder,
    "hf_folder": _hf_encoder,
    "timm_export": _timm_export_encoder,
    "project_export": _run_encoder,
    "run": _run_encoder,
    "weights": _weights_encoder,
}


def load_encoder(source: str, seed: int = 0, num_heads: int | None = None) -> FrozenEncoder:
    """Resolve an ``encoder=`` source (see the module docstring) into a frozen encoder.
    ``num_heads``: the head count of a WEIGHTS source, when it is not the one
    ``infer_architecture`` assumes."""
    try:
        parsed = parse_source(source)
        if num_heads is not None and parsed.kind != "weights":
            raise ConfigError(
                f"num_heads={num_heads} applies to weights files only (they do not record it); "
                f"{source!r} records its own: leave num_heads out"
            )
        return LOADERS[parsed.kind](parsed, seed, num_heads)
    except ConfigError:
        raise
    # missing files, bad configs, shape mismatches
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"encoder={source!r} could not be loaded ({type(e).__name__}: {e})"
        ) from e

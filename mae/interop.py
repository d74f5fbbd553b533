"""Weights from elsewhere into the project's MAE, strictly and without unpickling code.

``load_weights(path)`` reads:

- the official facebookresearch/mae checkpoints (``{"model": state_dict}`` ``.pth`` files; the
  ``_full`` variants with the decoder, the others encoder only), with
  ``torch.load(weights_only=True)`` — a file that needs full unpickling is refused;
- a timm ``VisionTransformer`` (an export folder, or a ``.safetensors`` file);
- a Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` ``save_pretrained`` folder (``from_hf``;
  ``to_hf`` goes the other way, ``python -m mae.export RUN --format hf`` writes one);
- a run's checkpoint folder or ``model.safetensors`` of the project;
- by name through the Hugging Face cache (``mae.hub``): ``hf-hub:ORG/NAME`` (ViTMAE) and
  ``timm:NAME.TAG``.

``load_into(model, state)`` maps the names onto ``MaskedAutoencoder`` (the official encoder keys
gain the ``encoder.`` prefix of the timm encoder; decoder keys are shared) and loads strictly; when
the patch grid differs, the position embeddings (fixed 2-D sin-cos in MAE) are the model's own for
its grid (reported); an unknown key or a shape that cannot be
fixed is an error naming the key and both shapes; a missing decoder is left at its fresh
initialisation and reported. ``pretrain.py init=PATH`` uses both before the first step.

``infer_architecture(path)`` reads the architecture off a weights file: from its config where it
has one (a timm export's ``model_args``, a Hugging Face ``config.json``), else from the tensor
shapes. Head counts leave no trace in the shapes; without a config they follow the presets
(or 64 channels per encoder head, 32 per decoder head) and are reported as guessed.
``load_pretrain_config`` (``mae.config.load_config`` plus this) fills the architecture keys a recipe
leaves unset from it and refuses a conflict. ``architecture_config`` turns an architecture into the
resolved ``Config`` to build its MAE from (``from_hf``; ``mae.eval.encoders`` for a weights file).

Importing this module is cheap (no torch): the pretraining entry point loads its config through it,
and a config is checked before torch is imported. torch, safetensors and transformers are imported
by the functions that read or build weights, ``mae.models`` (torch, timm) by ``from_hf`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mae.config import Config, ConfigError, DataConfig, ModelConfig, preset_values, resolve
from mae.config.loader import load_raw
from mae.config.presets import PRESETS, Preset
from mae.errors import UserError
from mae.hub import is_timm_pretrained, local_path, timm_heads, timm_pretrained

if TYPE_CHECKING:
    import torch
    from torch import nn

_DECODER = ("decoder_", "mask_token")
_TEACHER = "teacher."
_POS = ("encoder.pos_embed", "decoder_pos_embed")


class WeightsError(UserError, ValueError):
    """Weights that cannot be loaded as asked; the message names the key or file and the fix."""


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict in the project's MAE naming, from any supported file or folder."""
    import torch
    from safetensors.torch import load_file

    from mae.run.checkpoint import read_sharded_model  # Accelerate and torch: see above

    if is_timm_pretrained(path):  # timm's model of that tag: its weights under timm's names
        return _to_ours(timm_pretrained(str(path)).state_dict())
    p = local_path(path)  # an hf-hub: name is its snapshot folder in the cache
    if is_hf_folder(p):
        return from_hf(p)[0].state_dict()
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return _to_ours(load_file(str(p / "model.safetensors")))
        if (sharded := read_sharded_model(p)) is not None:  # a checkpoint of an FSDP run
            return _to_ours(sharded)
        raise WeightsError(
            f"init={path}: the folder holds no model.safetensors and no FSDP shards (an export or "
            "a checkpoint folder)"
        )
    if not p.is_file():
        raise WeightsError(f"init={path} does not exist; give a checkpoint file or folder")
    if p.suffix == ".safetensors":
        return _to_ours(load_file(str(p)))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"init={path} needs full unpickling (it could run code), which is never done; convert "
            "it to safetensors where you trust it, or give the official {'model': state_dict} "
            "checkpoint"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(
            f"init={path} is not a readable checkpoint ({type(e).__name__}: {e})"
        ) from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"init={path} holds no state dict of tensors (expected {{'model': state_dict}})"
        )
    return _to_ours(state)


@dataclass
class Architecture:
    """What a weights file says about its model: ``model.*`` keys, its input, and what was
    guessed."""

    model: dict[str, Any]  # model.* keys (the decoder's only when the file holds a decoder)
    # the position embeddings' grid x patch size (None without position embeddings)
    image_size: int | None
    channels: int
    guessed: list[str] = field(default_factory=list)  # keys the file does not record (head counts)
    origin: str = "tensor shapes"


def infer_architecture(
    path: str | Path, state: dict[str, torch.Tensor] | None = None
) -> Architecture:
    """The MAE / ViT architecture of the weights at ``path`` (see the module docstring)."""
    p = local_path(path)
    if is_hf_folder(p):  # its config.json says everything; no weights need loading
        from transformers import ViTMAEConfig

        try:
            return _hf_architecture(ViTMAEConfig.from_pretrained(str(p)))
        except (OSError, ValueError) as e:
            if isinstance(e, WeightsError):
                raise
            raise WeightsError(f"{p} is not a Hugging Face ViTMAE folder ({e})") from e
    state = load_weights(p) if state is None else state
    if "encoder.patch_embed.proj.weight" not in state:
        raise WeightsError(
            f"init={path}: no encoder.patch_embed.proj.weight, so no ViT architecture to read"
        )
    dim, channels, patch, _ = state["encoder.patch_embed.proj.weight"].shape
    depth = _count(state, "encoder.blocks")
    hidden = state["encoder.blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim
    model: dict[str, Any] = {
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "mlp_ratio": hidden / dim,
    }
    image_size = None
    if "encoder.pos_embed" in state:
        tokens = state["encoder.pos_embed"].shape[1] - ("encoder.cls_token" in state)
        grid = round(tokens**0.5)
        image_size = grid * patch if grid * grid == tokens else None
    preset = _preset_with(embed_dim=dim, depth=depth)
    model["num_heads"] = preset.num_heads if preset else _heads(dim, 64)
    guessed = ["num_heads"]
    if "decoder_embed.weight" in state:
        ddim = state["decoder_embed.weight"].shape[0]
        ddepth = _count(state, "decoder_blocks")
        model |= {"decoder_embed_dim": ddim, "decoder_depth": ddepth}
        dpreset = _preset_with(decoder_embed_dim=ddim, decoder_depth=ddepth)
        model["decoder_num_heads"] = dpreset.decoder_num_heads if dpreset else _heads(ddim, 32)
        guessed.append("decoder_num_heads")
        if ddepth and state["decoder_blocks.0.mlp.fc1.weight"].shape[0] != round(
            model["mlp_ratio"] * ddim
        ):
            raise WeightsError(
                f"init={path}: the encoder and decoder MLP ratios differ; "
                "model.mlp_ratio is one value"
            )
    elif preset:  # an encoder-only file of a known size: that preset's decoder
        decoder = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
        model |= {k: getattr(preset, k) for k in decoder}
        guessed += ["decoder_embed_dim", "decoder_depth", "decoder_num_heads"]
    # timm's definition has them
    if is_timm_pretrained(path) and (heads := timm_heads(str(path))) is not None:
        model["num_heads"], guessed = heads, [k for k in guessed if k != "num_heads"]
        return Architecture(
            model, image_size, channels, guessed, "timm model definition and tensor shapes"
        )
    config = p / "config.json" if p.is_dir() else None
    if config is not None and config.is_file():  # a timm export: its model_args record the heads
        args = json.loads(config.read_text()).get("model_args", {})
        if "num_heads" in args:
            model["num_heads"] = args["num_heads"]
            guessed.remove("num_heads")
            return Architecture(
                model, image_size, channels, guessed, "timm config.json and tensor shapes"
            )
    return Architecture(model, image_size, channels, guessed)


def _preset_with(**values: int) -> Preset | None:
    """The first preset with these ``model.*`` values."""
    return next(
        (p for p in PRESETS.values() if all(getattr(p, k) == v for k, v in values.items())), None
    )


def load_pretrain_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """``mae.config.load_config`` for pretraining: with ``init=`` (MAE), the architecture keys the
    recipe leaves unset come from the checkpoint (``infer_architecture``; torch is imported only
    then)."""
    cfg = load_raw(path, overrides, Config)
    if cfg.init is not None and cfg.model.name == "mae":
        cfg = architecture_from_init(cfg, infer_architecture(cfg.init))
    return resolve(cfg)


def architecture_from_init(cfg: Config, arch: Architecture) -> Config:
    """``cfg`` (not yet resolved) with its unset ``model.*`` architecture keys taken from ``arch``,
    the architecture of ``cfg.init``; a key the recipe names (itself or through ``model.preset``)
    must agree."""
    m = cfg.model
    preset = preset_values(m.preset) if m.preset else {}
    fill = {}
    for key, value in arch.model.items():
        named, where = getattr(m, key), f"model.{key}={getattr(m, key)}"
        if named is None and key in preset:
            named, where = preset[key], f"model.preset={m.preset} ({key}={preset[key]})"
        if named is None:
            fill[key] = value
        elif key not in arch.guessed and abs(named - value) > 1e-6:
            raise ConfigError(
                f"init={cfg.init} has {key}={value:g} (from its {arch.origin}) but the recipe "
                f"names {where}; leave it out to take the checkpoint's architecture, or give "
                "weights of that architecture"
            )
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **fill))


def folder_config(path: Path) -> dict[str, Any]:
    """The JSON object of the ``config.json`` in folder ``path``; empty where there is none, or it
    is not a JSON object (timm's exports and Hugging Face's folders both declare their format in
    one)."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return {}
    try:
        declared = json.loads(config.read_text())
    except ValueError:  # not JSON (or not UTF-8): no declared format
        return {}
    return declared if isinstance(declared, dict) else {}


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face ViTMAE ``save_pretrained`` folder: its ``config.json`` declares
    ``model_type`` ``vit_mae``."""
    return folder_config(path).get("model_type") == "vit_mae"


def architecture_config(
    arch: Architecture, num_heads: int | None = None, **settings: Any
) -> Config:
    """The resolved ``Config`` to build the project's MAE of ``arch`` from: its ``model.*`` keys,
    its channels and (where the weights have position embeddings) its input size. ``num_heads``:
    the head count where it is not the one ``arch`` holds (weights do not record it);
    ``settings``: ``model.*`` keys that are not architecture (``mask_ratio``, ``norm_pix_loss``)."""
    model = arch.model if num_heads is None else arch.model | {"num_heads": num_heads}
    data = DataConfig(channels=arch.channels)
    if arch.image_size is not None:
        data = dataclasses.replace(data, image_size=arch.image_size)
    return resolve(Config(model=ModelConfig(name="mae", **settings, **model), data=data))


def _hf_architecture(c: Any) -> Architecture:
    """The architecture a ``ViTMAEConfig`` describes (refusing what has no counterpart here)."""
    if c.hidden_act != "gelu" or not c.qkv_bias:
        raise WeightsError(
            f"ViTMAE with hidden_act={c.hidden_act!r}, qkv_bias={c.qkv_bias} "
            "has no counterpart here"
        )
    model = {
        "patch_size": c.patch_size,
        "embed_dim": c.hidden_size,
        "depth": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "mlp_ratio": c.intermediate_size / c.hidden_size,
        "decoder_embed_dim": c.decoder_hidden_size,
        "decoder_depth": c.decoder_num_hidden_layers,
        "decoder_num_heads": c.decoder_num_attention_heads,
    }
    return Architecture(model, c.image_size, c.num_channels, [], "Hugging Face config.json")


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def _heads(dim: int, head_dim: int) -> int:
    return dim // head_dim if dim % head_dim == 0 else 1


def _to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official / timm names -> the project's (already-prefixed names pass through)."""
    out = {}
    for k, v in state.items():
        if k.startswith(("encoder.", *_DECODER)):
            out[k] = v
        elif k.startswith(("head.", "fc_norm.")):  # a classifier's, not an encoder's
            continue
        else:
            out[f"encoder.{k}"] = v
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Load ``state`` into ``model`` strictly (see the module docstring); returns what was done."""
    ours = model.state_dict()
    # a teacher (model.target=teacher) follows the encoder it is loaded beside: the file's is not
    # needed, and one the model lacks is left out
    state = {k: v for k, v in state.items() if not k.startswith(_TEACHER)}
    other_decoder = _decoder_kind(state) not in (None, _decoder_kind(ours))
    if other_decoder:  # MAE's decoder into CrossMAE's or back: the encoder alone carries over
        state = {k: v for k, v in state.items() if not k.startswith(_DECODER)}
    unknown = sorted(k for k in state if k not in ours)
    if unknown:
        raise WeightsError(
            f"init={source}: keys {unknown[:5]} have no counterpart in model.name=mae"
        )
    resampled, merged = {}, dict(ours)
    for k, v in state.items():
        want = ours[k].shape
        if v.shape != want:
            if k in _POS and v.ndim == 3 and v.shape[-1] == want[-1]:
                # fixed 2-D sin-cos in MAE: the model's own, computed for its grid, is exact there
                resampled[k] = [list(v.shape), list(want)]
                continue
            else:
                raise WeightsError(
                    f"init={source}: {k} has shape {tuple(v.shape)} in the file and "
                    f"{tuple(want)} in the model; choose the matching model.preset / model.* "
                    "dimensions"
                )
        merged[k] = v.to(ours[k].dtype)
    missing = sorted(k for k in ours if k not in state)
    bad = [k for k in missing if not k.startswith((*_DECODER, _TEACHER))]
    if bad:
        raise WeightsError(
            f"init={source}: the file lacks encoder weights {bad[:5]}; "
            "is it an MAE / ViT checkpoint?"
        )
    model.load_state_dict(merged, strict=True)
    if getattr(model, "teacher", None) is not None:  # the teacher starts where the student does
        model.teacher.copy_from(model.encoder)
    done = {
        "source": source,
        "loaded": len(state) - len(resampled),
        "fresh": [k for k in missing if not k.startswith(_TEACHER)],
        "pos_embed_regrid": resampled,
    }
    return done | {"other_decoder": other_decoder}


def _decoder_kind(state: dict[str, Any]) -> tuple[bool, bool] | None:
    """(CrossMAE's decoder?, weighted features?) of ``state``; None without decoder blocks
    (``mae.models``)."""
    if not any(k.startswith("decoder_blocks.") for k in state):
        return None
    return any(".cross_attn." in k for k in state), "decoder_feature_mix" in state


# ------------------------------------------------------------------------------------- Hugging Face


def _block_pairs(ours: str, hf: str) -> list[tuple[str, str]]:
    """(our name, HF name) for one transformer block's tensors except the fused qkv."""
    pairs = [
        ("norm1", "layernorm_before"),
        ("attn.proj", "attention.o_proj"),
        ("norm2", "layernorm_after"),
    ]
    pairs += [("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    return [(f"{ours}.{a}.{p}", f"{hf}.{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _name_pairs(depth: int, decoder_depth: int) -> list[tuple[str, str]]:
    pairs = [
        ("encoder.cls_token", "vit.embeddings.cls_token"),
        ("encoder.pos_embed", "vit.embeddings.position_embeddings"),
        ("encoder.patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
        ("encoder.patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
        ("encoder.norm.weight", "vit.layernorm.weight"),
        ("encoder.norm.bias", "vit.layernorm.bias"),
        ("mask_token", "decoder.mask_token"),
        ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    ]
    for ours in ("decoder_embed", "decoder_norm", "decoder_pred"):
        pairs += [(f"{ours}.{p}", f"decoder.{ours}.{p}") for p in ("weight", "bias")]
    for i in range(depth):
        pairs += _block_pairs(f"encoder.blocks.{i}", f"vit.layers.{i}")
    for i in range(decoder_depth):
        pairs += _block_pairs(f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}")
    return pairs


def _qkv_prefixes(depth: int, decoder_depth: int) -> list[tuple[str, str]]:
    return [(f"encoder.blocks.{i}.attn.qkv", f"vit.layers.{i}.attention") for i in range(depth)] + [
        (f"decoder_blocks.{i}.attn.qkv", f"decoder.decoder_layers.{i}.attention")
        for i in range(decoder_depth)
    ]


def hf_config(cfg: Any) -> Any:
    """The ``ViTMAEConfig`` of a project config (``model.name=mae``)."""
    from transformers import ViTMAEConfig

    m, d = cfg.model, cfg.data
    return ViTMAEConfig(
        hidden_size=m.embed_dim,
        num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio),
        decoder_hidden_size=m.decoder_embed_dim,
        decoder_num_hidden_layers=m.decoder_depth,
        decoder_num_attention_heads=m.decoder_num_heads,
        decoder_intermediate_size=int(m.decoder_embed_dim * m.mlp_ratio),
        image_size=d.hw[0],
        patch_size=m.patch_size,
        num_channels=d.channels,
        mask_ratio=m.mask_ratio,
        norm_pix_loss=m.norm_pix_loss,
        layer_norm_eps=1e-6,  # timm's and the official code's (HF's default is 1e-12)
        hidden_act="gelu",
        qkv_bias=True,
    )


def to_hf(model: nn.Module, cfg: Any) -> Any:
    """The project's MAE as a ``ViTMAEForPreTraining`` with the same weights (``save_pretrained``
    it). A CrossMAE (``model.decoder=cross``) gives its encoder alone, a ``ViTMAEModel``: Hugging
    Face's decoder is MAE's."""
    from transformers import ViTMAEForPreTraining, ViTMAEModel

    m, (height, width) = cfg.model, cfg.data.hw
    if height != width:  # transformers' ViTMAE builds its sin-cos grids as sqrt(patches) squared
        raise ValueError(
            f"data.image_size={list(cfg.data.hw)}: Hugging Face's ViTMAE has square position "
            "grids only; export this run in timm's format (python -m mae.export RUN), which keeps "
            "its H x W grid"
        )
    encoder_only = m.decoder == "cross"
    decoder_depth = 0 if encoder_only else m.decoder_depth
    hf = (ViTMAEModel if encoder_only else ViTMAEForPreTraining)(hf_config(cfg)).eval()
    ours = model.state_dict()
    pairs = [
        (o, h)
        for o, h in _name_pairs(m.depth, decoder_depth)
        if not encoder_only or o.startswith("encoder.")
    ]
    state = {h: ours[o] for o, h in pairs}
    for o, h in _qkv_prefixes(m.depth, decoder_depth):
        for p in ("weight", "bias"):
            q, k, v = ours[f"{o}.{p}"].chunk(3, dim=0)
            state |= {f"{h}.q_proj.{p}": q, f"{h}.k_proj.{p}": k, f"{h}.v_proj.{p}": v}
    if encoder_only:  # a bare ViTMAEModel's names have no "vit." prefix
        state = {k.removeprefix("vit."): v for k, v in state.items()}
    hf.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return hf


def from_hf(source: Any) -> tuple[nn.Module, Any]:
    """A ``ViTMAEForPreTraining`` (in memory, or a ``save_pretrained`` folder) -> (the project's MAE
    with the same weights, its Config). A bare ``ViTMAEModel`` gives the encoder; the decoder stays
    fresh."""
    import torch
    from transformers import ViTMAEForPreTraining, ViTMAEModel

    from mae.models import build_model  # torch and timm: not for a plain `import mae.interop`

    if isinstance(source, (str, Path)):
        try:
            source = ViTMAEForPreTraining.from_pretrained(str(source))
        except (OSError, ValueError) as e:
            raise WeightsError(f"{source} is not a Hugging Face ViTMAE folder ({e})") from e
    c = source.config
    cfg = architecture_config(
        _hf_architecture(c), mask_ratio=c.mask_ratio, norm_pix_loss=c.norm_pix_loss
    )
    model = build_model(cfg)
    theirs = source.state_dict()
    if isinstance(source, ViTMAEModel):  # the encoder alone, its names without the "vit." prefix
        theirs = {f"vit.{k}": v for k, v in theirs.items()}
    ours = dict(model.state_dict())
    for o, h in _name_pairs(c.num_hidden_layers, c.decoder_num_hidden_layers):
        if h in theirs:
            ours[o] = theirs[h]
    for o, h in _qkv_prefixes(c.num_hidden_layers, c.decoder_num_hidden_layers):
        for p in ("weight", "bias"):
            if f"{h}.q_proj.{p}" in theirs:
                ours[f"{o}.{p}"] = torch.cat(
                    [theirs[f"{h}.{n}_proj.{p}"] for n in ("q", "k", "v")], dim=0
                )
    model.load_state_dict(ours, strict=True)
    return model, cfg

"""Pretrained weights by name, through the Hugging Face cache: ``hf-hub:ORG/NAME[@REVISION]`` and
``timm:NAME.TAG``.

- ``hf-hub:ORG/NAME[@REVISION]`` — a Hugging Face ViTMAE repository (``facebook/vit-mae-base``):
  its ``config.json``, ``preprocessor_config.json`` and safetensors weights (``pytorch_model.bin``
  only where it has none; read with ``weights_only=True``) come into the cache through
  ``huggingface_hub.snapshot_download``, and the snapshot folder is read as any Hugging Face folder
  (``mae.interop.is_hf_folder`` / ``from_hf``).
- ``timm:NAME.TAG`` — timm's pretrained weights of that tag (``timm:vit_base_patch16_224.mae``):
  the file of the hub repository its pretrained config names (``hf_hub_id``; ``model.safetensors``,
  else ``pytorch_model.bin``) comes into the cache the same way, and timm builds the model from it
  (``timm.create_model(NAME.TAG, pretrained=True, num_classes=0)``, timm's own checkpoint filter
  included). A name without a tag, ``timm:NAME``, stays what it always was: timm's random
  initialisation (``mae.eval.encoders``).

Only those files are fetched (a repository may also hold TensorFlow or Flax weights). Offline
(``HF_HUB_OFFLINE=1``, or no network) a name is served from the cache alone; one that is not there
is a ``ConfigError``, one line naming the cache folder and how to fill it. ``snapshot_download``
fails fast without network, where ``hf_hub_download`` (timm's own way to the hub) retries for most
of a minute per file.

Importing this module is cheap (no torch): ``mae.interop`` imports it, and a config is checked
before torch is imported. huggingface_hub, torch and timm are imported by the functions that use
them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mae.config.loader import ConfigError

if TYPE_CHECKING:
    from torch import nn

HF_PREFIX = "hf-hub:"
TIMM_PREFIX = "timm:"
_PICKLE = "pytorch_model.bin"  # only where a repository has no safetensors weights


def is_timm_pretrained(source: str | Path) -> bool:
    """``timm:NAME.TAG``: a timm name with a pretrained tag (``timm:NAME`` alone is a random
    initialisation)."""
    s = str(source)
    return s.startswith(TIMM_PREFIX) and "." in s.removeprefix(TIMM_PREFIX)


def local_path(source: str | Path) -> Path:
    """The folder or file ``source`` names: the cached snapshot of an ``hf-hub:`` name; any other
    path, and a ``timm:NAME.TAG`` name (``timm_pretrained`` reads it), as it is."""
    s = str(source)
    if s.startswith(TIMM_PREFIX) and not is_timm_pretrained(s):
        raise ConfigError(
            f"{s!r} names no weights (timm:NAME alone is a random initialisation); give a "
            "pretrained tag, timm:NAME.TAG, e.g. timm:vit_base_patch16_224.mae "
            "(timm.list_pretrained() lists them)"
        )
    return hf_folder(s) if s.startswith(HF_PREFIX) else Path(source)


def fetch(source: str) -> None:
    """Bring the files of a hub name into the cache (a plain path: nothing to do), building no
    model, so that a name that cannot be served stops a run before it writes anything."""
    if source.startswith(HF_PREFIX):
        hf_folder(source)
    elif is_timm_pretrained(source):
        _timm_file(source)


def hf_folder(source: str) -> Path:
    """The cached snapshot folder of ``hf-hub:ORG/NAME[@REVISION]``, a Hugging Face ViTMAE
    repository."""
    repo, at, revision = source.removeprefix(HF_PREFIX).partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or (at and not revision):
        raise ConfigError(
            f"{source!r}: give a Hugging Face repository as hf-hub:ORG/NAME or "
            "hf-hub:ORG/NAME@REVISION, e.g. hf-hub:facebook/vit-mae-base"
        )
    files = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]
    folder = _weights_snapshot(source, repo, revision or None, files)
    config = folder / "config.json"
    kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if kind != "vit_mae":
        raise ConfigError(
            f"{source}: {repo} is not a Hugging Face ViTMAE repository (config.json "
            f"model_type={kind!r}); for timm's pretrained weights give timm:NAME.TAG, e.g. "
            "timm:vit_base_patch16_224.mae"
        )
    return folder


def timm_pretrained(source: str) -> nn.Module:
    """timm's model of ``timm:NAME.TAG`` with its pretrained weights and no classifier
    (``num_classes=0``)."""
    import timm
    import torch

    name, file = source.removeprefix(TIMM_PREFIX), _timm_file(source)
    if file is None:  # the few tags whose weights timm fetches from a URL, not from the hub
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except OSError as e:
            raise ConfigError(
                f"{source}: timm fetches these weights from a URL into torch.hub's cache "
                f"({torch.hub.get_dir()}), which failed ({_one_line(e)}); run it once where there "
                "is network, or copy that cache here"
            ) from e
    # The hub copy is in timm's own format, as timm's hub path assumes (no custom loader, e.g. for
    # .npz files)
    overlay = {"file": str(file), "custom_load": False}
    return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)


def timm_heads(source: str) -> int | None:
    """Attention heads per block of ``timm:NAME.TAG``'s architecture (weights do not record them),
    read off the model built on the meta device (no memory, no weights); None for a model without
    attention blocks."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(_timm_name(source)[0], pretrained=False, num_classes=0)
    blocks = getattr(model, "blocks", None)
    return getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks else None


def _timm_name(source: str) -> tuple[str, str | None]:
    """(NAME.TAG, the hub repository of its weights, or None where timm has them at a URL) of
    ``timm:NAME.TAG``."""
    import timm
    from timm.models import get_pretrained_cfg

    name = source.removeprefix(TIMM_PREFIX)
    arch = name.partition(".")[0]
    if not timm.is_model(arch):
        raise ConfigError(f"{source!r}: timm has no model {arch!r}; see timm.list_models()")
    if name not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(
            f"{source!r}: timm has no pretrained weights {name!r}; "
            + (
                f"{arch}'s tags: {', '.join(tags)}"
                if tags
                else f"{arch} has none (timm:{arch} is a random init)"
            )
        )
    return name, get_pretrained_cfg(name).hf_hub_id


def _timm_file(source: str) -> Path | None:
    """The cached weights file of ``timm:NAME.TAG`` (None: timm has them at a URL, not on the
    hub)."""
    hub_id = _timm_name(source)[1]
    if hub_id is None:
        return None
    repo, _, revision = hub_id.partition("@")
    folder = _weights_snapshot(source, repo, revision or None, ["model.safetensors"])
    return (
        folder / "model.safetensors"
        if (folder / "model.safetensors").is_file()
        else folder / _PICKLE
    )


def _weights_snapshot(source: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """The cached snapshot of ``repo`` with the files of ``patterns``, safetensors weights among
    them, or else (the same commit) ``pytorch_model.bin``."""
    folder = _snapshot(source, repo, revision, patterns)
    if not any(folder.glob("*.safetensors")):
        folder = _snapshot(source, repo, folder.name, [_PICKLE])  # the folder's name is its commit
    if not any(folder.glob("*.safetensors")) and not (folder / _PICKLE).is_file():
        raise ConfigError(
            f"{source}: the cached snapshot {folder} holds no weights (*.safetensors or "
            f"{_PICKLE}); " + _how_to_fill(repo, revision)
        )
    return folder


def _snapshot(source: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` of the files of ``patterns``, its errors as one line each."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # offline: the cache alone (some huggingface_hub 1.x releases still ask the hub for a
        # commit's files)
        local = bool(constants.HF_HUB_OFFLINE)
        return Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=patterns, local_files_only=local
            )
        )
    except (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    ) as e:  # offline or no network, not (all) in the cache
        offline = " (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else ""
        raise ConfigError(
            f"{source} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
            f"cannot be reached{offline}; " + _how_to_fill(repo, revision)
        ) from e
    except HFValidationError as e:
        raise ConfigError(
            f"{source!r}: {repo!r} is not a Hugging Face repository id ({_one_line(e)})"
        ) from e
    except RepositoryNotFoundError as e:  # gated and private repositories among them
        raise ConfigError(
            f"{source}: the hub has no repository {repo} that you may read (a gated or private one "
            "needs `hf auth login`)"
        ) from e
    except RevisionNotFoundError as e:
        raise ConfigError(f"{source}: {repo} has no revision {revision!r}") from e
    except (HfHubHTTPError, OSError) as e:  # the hub down, a proxy, a full disk
        raise ConfigError(
            f"{source} could not be fetched ({type(e).__name__}: {_one_line(e)})"
        ) from e


def _how_to_fill(repo: str, revision: str | None) -> str:
    command = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    return (
        f"fill the cache where there is network with `{command}` and copy it here, or point "
        "HF_HUB_CACHE (or HF_HOME) at a filled one"
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())

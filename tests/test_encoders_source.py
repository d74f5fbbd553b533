"""``encoder=`` sources parsed once into a record (``mae.eval.encoders.parse_source``): every form's
kind, location and freshness; folders recognised by the format their files declare, not by
substrings; bad sources refused with the messages the loader gives."""

import json
from pathlib import Path

import pytest
from huggingface_hub import constants

from mae.config import ConfigError
from mae.eval.encoders import LOADERS, EncoderSource, load_encoder, parse_source
from mae.interop import Architecture, architecture_config, is_hf_folder

NOT_A_SOURCE = "is not an export directory (config.json + model.safetensors), a run directory"
# a timm export's config.json, as timm.models.save_for_hf writes it
TIMM_CONFIG = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "pretrained_cfg": {}}


def folder(root: Path, name: str, **files: str | dict) -> Path:
    """A folder ``root/name`` holding ``files`` (name -> text, or a dict written as JSON; dots in a
    file name as ``_``: ``model_safetensors``)."""
    path = root / name
    path.mkdir(parents=True)
    for file, content in files.items():
        text = json.dumps(content) if isinstance(content, dict) else content
        (path / file.replace("_", ".", 1)).write_text(text)
    return path


def hf(root: Path, name: str = "hf") -> Path:
    return folder(root, name, config_json={"model_type": "vit_mae"}, model_safetensors="")


def test_every_kind_has_one_loader():
    assert set(LOADERS) == {
        "pixels",
        "timm_pretrained",
        "timm_random",
        "hf_folder",
        "timm_export",
        "run",
        "project_export",
        "weights",
    }


def test_names_parse_without_files():
    assert parse_source("pixels:8") == EncoderSource("pixels", "8", False, "pixels:8")
    assert parse_source("timm:vit_base_patch16_224.mae") == EncoderSource(
        "timm_pretrained", "vit_base_patch16_224.mae", False, "timm:vit_base_patch16_224.mae"
    )
    assert parse_source("timm:vit_tiny_patch16_224") == EncoderSource(
        "timm_random", "vit_tiny_patch16_224", False, "timm:vit_tiny_patch16_224"
    )


def test_folders_parse_by_their_declared_format(tmp_path):
    hf_dir = hf(tmp_path)
    assert parse_source(str(hf_dir)) == EncoderSource("hf_folder", str(hf_dir), False, str(hf_dir))
    fresh = parse_source(f"random:{hf_dir}")
    assert (fresh.kind, fresh.location, fresh.fresh) == ("hf_folder", str(hf_dir), True)
    timm_dir = folder(tmp_path, "timm", config_json=TIMM_CONFIG, model_safetensors="")
    assert parse_source(str(timm_dir)) == EncoderSource(
        "timm_export", str(timm_dir), False, str(timm_dir)
    )
    project = folder(tmp_path, "project", config_yaml="model: {}\n", model_safetensors="")
    assert parse_source(str(project)) == EncoderSource(
        "project_export", str(project), False, str(project)
    )
    run = folder(tmp_path, "run", config_yaml="model: {}\n")
    assert parse_source(str(run)) == EncoderSource("run", str(run), False, str(run))
    assert parse_source(f"random:{run}") == EncoderSource("run", str(run), True, f"random:{run}")


def test_a_run_stands_for_its_export_unless_fresh(tmp_path):
    timm_run = folder(tmp_path, "timm_run", config_yaml="model: {}\n")
    folder(timm_run, "export", config_json=TIMM_CONFIG, model_safetensors="")
    got = parse_source(str(timm_run))
    assert (got.kind, got.location) == ("timm_export", str(timm_run / "export"))
    project_run = folder(tmp_path, "project_run", config_yaml="model: {}\n")
    folder(project_run, "export", config_yaml="model: {}\n", model_safetensors="")
    got = parse_source(str(project_run))
    assert (got.kind, got.location) == ("project_export", str(project_run / "export"))
    got = parse_source(f"random:{timm_run}")
    assert (got.kind, got.location, got.fresh) == ("run", str(timm_run), True)


def test_weights_files_and_checkpoint_folders(tmp_path):
    pth = tmp_path / "mae_pretrain.pth"
    pth.write_bytes(b"")
    assert parse_source(str(pth)) == EncoderSource("weights", str(pth), False, str(pth))
    assert parse_source(f"random:{pth}").fresh is True
    checkpoint = folder(tmp_path, "step_1", model_safetensors="")
    assert parse_source(str(checkpoint)).kind == "weights"


def test_vit_mae_in_a_config_that_declares_another_format_is_not_a_hugging_face_folder(tmp_path):
    # the text the old substring check looked for, "vit_mae" in quotes, in a timm export's config
    tags = TIMM_CONFIG | {"tags": ["vit_mae", "converted"]}
    timm_dir = folder(tmp_path, "timm", config_json=tags, model_safetensors="")
    assert '"vit_mae"' in (timm_dir / "config.json").read_text()
    assert not is_hf_folder(timm_dir)
    assert parse_source(str(timm_dir)).kind == "timm_export"
    # model_type is another model's; vit_mae only in a description
    other = {"model_type": "vit", "notes": {"vit_mae": "the model it was compared with"}}
    other_dir = folder(tmp_path, "other", config_json=other, model_safetensors="")
    assert '"vit_mae"' in (other_dir / "config.json").read_text()
    assert not is_hf_folder(other_dir)
    with pytest.raises(ConfigError) as e:
        parse_source(str(other_dir))
    assert NOT_A_SOURCE in str(e.value)
    assert is_hf_folder(hf(tmp_path))


def test_a_config_json_that_is_not_a_json_object_declares_nothing(tmp_path):
    broken = folder(tmp_path, "broken", config_json='{"model_type": "vit_mae"')
    listed = folder(tmp_path, "listed", config_json='["vit_mae"]')
    assert not is_hf_folder(broken) and not is_hf_folder(listed)
    assert not is_hf_folder(tmp_path / "missing")


def test_a_hub_name_parses_to_its_cached_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root = tmp_path / "cache" / "models--tiny-org--vit-mae-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = hf(root / "snapshots", commit)
    got = parse_source("random:hf-hub:tiny-org/vit-mae-tiny")
    assert got == EncoderSource(
        "hf_folder", str(snapshot), True, "random:hf-hub:tiny-org/vit-mae-tiny"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("pixels:big", "encoder='pixels:big': give the image size in pixels, e.g. pixels:32"),
        ("pixels:0", "encoder='pixels:0': give the image size in pixels, e.g. pixels:32"),
        ("pixels:", "encoder='pixels:': give the image size in pixels, e.g. pixels:32"),
        (
            "timm:not_a_model",
            "encoder='timm:not_a_model': timm has no model 'not_a_model'; see timm.list_models()",
        ),
        ("random:timm:vit_tiny_patch16_224", "names no weights (timm:NAME alone is a random"),
        ("hf-hub:facebook", "give a Hugging Face repository as hf-hub:ORG/NAME"),
        ("random:pixels:8", "encoder='random:pixels:8' " + NOT_A_SOURCE),
    ],
)
def test_bad_names_are_refused(text, message):
    with pytest.raises(ConfigError) as e:
        parse_source(text)
    assert message in str(e.value)


def test_folders_of_no_declared_format_are_refused(tmp_path):
    untyped = folder(tmp_path, "untyped", config_json={"num_classes": 0}, model_safetensors="")
    empty = folder(tmp_path, "empty")
    for path in (untyped, empty, tmp_path / "missing"):
        with pytest.raises(ConfigError) as e:
            parse_source(str(path))
        assert str(e.value).startswith(f"encoder={str(path)!r} {NOT_A_SOURCE}")


def test_num_heads_is_for_weights_files_alone(tmp_path):
    for source in ("pixels:8", str(hf(tmp_path))):
        with pytest.raises(ConfigError) as e:
            load_encoder(source, num_heads=4)
        assert str(e.value) == (
            "num_heads=4 applies to weights files only (they do not record it); "
            f"{source!r} records its own: leave num_heads out"
        )


def test_architecture_config_builds_what_the_weights_say():
    model = {"patch_size": 4, "embed_dim": 48, "depth": 3, "num_heads": 1, "mlp_ratio": 2.0}
    arch = Architecture(model, image_size=16, channels=1)
    cfg = architecture_config(arch, num_heads=4, norm_pix_loss=True)
    assert (cfg.model.name, cfg.model.embed_dim, cfg.model.depth) == ("mae", 48, 3)
    assert (cfg.model.num_heads, cfg.model.norm_pix_loss) == (4, True)
    assert (cfg.data.image_size, cfg.data.channels) == (16, 1)
    assert arch.model["num_heads"] == 1  # the architecture itself is left as it was
    default = architecture_config(Architecture(model, image_size=None, channels=3))
    assert (default.model.num_heads, default.data.image_size) == (1, 32)

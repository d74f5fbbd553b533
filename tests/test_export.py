import json

import pytest
import timm
import torch
from helpers import TINY
from safetensors.torch import load_file

from mae import pretrain
from mae.config import load_config
from mae.export import main as export_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    return pretrain.train(
        load_config(
            None,
            [
                *TINY,
                f"output_dir={out}",
                "train.max_steps=3",
                "data.channels=1",
                "data.mean=[0.5]",
                "data.std=[0.25]",
            ],
        )
    )


def test_timm_loads_export_strictly_with_same_features(trained):
    export = trained.export_dir
    keys = load_file(str(export / "model.safetensors")).keys()
    assert not any(k.startswith(("module.", "_orig_mod.", "encoder.")) for k in keys)
    # strict load inside timm
    timm_model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    assert type(timm_model).__name__ == "VisionTransformer"
    ours = trained.model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(timm_model(x), ours.encode(x), atol=1e-6)
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == [0.5] and cfg["pretrained_cfg"]["std"] == [0.25]
    assert cfg["pretrained_cfg"]["input_size"] == [1, 16, 16]
    data_cfg = timm.data.resolve_data_config({}, model=timm_model)
    assert tuple(data_cfg["mean"]) == (0.5,) and data_cfg["interpolation"] == "bicubic"


def test_command_line_export_matches_and_failure_keeps_old(trained, tmp_path, capsys):
    out = tmp_path / "exp"
    assert export_main([str(trained.run_dir), "--out", str(out)]) == 0
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(trained.export_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = (out / "model.safetensors").read_bytes()
    assert export_main([str(tmp_path / "no_such_run"), "--out", str(out)]) == 1
    assert "has no config.yaml" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


def test_an_interrupted_swap_is_repaired_before_the_next_one(tmp_path):
    from mae.export import replace_dir

    out = tmp_path / "export"
    (tmp_path / "export.old").mkdir()  # the swap died after setting the old export aside
    (tmp_path / "export.old" / "model.safetensors").write_text("previous")
    with pytest.raises(RuntimeError):
        replace_dir(out, lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert (
        out / "model.safetensors"
    ).read_text() == "previous"  # back in place, and kept by the failure
    replace_dir(out, lambda tmp: (tmp.mkdir(), (tmp / "model.safetensors").write_text("new")))
    assert (out / "model.safetensors").read_text() == "new" and not (
        tmp_path / "export.old"
    ).exists()


def test_exported_files_are_readable_as_the_umask_allows(trained):
    import os

    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in trained.export_dir.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json"}
    # safetensors alone writes 0600
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {
        p.name: 0o666 & ~umask for p in files
    }


def test_every_export_has_a_model_card_the_hub_reads(trained, tmp_path):
    """export/README.md in the Hugging Face card format: YAML metadata ModelCard.load parses, what
    was trained and for how long, how to load it; python -m mae.export writes the same card."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained.export_dir / "README.md")
    assert card.data.library_name == "timm" and "masked-autoencoder" in card.data.tags
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert "| length | 3 optimizer steps of 8 images (0.01 epochs) |" in card.text
    assert "at 16x16 px, 1 channel |" in card.text and 'timm.create_model("local-dir:' in card.text
    assert export_main([str(trained.run_dir), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again/README.md").read_text() == (
        trained.export_dir / "README.md"
    ).read_text()

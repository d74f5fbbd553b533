"""A model family is one file plus one registry line: a family defined in this test, registered
here, trains through pretraining's own path and comes back from its run directory."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY
from torch import nn

from mae import pretrain
from mae.config import ConfigError, load_config
from mae.config.families import CLASSIC, FAMILY_DEFAULTS
from mae.export import load_run_model
from mae.models import MODELS, AEOutput, Autoencoder, register


class PatchCodeAutoencoder(Autoencoder):
    """Each 4x4 patch to 8 numbers and back: a family the project does not have."""

    def __init__(self, cfg) -> None:
        super().__init__()
        channels, (h, w) = cfg.data.channels, cfg.data.hw
        self.encoder = nn.Conv2d(channels, 8, kernel_size=4, stride=4)
        self.decoder = nn.ConvTranspose2d(8, channels, kernel_size=4, stride=4)
        self.feature_dim = 8 * (h // 4) * (w // 4)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).flatten(1)  # (B, 8 * H/4 * W/4)

    def forward(self, images: torch.Tensor) -> AEOutput:
        recon = self.decoder(self.encoder(images))  # (B, C, H, W)
        loss = F.mse_loss(recon, images)
        return AEOutput(loss, {"mse": loss.detach()}, None if self.training else recon)


@pytest.fixture
def patch_family():
    register("patch_code", PatchCodeAutoencoder, CLASSIC)
    yield "patch_code"
    MODELS.pop("patch_code")
    FAMILY_DEFAULTS.pop("patch_code")


def test_an_unregistered_family_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"model.name='patch_code' is invalid; choose one of"):
        load_config(None, ["model.name=patch_code"])


def test_a_family_registered_in_a_test_trains_five_steps_through_pretraining(
    tmp_path, patch_family
):
    run = tmp_path / "run"
    overrides = [f"model.name={patch_family}", "train.max_steps=5", "train.log_every=1"]
    cfg = load_config(None, [*TINY, *overrides, f"output_dir={run}", "train.log_with=[]"])
    assert (cfg.data.augment, cfg.train.blr) == (CLASSIC["augment"], CLASSIC["blr"])
    result = pretrain.train(cfg)
    assert result.steps == 5 and isinstance(result.model, PatchCodeAutoencoder)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    assert all(r["terms/mse"] == pytest.approx(r["loss"]) for r in lines)
    # the run's export rebuilds the same family with the trained weights
    model, _ = load_run_model(run)
    assert isinstance(model, PatchCodeAutoencoder)
    for name, value in result.model.state_dict().items():
        assert torch.equal(value.cpu(), model.state_dict()[name])


def test_a_family_cannot_be_registered_twice_or_without_defaults(patch_family):
    with pytest.raises(ValueError, match="already registered"):
        register(patch_family, PatchCodeAutoencoder, CLASSIC)
    with pytest.raises(ValueError, match=r"without defaults for \['warmup_epochs'\]"):
        partial = {k: v for k, v in CLASSIC.items() if k != "warmup_epochs"}
        register("other", PatchCodeAutoencoder, partial)
    assert "other" not in MODELS and "other" not in FAMILY_DEFAULTS


def test_the_built_in_families_are_the_names_the_config_accepts():
    assert list(MODELS) == list(FAMILY_DEFAULTS)

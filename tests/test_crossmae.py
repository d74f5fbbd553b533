"""CrossMAE's decoder (model.decoder=cross): independent queries, a loss on the chosen patches only,
the subset fixed by the mask's noise, and an encoder that everything taking an MAE encoder takes."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from helpers import ROOT, TINY, TINY_ARCH
from safetensors.torch import load_file

from mae.config import ConfigError, load_config
from mae.interop import from_hf, load_into, load_weights
from mae.masking import num_kept, predicted_patches, random_masking
from mae.models import CrossMaskedAutoencoder, MaskedAutoencoder, build_model

pytestmark = pytest.mark.xdist_group("crossmae")  # one pretrained cross run
CROSS = ["model.decoder=cross", "model.reconstruct_ratio=0.25"]
WEIGHTED = [*CROSS, "model.decoder_features=weighted"]


def tiny(*extra: str) -> CrossMaskedAutoencoder:
    torch.manual_seed(0)
    return build_model(load_config(None, [*TINY_ARCH, "data.image_size=16", *extra]))


@pytest.mark.parametrize("features", ["last", "weighted"])
def test_a_query_does_not_depend_on_the_other_queries(features):
    model = tiny(*CROSS, f"model.decoder_features={features}").eval()
    images, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        memories, _, _, ids_restore = model.encoder_outputs(images, noise)
        every = predicted_patches(ids_restore, 12)  # all 12 removed patches
        alone = model.forward_decoder(memories, every[:, -3:])
        among_all = model.forward_decoder(memories, every)[:, -3:]
    torch.testing.assert_close(alone, among_all, rtol=1e-5, atol=1e-6)

    # the same check fails with self-attention
    model = tiny(*CROSS, "model.decoder_self_attn=true").eval()
    with torch.no_grad():
        memories, _, _, ids_restore = model.encoder_outputs(images, noise)
        every = predicted_patches(ids_restore, 12)
        alone = model.forward_decoder(memories, every[:, -3:])
        among_all = model.forward_decoder(memories, every)[:, -3:]
    assert (alone - among_all).abs().max() > 1e-4


def test_loss_and_gradients_touch_only_the_chosen_patches():
    model = tiny(*WEIGHTED).train()
    images, noise = torch.randn(2, 3, 16, 16, requires_grad=True), torch.rand(2, 16)
    model(images, noise).loss.backward()
    _, mask, ids_restore = random_masking(torch.zeros(2, 16, 1), 0.75, noise)
    chosen = torch.zeros(2, 16).scatter(1, predicted_patches(ids_restore, 4), 1.0)
    per_patch = images.grad.abs().unfold(2, 4, 4).unfold(3, 4, 4).sum(dim=(1, 4, 5)).reshape(2, 16)
    visible, unscored = mask == 0, (mask == 1) & (chosen == 0)
    # 25% of the patches, all of them masked
    assert chosen.sum() == 8 and (chosen * mask).sum() == 8
    assert (per_patch[visible] > 0).all() and (per_patch[chosen == 1] > 0).all()
    assert (per_patch[unscored] == 0).all()
    # every parameter but the fixed positions learns (data parallel needs
    # no unused-parameter search)
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == [] and model.decoder_feature_mix.grad.abs().sum() > 0

    # a view of (B, C, 4, 4, 4, 4) patches
    changed = images.detach().clone().unfold(2, 4, 4).unfold(3, 4, 4)
    before = model(images.detach(), noise).loss
    for b, patch in unscored.nonzero().tolist():
        changed[b, :, patch // 4, patch % 4] += 5.0  # writes through the view
    after = model(changed.permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 16, 16), noise).loss
    assert torch.equal(before, after)


def test_the_subset_is_fixed_by_the_noise_and_lies_inside_the_mask():
    noise = torch.rand(4, 64)
    _, mask, ids_restore = random_masking(torch.zeros(4, 64, 1), 0.75, noise)
    small, large = predicted_patches(ids_restore, 16), predicted_patches(ids_restore, 32)
    assert torch.equal(
        small, predicted_patches(random_masking(torch.zeros(4, 64, 1), 0.75, noise)[2], 16)
    )
    assert torch.gather(mask, 1, large).eq(1).all() and small.shape == (4, 16)
    assert all(set(s.tolist()) <= set(g.tolist()) for s, g in zip(small, large, strict=True))
    other = predicted_patches(random_masking(torch.zeros(4, 64, 1), 0.75, torch.rand(4, 64))[2], 16)
    assert not torch.equal(small, other)
    # the same noise gives the same loss; the eval-mode forward predicts every masked patch
    model, images = tiny(*CROSS), torch.randn(2, 3, 16, 16)
    fixed = torch.rand(2, 16)
    assert torch.equal(model(images, fixed).loss, model(images, fixed).loss)
    out = model.eval()(images, fixed)
    removed = 16 - num_kept(16, 0.75)
    assert out.recon.shape == images.shape and out.mask.sum() == 2 * removed * 16


def test_settings_outside_the_cross_decoder_are_refused():
    with pytest.raises(ConfigError, match="model.reconstruct_ratio=0.9 is invalid"):
        load_config(None, [*CROSS[:1], "model.reconstruct_ratio=0.9"])
    with pytest.raises(ConfigError, match="need model.decoder=cross"):
        load_config(None, ["model.reconstruct_ratio=0.25"])
    with pytest.raises(ConfigError, match="need model.decoder=cross"):
        load_config(None, ["model.decoder_features=weighted"])
    assert load_config(None, ["model.mask_ratio=0.6"]).model.reconstruct_ratio == 0.6
    assert isinstance(build_model(load_config(None, [])), MaskedAutoencoder)


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cross") / "run"
    args = [*TINY, *WEIGHTED, "train.max_steps=4", "train.checkpoint_every=4", f"output_dir={out}"]
    proc = subprocess.run(
        [sys.executable, "pretrain.py", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_the_export_is_the_timm_encoder_of_mae(cross_run):
    config = json.loads((cross_run / "export/config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    state = load_file(str(cross_run / "export/model.safetensors"))
    model.load_state_dict(state, strict=True)
    cross = build_model(load_config(cross_run / "config.yaml"))
    cross.load_state_dict(load_file(str(cross_run / "checkpoints/step_4/model.safetensors")))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), cross.eval().encode(images))
    assert (cross_run / "recon_4.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["linear", "knn", "finetune"])
def test_probes_and_fine_tuning_take_the_encoder(cross_run, tmp_path, mode):
    out = tmp_path / mode
    args = [
        f"mode={mode}",
        f"encoder={cross_run}",
        f"output_dir={out}",
        "finetune.max_steps=2",
        "probe.epochs=1",
        "probe.warmup_epochs=0",
    ]
    proc = subprocess.run(
        [sys.executable, "finetune.py", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    # the fraction of the scored images classified right: a whole number of them
    correct = results["top1"] * results["eval_size"]
    assert results["mode"] == mode and abs(correct - round(correct)) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "decoder", [[], CROSS, WEIGHTED], ids=["into_mae", "into_last", "into_weighted"]
)
def test_init_takes_a_cross_run_into_either_decoder(cross_run, tmp_path, decoder):
    out = tmp_path / "from_init"
    args = [
        *TINY,
        *decoder,
        "train.max_steps=1",
        f"init={cross_run / 'checkpoints/step_4'}",
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "pretrain.py", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("decoder is of the other kind" in proc.stdout) == (decoder != WEIGHTED), proc.stdout
    start = load_file(str(cross_run / "checkpoints/step_4/model.safetensors"))
    model = build_model(load_config(out / "config.yaml"))
    done = load_into(model, load_weights(cross_run / "checkpoints/step_4"), "run")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in start.items() if k.startswith("encoder."))
    assert bool(done["fresh"]) == (decoder != WEIGHTED)


def test_a_cross_run_starts_from_an_mae_checkpoint(tmp_path):
    mae = build_model(load_config(None, [*TINY_ARCH, "data.image_size=16"]))
    torch.save({"model": mae.state_dict()}, tmp_path / "mae.pth")
    cross = tiny(*WEIGHTED)
    done = load_into(cross, load_weights(tmp_path / "mae.pth"), "mae.pth")
    assert done["other_decoder"] and "decoder_feature_mix" in done["fresh"]
    assert torch.equal(cross.encoder.blocks[1].mlp.fc2.weight, mae.encoder.blocks[1].mlp.fc2.weight)


@pytest.mark.slow
def test_the_hugging_face_export_is_the_encoder(cross_run, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "mae.export", str(cross_run), "--format", "hf", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import ViTMAEModel

    hf = ViTMAEModel.from_pretrained(str(out))
    ours = load_file(str(cross_run / "checkpoints/step_4/model.safetensors"))
    torch.testing.assert_close(hf.layernorm.weight, ours["encoder.norm.weight"])
    back, _ = from_hf(hf)
    assert all(
        torch.equal(back.state_dict()[k], v) for k, v in ours.items() if k.startswith("encoder.")
    )


def test_evaluate_reconstruct_predicts_every_masked_patch(cross_run, tmp_path):
    from mae.evaluate import main

    out = tmp_path / "reconstruct"
    args = [
        "reconstruct",
        "--run",
        str(cross_run),
        "--split",
        "train",
        "--max-images",
        "16",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["images"] == 16 and result["mask_ratio"] == 0.75 and 0 < result["mse"] < 10
    assert (out / "reconstruct.png").is_file()

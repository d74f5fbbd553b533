"""The classic autoencoders: the model contract over the registry, closed forms, end to end."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY, reset_accelerate
from PIL import Image

from mae import pretrain, runner
from mae.config import ConfigError, load_config
from mae.config.families import FAMILY_DEFAULTS
from mae.eval.encoders import load_encoder
from mae.evaluate import main as evaluate_main
from mae.losses import bernoulli_kl, kl_diag_gaussians, kl_to_standard_normal
from mae.models import MODELS, build_model
from mae.models.dae import corrupt_pixels

CLASSIC = [n for n in MODELS if n != "mae"]
SMALL = ["data.image_size=16", "model.widths=[8,16]", "model.latent_dim=12"]


def small(name, *extra):
    torch.manual_seed(0)
    return build_model(load_config(None, [f"model.name={name}", *SMALL, *extra]))


@pytest.mark.parametrize(
    "name, extra",
    [
        ("mae", TINY[:6]),
        *[(n, []) for n in CLASSIC],
        ("ae", ["model.arch=mlp"]),
        ("vae", ["data.channels=1"]),
        ("stacked_ae", ["model.arch=mlp", "data.channels=1"]),
    ],
)
def test_every_model_keeps_the_contract(name, extra):
    cfg = load_config(
        None, [f"model.name={name}", *(SMALL if name != "mae" else ["data.image_size=16"]), *extra]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_step(10**6)  # past any warm-up or greedy stage: every parameter is trained
    x = torch.randn(4, cfg.data.channels, 16, 16)
    out = model(x)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(torch.isfinite(v).all() for v in out.terms.values())
    out.loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not missing, missing
    model.eval()
    a, b = model.encode(x), model.encode(x)
    # deterministic: no noise, mask or sampling
    assert a.shape == (4, model.feature_dim) and torch.equal(a, b)
    # a code depends on its own image only
    assert torch.allclose(model.encode(x[:1]), a[:1], atol=1e-5)
    recon = model(x).recon
    assert recon.shape == x.shape


def test_kl_of_diagonal_gaussians_matches_the_closed_form():
    mu_q, mu_p = torch.tensor([[0.3, -1.0]]), torch.tensor([[1.0, 0.5]])
    var_q, var_p = torch.tensor([[0.5, 2.0]]), torch.tensor([[1.5, 0.25]])
    expected = sum(
        math.log(math.sqrt(vp) / math.sqrt(vq)) + (vq + (mq - mp) ** 2) / (2 * vp) - 0.5
        for mq, mp, vq, vp in zip(
            mu_q[0].tolist(), mu_p[0].tolist(), var_q[0].tolist(), var_p[0].tolist(), strict=True
        )
    )
    got = kl_diag_gaussians(mu_q, var_q.log(), mu_p, var_p.log())
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the prior special case, and torch's own implementation
    assert torch.allclose(
        kl_to_standard_normal(mu_q, var_q.log()),
        kl_diag_gaussians(mu_q, var_q.log(), 0 * mu_q, 0 * mu_q),
    )
    q = torch.distributions.Normal(mu_q, var_q.sqrt())
    p = torch.distributions.Normal(mu_p, var_p.sqrt())
    assert got.item() == pytest.approx(
        torch.distributions.kl_divergence(q, p).sum().item(), rel=1e-6
    )


def test_sparsity_kl_matches_the_bernoulli_formula():
    rho, rho_hat = 0.05, torch.tensor([0.05, 0.2, 0.5])
    expected = sum(
        rho * math.log(rho / r) + (1 - rho) * math.log((1 - rho) / (1 - r))
        for r in rho_hat.tolist()
    )
    assert bernoulli_kl(rho, rho_hat).item() == pytest.approx(expected, rel=1e-5)
    assert bernoulli_kl(rho, torch.full((4,), rho)).item() == pytest.approx(0, abs=1e-7)
    model = small("sparse_ae", "model.sparsity_weight=2.0")
    x = torch.randn(8, 3, 16, 16)
    code = model.encode(x)
    assert ((code > 0) & (code < 1)).all()  # sigmoid code
    assert model.penalty(x, code)["sparsity"].item() == pytest.approx(
        2 * bernoulli_kl(0.05, code.mean(0)).item()
    )
    l1 = small("sparse_ae", "model.sparsity=l1")
    code = l1.encode(x)
    assert (code >= 0).all() and l1.stats(code)["density"] == (code > 0).float().mean()


def exact_jacobian_norm(model, x):
    return torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v: model.code(v[None])[0], xi).pow(2).sum()
            for xi in x
        ]
    )


def test_contractive_penalty_exact_for_one_sigmoid_layer():
    model = small("cae", "model.arch=mlp", "model.widths=[]", "data.image_size=8")
    assert model.exact
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(model.jacobian_norm(x), exact_jacobian_norm(model, x), rtol=1e-5)


def test_contractive_estimate_is_unbiased_for_deep_encoders():
    model = small("cae", "model.contractive_projections=4")
    assert not model.exact
    x = torch.randn(2, 3, 16, 16)
    exact = exact_jacobian_norm(model, x)
    torch.manual_seed(0)
    estimates = torch.stack([model.jacobian_norm(x) for _ in range(200)])  # 800 projections
    assert torch.allclose(estimates.mean(0), exact, rtol=0.05)
    # and it trains: the penalty's gradient reaches the encoder
    model.zero_grad()
    model.penalty(x, model.code(x))["contractive"].backward()
    assert model.encoder.fc.weight.grad.abs().sum() > 0


def test_denoising_target_is_the_clean_image():
    model = small("dae", "model.noise_level=0.5")
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    noisy = model.corrupt(x)
    assert not torch.allclose(noisy, x)
    decoded = model.decoder(model.code(noisy)).float()
    assert out.loss.item() == pytest.approx(
        torch.nn.functional.mse_loss(decoded, x).item(), rel=1e-5
    )
    model.eval()
    assert torch.equal(model.encode(x), model.code(x))  # encode sees the clean image


@pytest.mark.parametrize("kind", ["masking", "salt_pepper"])
def test_corruption_levels(kind):
    torch.manual_seed(0)
    pixels = torch.full((8, 3, 32, 32), 0.5)
    noisy = corrupt_pixels(pixels, kind, 0.3, patch=4 if kind == "masking" else 1)
    hit = (noisy != 0.5).all(dim=1)  # every channel of a location alike
    assert ((noisy != 0.5).any(dim=1) == hit).all()
    assert hit.float().mean().item() == pytest.approx(0.3, abs=0.03)
    if kind == "masking":
        assert (noisy[noisy != 0.5] == 0).all()
        blocks = hit.view(8, 8, 4, 8, 4).float().mean(dim=(2, 4))
        assert ((blocks == 0) | (blocks == 1)).all()  # whole 4x4 squares
    else:
        assert set(noisy[noisy != 0.5].unique().tolist()) == {0.0, 1.0}
    gauss = corrupt_pixels(pixels, "gaussian", 0.2)
    assert (gauss - pixels).std().item() == pytest.approx(0.2, rel=0.05)


def test_vae_terms_warmup_and_samples():
    model = small("vae", "model.likelihood=bernoulli", "model.beta=4", "model.beta_warmup_steps=10")
    x = torch.randn(4, 3, 16, 16)
    model.set_step(5)
    out = model(x)
    assert out.terms["beta"].item() == 2.0
    assert out.terms["elbo"].item() == pytest.approx(
        -(out.terms["recon_nll"] + out.terms["kl"]).item(), rel=1e-5
    )
    dims = 3 * 16 * 16
    assert out.terms["bits_per_dim"].item() == pytest.approx(
        -out.terms["elbo"].item() / (dims * math.log(2)), rel=1e-5
    )
    model.set_step(50)
    assert model(x).terms["beta"].item() == 4.0
    samples = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (6, 3, 16, 16) and torch.isfinite(samples).all()
    mu, _ = model.posterior(x)
    assert torch.equal(model.encode(x), mu)


def test_bad_classic_configs_are_refused():
    with pytest.raises(ConfigError, match="data.image_size=20 is not divisible by 8"):
        load_config(None, ["model.name=ae", "data.image_size=20"])
    with pytest.raises(ConfigError, match="model.noise_level=1.5"):
        load_config(None, ["model.name=dae", "model.corruption=masking", "model.noise_level=1.5"])
    with pytest.raises(ConfigError, match="model.widths"):
        load_config(None, ["model.name=ae", "model.widths=[]"])
    with pytest.raises(ConfigError, match="fraction of code units zeroed"):
        load_config(
            None, ["model.name=stacked_ae", "model.stack_denoising=true", "model.noise_level=2"]
        )
    with pytest.raises(
        ConfigError, match="train.online_probe=true does not work with model.name=stacked_ae"
    ):
        load_config(None, ["model.name=stacked_ae", "train.online_probe=true"])
    # their forward follows the step: compiling would recompile each step
    for name in (
        "vae",
        "stacked_ae",
    ):
        with pytest.raises(
            ConfigError, match=f"train.compile=true does not work with model.name={name}"
        ):
            load_config(None, [f"model.name={name}", "train.compile=true"])
    assert load_config(None, ["model.name=dae", "train.compile=true"]).train.compile


@pytest.mark.parametrize("name", ["vae", "dae"])
def test_pretrain_export_and_probe_end_to_end(tmp_path, name):
    out = tmp_path / name
    cfg = load_config(
        None,
        [
            f"model.name={name}",
            *SMALL,
            "data.num_workers=0",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.recon_images=2",
            f"output_dir={out}",
            "train.blr=1e-2",
        ],
    )
    result = pretrain.train(cfg)
    assert (out / "recon_4.png").is_file()
    assert (out / "samples_4.png").is_file() == (name == "vae")
    assert (out / "export/model.safetensors").is_file() and (out / "export/config.yaml").is_file()
    encoder = load_encoder(str(out))
    assert encoder.kind == "autoencoder" and encoder.default_pool == "encode"
    x = torch.randn(2, 3, 16, 16)
    result.model.eval()
    assert torch.allclose(encoder.features(x, "encode"), result.model.encode(x))
    fresh = load_encoder(f"random:{out}")
    assert fresh.sha256 != encoder.sha256


@pytest.mark.parametrize("arch", [[], ["model.arch=mlp", "model.widths=[64,32]"]])
def test_stacked_stages_train_one_layer_at_a_time(arch):
    model = small("stacked_ae", "model.stage_steps=3", "model.stack_denoising=true", *arch)
    x = torch.randn(4, 3, 16, 16)
    layers = model.stages
    assert len(layers) == 3
    for step, trained in [
        (0, [layers[0]]),
        (4, [layers[1]]),
        (8, [layers[2]]),
        (9, layers),
        (50, layers),
    ]:
        model.set_step(step)
        model.zero_grad()
        out = model(x)
        out.loss.backward()
        got = sorted(
            {int(n.split(".")[1]) for n, p in model.named_parameters() if p.grad is not None}
        )
        assert got == trained and out.terms["stage"].item() == min(step // 3, 3)
        # the encoder layers below the one trained are frozen, those above unused
    model.eval()
    assert model(x).recon.shape == x.shape and model.encode(x).shape == (4, 12)
    # decoders of hidden codes end with the codes' own non-linearity; the image decoder does not
    assert [
        isinstance(d, torch.nn.Sequential) and isinstance(d[-1], torch.nn.GELU)
        for d in model.decoders
    ] == [i > layers[0] for i in range(len(model.decoders))]


def test_stacked_resume_across_a_stage_boundary_is_exact(tmp_path, monkeypatch):
    common = [
        "model.name=stacked_ae",
        *SMALL,
        "model.stage_steps=4",
        "model.stack_denoising=true",
        "data.num_workers=0",
        "train.batch_size=8",
        "train.max_steps=14",
        "train.checkpoint_every=6",
        "train.log_every=1",
        "train.blr=1e-2",
    ]
    straight = pretrain.train(load_config(None, [*common, f"output_dir={tmp_path / 'a'}"]))
    reset_accelerate()
    real_write = runner.MetricLog.write

    def write_then_crash(self, step, *args):
        # after the step-6 checkpoint (stage 1), before the stage-2 boundary at 8 is saved
        if step == 9:
            raise RuntimeError("killed")
        return real_write(self, step, *args)

    monkeypatch.setattr(runner.MetricLog, "write", write_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        pretrain.train(load_config(None, [*common, f"output_dir={tmp_path / 'b'}"]))
    monkeypatch.undo()
    reset_accelerate()
    resumed = pretrain.train(load_config(None, [*common, f"output_dir={tmp_path / 'b'}"]))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.model.stage() == 3  # ended in the end-to-end stage


def blob_folder(root, train=600, test=200, size=28):
    """Grayscale images of one Gaussian blob at a random position and width: three numbers per
    image, which a non-linear code of a few dimensions can hold and a linear one (PCA) cannot."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, n in (("train", train), ("test", test)):
        (root / split / "blobs").mkdir(parents=True)
        for i in range(n):
            cy, cx = rng.uniform(6, size - 6, 2)
            sigma = rng.uniform(1.5, 4.0)
            a = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
            Image.fromarray((255 * a).astype(np.uint8), "L").save(
                root / split / "blobs" / f"{i}.png"
            )
    return root


def test_an_mlp_autoencoder_with_its_defaults_beats_pca_at_equal_code_size(tmp_path):
    data = blob_folder(tmp_path / "blobs")
    run = tmp_path / "ae"
    cfg = load_config(
        None,
        [
            "model.name=ae",
            "model.arch=mlp",
            "model.latent_dim=4",
            f"data.dataset={data}",
            "data.image_size=28",
            "data.channels=1",
            f"output_dir={run}",
            "train.epochs=100",
            "data.on_device=true",
        ],
    )
    family = FAMILY_DEFAULTS["ae"]
    assert (cfg.data.augment, cfg.train.blr, cfg.model.widths) == (
        family["augment"],
        family["blr"],
        (512, 256),
    )
    pretrain.train(cfg)
    assert evaluate_main(["reduce", "--run", str(run), "--fit-images", "600"]) == 0
    result = json.loads((run / "evaluate/reduce/metrics.json").read_text())["reconstruction"]
    # dB, on the 200 test images
    assert result["encoder"]["psnr_db"] > result["pca"]["psnr_db"] + 1.0


def test_each_family_resolves_its_own_defaults_and_mae_keeps_the_papers():
    mae = load_config(None, [])
    assert (mae.data.augment, mae.train.blr, mae.train.weight_decay, mae.train.warmup_epochs) == (
        "crop",
        1e-3,
        0.05,
        1,
    )
    for name in ("ae", "dae", "sparse_ae", "cae", "vae", "stacked_ae"):
        cfg = load_config(None, [f"model.name={name}"])
        family = FAMILY_DEFAULTS[name]
        assert (cfg.data.augment, cfg.train.blr, cfg.train.weight_decay) == (
            family["augment"],
            family["blr"],
            family["weight_decay"],
        )
    given = load_config(
        None, ["model.name=ae", "data.augment=crop", "train.blr=3e-3", "train.weight_decay=0.05"]
    )
    # yours stay
    assert (given.data.augment, given.train.blr, given.train.weight_decay) == (
        "crop",
        3e-3,
        0.05,
    )
    with pytest.raises(
        ConfigError, match="data.decoder=dali decodes the crops of data.augment=crop"
    ):
        load_config(None, ["model.name=ae", "data.augment=flip", "data.decoder=dali"])


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_data_augment_none_and_flip_show_the_whole_image(augment):
    from mae.data.images import augment_transform, eval_transform, seeded_sample
    from mae.data.loading import load_split
    from mae.data.on_device import DecodedImages, DeviceAugment

    cfg = load_config(None, ["model.name=ae", f"data.augment={augment}"]).data
    split = load_split(cfg).select(range(16))
    whole = eval_transform(cfg)
    data = DecodedImages(split, cfg)
    device = DeviceAugment(data, cfg, seed=0, noise_length=None, device=torch.device("cpu"))
    keys = torch.tensor([[0, i] for i in range(16)])
    on_device = device(keys, data.labels[:16]).images
    flipped = set()
    for i in range(16):
        image = split[i]["image"]
        x, _ = seeded_sample(augment_transform(cfg), image, seed=i, noise_length=None)
        ref = whole(image)
        assert torch.equal(x, ref) or (augment == "flip" and torch.equal(x, ref.flip(-1)))
        flipped.add(not torch.equal(x, ref))
        assert torch.allclose(on_device[i], ref, atol=1e-5) or (
            augment == "flip" and torch.allclose(on_device[i], ref.flip(-1), atol=1e-5)
        )
    assert flipped == ({False} if augment == "none" else {False, True})

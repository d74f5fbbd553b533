import math

import numpy as np
import pytest
import torch
from helpers import TINY_ARCH

from mae.config import load_config
from mae.models import MODELS, AEOutput, Autoencoder, build_model
from mae.models.mae import sincos_pos_embed


def tiny(*extra):
    return build_model(load_config(None, [*TINY_ARCH, "data.image_size=16", *extra]))


def official_sincos(dim, grid_size):
    """Reference: the official MAE get_2d_sincos_pos_embed, in numpy, without the cls row."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gh, gh), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_sincos_matches_official():
    ours = sincos_pos_embed(64, (5, 5))
    assert ours.shape == (1, 26, 64)
    assert torch.all(ours[0, 0] == 0)
    assert np.allclose(ours[0, 1:].numpy(), official_sincos(64, 5), atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_contract(name):
    """Every registered family honours the Autoencoder interface."""
    model = tiny(f"model.name={name}")
    assert isinstance(model, Autoencoder)
    x = torch.randn(3, 3, 16, 16)
    out = model(x)
    assert isinstance(out, AEOutput) and out.loss.ndim == 0 and out.loss.requires_grad
    assert all(not v.requires_grad for v in out.terms.values())
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        feats = model.encode(x)
        assert feats.shape == (3, model.feature_dim)
        assert torch.equal(feats, model.encode(x))  # deterministic
        out = model(x)
    assert out.recon.shape == x.shape
    assert isinstance(model.encoder, torch.nn.Module)


@pytest.mark.parametrize("channels, size, patch", [(1, 16, 4), (4, 24, 8), (3, 14, 7)])
def test_any_channels_size_patch(channels, size, patch):
    model = tiny(
        f"data.channels={channels}", f"data.image_size={size}", f"model.patch_size={patch}"
    )
    x = torch.randn(2, channels, size, size)
    model.eval()
    out = model(x)
    assert out.recon.shape == x.shape and out.mask.shape == (2, 1, size, size)
    L = (size // patch) ** 2
    assert out.mask.sum().item() == 2 * (L - int(L * 0.25)) * patch * patch


def test_noise_fixes_mask_and_loss():
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    a, b = model(x, noise=noise), model(x, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.loss, b.loss)
    assert not torch.equal(model(x, noise=torch.rand(2, 16)).mask, a.mask)


def test_loss_ignores_visible_patches():
    """Changing a *visible* patch changes the encoder input but not the target of the loss."""
    model = tiny("model.norm_pix_loss=false").eval()
    x = torch.randn(1, 3, 16, 16)
    noise = torch.arange(16, dtype=torch.float32).unsqueeze(0)  # keeps patches 0..3 (the top row)
    latent, mask, ids_restore = model.forward_encoder(x, noise)
    assert mask[0, :4].tolist() == [0, 0, 0, 0] and mask[0, 4:].eq(1).all()
    pred = model.forward_decoder(latent, ids_restore)
    y = x.clone()
    # patch 0, visible: only its own term would change, and it is not counted
    y[:, :, :4, :4] += 10.0
    loss_x, _ = model.forward_loss(x, pred, mask)
    loss_y, _ = model.forward_loss(y, pred, mask)
    assert torch.equal(loss_x, loss_y)


def test_encoder_sees_only_visible_patches():
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    noise = torch.arange(16, dtype=torch.float32).repeat(2, 1)  # keeps patches 0..3 (the top row)
    latent, mask, _ = model.forward_encoder(x, noise)
    assert latent.shape == (2, 1 + 4, 32)  # cls + 25% of 16 patches
    y = x.clone()
    y[:, :, 4:, :] = torch.randn(2, 3, 12, 16)  # every hidden patch changes ...
    # ... and the encoder cannot tell
    assert torch.equal(model.forward_encoder(y, noise)[0], latent)
    y[:, :, :4, 4:8] += 1.0  # a visible one changes: it can
    assert not torch.allclose(model.forward_encoder(y, noise)[0], latent)


def test_decoder_unshuffles_to_patch_order():
    """The decoder puts every kept token back at its own patch index (mask tokens elsewhere) before
    adding position embeddings: compare with a sequence assembled by hand."""
    model = tiny().eval()
    x = torch.randn(1, 3, 16, 16)
    noise = torch.rand(1, 16)
    latent, mask, ids_restore = model.forward_encoder(x, noise)
    pred = model.forward_decoder(latent, ids_restore)
    # Reference: put tokens in patch order by hand (kept tokens at their patch index, mask tokens
    # elsewhere)
    tokens = model.decoder_embed(latent)
    keep_ids = torch.argsort(noise, dim=1)[0, : latent.shape[1] - 1]
    seq = model.mask_token.expand(1, 16, -1).clone()
    seq[0, keep_ids] = tokens[0, 1:]
    seq = torch.cat([tokens[:, :1], seq], dim=1) + model.decoder_pos_embed
    ref = model.decoder_pred(model.decoder_norm(model.decoder_blocks(seq)))[:, 1:]
    assert torch.allclose(pred, ref, atol=1e-6)


def test_initial_loss_is_about_one_with_norm_pix():
    # targets are per-patch standardised, and the init predicts near zero: MSE ~ 1
    torch.manual_seed(0)
    loss = tiny()(torch.randn(8, 3, 16, 16)).loss.item()
    assert 0.5 < loss < 2.5 and math.isfinite(loss)


def test_weight_decay_exemptions():
    from mae.config import derive
    from mae.pretrain import build_optimizer

    cfg = load_config(None, [*TINY_ARCH, "data.image_size=16"])
    model = build_model(cfg)
    opt = build_optimizer(model, cfg, derive(cfg, 1000, 1))
    assert opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "decoder_pred.weight" in decayed
    assert not any(n.endswith(".bias") or "norm" in n or "token" in n for n in decayed)
    trainable = {names[id(p)] for g in opt.param_groups for p in g["params"]}
    assert "encoder.pos_embed" not in trainable  # fixed sin-cos


def test_fused_adamw_takes_the_same_groups_and_steps_alike():
    # the trainer's GPU optimizer (fused=True) against the default one: same groups, and from the
    # same gradients the same update up to fp32 rounding
    from mae.config import derive
    from mae.pretrain import build_optimizer

    cfg = load_config(None, [*TINY_ARCH, "data.image_size=16"])
    torch.manual_seed(0)
    models = [build_model(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    derived = derive(cfg, 1000, 1)
    opts = [
        build_optimizer(m, cfg, derived, fused=f)
        for m, f in zip(models, (False, True), strict=True)
    ]
    assert opts[1].defaults["fused"] is True and not opts[0].defaults.get("fused")
    assert [len(g["params"]) for g in opts[0].param_groups] == [
        len(g["params"]) for g in opts[1].param_groups
    ]
    images, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    steps = 3
    for _ in range(steps):
        # both take model 0's gradients: fed their own, the two would drift apart through the
        # loss (a gradient near 0 can turn Adam's update around), which is not the optimizer's
        models[0](images, noise=noise).loss.backward()
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            b.grad = None if a.grad is None else a.grad.clone()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    # Each step computes p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p) in fp32, in another
    # order of operations: a few roundings of |p| and of the update, whose size is at most lr
    # times Adam's bound |m_hat| / sqrt(v_hat) <= 1 / sqrt(1 - beta2) here, plus decay.
    beta2 = cfg.train.betas[1]
    update = derived.lr * (1 / (1 - beta2) ** 0.5 + cfg.train.weight_decay)
    eps32 = torch.finfo(torch.float32).eps
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        tol = steps * 8 * eps32 * (b.abs() + update)
        assert ((a - b).abs() <= tol).all(), (a - b).abs().max()
    assert all(
        not torch.equal(a, b)
        for a, b in zip(models[1].parameters(), start, strict=True)
        if a.requires_grad
    )

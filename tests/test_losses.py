import torch

from mae.losses import masked_mse, normalize_patches


def test_masked_mse_counts_removed_patches_only():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the huge error sits on a kept patch
    assert masked_mse(pred, target, mask).item() == (1.0 + 4.0) / 2


def test_normalize_patches_unbiased_like_official():
    p = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    normed, mean, std = normalize_patches(p)
    var = ((p - 2.5) ** 2).sum() / 3  # unbiased
    assert torch.allclose(mean, torch.tensor(2.5))
    assert torch.allclose(std, (var + 1e-6).sqrt())
    assert torch.allclose(normed * std + mean, p)

import pytest
import torch

from mae.masking import num_kept, patchify, random_masking, unpatchify


@pytest.mark.parametrize("channels, size, patch", [(1, 8, 4), (3, 12, 4), (4, 16, 8), (3, 6, 2)])
def test_patchify_round_trip(channels, size, patch):
    x = torch.randn(2, channels, size, size)
    p = patchify(x, patch)
    assert p.shape == (2, (size // patch) ** 2, patch * patch * channels)
    assert torch.equal(unpatchify(p, patch, channels, (size // patch, size // patch)), x)


def test_patchify_layout_matches_official_convention():
    # official MAE: 'nchpwq->nhwpqc' -> patch index h*W + w, inside a patch (row, col, channel)
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = patchify(x, 2)
    ref = x.reshape(1, 2, 2, 2, 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(1, 4, 8)
    assert torch.equal(p, ref)
    # patch (0,1), pixel (0,0), c0 c1
    assert p[0, 1, :2].tolist() == [
        x[0, 0, 0, 2].item(),
        x[0, 1, 0, 2].item(),
    ]


def test_noise_fixes_the_mask_ascending_argsort():
    tokens = torch.arange(8, dtype=torch.float32).view(1, 8, 1).repeat(2, 1, 3)
    noise = torch.tensor(
        [[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]]
    )
    kept, mask, ids_restore = random_masking(tokens, 0.75, noise)
    assert num_kept(8, 0.75) == 2
    assert kept[0, :, 0].tolist() == [1.0, 3.0]  # the two smallest noise values, in ascending order
    assert kept[1, :, 0].tolist() == [0.0, 1.0]
    assert mask[0].tolist() == [1, 0, 1, 0, 1, 1, 1, 1]  # 0 keep, 1 remove, in patch order
    assert mask.sum(1).tolist() == [6, 6]
    # ids_restore puts the shuffled sequence (kept first) back in patch order
    shuffled = torch.gather(tokens, 1, torch.argsort(noise, 1).unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(
        torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 3)), tokens
    )


def test_random_noise_masks_differ_per_sample_and_count_is_exact():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.zeros(4, 49, 2), 0.6)
    assert mask.sum(1).tolist() == [49 - int(49 * 0.4)] * 4
    assert not torch.equal(mask[0], mask[1])


def test_noise_shape_is_checked():
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 4\)"):
        random_masking(torch.zeros(2, 4, 1), 0.5, torch.zeros(2, 5))

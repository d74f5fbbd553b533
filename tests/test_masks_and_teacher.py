"""Several masks per image (train.masks_per_image) and teacher targets (model.target=teacher):
the masks' index rules, the teacher's schedule and isolation from the gradient, and runs that use
both, exported and probed. (Exact resume, two processes and FSDP: test_pretrain, test_resilience
and test_distributed run their cases with both keys.)"""

import json

import pytest
import timm
import torch
from helpers import TINY, colour_folder, reset_accelerate

from mae import pretrain
from mae.config import load_config
from mae.config.evaluation import load_eval_config
from mae.eval.probe import probe
from mae.masking import mask_views, random_masking
from mae.models import build_model

TEACHER = ["model.target=teacher", "model.teacher_layers=2"]


def visible(noise: torch.Tensor, views: int, ratio: float) -> torch.Tensor:
    """(views, B, L): 1 where a view shows a patch; ``noise``: mask_views' (views * B, L)."""
    rows, length = noise.shape
    _, mask, _ = random_masking(torch.zeros(rows, length, 1), ratio, noise)
    return (1 - mask).view(views, rows // views, length)


def test_the_masks_of_an_image_are_disjoint_and_at_k_1_over_1_minus_r_show_every_patch_once():
    noise = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    shown = visible(mask_views(noise, 4, 0.75), 4, 0.75)
    assert torch.equal(shown.sum(0), torch.ones(5, 64))  # each patch visible in one mask of four
    assert torch.equal(shown.sum(2), torch.full((4, 5), 16.0))
    two = visible(mask_views(noise, 2, 0.75), 2, 0.75)
    assert two.sum(0).max() == 1 and two.sum() == 2 * 5 * 16  # disjoint, 32 of 64 shown
    # the first mask is the sample's own
    _, own, _ = random_masking(torch.zeros(5, 64, 1), 0.75, noise)
    assert torch.equal(visible(mask_views(noise, 6, 0.75), 6, 0.75)[0], 1 - own)
    # more masks than fit: they overlap, cyclically, and still cover every patch
    six = visible(mask_views(noise, 6, 0.75), 6, 0.75)
    assert six.sum(0).min() >= 1 and six.sum(0).max() == 2


@pytest.mark.parametrize("decoder", [[], ["model.decoder=cross", "model.reconstruct_ratio=0.5"]])
def test_the_loss_of_k_masks_is_the_mean_of_their_losses(decoder):
    """One forward of K=3 masks per image against three forwards of one mask each, the noise of
    each view given: the same loss, averaged, for the paper's decoder and CrossMAE's."""
    cfg = load_config(None, [*TINY, "train.masks_per_image=3", *decoder])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    together = model(images, noise=noise).loss
    model.masks_per_image = 1
    views = mask_views(noise, 3, cfg.model.mask_ratio).view(3, 4, 16)
    apart = torch.stack([model(images, noise=v).loss for v in views]).mean()
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)


def test_the_teacher_is_not_trained_by_the_gradient_and_follows_its_ema_schedule():
    args = [*TINY, *TEACHER, "model.ema_decay=0.9", "model.ema_end_decay=0.99"]
    cfg = load_config(None, [*args, "model.ema_anneal_steps=10"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    teacher = model.teacher
    assert [k for k in model.state_dict() if k.startswith("teacher.")]  # in every checkpoint
    assert not any(p.requires_grad for p in teacher.parameters())
    optimizer = pretrain.build_optimizer(model, cfg, pretrain.derive(cfg, 3000, 1))
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    assert teacher.decay_at(0) == 0.9 and teacher.decay_at(10) == teacher.decay_at(99) == 0.99
    assert teacher.decay_at(5) == pytest.approx(0.945)
    # a training step moves the student, not the teacher
    before = [p.clone() for p in teacher.parameters()]
    model.set_step(0)  # a copy of the student: nothing to follow yet
    model(torch.randn(2, 3, 16, 16)).loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    # before step 5's forward passes it moves 1 - 0.945 of the way, once per step
    student = [p.detach().clone() for p in model.encoder.parameters()]
    expected = [t.lerp(s, 1 - 0.945) for t, s in zip(before, student, strict=True)]
    model.set_step(5)
    model.set_step(5)  # a second micro-batch of the same step
    for got, want in zip(teacher.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


def test_teacher_targets_are_refused_where_they_cannot_work():
    with pytest.raises(Exception, match="model.target=teacher distils a ViT's own features"):
        load_config(None, [*TINY, "model.name=vae", "model.target=teacher"])
    with pytest.raises(Exception, match="model.teacher_layers=3 is more than the encoder's 2"):
        load_config(None, [*TINY, "model.target=teacher", "model.teacher_layers=3"])
    with pytest.raises(Exception, match="train.masks_per_image=2 masks the patches of a ViT"):
        load_config(None, [*TINY, "model.name=ae", "train.masks_per_image=2"])


def test_a_run_with_both_exports_for_timm_and_probes(tmp_path, capsys):
    """K=2 masks per image and teacher targets: trains, says so, exports the student encoder,
    which timm loads and a kNN probe scores."""
    data = colour_folder(tmp_path / "colours", per_class=16)
    args = [*TINY, *TEACHER, "train.masks_per_image=2", f"data.dataset={data}"]
    run = tmp_path / "run"
    result = pretrain.train(load_config(None, [*args, f"output_dir={run}", "train.max_steps=6"]))
    reset_accelerate()
    out = capsys.readouterr().out
    assert "2 masks per image: 16 masked views per optimizer step" in out
    assert "targets: an EMA teacher's top 2 blocks" in out
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    with torch.no_grad():
        mine = result.model.eval().encode(torch.zeros(1, 3, 16, 16))
        torch.testing.assert_close(model(torch.zeros(1, 3, 16, 16)), mine)
    cfg = load_eval_config(
        None,
        [f"encoder={run}", f"data.dataset={data}", "mode=knn", f"output_dir={tmp_path / 'knn'}"]
        + [f"probe.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"],
    )
    assert 0 <= probe(cfg)["top1"] <= 1

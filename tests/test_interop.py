"""Weights in: official MAE checkpoints, timm ViTs and the project's own, loaded strictly."""

import os

import pytest
import torch
from helpers import TINY
from safetensors.torch import load_file, save_file

from mae import pretrain
from mae.config import ConfigError, load_config
from mae.interop import WeightsError, load_into, load_pretrain_config, load_weights
from mae.models import build_model


def tiny(seed, *extra):
    torch.manual_seed(seed)
    return build_model(load_config(None, [*TINY, *extra]))


def official(model):
    """The model's weights under the official facebookresearch/mae names."""
    return {k.removeprefix("encoder."): v.clone() for k, v in model.state_dict().items()}


def test_an_official_full_checkpoint_gives_the_same_model(tmp_path):
    source = tiny(1)
    path = tmp_path / "mae_pretrain_full.pth"
    torch.save({"model": official(source), "epoch": 799}, path)
    target = tiny(2)
    done = load_into(target, load_weights(path), str(path))
    assert done["fresh"] == [] and done["pos_embed_regrid"] == {}
    a, b = source.state_dict(), target.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    source.eval()
    target.eval()
    assert torch.equal(source(x, noise=noise).loss, target(x, noise=noise).loss)


def test_an_encoder_only_checkpoint_leaves_a_fresh_decoder(tmp_path):
    source, target = tiny(1), tiny(2)
    fresh_decoder = {
        k: v.clone() for k, v in target.state_dict().items() if not k.startswith("encoder.")
    }
    encoder_only = {
        k: v for k, v in official(source).items() if not k.startswith(("decoder_", "mask_token"))
    }
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain.pth")
    done = load_into(target, load_weights(tmp_path / "mae_pretrain.pth"), "x")
    assert set(done["fresh"]) == set(fresh_decoder)
    state = target.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fresh_decoder.items())
    assert all(
        torch.equal(state[k], v) for k, v in source.state_dict().items() if k.startswith("encoder.")
    )


def test_a_timm_export_loads_as_the_encoder(tmp_path):
    source = tiny(1)
    save_file(
        {k: v.contiguous() for k, v in source.encoder.state_dict().items()},
        tmp_path / "model.safetensors",
    )
    target = tiny(2)
    done = load_into(target, load_weights(tmp_path), "x")
    assert done["fresh"] and all(not k.startswith("encoder.") for k in done["fresh"])
    assert torch.equal(
        target.encoder.blocks[0].attn.qkv.weight, source.encoder.blocks[0].attn.qkv.weight
    )


def test_another_grid_keeps_the_models_own_sincos(tmp_path):
    source, target = tiny(1), tiny(2, "data.image_size=24")
    torch.save({"model": official(source)}, tmp_path / "a.pth")
    done = load_into(target, load_weights(tmp_path / "a.pth"), "x")
    assert done["pos_embed_regrid"]["encoder.pos_embed"] == [[1, 17, 32], [1, 37, 32]]
    assert torch.equal(
        target.encoder.patch_embed.proj.weight, source.encoder.patch_embed.proj.weight
    )


def test_wrong_shapes_and_foreign_keys_name_the_key(tmp_path):
    torch.save(
        {"model": official(tiny(1, "model.embed_dim=48", "model.num_heads=2"))},
        tmp_path / "wide.pth",
    )
    with pytest.raises(
        WeightsError, match=r"encoder.cls_token has shape \(1, 1, 48\) in the file and \(1, 1, 32\)"
    ):
        load_into(tiny(2), load_weights(tmp_path / "wide.pth"), "wide.pth")
    torch.save({"model": {"conv1.weight": torch.zeros(3)}}, tmp_path / "resnet.pth")
    with pytest.raises(WeightsError, match="no counterpart"):
        load_into(tiny(2), load_weights(tmp_path / "resnet.pth"), "resnet.pth")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mae_interop_pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": RunsCode()}, path)
    if os.path.exists("/tmp/mae_interop_pwned"):
        os.remove("/tmp/mae_interop_pwned")
    with pytest.raises(WeightsError, match="never done"):
        load_weights(path)
    assert not os.path.exists("/tmp/mae_interop_pwned")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable checkpoint|never done"):
        load_weights(tmp_path / "junk.pth")


def test_pretraining_starts_from_init(tmp_path):
    source = tiny(1)
    torch.save({"model": official(source)}, tmp_path / "start.pth")
    out = tmp_path / "run"
    cfg = load_pretrain_config(
        None, [*TINY, f"output_dir={out}", f"init={tmp_path / 'start.pth'}", "train.max_steps=1"]
    )
    result = pretrain.train(cfg)
    trained = load_file(str(out / "checkpoints/step_1/model.safetensors"))
    init = source.state_dict()
    # one small step away from the given weights, far from a fresh initialisation
    delta = (
        (trained["encoder.blocks.0.attn.qkv.weight"] - init["encoder.blocks.0.attn.qkv.weight"])
        .abs()
        .max()
    )
    fresh = tiny(0).state_dict()["encoder.blocks.0.attn.qkv.weight"]
    assert delta < 1e-3 < (trained["encoder.blocks.0.attn.qkv.weight"] - fresh).abs().max()
    assert result.steps == 1
    with pytest.raises(ConfigError, match="needs model.name=mae"):
        load_config(None, ["model.name=ae", "init=x.pth"])


transformers = pytest.importorskip(
    "transformers", reason="transformers (dev extra) is needed for the HF tests"
)


def hf_equal(ours, hf, x, noise):
    """Our loss, predictions and mask against HF's for the same images and noise."""
    ours.eval()
    latent, mask, ids_restore = ours.forward_encoder(x, noise)
    pred = ours.forward_decoder(latent, ids_restore)
    loss, _ = ours.forward_loss(x, pred, mask)
    with torch.no_grad():
        out = hf(pixel_values=x, noise=noise)
    assert torch.equal(out.mask, mask)
    assert torch.allclose(out.logits, pred, atol=1e-5)
    assert torch.allclose(out.loss, loss, atol=1e-5)


def test_hugging_face_vitmae_converts_both_ways_with_equal_outputs(tmp_path):
    from transformers import ViTMAEForPreTraining

    from mae.interop import from_hf, hf_config, to_hf

    cfg = load_config(None, [*TINY])
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    # HF (random weights) -> ours
    torch.manual_seed(3)
    hf = ViTMAEForPreTraining(hf_config(cfg)).eval()
    ours, got = from_hf(hf)
    assert (got.model.embed_dim, got.model.depth, got.model.num_heads, got.data.image_size) == (
        32,
        2,
        2,
        16,
    )
    hf_equal(ours, hf, x, noise)
    # ours (random weights) -> HF, through save_pretrained / from_pretrained
    mine = tiny(4)
    to_hf(mine, cfg).save_pretrained(tmp_path / "hf")
    back = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    hf_equal(mine, back, x, noise)
    again, _ = from_hf(tmp_path / "hf")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in mine.state_dict().items())


def test_a_run_exports_to_hugging_face_and_pretraining_starts_from_it(tmp_path):
    from transformers import ViTMAEForPreTraining

    from mae.export import main as export_main

    run = tmp_path / "run"
    first = pretrain.train(load_config(None, [*TINY, f"output_dir={run}", "train.max_steps=2"]))
    assert export_main([str(run), "--format", "hf"]) == 0
    hf = ViTMAEForPreTraining.from_pretrained(run / "export_hf").eval()
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    hf_equal(first.model, hf, x, noise)
    state = load_weights(run / "export_hf")  # init=HF_FOLDER reads it back
    assert all(torch.equal(v, state[k]) for k, v in first.model.state_dict().items())


def test_the_hugging_face_export_serves_the_feature_extraction_pipeline(tmp_path):
    """The export's image processor (preprocessor_config.json): what transformers.pipeline needs."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    from mae.export import save_hf

    cfg = load_config(None, [*TINY])
    model = build_model(cfg).eval()
    save_hf(model, cfg, tmp_path / "hf")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    # ViTMAEModel masks 75% of the patches at inference too; mask_ratio=0 keeps them all (shuffled)
    extractor = pipeline(
        "image-feature-extraction", model=str(tmp_path / "hf"), model_kwargs={"mask_ratio": 0.0}
    )
    features = torch.tensor(extractor(image))
    assert features.shape == (1, 1 + (16 // 4) ** 2, 32)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert (processor.size.height, processor.size.width) == (16, 16)
    assert list(processor.image_mean) == list(cfg.data.mean) and list(processor.image_std) == list(
        cfg.data.std
    )
    x = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        # the class token: the same whatever the patch order
        ours = model.encoder.forward_features(x)[:, 0]
    assert torch.allclose(features[:, 0], ours, atol=1e-5)


def test_a_hugging_face_folder_is_an_encoder_source_for_probes_and_fine_tuning(tmp_path):
    from mae.config.evaluation import load_eval_config
    from mae.eval.encoders import load_encoder
    from mae.eval.finetune import build_classifier
    from mae.interop import to_hf

    mine = tiny(5)
    to_hf(mine, load_config(None, [*TINY])).save_pretrained(tmp_path / "hf")
    encoder = load_encoder(str(tmp_path / "hf"))
    x = torch.randn(2, 3, 16, 16)
    mine.eval()
    assert encoder.kind == "timm" and torch.allclose(
        encoder.features(x, "cls"), mine.encode(x), atol=1e-6
    )
    assert load_encoder(f"random:{tmp_path / 'hf'}").sha256 != encoder.sha256
    cfg = load_eval_config(None, [f"encoder={tmp_path / 'hf'}", "mode=finetune"])
    clf = build_classifier(cfg, num_classes=4)
    assert torch.equal(clf.model.blocks[1].attn.qkv.weight, mine.encoder.blocks[1].attn.qkv.weight)


ODD = ["model.embed_dim=48", "model.depth=3", "model.num_heads=4", "model.mlp_ratio=2"]
ODD += [
    "model.decoder_embed_dim=24",
    "model.decoder_depth=1",
    "model.decoder_num_heads=3",
    "data.image_size=16",
]


def test_the_architecture_is_read_off_the_checkpoint_and_conflicts_name_both(tmp_path):
    from mae.interop import infer_architecture

    source = tiny(1, *ODD)
    path = tmp_path / "mae_pretrain_full.pth"
    torch.save({"model": official(source)}, path)
    arch = infer_architecture(path)
    assert (
        arch.image_size == 16
        and arch.channels == 3
        and arch.guessed == ["num_heads", "decoder_num_heads"]
    )
    want = {"patch_size": 4, "embed_dim": 48, "depth": 3, "mlp_ratio": 2.0, "decoder_embed_dim": 24}
    assert {k: arch.model[k] for k in want} == want and arch.model["decoder_depth"] == 1
    # a recipe that names no architecture takes the checkpoint's; the weights then load strictly
    cfg = load_pretrain_config(None, [f"init={path}", "data.image_size=16"])
    m = cfg.model
    assert (m.embed_dim, m.depth, m.mlp_ratio, m.decoder_embed_dim, m.decoder_depth) == (
        48,
        3,
        2.0,
        24,
        1,
    )
    # 48 / 64, 24 / 32: one head each
    assert m.preset is None and (m.num_heads, m.decoder_num_heads) == (
        1,
        1,
    )
    target = build_model(cfg)
    assert load_into(target, load_weights(path), str(path))["fresh"] == []
    # head counts are the recipe's when it names them (shapes cannot contradict them)
    assert load_pretrain_config(None, [f"init={path}", "model.num_heads=4"]).model.num_heads == 4
    with pytest.raises(
        ConfigError,
        match=r"has embed_dim=48 \(from its tensor shapes\) "
        r"but the recipe names model.embed_dim=32",
    ):
        load_pretrain_config(None, [f"init={path}", "model.embed_dim=32"])
    with pytest.raises(
        ConfigError, match=r"has patch_size=4 .* model.preset=vit_base_patch16 \(patch_size=16\)"
    ):
        load_pretrain_config(None, [f"init={path}", "model.preset=vit_base_patch16"])
    with pytest.raises(ConfigError, match=r"has mlp_ratio=2 .* model.mlp_ratio=4"):
        load_pretrain_config(None, [f"init={path}", "model.mlp_ratio=4"])
    # the config alone reads no checkpoint (it sits below mae.interop): the default preset fills
    # the keys
    assert load_config(None, [f"init={path}", "data.image_size=16"]).model.embed_dim == 192


def test_a_paper_sized_encoder_only_checkpoint_takes_its_presets_heads_and_decoder(tmp_path):
    from mae.config.presets import PRESETS
    from mae.interop import infer_architecture

    # the key layout and shapes of mae_pretrain_vit_large.pth (encoder only), on the meta device:
    # no values
    with torch.device("meta"):
        ref = build_model(
            load_config(None, ["model.preset=vit_large_patch16", "data.image_size=224"])
        )
    state = {k: v for k, v in ref.state_dict().items() if k.startswith("encoder.")}
    arch = infer_architecture("mae_pretrain_vit_large.pth", state)
    large = PRESETS["vit_large_patch16"]
    assert arch.image_size == 224 and arch.model["num_heads"] == large.num_heads == 16
    decoder = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}  # the paper's
    assert {k: arch.model[k] for k in decoder} == {k: getattr(large, k) for k in decoder} == decoder
    assert set(arch.guessed) == {
        "num_heads",
        "decoder_embed_dim",
        "decoder_depth",
        "decoder_num_heads",
    }


def test_official_weights_are_an_encoder_source_and_finetune_takes_init(tmp_path):
    from mae.config.evaluation import load_eval_config
    from mae.eval.encoders import load_encoder
    from mae.eval.finetune import build_classifier

    source = tiny(4, *ODD)
    path = tmp_path / "mae_pretrain.pth"
    torch.save(
        {"model": {k: v for k, v in official(source).items() if not k.startswith(_DEC)}}, path
    )
    guessed = load_encoder(str(path))  # 48 channels: one head, as the file does not say 4
    assert guessed.module.blocks[0].attn.num_heads == 1
    encoder = load_encoder(str(path), num_heads=4)
    x = torch.randn(2, 3, 16, 16)
    source.eval()
    assert encoder.kind == "timm" and encoder.data_config["input_size"] == (3, 16, 16)
    assert torch.allclose(encoder.features(x, "cls"), source.encode(x), atol=1e-6)
    assert load_encoder(f"random:{path}").sha256 != encoder.sha256
    cfg = load_eval_config(None, [f"init={path}", "mode=finetune", "num_heads=4"])
    assert cfg.encoder == str(path)
    clf = build_classifier(cfg, num_classes=3)
    assert torch.equal(clf.model.blocks[2].mlp.fc1.weight, source.encoder.blocks[2].mlp.fc1.weight)
    with pytest.raises(ConfigError, match="name two encoders"):
        load_eval_config(None, [f"init={path}", "encoder=timm:vit_tiny_patch16_224"])
    with pytest.raises(ConfigError, match="applies to weights files only"):
        load_encoder("timm:vit_tiny_patch16_224", num_heads=4)


_DEC = ("decoder_", "mask_token")

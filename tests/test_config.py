import dataclasses
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT

from mae.config import (
    Config,
    ConfigError,
    ModelConfig,
    derive,
    from_dict,
    load_config,
    to_dict,
)
from mae.config.evaluation import EvalConfig, load_eval_config
from mae.config.presets import PRESET_KEYS, PRESETS


def test_defaults_resolve_preset():
    cfg = load_config()
    assert (cfg.model.patch_size, cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (
        4,
        192,
        12,
        3,
    )
    assert cfg.data.mean == (0.485, 0.456, 0.406)


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  preset: vit_base_patch16\ndata:\n  image_size: 224\ntrain:\n  blr: 1.0e-3\n"
    )
    cfg = load_config(
        recipe, ["train.blr=2e-3", "model.depth=6", "data.crop_scale=[0.3, 1.0]", "output_dir=x"]
    )
    assert cfg.model.embed_dim == 768 and cfg.model.patch_size == 16  # from the preset
    assert cfg.model.depth == 6  # explicit key beats the preset
    assert cfg.train.blr == 2e-3 and isinstance(cfg.train.blr, float)
    assert cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.output_dir == "x"


def test_a_preset_is_a_named_record_of_model_keys_and_fills_them_all():
    small = PRESETS["vit_small_patch4"]
    assert (small.patch_size, small.embed_dim, small.num_heads, small.decoder_embed_dim) == (
        4,
        384,
        6,
        256,
    )
    assert set(PRESET_KEYS) <= {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = load_config(None, ["model.preset=vit_small_patch4"])
    assert {k: getattr(cfg.model, k) for k in PRESET_KEYS} == dataclasses.asdict(small)
    assert cfg.model.preset == "vit_small_patch4"
    with pytest.raises(dataclasses.FrozenInstanceError):
        small.depth = 6


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config().train.blr = 1.0


def test_round_trip_through_yaml():
    cfg = load_config(None, ["data.channels=1", "train.max_steps=7"])
    again = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_step=3", "unknown config key 'train.max_step'"),
        ("trian.blr=1", "unknown config key 'trian'"),
        ("train.max_steps=abc", "train.max_steps='abc' has the wrong type"),
        ("train.batch_size=1.5", "train.batch_size=1.5 has the wrong type; expected int"),
        ("model.norm_pix_loss=3", "expected bool"),
        (
            "model.mask_ratio=1.0",
            "model.mask_ratio=1.0 is invalid; it must be a fraction strictly between 0 and 1",
        ),
        ("model.mask_ratio=0", "model.mask_ratio"),
        ("data.image_size=30", "data.image_size=30 is not divisible by model.patch_size=4"),
        ("model.preset=vit_giant", "model.preset='vit_giant' is unknown; choose one of"),
        (
            "model.name=gan",
            "model.name='gan' is invalid; choose one of "
            "['mae', 'ae', 'dae', 'sparse_ae', 'cae', 'vae', 'stacked_ae']",
        ),
        ("train.mixed_precision=fp8", "choose one of ['auto', 'no', 'bf16', 'fp16']"),
        ("data.crop_scale=[0.5]", "data.crop_scale=[0.5] must have 2 values"),
        ("data.mean=[0.5]", "data.mean=(0.5,) is invalid; it must be one value per channel (3)"),
        ("model.num_heads=5", "model.embed_dim=192 is not divisible by model.num_heads=5"),
        ("train.max_steps=0", "train.max_steps=0 is invalid"),
        ("train.max_steps", "is not of the form dotted.key=value"),
        ("train.blr=.inf", "train.blr=inf is invalid; it must be a finite number"),
        ("model.mlp_ratio=.nan", "it must be a finite number"),
        ("data.channels=0", "data.channels=0 is invalid; it must be a positive integer"),
        ("data.mean=[]", "data.mean=() is invalid; it must be one value per channel (3)"),
        ("train.seed=-1", "train.seed=-1 is invalid; it must be an integer in [0, 2**31)"),
        ("model.mask_ratio=1e-17", "leaves 64 of 64 patches visible"),
        ("model.mask_ratio=0.999", "leaves 0 of 64 patches visible"),
        ("data.mean=[0.5", "the value of 'data.mean' is not valid YAML"),
        ("model.embed_dim=6", "model.embed_dim=6 must be divisible by 4"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_yaml_12_scalars_and_text_fields():
    cfg = load_config(
        None, ["train.mixed_precision=no", "train.blr=1e-4", "output_dir=2024", "data.split=2017"]
    )
    assert cfg.train.mixed_precision == "no" and cfg.train.blr == 1e-4
    assert cfg.output_dir == "2024" and cfg.data.split == "2017"
    # YAML quotes still work
    assert load_config(None, ['output_dir="runs/a b"']).output_dir == "runs/a b"
    assert (
        load_config(None, ["model.norm_pix_loss=false", "train.clip_grad=null"]).model.norm_pix_loss
        is False
    )


def test_recipe_written_the_natural_way(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n  blr: 1e-3\n")
    cfg = load_config(recipe)
    assert cfg.train.mixed_precision == "no" and cfg.train.blr == 1e-3


def test_missing_or_bad_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    bad.write_text("train: {blr: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_shipped_recipes_load():
    from pathlib import Path

    configs = Path(__file__).parents[1] / "configs"
    recipes, evals = sorted(configs.glob("*.yaml")), sorted((configs / "eval").glob("*.yaml"))
    assert recipes and evals, "configs/ holds no recipes"
    for recipe in recipes:
        assert isinstance(load_config(recipe), Config)
    for recipe in evals:
        assert isinstance(load_eval_config(recipe, ["encoder=x"]), EvalConfig)


def test_derived_values():
    cfg = load_config(
        None,
        [
            "train.batch_size=64",
            "train.accum_steps=2",
            "train.blr=1e-4",
            "train.epochs=3",
            "train.warmup_epochs=0.5",
            "train.warmup_cap=0.5",
        ],
    )
    d = derive(cfg, dataset_size=1000, num_processes=2)
    assert d.effective_batch == 256
    assert d.lr == pytest.approx(1e-4)
    assert d.steps_per_epoch == 3  # 1000 // 256, whole steps only
    assert d.total_steps == 9
    assert d.warmup_steps == 2  # round(0.5 * 3)
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=5))
    capped = derive(short, 1000, 2)
    assert capped.total_steps == 5 and capped.warmup_steps == 2  # as asked: under 0.5 of 5
    # a shortened run keeps its shape: the warm-up is at most warmup_cap of it (0.2: 1 of 5)
    default_cap = dataclasses.replace(short.train, warmup_cap=0.2)
    assert derive(dataclasses.replace(short, train=default_cap), 1000, 2).warmup_steps == 1
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        derive(cfg, dataset_size=100, num_processes=2)
    high_floor = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, min_lr=1.0))
    with pytest.raises(ConfigError, match="train.min_lr=1 is above the peak lr 0.0001"):
        derive(high_floor, 1000, 2)


def test_a_misspelt_key_gets_the_closest_one_suggested():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.blrr'; did you mean 'train.blr'"
    ):
        load_config(None, ["train.blrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        load_config(None, ["trian.blr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'; valid keys here"):
        load_config(None, ["zzz=1"])


def test_a_home_path_is_expanded_as_a_shell_would(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["data.dataset=~/images", "output_dir=~/runs/a"])
    assert cfg.data.dataset == str(tmp_path / "images")
    assert cfg.output_dir == str(tmp_path / "runs/a")
    (tmp_path / "recipe.yaml").write_text("train:\n  max_steps: 7\n")
    assert load_config("~/recipe.yaml").train.max_steps == 7


@dataclasses.dataclass(frozen=True)
class Documented:
    # the first line of a comment
    # and its second
    width: int = 4
    depth: int = 2  # a comment at the end of the line
    name: str | None = None
    shape: tuple[int, int] = (3, 5)


@dataclasses.dataclass(frozen=True)
class Redeclared(Documented):
    width: int = 8  # a comment of its own
    depth: int = 3


def test_help_reads_each_keys_comment_and_default_off_the_schema():
    from mae.config.help import field_comments, key_lines

    assert field_comments(Documented) == {
        "width": "the first line of a comment and its second",
        "depth": "a comment at the end of the line",
    }
    # a redeclared field keeps the comment it was declared with unless it brings its own
    assert field_comments(Redeclared) == {
        "width": "a comment of its own",
        "depth": "a comment at the end of the line",
    }
    assert key_lines(Redeclared, "x.") == [
        ("x.width", "8", "a comment of its own"),
        ("x.depth", "3", "a comment at the end of the line"),
        ("x.name", "null", ""),
        ("x.shape", "[3,5]", ""),
    ]


def test_pretrain_help_lists_every_key_with_its_default():
    from mae.config.help import key_lines

    proc = subprocess.run(
        [sys.executable, "pretrain.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    listed = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    for key, default, _ in key_lines(Config):
        assert f"{key}={default}" in listed
    # a default the model family fills is shown with each family's value
    blr = "train.blr=null (by model.name: mae 0.001, ae/dae/sparse_ae/cae/vae/stacked_ae 0.005)"
    assert blr in listed and "data.augment=null (one of crop|flip|none)" in listed
    assert "model.mask_ratio=0.75" in listed


@pytest.mark.parametrize(
    "script, run",
    [("pretrain.py", "run_path"), ("finetune.py", "run_path"), ("mae.evaluate", "run_module")],
)
def test_help_imports_neither_torch_nor_the_data_libraries(script, run):
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "try:\n"
        f"    runpy.{run}({script!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'datasets', 'accelerate', 'timm')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"

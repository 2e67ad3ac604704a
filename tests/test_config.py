"""fastcifar.config: flags, presets, TOML files and their precedence, help text, range checks and which
settings a resume may change.

    pytest -q tests/test_config.py
"""

from __future__ import annotations

import re
import time
import typing
from dataclasses import fields
from typing import Literal

import pytest
from torch import nn

from fastcifar.config import (ENVIRONMENT_FIELDS, PRESETS, TrainConfig, get_args_parser, model_options, parse_config,
                              resume_config)
from fastcifar.errors import UserError, run_cli
from fastcifar.model import ModelConfig, ResNet9
from fastcifar.report import check_out_dir
from fastcifar.runtime import select_device
from fastcifar.train import main as train_main


def test_help_lists_every_field_with_its_default():
    text = get_args_parser().format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "--no-amp" in text and "--preset" in text and "--config" in text


@pytest.mark.slow
def test_precedence_defaults_preset_config_flags(tmp_path):
    assert parse_config([])[0].optimizer == "sgd"
    assert parse_config(["--preset", "seed"])[0].optimizer == "adam"
    toml = tmp_path / "c.toml"
    toml.write_text('epochs = 7\nlr = 0.01\n')
    c, _ = parse_config(["--preset", "seed", "--config", str(toml), "--lr", "0.02"])
    assert (c.optimizer, c.epochs, c.lr) == ("adam", 7, 0.02)


def test_resume_config_keeps_the_recipe_and_takes_the_environment():
    saved = vars(TrainConfig(lr=0.2, width=8, device="cpu", plots=True))
    requested = TrainConfig(lr=0.4, device="cuda:1", plots=False, workers=7, data_dir="elsewhere")
    config = resume_config(saved, requested, {"device", "plots", "workers", "data_dir"}, "runs/x")
    assert (config.lr, config.width, config.out_dir) == (0.2, 8, "runs/x")
    assert (config.device, config.plots, config.workers, config.data_dir) == ("cuda:1", False, 7, "elsewhere")
    with pytest.raises(UserError, match=r"^--lr 0\.4 conflicts"):
        resume_config(saved, requested, {"lr"}, "runs/x")
    with pytest.raises(UserError, match="--out-dir"):
        resume_config(saved, TrainConfig(out_dir="runs/other"), {"out_dir"}, "runs/x")


def test_short_flags_output_dir_alias_and_cuda_index():
    config, args = parse_config(["-b", "64", "-j", "3", "--output-dir", "runs/x", "--device", "cuda:1"])
    assert (config.batch_size, config.workers, config.out_dir, config.device) == (64, 3, "runs/x", "cuda:1")
    assert args.explicit == {"batch_size", "workers", "out_dir", "device"}
    config, _ = parse_config(["--batch-size", "16", "--workers", "0", "--out-dir", "y"])
    assert (config.batch_size, config.workers, config.out_dir) == (16, 0, "y")
    assert select_device("cpu").type == "cpu"
    with pytest.raises(UserError, match=r"--device \(cuda:99\)"):
        select_device("cuda:99")  # no machine has 100 GPUs; without CUDA: not available


def int_fields() -> list[str]:
    """The fields a flag reads as an int (`int` or `int | None`; not a Literal of choices)."""
    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in fields(TrainConfig) if typing.get_origin(hints[f.name]) is not Literal
            and int in (hints[f.name], *typing.get_args(hints[f.name]))]


def test_int_flags_parse_to_int_and_refuse_a_fraction(capsys):
    """Sabotage: the parser's scalar type picked float before int (8 == 8.0 would pass an equality check)."""
    assert {"batch_size", "width", "seed", "workers"} <= set(int_fields())
    config, _ = parse_config(["--batch-size", "8"])
    assert config.batch_size == 8 and type(config.batch_size) is int
    for name in int_fields():
        flag = "--" + name.replace("_", "-")
        value = getattr(get_args_parser().parse_args([flag, "8"]), name)
        assert value == 8 and type(value) is int, flag
        with pytest.raises(UserError, match=f"{flag}: invalid int value: '2.5'"):
            get_args_parser().parse_args([flag, "2.5"])
    assert run_cli(train_main, ["--batch-size", "2.5"]) == 2
    assert "argument -b/--batch-size: invalid int value: '2.5'" in capsys.readouterr().err


def test_help_comes_from_the_fields_not_the_source_file(monkeypatch):
    import inspect

    monkeypatch.setattr(inspect, "getsource", lambda *a: (_ for _ in ()).throw(OSError("no source")))
    text = get_args_parser().format_help()
    assert "peak learning rate" in text and "-b BATCH_SIZE, --batch-size BATCH_SIZE" in text
    assert "--out-dir OUT_DIR, --output-dir OUT_DIR" in text and "{sgd,adam,muon}" in text


def test_out_dir_help_names_the_default_it_uses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    help_text = " ".join(get_args_parser().format_help().split())
    assert "runs/YYYYmmdd-HHMMSS" in help_text
    out = check_out_dir(TrainConfig(), resume=False)
    assert re.fullmatch(r"runs/\d{8}-\d{6}", out.as_posix()) and out.name[:8] == time.strftime("%Y%m%d")


@pytest.mark.parametrize("name, saved, requested", [
    ("data_dir", "a", "b"), ("device", "cpu", "cuda:1"), ("compile", False, True), ("plots", True, False),
    ("eval_every", 1, 3), ("checkpoint_every", 1, 0), ("workers", 2, 7), ("compile_mode", "default", "reduce-overhead"),
    ("download", False, True)])
def test_resume_honours_every_environment_flag(name, saved, requested):
    """Sabotage: environment=True dropped from --compile or --checkpoint-every (or any listed flag): --resume
    would then refuse it as a recipe conflict."""
    assert name in ENVIRONMENT_FIELDS
    config = resume_config(vars(TrainConfig(**{name: saved})), TrainConfig(**{name: requested}), {name}, "runs/x")
    assert getattr(config, name) == requested


def test_keys_of_a_config_file_count_as_given_for_resume(tmp_path):
    """Sabotage: parse_config not adding the --config file's keys to args.explicit (a --resume with a TOML file
    that changes the recipe would be silently ignored instead of refused)."""

    toml = tmp_path / "c.toml"
    toml.write_text("lr = 0.5\nwidth = 8\n")
    config, args = parse_config(["--config", str(toml), "--epochs", "3"])
    assert args.explicit == {"lr", "width", "epochs"}
    with pytest.raises(UserError, match="--lr 0.5 conflicts"):
        resume_config(vars(TrainConfig(lr=0.2, width=8, epochs=3)), config, args.explicit, "runs/x")


def test_val_split_is_a_flag_and_a_toml_key(tmp_path):
    (tmp_path / "c.toml").write_text("val_split = 500\nsplit_seed = 3\n")
    config, _ = parse_config(["--config", str(tmp_path / "c.toml")])
    assert (config.val_split, config.split_seed) == (500, 3)
    assert parse_config(["--val-split", "7"])[0].val_split == 7


def test_model_options_carry_every_family_option():
    config = TrainConfig(widths="6,8,12,16", residual="3,2", prep_kernel=2, activation="gelu", bn_momentum=0.3,
                         logit_scale=0.5, width=32, plain="2,1", prep_bn=False, bn_eps=1e-9, fc_bias=False,
                         dirac=True)
    model_config = ModelConfig(**model_options(config))
    assert model_config == ModelConfig(width=32, logit_scale=0.5, widths=(6, 8, 12, 16), residual=(2, 3),
                                       prep_kernel=2, activation="gelu", bn_momentum=0.3, plain=(1, 2),
                                       prep_bn=False, bn_eps=1e-9, fc_bias=False, dirac=True)


def test_the_speedrun_presets_net_has_gelu_and_its_bn_momentum():
    model = ResNet9(ModelConfig(**model_options(TrainConfig(**PRESETS["speedrun"]))))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.4 for m in bns)
    assert any(isinstance(m, nn.GELU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_print_config_shows_every_field_its_value_source_and_meaning_without_loading_data(tmp_path, monkeypatch,
                                                                                          capsys):
    """lr is set by the preset, the config file and a flag: the flag's value and source win. Sabotage caught: a
    source mislabelled (a flag reported as the preset's or the config file's), a field left out, or the data
    loaded before printing."""
    import fastcifar.data
    from fastcifar.config import value_sources
    from fastcifar.train import main

    monkeypatch.setattr(fastcifar.data, "load_cifar10", lambda *a, **k: pytest.fail("--print-config loaded data"))
    (tmp_path / "c.toml").write_text("cutout = 4\nlr = 3.0\n")
    argv = ["--preset", "speedrun", "--config", str(tmp_path / "c.toml"), "--lr", "2.0", "--print-config"]
    assert main(argv) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(rows) == {f.name for f in fields(TrainConfig)}
    assert re.fullmatch(r"lr +2\.0 +flag +peak learning rate .*", rows["lr"])
    assert re.fullmatch(r"cutout +4 +config +side of the cutout square, pixels.*", rows["cutout"])
    assert re.fullmatch(r"bias_lr +64\.0 +preset speedrun +lr multiplier for BatchNorm biases.*", rows["bias_lr"])
    assert re.fullmatch(r"seed +0 +default +the first seed.*", rows["seed"])
    assert value_sources(["--lr", "1"])["lr"] == "flag" and value_sources([])["lr"] == "default"


def test_a_checkpoint_config_from_before_the_airbench_options_resumes_with_their_defaults():
    """checkpoint.pt's config.json has no plain, prep_bn, bn_eps, fc_bias, dirac, step_rounding or
    whiten_bias_stop when an older version wrote it: --resume takes the defaults, the recipe it trained."""
    newer = {"plain", "prep_bn", "bn_eps", "fc_bias", "dirac", "step_rounding", "whiten_bias_stop"}
    saved = {k: v for k, v in vars(TrainConfig(width=8)).items() if k not in newer}
    assert resume_config(saved, TrainConfig(), explicit=[], run_dir="runs/x") == TrainConfig(width=8,
                                                                                           out_dir="runs/x")

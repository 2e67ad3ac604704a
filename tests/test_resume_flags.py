"""--resume respects the command line (recipe flags must agree, environment flags are honoured) and the
flag conventions a torchvision or timm user expects (-b, -j, --output-dir, --device cuda:N, Literal choices)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from fastcifar.checkpoint import load_checkpoint
from fastcifar.config import TrainConfig, get_args_parser, parse_config, resume_config
from fastcifar.errors import UserError, run_cli
from fastcifar.report import check_out_dir
from fastcifar.runtime import select_device
from fastcifar.train import main
from synthetic import write_learnable_dataset

FAST = ["--width", "8", "--batch-size", "32", "--device", "cpu", "--lr", "0.2", "--no-tta"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A one-epoch run without plots: its checkpoint is the state after the last epoch."""
    root = tmp_path_factory.mktemp("resume")
    data = write_learnable_dataset(root / "data", train_per_class=24, test_per_class=4)
    out = root / "run"
    assert main(["--data-dir", str(data), "--out-dir", str(out), *FAST, "--epochs", "1", "--no-plots"]) == 0
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flags, named", [(["--lr", "0.5"], "--lr"), (["--epochs", "3"], "--epochs"),
                                          (["--width", "16"], "--width"), (["-b", "16"], "--batch-size"),
                                          (["--preset", "speedrun"], "--")])
def test_a_recipe_flag_that_disagrees_with_the_checkpoint_is_a_one_line_error(finished_run, capsys, flags, named):
    before = (finished_run / "summary.json").read_bytes()
    assert run_cli(main, ["--resume", str(finished_run), *flags]) == 2
    line = one_line_error(capsys)
    assert named in line and "checkpoint" in line
    assert (finished_run / "summary.json").read_bytes() == before  # nothing ran


def test_agreeing_recipe_flags_and_environment_flags_are_accepted(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    assert not (run / "curves.png").exists()
    # given checkpoint.pt, not the directory; --plots (environment) is honoured, --width 8 agrees
    assert main(["--resume", str(run / "checkpoint.pt"), "--plots", "--width", "8", "--eval-every", "3"]) == 0
    assert (run / "curves.png").exists() and (run / "confusion.png").exists()
    saved = load_checkpoint(run / "checkpoint.pt")["config"]
    assert saved["width"] == 8 and saved["lr"] == 0.2


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


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(finished_run, tmp_path, capsys):
    """A checkpoint written while mid-epoch stops were saved (format 1: step_in_epoch, partial) names its
    format instead of failing inside RunState."""
    import torch

    run = tmp_path / "old"
    shutil.copytree(finished_run, run)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt["format"], ckpt["run"]["step_in_epoch"], ckpt["run"]["partial"] = 1, 0, {}
    torch.save(ckpt, run / "checkpoint.pt")
    assert run_cli(main, ["--resume", str(run)]) == 2
    assert "format 1" in one_line_error(capsys)


def test_resume_of_a_missing_directory_names_both_forms(tmp_path, capsys):
    assert run_cli(main, ["--resume", str(tmp_path / "nope")]) == 2
    assert "checkpoint.pt" in one_line_error(capsys)


def test_short_flags_output_dir_alias_and_cuda_index():
    config, args = parse_config(["-b", "64", "-j", "3", "--output-dir", "runs/x", "--device", "cuda:1"])
    assert (config.batch_size, config.workers, config.out_dir, config.device) == (64, 3, "runs/x", "cuda:1")
    assert args.explicit == {"batch_size", "workers", "out_dir", "device"}
    config, _ = parse_config(["--batch-size", "16", "--workers", "0", "--out-dir", "y"])
    assert (config.batch_size, config.workers, config.out_dir) == (16, 0, "y")
    assert select_device("cpu").type == "cpu"
    with pytest.raises(UserError, match=r"--device \(cuda:99\)"):
        select_device("cuda:99")  # no machine has 100 GPUs; without CUDA: not available


@pytest.mark.parametrize("argv, flag", [(["--optimizer", "rmsprop"], "--optimizer"),
                                        (["--pipeline", "dali"], "--pipeline"),
                                        (["--device", "tpu"], "--device"),
                                        (["--device", "cuda:"], "--device")])
def test_values_outside_the_allowed_ones_are_one_line_errors(argv, flag, capsys):
    assert run_cli(main, argv) == 2
    assert flag in one_line_error(capsys)


def test_literal_choices_also_bind_config_files(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('pad_mode = "mirror"\n')
    assert run_cli(main, ["--config", str(toml)]) == 2
    line = one_line_error(capsys)
    assert "--pad-mode" in line and "reflect, zeros" in line


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

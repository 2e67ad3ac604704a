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




@pytest.mark.parametrize("flags, named", [(["--lr", "0.5"], "--lr"), (["--epochs", "3"], "--epochs"),
                                          (["--width", "16"], "--width"), (["-b", "16"], "--batch-size"),
                                          (["--preset", "speedrun"], "--")])
def test_a_recipe_flag_that_disagrees_with_the_checkpoint_is_a_one_line_error(finished_run, capsys, flags, named, one_line_error):
    before = (finished_run / "summary.json").read_bytes()
    assert run_cli(main, ["--resume", str(finished_run), *flags]) == 2
    line = one_line_error()
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


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(finished_run, tmp_path, capsys, one_line_error):
    """A checkpoint written while mid-epoch stops were saved (format 1: step_in_epoch, partial) names its
    format instead of failing inside RunState."""
    import torch

    run = tmp_path / "old"
    shutil.copytree(finished_run, run)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt["format"], ckpt["run"]["step_in_epoch"], ckpt["run"]["partial"] = 1, 0, {}
    torch.save(ckpt, run / "checkpoint.pt")
    assert run_cli(main, ["--resume", str(run)]) == 2
    assert "format 1" in one_line_error()


def test_resume_of_a_missing_directory_names_both_forms(tmp_path, capsys, one_line_error):
    assert run_cli(main, ["--resume", str(tmp_path / "nope")]) == 2
    assert "checkpoint.pt" in one_line_error()



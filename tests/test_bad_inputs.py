"""Bad input, everywhere: exit code 2, one clear line naming the problem, no traceback, nothing half-written.

Each case runs a command's `main` through `run_cli` (exactly what `python -m ...` does); a few also run as
real subprocesses to prove the wiring.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from fastcifar.errors import run_cli
from synthetic import CLASSES, learnable_images, write_image_folder, write_learnable_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = ["--width", "4", "--batch-size", "8", "--device", "cpu", "--epochs", "1", "--no-plots", "--no-tta"]


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("good"), train_per_class=2, test_per_class=1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, good_data) -> Path:
    from fastcifar.train import main

    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:  # module scope: runs before the per-test private cache
        mp.setenv("FASTCIFAR_HOME", str(out.parent / "home"))
        assert main(["--data-dir", str(good_data), "--out-dir", str(out), *TINY]) == 0
    return out


# -- builders of bad things ----------------------------------------------------------------------------
def made(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def tree(root: Path, train=CLASSES, test=CLASSES) -> Path:
    images, labels = learnable_images(1)
    write_image_folder(root, "train", images[: len(train)], np.arange(len(train)), train)
    write_image_folder(root, "test", images[: len(test)], np.arange(len(test)), test)
    return root


def wrong_size(root: Path) -> Path:
    tree(root)
    Image.new("RGB", (31, 40)).save(root / "train" / "cat" / "odd.png")
    return root


def not_an_image(root: Path) -> Path:
    tree(root)
    (root / "train" / "dog" / "notes.png").write_text("not a picture")
    return root


def archive(root: Path, truncate: bool = False, garbage: bool = False) -> Path:
    src = tree(root / "src")
    path = root / "data.tar.gz"
    if garbage:
        path.write_bytes(os.urandom(4096))
        return path
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname="cifar")
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def corrupt_file(path: Path, how: str) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else os.urandom(len(data)))
    return path


def command(module: str) -> Callable:
    """`module`'s main, imported when a case runs, so a module that fails to import fails its cases only."""
    return lambda argv: importlib.import_module(module).main(argv)


train_main, data_main, evaluate_main, lr_find_main = (command(f"fastcifar.{name}")
                                                      for name in ("train", "data", "evaluate", "lr_find"))
export_main, predict_main = command("export.onnx"), command("export.predict")


# -- the cases: (id, command, argv factory (tmp, data, run) -> (argv, path that must not appear), expected) -------
Case = tuple[str, Callable, Callable, str]
CASES: list[Case] = [
    ("train-missing-data", train_main, lambda t, d, r: (["--data-dir", str(t / "nope"), *TINY, "--out-dir", str(t / "o")], t / "o"), "nope"),
    ("train-empty-data", train_main, lambda t, d, r: (["--data-dir", str(folder(t / "empty")), *TINY, "--out-dir", str(t / "o")], t / "o"), "empty"),
    ("train-test-class-not-in-train", train_main, lambda t, d, r: (["--data-dir", str(tree(t / "m", train=CLASSES[:9])), *TINY, "--out-dir", str(t / "o")], t / "o"), "truck"),
    ("train-wrong-image-size", train_main, lambda t, d, r: (["--data-dir", str(wrong_size(t / "w")), *TINY, "--out-dir", str(t / "o")], t / "o"), "odd.png"),
    ("train-not-an-image", train_main, lambda t, d, r: (["--data-dir", str(not_an_image(t / "n")), *TINY, "--out-dir", str(t / "o")], t / "o"), "notes.png"),
    ("train-truncated-archive", train_main, lambda t, d, r: (["--data-dir", str(archive(t, truncate=True)), *TINY, "--out-dir", str(t / "o")], t / "o"), "data.tar.gz"),
    ("train-garbage-archive", train_main, lambda t, d, r: (["--data-dir", str(archive(t, garbage=True)), *TINY, "--out-dir", str(t / "o")], t / "o"), "data.tar.gz"),
    ("train-epochs-zero", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--epochs", "0", "--out-dir", str(t / "o")], t / "o"), "--epochs"),
    ("train-pct-start", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--pct-start", "1", "--out-dir", str(t / "o")], t / "o"), "--pct-start"),
    ("train-negative-lr", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--lr", "-1", "--out-dir", str(t / "o")], t / "o"), "--lr"),
    ("train-cutout-too-big", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--cutout", "33", "--out-dir", str(t / "o")], t / "o"), "--cutout"),
    ("train-bias-lr-zero", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--bias-lr", "0", "--out-dir", str(t / "o")], t / "o"), "--bias-lr"),
    ("train-widths-three", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--widths", "8,16,32", "--out-dir", str(t / "o")], t / "o"), "--widths"),
    ("train-widths-not-numbers", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--widths", "a,b,c,d", "--out-dir", str(t / "o")], t / "o"), "--widths"),
    ("train-residual-layer-four", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--residual", "1,4", "--out-dir", str(t / "o")], t / "o"), "--residual"),
    ("train-prep-kernel-five", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--prep-kernel", "5", "--out-dir", str(t / "o")], t / "o"), "--prep-kernel"),
    ("train-bn-momentum-zero", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--bn-momentum", "0", "--out-dir", str(t / "o")], t / "o"), "--bn-momentum"),
    ("train-whiten-bias-epochs-without-whiten", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--whiten-bias-epochs", "2", "--out-dir", str(t / "o")], t / "o"), "--whiten-bias-epochs"),
    ("train-unknown-choice", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--optimizer", "lion", "--out-dir", str(t / "o")], t / "o"), "--optimizer"),
    ("train-not-a-number", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--width", "wide", "--out-dir", str(t / "o")], t / "o"), "--width"),
    ("train-cuda-missing", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--device", "cuda", "--out-dir", str(t / "o")], t / "o"), "--device"),
    ("train-batch-larger-than-data", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--batch-size", "4096", "--out-dir", str(t / "o")], t / "o"), "--batch-size"),
    ("train-val-split-not-below-the-training-images", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--val-split", "20", "--out-dir", str(t / "o")], t / "o"), "--val-split (20)"),
    ("train-config-unknown-key", train_main, lambda t, d, r: (["--config", str(made(t / "c.toml", "epochz = 1\n")), "--out-dir", str(t / "o")], t / "o"), "epochz"),
    ("train-config-bad-toml", train_main, lambda t, d, r: (["--config", str(made(t / "c.toml", "epochs = [\n")), "--out-dir", str(t / "o")], t / "o"), "c.toml"),
    ("train-out-dir-is-a-file", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--out-dir", str(made(t / "f", "x"))], None), "--out-dir"),
    ("train-resume-missing-dir", train_main, lambda t, d, r: (["--resume", str(t / "gone")], None), "gone"),
    ("train-resume-no-checkpoint", train_main, lambda t, d, r: (["--resume", str(folder(t / "empty-run"))], None), "checkpoint.pt"),
    ("train-resume-corrupt-checkpoint", train_main, lambda t, d, r: (["--resume", str(copy_run(r, t, "checkpoint.pt", "garbage"))], None), "checkpoint.pt"),
    ("train-resume-truncated-checkpoint", train_main, lambda t, d, r: (["--resume", str(copy_run(r, t, "checkpoint.pt", "truncate"))], None), "checkpoint.pt"),
    ("data-missing-path", data_main, lambda t, d, r: (["--data-dir", str(t / "nope")], None), "nope"),
    ("data-unknown-file-type", data_main, lambda t, d, r: (["--data-dir", str(made(t / "x.rar", "rar"))], None), "x.rar"),
    ("lr-find-bad-range", lr_find_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--start-lr", "1", "--end-lr", "0.1", "--out", str(t / "lr.png")], t / "lr.png"), "--end-lr"),
    ("export-missing-checkpoint", export_main, lambda t, d, r: (["--checkpoint", str(t / "none"), "--out", str(t / "m.onnx")], t / "m.onnx"), "none"),
    ("export-corrupt-checkpoint", export_main, lambda t, d, r: (["--checkpoint", str(copy_run(r, t, "model.safetensors", "garbage")), "--out", str(t / "m.onnx")], t / "m.onnx"), "model.safetensors"),
    ("export-truncated-checkpoint", export_main, lambda t, d, r: (["--checkpoint", str(copy_run(r, t, "model.safetensors", "truncate")), "--out", str(t / "m.onnx")], t / "m.onnx"), "model.safetensors"),
    ("export-checkpoint-of-another-width", export_main, lambda t, d, r: (["--checkpoint", str(relabel_width(r, t)), "--out", str(t / "m.onnx")], t / "m.onnx"), "width"),
    ("export-out-dir-missing", export_main, lambda t, d, r: (["--checkpoint", str(r), "--out", str(t / "no" / "m.onnx")], t / "no" / "m.onnx"), "no"),
    ("export-int8-without-data", export_main, lambda t, d, r: (["--checkpoint", str(r), "--out", str(t / "m.onnx"), "--int8"], t / "m.onnx"), "--int8"),
    ("export-negative-max-int8-drop", export_main, lambda t, d, r: (["--checkpoint", str(r), "--out", str(t / "m.onnx"), "--max-int8-drop", "-1"], t / "m.onnx"), "--max-int8-drop"),
    ("evaluate-batch-size-zero", evaluate_main, lambda t, d, r: (["--checkpoint", str(r), "--data-dir", str(d), "--device", "cpu", "-b", "0"], None), "--batch-size"),
    ("evaluate-tta-translate-too-wide", evaluate_main, lambda t, d, r: (["--checkpoint", str(r), "--data-dir", str(d), "--device", "cpu", "--tta-translate", "40"], None), "--tta-translate"),
    ("evaluate-tta-translate-negative", evaluate_main, lambda t, d, r: (["--checkpoint", str(r), "--data-dir", str(d), "--device", "cpu", "--tta-translate", "-1"], None), "--tta-translate"),
    ("train-config-is-a-directory", train_main, lambda t, d, r: (["--data-dir", str(d), *TINY, "--config", str(folder(t / "conf")), "--out-dir", str(t / "o")], t / "o"), "--config"),
    ("predict-batch-size-zero", predict_main, lambda t, d, r: ([str(t / "m.onnx"), str(t / "a.png"), "--batch-size", "0"], None), "--batch-size"),
    ("predict-threads-zero", predict_main, lambda t, d, r: ([str(t / "m.onnx"), str(t / "a.png"), "--threads", "0"], None), "--threads"),
    ("predict-empty-folder", predict_main, lambda t, d, r: ([str(t / "m.onnx"), str(folder(t / "no-images"))], None), "no-images"),
    ("predict-missing-model", predict_main, lambda t, d, r: ([str(t / "none.onnx"), str(t / "a.png")], None), "none.onnx"),
    ("predict-not-onnx", predict_main, lambda t, d, r: ([str(made(t / "fake.onnx", "hello")), str(t / "a.png")], None), "fake.onnx"),
]


def copy_run(run: Path, tmp: Path, name: str, how: str) -> Path:
    """A copy of a finished run directory with one file damaged."""
    import shutil

    dst = tmp / f"damaged-{name}-{how}"
    shutil.copytree(run, dst)
    corrupt_file(dst / name, how)
    return dst


def relabel_width(run: Path, tmp: Path) -> Path:
    """model.safetensors whose header claims another width than its weights have."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    src = run / "model.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["fastcifar"])
    info["model"]["width"] = 16
    meta["fastcifar"] = json.dumps(info)
    dst = tmp / "relabeled.safetensors"
    save_file(tensors, str(dst), metadata=meta)
    return dst


# cases about a device this machine lacks: the device is hidden first, so a CUDA host gets the same error
# (without it, `--device cuda` simply trains there and the case fails for the wrong reason)
HIDE_CUDA = {"train-cuda-missing"}


@pytest.mark.slow
@pytest.mark.parametrize("name, command, build, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(name, command, build, expected, tmp_path, good_data, trained_run, capsys,
                                            monkeypatch):
    if name.startswith(("export", "predict")):
        pytest.importorskip("onnxruntime")
    if name in HIDE_CUDA:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv, must_not_exist = build(tmp_path, good_data, trained_run)
    before = set(tmp_path.rglob("*"))
    code = run_cli(command, argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and ": error: " in lines[0], captured.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    if must_not_exist is not None:
        assert not must_not_exist.exists()
    leftovers = [p for p in set(tmp_path.rglob("*")) - before if p.name.endswith(".tmp")]
    assert not leftovers


@pytest.mark.slow
@pytest.mark.parametrize("module, argv, expected", [
    ("fastcifar.train", ["--epochs", "0"], "--epochs"),
    ("fastcifar.data", ["--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    ("export.onnx", ["--checkpoint", "/nonexistent/run", "--out", "/tmp/never.onnx"], "/nonexistent/run"),
])
def test_real_command_line_exit_code_and_single_line(module, argv, expected, tmp_path):
    env = {**os.environ, "FASTCIFAR_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr


def test_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "FASTCIFAR_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "fastcifar.data", "--data-dir", str(tmp_path / "x"), "--debug"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_an_empty_checkpoint_is_a_user_error(tmp_path):
    from fastcifar.checkpoint import load_checkpoint
    from fastcifar.errors import UserError

    (tmp_path / "checkpoint.pt").write_bytes(b"")  # torch.load raises EOFError('') on it
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")

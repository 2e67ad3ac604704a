"""bench/speedrun.py and bench/gpu.sh on the CPU: statistics, the table, airbench's log and data files (with a
fake airbench: the real one needs CUDA), a tiny end-to-end run, and the GPU script's smoke mode."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import write_learnable_dataset

REPO = Path(__file__).resolve().parent.parent
TINY_TRAIN = ["--width", "4", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]

# What airbench 0.1.8's train94(verbose=True) printed for one (CPU-patched) run.
AIRBENCH_LOG = """\
------------------------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
------------------------------------------------------------------------------------------------------
|       0  |      0  |      2.3047  |     0.0977  |   0.1980  |               |              1.3253  |
|          |      1  |      2.3047  |     0.1367  |   0.1740  |               |              2.4674  |
|          |   eval  |      2.3047  |     0.1367  |   0.9412  |       0.9440  |              3.4662  |
------------------------------------------------------------------------------------------------------
"""


def _load_speedrun():
    spec = importlib.util.spec_from_file_location("speedrun", REPO / "bench" / "speedrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speedrun = _load_speedrun()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("speedrun_data"), train_per_class=20, test_per_class=5)


def test_split_argv_gives_everything_after_the_double_dash_to_the_trainer():
    assert speedrun.split_argv(["--runs", "2", "--", "--width", "8", "--"]) == (["--runs", "2"], ["--width", "8", "--"])
    assert speedrun.split_argv(["--runs", "2"]) == (["--runs", "2"], [])


def test_stats_use_the_tta_accuracy_for_the_success_fraction_and_the_table_is_fixed_width():
    fast = speedrun.method_stats([0.93, 0.935, 0.945], [0.941, 0.939, 0.95], [0.941, 0.939, 0.95],
                                 [4.0, 5.0, 9.0], 0.94, "flip")
    assert fast["median_seconds"] == 5.0
    assert fast["acc"]["std"] == pytest.approx(np.std([0.93, 0.935, 0.945], ddof=1))
    assert fast["at_least_threshold"]["primary"] == "acc_tta"
    assert fast["at_least_threshold"]["acc_tta"]["count"] == 2 and fast["at_least_threshold"]["acc"]["count"] == 1
    plain = speedrun.method_stats([0.95], None, None, [2.5], 0.94, None)
    assert plain["at_least_threshold"]["primary"] == "acc" and plain["acc"]["std"] == 0.0
    table = speedrun.format_table([("fastcifar[x]", fast), ("airbench94", plain)], reference="airbench94")
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1, table
    assert ">=94%" in lines[0] and ">=94% TTA" in lines[0]
    assert " 1/3 " in lines[2] and " 2/3 " in lines[2] and "2.00x" in lines[2] and "1.00x" in lines[3]
    assert " 1/1 " in lines[3] and lines[3].split()[-3] == "-"  # no TTA: its success column is empty


def test_parse_airbench_log_reads_the_final_eval_row():
    assert speedrun.parse_airbench_log(AIRBENCH_LOG) == {"val_acc": 0.9412, "tta_val_acc": 0.944,
                                                        "total_time_seconds": 3.4662}
    assert speedrun.parse_airbench_log("no table here") is None


@pytest.mark.parametrize("epochs", [2, 1.5])  # 1.5: the second epoch is a partial one
def test_salvage_keeps_only_finished_seeds(tmp_path, epochs):
    (tmp_path / "config.json").write_text(json.dumps({"epochs": epochs}))
    (tmp_path / "metrics.csv").write_text(
        "seed,epoch,lr,train_loss,train_acc,test_loss,test_acc,epoch_seconds\n"
        "0,1,0.1,2,0.1,2,0.5,1.5\n0,2,0.1,2,0.1,2,0.75,2.5\n1,1,0.1,2,0.1,2,0.25,1.0\n")
    assert speedrun.salvage_runs(tmp_path) == {"seeds": [0], "test_acc": [0.75], "train_seconds": [4.0]}


def test_salvage_counts_a_seed_done_once_the_next_one_started(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 1.001}))  # rounds to 1 epoch of steps
    (tmp_path / "metrics.csv").write_text(
        "seed,epoch,lr,train_loss,train_acc,test_loss,test_acc,epoch_seconds\n"
        "0,1,0.1,2,0.1,2,0.5,1.5\n1,1,0.1,2,0.1,2,0.25,1.0\n")
    assert speedrun.salvage_runs(tmp_path)["seeds"] == [0]


def test_airbench_without_cuda_fails_before_training_with_a_clear_message(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = speedrun.run_cli(speedrun.main, ["--airbench", "--preset", "default", "--data-dir", "/nonexistent"],
                            prog="speedrun")
    assert code == 2
    err = capsys.readouterr().err
    assert "--airbench needs a CUDA GPU" in err and "without --airbench" in err


def test_unknown_preset_and_bad_trainer_flags_fail_up_front(capsys):
    assert speedrun.run_cli(speedrun.main, ["--preset", "nope"], prog="speedrun") == 2
    assert "invalid --preset (nope)" in capsys.readouterr().err
    try:  # fastcifar.train's parser rejects it before any data is loaded (UserError, or argparse's exit)
        code = speedrun.run_cli(speedrun.main, ["--preset", "default", "--data-dir", "/nonexistent", "--",
                                                "--no-such-flag"], prog="speedrun")
    except SystemExit as e:
        code = e.code
    assert code == 2 and "--no-such-flag" in capsys.readouterr().err


def test_tiny_end_to_end_run_writes_the_report(tiny_data, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = speedrun.main(["--data-dir", str(tiny_data), "--preset", "default", "--runs", "2",
                          "--out-dir", str(tmp_path / "run"), "--json", str(out), "--", *TINY_TRAIN])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("date", "device", "torch", "data_source", "command", "table", "methods"):
        assert report[key], key
    assert "--preset default" in report["command"] and "image-folder" in report["data_source"]
    stats = report["methods"]["fastcifar[default]"]
    assert stats["runs"] == 2 and stats["acc"]["n"] == 2 and stats["acc_tta"]["n"] == 2
    assert report["fastcifar"]["summary"]["runs"]["seeds"] == [0, 1]
    assert report["airbench"] is None and report["errors"] == []
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("fastcifar[default]") for line in printed[-6:]), printed[-6:]


class FakeAirbench:
    """Stands in for airbench 0.1.8 on a CPU: reads ./cifar10/*.pt like CifarLoader, prints its table."""

    def __init__(self):
        self.calls: list[str] = []

    class CifarLoader:
        def __init__(self, path, train=True, batch_size=500, **kwargs):
            import torch

            data = torch.load(os.path.join(path, "train.pt" if train else "test.pt"))
            assert data["images"].dtype == torch.uint8 and data["images"].shape[1:] == (32, 32, 3)
            assert data["labels"].dtype == torch.int64 and len(data["labels"]) == len(data["images"])
            assert len(data["classes"]) == 10
            self.images, self.labels = data["images"], data["labels"]

    def warmup94(self):
        self.CifarLoader("cifar10")
        self.calls.append("warmup")

    def train94(self, run=0, verbose=True):
        self.CifarLoader("cifar10")
        self.calls.append(f"train{run}")
        print(AIRBENCH_LOG.replace("3.4662", f"{3.0 + run:.4f}"))
        return object()

    def evaluate(self, model, loader, tta_level=0):
        return (0.93, 0.94, 0.945)[tta_level]


def test_run_airbench_writes_its_data_files_and_reads_its_timings(tmp_path, monkeypatch):
    from fastcifar.data import CLASSES, CifarData

    rng = np.random.default_rng(0)
    data = CifarData(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.arange(40) % 10,
                     rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), np.arange(20) % 10,
                     list(CLASSES), (0.5,) * 3, (0.25,) * 3, "synthetic")
    cwd = os.getcwd()
    fake = FakeAirbench()
    saved: list[int] = []
    out: dict = {}
    result = speedrun.run_airbench(fake, data, runs=2, seed=5, work_dir=tmp_path, out=out,
                                   on_run=lambda: saved.append(len(out["runs"])))
    assert os.getcwd() == cwd and result is out and saved == [1, 2]
    assert fake.calls == ["warmup", "train0", "train1"]
    assert [r["seed"] for r in out["runs"]] == [5, 6]
    assert [r["seconds"] for r in out["runs"]] == [3.0, 4.0]
    assert out["runs"][0]["acc_tta"] == 0.945 and out["runs"][0]["acc_flip_tta"] == 0.94
    stats = speedrun.airbench_stats(out, 0.94)
    assert stats["median_seconds"] == 3.5 and stats["at_least_threshold"]["acc_tta"]["count"] == 2


def test_main_with_airbench_keeps_finished_runs_when_airbench_crashes(tiny_data, tmp_path, monkeypatch):
    class Crashing(FakeAirbench):
        def train94(self, run=0, verbose=True):
            if run == 1:
                raise RuntimeError("CUDA error: out of memory")
            return super().train94(run, verbose)

    monkeypatch.setattr(speedrun, "require_airbench", Crashing)
    out = tmp_path / "report.json"
    code = speedrun.main(["--data-dir", str(tiny_data), "--preset", "default", "--runs", "1", "--airbench",
                          "--airbench-runs", "3", "--work-dir", str(tmp_path / "ab"),
                          "--out-dir", str(tmp_path / "run"), "--json", str(out), "--", *TINY_TRAIN])
    assert code == 1
    report = json.loads(out.read_text())
    assert report["errors"] == ["airbench: RuntimeError: CUDA error: out of memory"]
    assert set(report["methods"]) == {"fastcifar[default]", "airbench94"}
    assert report["methods"]["airbench94"]["seconds"] == [3.0]
    assert report["time_ratio_fastcifar_over_airbench"] == pytest.approx(
        report["methods"]["fastcifar[default]"]["median_seconds"] / 3.0)
    assert "airbench94" in report["table"] and (tmp_path / "ab" / "cifar10" / "train.pt").exists()


def test_real_airbench_loader_reads_our_files_on_the_cpu(tmp_path):
    airbench = pytest.importorskip("airbench")
    from fastcifar.data import CLASSES, CifarData

    rng = np.random.default_rng(1)
    data = CifarData(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10,
                     rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 10,
                     list(CLASSES), (0.5,) * 3, (0.25,) * 3, "synthetic")
    folder = speedrun.write_airbench_data(data, tmp_path)
    loader = airbench.CifarLoader(str(folder), train=True, batch_size=32, aug=dict(flip=True, translate=2),
                                  altflip=True, gpu="cpu")
    inputs, labels = next(iter(loader))
    assert inputs.shape == (32, 3, 32, 32) and len(loader) == 2
    assert set(labels.tolist()) <= set(range(10))
    test = airbench.CifarLoader(str(folder), train=False, batch_size=16, gpu="cpu")
    assert test.labels.tolist() == data.test_labels.tolist() and test.classes == list(CLASSES)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_script_smoke_mode_runs_every_part_on_the_cpu(tiny_data, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "FASTCIFAR_GPU_SMOKE": "1", "FASTCIFAR_GPU_DATA": str(tiny_data),
           "FASTCIFAR_GPU_WHEELS": str(tmp_path / "no-wheels"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    env.pop("FASTCIFAR_GPU_PRESET", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), str(out)], cwd=tmp_path, env=env, check=False,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["default.json", "default.log", "env.txt", "speedrun.json",
                                                     "speedrun.log", "summary.txt", "sweep.json", "sweep.log"]
    for name, runs in (("speedrun", 2), ("default", 1), ("sweep", 2)):
        report = json.loads((out / f"{name}.json").read_text())
        (stats,) = report["methods"].values()
        assert stats["runs"] == runs and report["errors"] == []
        assert stats["tta"] == ("flip + translate 1" if name != "default" else "flip")  # the preset's own TTA
    summary = (out / "summary.txt").read_text()
    assert "speedrun: exit 0" in summary and "default: exit 0" in summary and "sweep: exit 0" in summary
    assert "median s" in summary
    assert json.loads((out / "sweep.json").read_text())["command"].endswith("--epochs 0.5")
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert not list(tmp_path.glob("fastcifar-gpu.*")), "scratch directory left behind"

"""bench/speedrun.py and bench/gpu.sh on the CPU: statistics, the table, the interleaved runs against airbench
(a fake one, and the real one under the CPU patch), tiny end-to-end runs that must learn, and the GPU script's
smoke mode."""

from __future__ import annotations

import contextlib

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_helpers import AIRBENCH_LOG, REPO, FakeAirbench, small_airbench, speedrun, synthetic_data
from synthetic import write_learnable_dataset

TINY_TRAIN = ["--width", "4", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("speedrun_data"), train_per_class=20, test_per_class=5)


def use_synthetic_data(monkeypatch):
    import fastcifar.data

    monkeypatch.setattr(fastcifar.data, "load_cifar10", lambda path: synthetic_data())


def trainer_summary(seed_result: dict, translate: int = 0) -> dict:
    """A one-seed summary.json exactly as fastcifar.report.run_summary builds it (the real shape)."""
    from fastcifar.config import TrainConfig
    from fastcifar.report import run_summary

    result = {"images": 1000, "evaluations": [], **seed_result}
    return json.loads(json.dumps(run_summary(
        TrainConfig(tta=True, tta_translate=translate), [result], params=1, world_size=1,
        environment={"device": "cpu"}, clocks={})))


def test_split_argv_gives_everything_after_the_double_dash_to_the_trainer():
    assert speedrun.split_at_double_dash(["--runs", "2", "--", "--width", "8", "--"]) == (["--runs", "2"],
                                                                                         ["--width", "8", "--"])
    assert speedrun.split_at_double_dash(["--runs", "2"]) == (["--runs", "2"], [])


def record(seed, acc, tta=None, run=None, steps=None, wall=1.0, **extra):
    return {"seed": seed, "acc": acc, "acc_tta": tta, "acc_flip_tta": tta, "tta": "flip" if tta else None,
            "run_seconds": run, "train_seconds": steps, "wall_seconds": wall, **extra}


def test_stats_use_the_tta_accuracy_for_the_success_fraction_and_the_table_is_fixed_width():
    fast = speedrun.method_stats([record(0, 0.93, 0.941, 4.0, 3.0), record(1, 0.935, 0.939, 5.0, 4.0),
                                  record(2, 0.945, 0.95, 9.0, 8.0), {"seed": 3, "error": "UserError: boom"}],
                                 0.94, "flip")
    assert fast["run_seconds"]["median"] == 5.0 and fast["train_seconds"]["median"] == 4.0
    assert fast["runs"] == 4 and fast["finished"] == 3
    assert fast["acc"]["std"] == pytest.approx(np.std([0.93, 0.935, 0.945], ddof=1))
    assert fast["at_least_threshold"]["primary"] == "acc_tta"
    assert fast["at_least_threshold"]["acc_tta"]["count"] == 2 and fast["at_least_threshold"]["acc"]["count"] == 1
    plain = speedrun.method_stats([record(0, 0.95, run=2.5)], 0.94, None)
    assert plain["at_least_threshold"]["primary"] == "acc" and plain["acc"]["std"] == 0.0
    table = speedrun.format_table([("fastcifar[x]", fast), ("airbench94", plain)], reference="airbench94")
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1, table
    assert ">=94%" in lines[0] and ">=94% TTA" in lines[0] and "run s" in lines[0] and "steps s" in lines[0]
    assert " 3/4 " in lines[2] and " 1/3 " in lines[2] and " 2/3 " in lines[2]
    assert "2.00x" in lines[2] and "1.00x" in lines[3]
    assert " 1/1 " in lines[3] and lines[3].split()[-5] == "-"  # no TTA: its success column is empty


def test_fastcifar_record_reads_the_summary_and_names_the_presets_own_tta():
    translate = trainer_summary({"seed": 3, "test_acc": 0.9, "test_acc_tta": 0.92, "train_seconds": 4.0,
                                 "run_seconds": 4.5}, translate=1)
    rec = speedrun.fastcifar_record(translate)
    assert rec["seed"] == 3 and rec["acc_tta"] == 0.92 and rec["acc_flip_tta"] is None
    assert rec["tta"] == "flip + translate 1" and rec["train_seconds"] == 4.0 and rec["run_seconds"] == 4.5
    flip = trainer_summary({"seed": 0, "test_acc": 0.9, "test_acc_tta": 0.91, "train_seconds": 4.0,
                            "run_seconds": 4.5, "wall_seconds": 6.0})
    rec = speedrun.fastcifar_record(flip)
    assert rec["run_seconds"] == 4.5 and rec["trainer_wall_seconds"] == 6.0 and rec["acc_flip_tta"] == 0.91
    assert rec["tta"] == "flip"


def test_the_schedule_interleaves_seed_by_seed_and_alternates_who_goes_first():
    assert speedrun.schedule(3, 2) == [("fastcifar", 0), ("airbench94", 0), ("airbench94", 1), ("fastcifar", 1),
                                       ("fastcifar", 2)]
    assert speedrun.schedule(2, 0) == [("fastcifar", 0), ("fastcifar", 1)]


def test_unknown_preset_and_bad_trainer_flags_fail_up_front(capsys):
    assert speedrun.run_cli(speedrun.main, ["--preset", "nope"], prog="speedrun") == 2
    assert "invalid --preset (nope)" in capsys.readouterr().err
    try:  # fastcifar.train's parser rejects it before any data is loaded (UserError, or argparse's exit)
        code = speedrun.run_cli(speedrun.main, ["--preset", "default", "--data-dir", "/nonexistent", "--",
                                                "--no-such-flag"], prog="speedrun")
    except SystemExit as e:
        code = e.code
    assert code == 2 and "--no-such-flag" in capsys.readouterr().err
    assert speedrun.run_cli(speedrun.main, ["--preset", "default", "--", "--seed=3"], prog="speedrun") == 2
    assert "--seed=3 after `--`" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_end_to_end_run_trains_each_seed_in_its_own_call_and_writes_the_report(tiny_data, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = speedrun.main(["--data-dir", str(tiny_data), "--preset", "default", "--runs", "2", "--seed", "4",
                          "--out-dir", str(tmp_path / "run"), "--json", str(out), "--", *TINY_TRAIN])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("date", "device", "torch", "data_source", "command", "table", "methods", "clock"):
        assert report[key], key
    assert "--preset default" in report["command"] and "image-folder" in report["data_source"]
    stats = report["methods"]["fastcifar[default]"]
    assert stats["runs"] == 2 and stats["acc"]["n"] == 2 and stats["acc_tta"]["n"] == 2
    runs = report["fastcifar"]["runs"]
    assert [r["seed"] for r in runs] == [4, 5]
    for r in runs:
        assert json.loads((Path(r["out_dir"]) / "summary.json").read_text())["runs"]["seeds"] == [r["seed"]]
        assert r["wall_seconds"] > r["train_seconds"] > 0
    # the trainer's own run_seconds (airbench's clock), which holds the steps and more, is what is read
    assert all(r["run_seconds"] > r["train_seconds"] for r in runs) and stats["run_seconds"]["n"] == 2
    assert report["airbench"] is None and report["errors"] == []
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("fastcifar[default]") for line in printed[-9:]), printed[-9:]
    assert not any(line.startswith("WARNING") for line in printed)


def test_a_user_error_in_one_seed_is_recorded_and_the_other_seeds_continue(tmp_path, monkeypatch):
    real = speedrun.run_fastcifar_seed

    def failing_seed_1(argv, out_dir):
        if argv[argv.index("--seed") + 1] == "1":
            raise speedrun.UserError("loss became non-finite at step 3 of epoch 1 (lr 0.6)")
        return real(argv, out_dir)

    def fake_main(argv):  # writes what fastcifar.train.main writes, in a millisecond
        out = Path(argv[argv.index("--out-dir") + 1])
        out.mkdir(parents=True)
        seed = int(argv[argv.index("--seed") + 1])
        (out / "summary.json").write_text(json.dumps(trainer_summary(
            {"seed": seed, "test_acc": 0.9, "test_acc_tta": 0.95, "train_seconds": 1.0, "run_seconds": 1.5})))
        return 0

    from fastcifar import train

    monkeypatch.setattr(train, "main", fake_main)
    monkeypatch.setattr(speedrun, "run_fastcifar_seed", failing_seed_1)
    use_synthetic_data(monkeypatch)
    out = tmp_path / "report.json"
    code = speedrun.main(["--data-dir", "synthetic", "--preset", "default", "--runs", "3",
                          "--out-dir", str(tmp_path / "run"), "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["fastcifar"]["runs"]] == [0, 1, 2]
    assert report["fastcifar"]["runs"][1]["error"].startswith("UserError: loss became non-finite")
    assert report["errors"] == ["fastcifar seed 1: UserError: loss became non-finite at step 3 of epoch 1 (lr 0.6)"]
    stats = report["methods"]["fastcifar[default]"]
    assert stats["finished"] == 2 and stats["failed"] == 1 and stats["run_seconds"]["median"] == 1.5
    assert report["table"].splitlines()[2].split()[1:4] == ["2/3", "1", "90.00"]  # runs, failed, acc % of the 2


def interleaved_main(tmp_path, monkeypatch, airbench, runs=2, airbench_runs=2):
    """speedrun.main with --airbench: fake fastcifar seeds (a summary with run_seconds) and `airbench`."""
    calls = []

    def fake_seed(argv, out_dir):
        seed = int(argv[argv.index("--seed") + 1])
        calls.append(f"fastcifar{seed}")
        return speedrun.fastcifar_record(trainer_summary(
            {"seed": seed, "test_acc": 0.9, "test_acc_tta": 0.95, "train_seconds": 5.0, "run_seconds": 6.0}))

    monkeypatch.setattr(speedrun, "run_fastcifar_seed", fake_seed)
    monkeypatch.setattr(speedrun, "require_airbench", lambda device: airbench)
    monkeypatch.setattr(speedrun, "airbench_on_cpu", lambda airbench, dtype: contextlib.nullcontext())
    original = airbench.train94

    def train94(run=0, verbose=True):
        calls.append(f"airbench{run}")
        return original(run, verbose)

    airbench.train94 = train94
    use_synthetic_data(monkeypatch)
    out = tmp_path / "report.json"
    code = speedrun.main(["--data-dir", "synthetic", "--preset", "default", "--runs", str(runs),
                          "--airbench", "--airbench-runs", str(airbench_runs), "--work-dir", str(tmp_path / "ab"),
                          "--out-dir", str(tmp_path / "run"), "--json", str(out)])
    return code, json.loads(out.read_text()), calls


def test_with_airbench_the_methods_alternate_seed_by_seed_on_one_clock(tmp_path, monkeypatch):
    code, report, calls = interleaved_main(tmp_path, monkeypatch, FakeAirbench(), runs=3, airbench_runs=3)
    assert code == 0 and report["errors"] == []
    assert calls == ["fastcifar0", "airbench0", "airbench1", "fastcifar1", "fastcifar2", "airbench2"]
    assert report["methods"]["airbench94"]["run_seconds"]["median"] == 4.0  # 3.0, 4.0, 5.0 as printed
    assert report["time_ratio_fastcifar_over_airbench"] == pytest.approx(6.0 / 4.0)
    assert "1.50x" in report["table"] and (tmp_path / "ab" / "cifar10" / "train.pt").exists()


def test_an_airbench_seed_out_of_memory_is_recorded_and_the_rest_continue(tmp_path, monkeypatch):
    class Crashing(FakeAirbench):
        def train94(self, run=0, verbose=True):
            if run == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().train94(run, verbose)

    code, report, calls = interleaved_main(tmp_path, monkeypatch, Crashing(), runs=1, airbench_runs=3)
    assert code == 1 and calls == ["fastcifar0", "airbench0", "airbench1", "airbench2"]
    assert report["errors"] == ["airbench94 seed 1: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    assert [r.get("run_seconds") for r in report["airbench"]["runs"]] == [3.0, None, 5.0]
    assert report["methods"]["fastcifar[default]"]["finished"] == 1


def test_unreadable_airbench_output_stops_airbench_loudly_and_never_uses_wall_time(tmp_path, monkeypatch, capsys):
    class Garbled(FakeAirbench):
        def train94(self, run=0, verbose=True):
            self.calls.append(f"train{run}")
            print("| run | eval | 0.9 |")  # another format
            return object()

    code, report, calls = interleaved_main(tmp_path, monkeypatch, Garbled(), runs=2, airbench_runs=2)
    assert code == 1 and calls == ["fastcifar0", "airbench0", "fastcifar1"]  # airbench stops; fastcifar goes on
    assert report["airbench"]["runs"] == [] and "AirbenchOutputError" in report["airbench"]["error"]
    assert report["errors"][0].startswith("airbench94 stopped at seed 0: AirbenchOutputError: no final '| eval |'")
    assert "airbench94" not in report["methods"] and report["time_ratio_fastcifar_over_airbench"] is None
    assert "error: airbench94 stopped" in capsys.readouterr().out


@pytest.mark.parametrize("loss", ["nan", "inf", "-inf"])
def test_a_seed_whose_loss_is_not_finite_is_failed_in_the_json_and_the_table_never_an_accuracy(
        loss, tmp_path, monkeypatch, capsys):
    """Sabotage caught: the check reading math.isnan (an inf loss would pass) instead of math.isfinite."""
    class Diverging(FakeAirbench):
        def train94(self, run=0, verbose=True):
            self.calls.append(f"train{run}")
            print(AIRBENCH_LOG.replace("2.3047", f"{loss:>6}"))  # what a NaN whitening prints; accuracies still print
            return object()

    code, report, calls = interleaved_main(tmp_path, monkeypatch, Diverging(), runs=1, airbench_runs=2)
    assert code == 1 and calls == ["fastcifar0", "airbench0", "airbench1"]
    runs = report["airbench"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all("acc" not in r for r in runs)
    assert all(r["error"].startswith("NonFiniteLoss: airbench's train_loss was not finite") for r in runs)
    stats = report["methods"]["airbench94"]
    assert (stats["finished"], stats["failed"], stats["acc"]["n"], stats["acc_tta"]["n"]) == (0, 2, 0, 0)
    row = next(line for line in report["table"].splitlines() if line.startswith("airbench94"))
    assert row.split()[1:5] == ["0/2", "2", "-", "-"]  # runs, failed, acc %, flip TTA %
    assert report["time_ratio_fastcifar_over_airbench"] is None
    assert "error: airbench94 seed 1: NonFiniteLoss" in capsys.readouterr().out


def record_whitening(monkeypatch, airbench) -> list[dict]:
    """Wraps airbench's whitening init: per call, the eigenvalues of its patch covariance, their float64
    reference from the same patches (numpy) and the filters it wrote."""
    utils = airbench.utils
    real_parameters, real_init = utils.get_whitening_parameters, utils.init_whitening_conv
    calls: list[dict] = []

    def parameters(patches):
        eigenvalues, eigenvectors = real_parameters(patches)
        flat = patches.reshape(len(patches), -1).double().numpy()
        calls.append({"eigenvalues": eigenvalues.flatten().double().numpy(),
                      "reference": np.linalg.eigvalsh(flat.T @ flat / len(flat))[::-1]})
        return eigenvalues, eigenvectors

    def init(layer, train_set, eps=5e-4):
        real_init(layer, train_set, eps)
        calls[-1]["filters"] = layer.weight.detach().clone()

    monkeypatch.setattr(utils, "get_whitening_parameters", parameters)
    monkeypatch.setattr(utils, "init_whitening_conv", init)
    return calls


@pytest.fixture(scope="module")
def learnable_folder(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("learnable"), train_per_class=100, test_per_class=20)


LEARNABLE_TRAIN = ["--device", "cpu", "--widths", "8,16,16,16", "--batch-size", "50", "--lr", "0.3", "--epochs", "5"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_comparator_learns_on_both_sides_in_fp32_and_bf16(learnable_folder, tmp_path, monkeypatch, precision):
    """Both methods through speedrun.main on the CPU, the real airbench under airbench_on_cpu, on images whose
    class is their colour: each must learn (finite loss, well above chance), airbench's whitening must be its
    fp32 one (finite filters, eigenvalues as float64 gives them), and bf16 must mean bf16 kernels, with bf16
    weights for airbench (its fp16 on a GPU) and fp32 BatchNorm. Any CPU: without native bf16 it is slower."""
    airbench = pytest.importorskip("airbench")
    small_airbench(monkeypatch)
    whitening = record_whitening(monkeypatch, airbench)
    low = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    seen: dict[str, set] = {"airbench conv": set(), "airbench norm": set(), "fastcifar conv": set()}

    def hook(module, inputs, output):
        side = "airbench" if type(module).__module__.startswith("airbench") else "fastcifar"
        if isinstance(module, torch.nn.Conv2d):
            seen[f"{side} conv"].add(output.dtype)
        elif isinstance(module, torch.nn.BatchNorm2d) and side == "airbench":
            seen["airbench norm"].add(module.running_mean.dtype)

    out = tmp_path / "report.json"
    flags = ["--no-amp"] if precision == "fp32" else ["--amp-dtype", "bf16"]
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        code = speedrun.main(["--data-dir", str(learnable_folder), "--preset", "speedrun", "--runs", "1", "--airbench",
                              "--out-dir", str(tmp_path / "run"), "--json", str(out), "--", *flags, *LEARNABLE_TRAIN])
    finally:
        handle.remove()
    report = json.loads(out.read_text())
    assert code == 0 and report["errors"] == [], report["errors"]
    assert report["airbench"]["cpu_precision"] == str(low)
    (fast,), (ab,) = report["fastcifar"]["runs"], report["airbench"]["runs"]
    assert fast["acc_tta"] >= 0.5 and ab["acc_tta"] >= 0.5  # chance: 0.1, what a NaN run gives
    with open(Path(fast["out_dir"]) / "metrics.csv") as f:
        assert all(np.isfinite(float(row["train_loss"])) for row in csv.DictReader(f))
    assert np.isfinite(ab["logged"]["train_losses"]).all()
    assert 0 < ab["run_seconds"] <= ab["wall_seconds"]
    assert len(whitening) == 2  # warm-up and seed
    for call in whitening:
        assert call["filters"].dtype == low and torch.isfinite(call["filters"]).all()
        assert np.abs(call["eigenvalues"] - call["reference"]).max() <= 1e-4 * call["reference"].max()
    assert seen["airbench conv"] == {low} and seen["airbench norm"] == {torch.float32}
    assert low in seen["fastcifar conv"]  # its training steps (its model summary runs in fp32)


def test_the_cuda_marker_is_registered_for_gpu_sh(pytestconfig):
    assert any(m.startswith("cuda:") for m in pytestconfig.getini("markers"))


def run_gpu_script(tmp_path: Path, data: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTCIFAR_GPU_SMOKE": "1", "FASTCIFAR_GPU_DATA": str(data),
           "FASTCIFAR_GPU_WHEELS": str(tmp_path / "no-wheels"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), **env_vars}
    env.pop("FASTCIFAR_GPU_PRESET", None)
    return subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), str(tmp_path / "out")], cwd=tmp_path, env=env,
                          check=False, capture_output=True, text=True, timeout=280)


needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


@pytest.mark.slow
@needs_bash
def test_gpu_script_smoke_mode_runs_every_part_on_the_cpu(tiny_data, tmp_path):
    proc = run_gpu_script(tmp_path, tiny_data, FASTCIFAR_GPU_AIRBENCH="1")  # asked for, but no wheel
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["ablations.json", "default.json", "env.txt", "log.txt",
                                                     "parts.json", "speedrun.json", "summary.txt"]
    for name, runs in (("speedrun", 2), ("default", 1)):
        report = json.loads((out / f"{name}.json").read_text())
        (stats,) = report["methods"].values()
        assert stats["runs"] == runs and report["errors"] == [] and report["airbench"] is None
        assert stats["tta"] == ("flip + translate 1" if name != "default" else "flip")  # the preset's own TTA
        assert stats["flops_per_run"] > 0  # the work of a run sits next to its seconds
    ablations = json.loads((out / "ablations.json").read_text())
    assert list(ablations["arms"]) == ["base", "lr"] and ablations["seeds"] == [0, 1]
    assert all(len(arm["runs"]) == 2 for arm in ablations["arms"].values())
    parts = json.loads((out / "parts.json").read_text())
    assert [(p["name"], p["exit_code"], p["status"]) for p in parts["parts"]] == [
        ("speedrun", 0, "ok"), ("ablations", 0, "ok"), ("cuda-tests", 0, "ok"), ("default", 0, "ok")]
    assert parts["notes"] and parts["notes"][0].startswith("airbench skipped: no airbench-*.whl")
    summary = (out / "summary.txt").read_text()
    assert "speedrun: ok, exit 0" in summary and "ablations: ok, exit 0" in summary and "run s" in summary
    assert "base: " in summary and "lr: " in summary and "PFLOP per run" in summary
    assert "note: airbench skipped" in summary
    log = (out / "log.txt").read_text()
    rewrites = [line for line in log.splitlines() if line.startswith("=== summary.txt and parts.json rewritten")]
    assert [r.split("(")[1].split()[0] for r in rewrites] == ["1", "2", "2", "3", "4"]  # after every part
    assert "skipped" in log and "needs a CUDA GPU" in log  # the cuda part ran, and skipped for the right reason
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert not list(tmp_path.glob("fastcifar-gpu.*")), "scratch directory left behind"


@pytest.mark.slow
@needs_bash
def test_gpu_script_skips_what_its_budget_cannot_fit_and_still_writes_the_summary(tiny_data, tmp_path):
    proc = run_gpu_script(tmp_path, tiny_data, FASTCIFAR_GPU_BUDGET="5")
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = json.loads((out / "parts.json").read_text())["parts"]
    assert [p["name"] for p in parts] == ["speedrun", "ablations", "cuda-tests", "default"]
    assert all(p["status"].startswith("skipped") and p["exit_code"] is None for p in parts)
    assert "speedrun: skipped" in (out / "summary.txt").read_text()


def test_the_json_report_holds_each_seed_before_the_next_one_starts(tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    seen = []

    def fake_seed(argv, out_dir):
        seed = int(argv[argv.index("--seed") + 1])
        report = json.loads(out.read_text()) if out.exists() else None
        seen.append(None if report is None else [r["seed"] for r in report["fastcifar"]["runs"]])
        return speedrun.fastcifar_record(trainer_summary(
            {"seed": seed, "test_acc": 0.9, "test_acc_tta": 0.95, "train_seconds": 5.0, "run_seconds": 6.0}))

    monkeypatch.setattr(speedrun, "run_fastcifar_seed", fake_seed)
    use_synthetic_data(monkeypatch)
    assert speedrun.main(["--data-dir", "synthetic", "--preset", "default", "--runs", "3",
                          "--out-dir", str(tmp_path / "run"), "--json", str(out)]) == 0
    assert seen == [None, [0], [0, 1]]
    assert [r["seed"] for r in json.loads(out.read_text())["fastcifar"]["runs"]] == [0, 1, 2]


@pytest.mark.slow
@needs_bash
def test_a_failing_part_is_recorded_and_makes_the_script_exit_non_zero(tmp_path):
    proc = run_gpu_script(tmp_path, tmp_path / "no-such-data.tar.gz", FASTCIFAR_GPU_ARMS="")
    out = tmp_path / "out"
    parts = json.loads((out / "parts.json").read_text())["parts"]
    failed = [p for p in parts if p["name"] != "cuda-tests"]
    assert failed and all(p["status"] == "failed" and p["exit_code"] not in (0, None) for p in failed), parts
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "speedrun: failed" in (out / "summary.txt").read_text()

"""python -m fastcifar.tune on tiny data: the test set is never read, pruning happens, the sampler and the
seed are honoured, a study continues and is shared by two processes, best.toml trains."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from fastcifar.config import TrainConfig, load_toml, parse_config  # noqa: E402
from fastcifar.errors import run_cli  # noqa: E402
from fastcifar.search_space import load_search_space  # noqa: E402
from fastcifar.tune import main, recipe_toml  # noqa: E402
from synthetic import write_learnable_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = ["--width", "4", "--batch-size", "32", "--device", "cpu", "--val-split", "100", "--epochs", "1", "--no-plots"]
SPACE = """
[lr]
low = 0.05
high = 0.8
log = true

[label_smoothing]
choices = [0.0, 0.2]
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("data"), 40, 10)


def space_file(tmp_path: Path, text: str = SPACE, name: str = "space.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tune(tmp_path: Path, data: Path, space: Path, *extra: str, study: str = "s") -> list[dict]:
    out = tmp_path / study
    code = run_cli(main, ["--space", str(space), "--data-dir", str(data), *TINY, "--out-dir", str(out),
                          "--storage", f"sqlite:///{tmp_path / 'tune.db'}", "--study", study, *extra])
    assert code == 0
    return trials(out)


def trials(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/trial.json"))]


def test_search_ignores_the_test_set_and_is_reproducible_by_seed(tmp_path, data):
    """The same seeded study on a tree whose test set is different and wrongly labelled gives the same
    trials, value for value; another --seed samples other values."""
    shuffled = write_learnable_dataset(tmp_path / "shuffled", 40, 10, other_test_set=True)
    space = space_file(tmp_path)
    args = ("--trials", "3", "--sampler", "random", "--pruner", "none")
    a = tune(tmp_path, data, space, *args, study="a")
    b = tune(tmp_path, shuffled, space, *args, study="b")
    c = tune(tmp_path, data, space, *args, "--seed", "1", study="c")
    key = lambda ts: [(t["params"], t["value"], t["state"]) for t in ts]  # noqa: E731
    assert len(a) == 3 and all(t["state"] == "COMPLETE" for t in a)
    assert key(a) == key(b)
    assert [t["params"] for t in a[1:]] != [t["params"] for t in c[1:]]  # trial 0 is the base in both
    assert a[0]["base"] and a[0]["params"] == {"lr": 0.4, "label_smoothing": 0.2}
    summary = json.loads((tmp_path / "a" / "trials" / "0001" / "summary.json").read_text())
    assert summary["eval_split"] == "val"


def test_median_pruner_stops_bad_trials_after_their_first_epoch(tmp_path, data):
    space = space_file(tmp_path, "[lr]\nchoices = [0.4, 0.0001]\n")
    ts = tune(tmp_path, data, space, "--trials", "6", "--sampler", "random", "--prune-after", "1",
              "--epochs", "2")
    pruned = [t for t in ts if t["state"] == "PRUNED"]
    assert pruned, [(t["params"], t["intermediate_val_acc"]) for t in ts]
    assert all(t["params"]["lr"] == 0.0001 and t["epochs_done"] == 1 for t in pruned)
    assert any(t["state"] == "COMPLETE" and t["epochs_done"] == 2 for t in ts)


def test_time_budget_stops_trials_that_train_too_long(tmp_path, data):
    ts = tune(tmp_path, data, space_file(tmp_path), "--trials", "2", "--max-train-seconds", "0.001",
              "--pruner", "none")
    assert [t["state"] for t in ts] == ["PRUNED", "PRUNED"] and all(t["over_budget"] for t in ts)
    assert not (tmp_path / "s" / "best.toml").exists()  # no feasible trial, no best configuration


def test_grid_sampler_walks_the_grid_and_best_toml_trains(tmp_path, data):
    space = space_file(tmp_path, "[lr]\nlow = 0.2\nhigh = 0.6\nstep = 0.4\n\n[cutout]\nchoices = [0, 8]\n")
    ts = tune(tmp_path, data, space, "--trials", "10", "--sampler", "grid", "--plots")
    grid = sorted((t["params"]["lr"], t["params"]["cutout"]) for t in ts)
    assert grid == [(0.2, 0), (0.2, 8), (0.6, 0), (0.6, 8)]  # every point once, then the study stops
    out = tmp_path / "s"
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3] and {"value", "lr", "cutout"} <= set(rows[0])
    for name in ("history.png", "importances.png", "slice.png", "study.json"):
        assert (out / name).stat().st_size > 0, name
    best = max((t for t in ts if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    assert json.loads((out / "study.json").read_text())["best"]["number"] == best["number"]
    config, _ = parse_config(["--config", str(out / "best.toml")])
    assert (config.lr, config.cutout, config.width, config.epochs) == (best["params"]["lr"],
                                                                       best["params"]["cutout"], 4, 1.0)
    assert config.val_split == 0  # the recipe, not the search's split: it trains on every image
    from fastcifar.train import main as train_main

    assert train_main(["--config", str(out / "best.toml"), "--data-dir", str(data), "--device", "cpu",
                       "--out-dir", str(tmp_path / "best-run"), "--no-plots"]) == 0


def test_a_study_continues_and_two_processes_share_one_storage(tmp_path, data):
    space = space_file(tmp_path)
    out, db = tmp_path / "s", f"sqlite:///{tmp_path / 'tune.db'}"
    argv = [sys.executable, "-m", "fastcifar.tune", "--space", str(space), "--data-dir", str(data), *TINY,
            "--epochs", "0.5", "--out-dir", str(out), "--storage", db, "--study", "s", "--trials", "4",
            "--sampler", "random", "--pruner", "none"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    first = trials(out)
    assert 4 <= len(first) <= 5 and all(t["state"] == "COMPLETE" for t in first)  # each may finish one in flight
    assert all("trial" in log for log in logs)  # both processes ran trials
    assert sum(t["base"] for t in first) == 1
    # a later invocation continues the same study up to the new total
    tune(tmp_path, data, space, "--epochs", "0.5", "--trials", str(len(first) + 1), "--sampler", "random",
         "--pruner", "none")
    again = trials(out)
    assert len(again) == len(first) + 1 and sum(t["base"] for t in again) == 1


@pytest.mark.parametrize("space, extra, message", [
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--val-split", "0"], "needs a validation split"),
    ("[lrr]\nlow = 0.1\nhigh = 1.0\n", [], "unknown field 'lrr'"),
    ("[lr\nlow = 0.1\n", [], "not valid TOML"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--sampler", "grid"], "needs a finite set of values for 'lr'"),
    ("[pct_start]\nlow = 0.1\nhigh = 1.5\n", [], "pct_start = 1.5"),
    ("[lr]\nlow = 1.0\nhigh = 0.1\n", [], "low (1.0) must be below high"),
    ("[seed]\nchoices = [0, 1]\n", [], "'seed' cannot be searched"),
    ("[whiten]\nlow = 0\nhigh = 1\n", [], "takes choices"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--val-split", "400"], "invalid --val-split (400)"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, data, capsys, space, extra, message):
    path = space_file(tmp_path, space)
    code = run_cli(main, ["--space", str(path), "--data-dir", str(data), *TINY, *extra,
                          "--out-dir", str(tmp_path / "out"), "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.db").exists()  # nothing created before the inputs are checked


def test_space_types_and_grid_values(tmp_path):
    space = load_search_space(space_file(tmp_path, "width = 8\n[epochs]\nlow = 1\nhigh = 2\nstep = 0.5\n\n"
                                                   "[batch_size]\nlow = 128\nhigh = 512\nstep = 128\n"),
                              TrainConfig())
    assert space.grid() == {"epochs": [1.0, 1.5, 2.0], "batch_size": [128, 256, 384, 512]}
    assert space.fixed == {"width": 8} and space.apply(TrainConfig(), {"epochs": 1.5}).width == 8


def test_recipe_toml_round_trips_through_train_config(tmp_path):
    config, _ = parse_config(["--preset", "speedrun", "--lr", "1e-05", "--out-dir", "x", "--val-split", "9"])
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(config, ["a comment"]))
    loaded = load_toml(path)
    assert "out_dir" not in loaded and "val_split" not in loaded and "compile" not in loaded
    again, _ = parse_config(["--config", str(path)])
    for name, value in loaded.items():
        assert getattr(again, name) == getattr(config, name), name
    assert again.lr == 1e-05 and again.whiten and again.epochs == 10


def test_an_interrupted_trial_is_recorded_as_failed_and_the_study_continues(tmp_path, data, monkeypatch, capsys):
    import fastcifar.train

    def stopped(config, **kw):  # what train() does on Ctrl-C: checkpoint, then SystemExit(130)
        raise SystemExit(130)

    space = space_file(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(fastcifar.train, "train", stopped)
        code = run_cli(main, ["--space", str(space), "--data-dir", str(data), *TINY, "--out-dir", str(tmp_path / "s"),
                              "--storage", f"sqlite:///{tmp_path / 'tune.db'}", "--study", "s", "--trials", "2"])
    assert code == 130 and "run the same command again" in capsys.readouterr().err
    tune(tmp_path, data, space, "--trials", "2")
    rows = list(csv.DictReader((tmp_path / "s" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE"]  # the failure counts towards --trials

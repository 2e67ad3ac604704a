"""python -m fastcifar.tune on tiny data: the test set is never read, pruning follows the median rule, the
sampler and the seed are honoured, no trial repeats another's draw, a study continues, is shared by two processes
and refuses incomparable settings, two objectives give a Pareto front, best.toml trains. The search space, the
study's storage and the report have test files of their own (test_search_space, test_tune_study, test_tune_report)."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optuna")

import fastcifar.train  # noqa: E402
from fastcifar.config import TrainConfig, parse_config  # noqa: E402
from fastcifar.errors import run_cli  # noqa: E402
from fastcifar.tune import main  # noqa: E402
from synthetic import write_learnable_dataset  # noqa: E402
from tune_helpers import SPACE, space_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Tiny runs in the precision the CPU picks (--amp-dtype auto: bf16 on a CPU with AMX or AVX-512 BF16, else
# fp32). What a trained run reaches depends on its seed and the CPU's rounding, so no test asserts on it: the
# tests that train compare runs with each other; pruning and the best trials are tested on fake_train's values.
TINY = ["--width", "4", "--batch-size", "32", "--device", "cpu", "--val-split", "100", "--epochs", "1", "--no-plots"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("data"), 40, 10)


@pytest.fixture
def fake_train(monkeypatch):
    """fastcifar.train.train replaced by a function of the config: no training, exact values. Returns the
    list of configs it was called with."""
    seen: list[TrainConfig] = []
    monkeypatch.setattr(fastcifar.train, "train", fake_training(seen))
    return seen


def fake_training(seen: list[TrainConfig]):
    def train(config, on_epoch=None, **kw):
        seen.append(config)
        for epoch in range(1, math.ceil(config.epochs) + 1):  # a row per epoch, as train() gives tune
            on_epoch({"epoch": epoch, "test_acc": fake_accuracy(config), "total_seconds": float(epoch)})
        return {"test_acc": fake_accuracy(config), "test_acc_tta": None, "train_seconds": fake_seconds(config)}

    return train


def fake_accuracy(config: TrainConfig) -> float:
    return round(1 - abs(config.lr - 0.3), 6)  # best at lr 0.3


def fake_seconds(config: TrainConfig) -> float:
    return round(10 * config.lr + config.label_smoothing, 6)  # a higher lr costs more: a real trade-off


def tune_args(tmp_path: Path, data: Path, space: Path | None, *extra: str, study: str = "s") -> list[str]:
    return [*(["--space", str(space)] if space else []), "--data-dir", str(data), *TINY,
            "--out-dir", str(tmp_path / study), "--storage", f"sqlite:///{tmp_path / 'tune.db'}", "--study", study,
            *extra]


def tune(tmp_path: Path, data: Path, space: Path | None, *extra: str, study: str = "s") -> list[dict]:
    assert run_cli(main, tune_args(tmp_path, data, space, *extra, study=study)) == 0
    return trials(tmp_path / study)


def trials(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/trial.json"))]


def draws(ts: list[dict]) -> list[tuple]:
    return [tuple(sorted(t["params"].items())) for t in ts]


# ------------------------------------------------------------------------------------------------------
# Sampling and seeds
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
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


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_draws_new_values(tmp_path, data, fake_train, sampler):
    """Three trials, then three more in a second invocation with the same --seed: six different draws
    (TPE's first trials are random ones)."""
    space = space_file(tmp_path)
    args = ("--sampler", sampler, "--no-enqueue-base", "--startup-trials", "10")
    tune(tmp_path, data, space, "--trials", "3", *args)
    ts = tune(tmp_path, data, space, "--trials", "6", *args)
    assert len(ts) == 6 and len(set(draws(ts))) == 6, draws(ts)


def test_every_trial_records_its_training_seed(tmp_path, data, fake_train):
    ts = tune(tmp_path, data, space_file(tmp_path), "--trials", "2", "--seed", "7")
    assert [c.seed for c in fake_train] == [7, 7]
    assert [t["seed"] for t in ts] == [7, 7]
    rows = list(csv.DictReader((tmp_path / "s" / "trials.csv").open()))
    assert [r["seed"] for r in rows] == ["7", "7"]


@pytest.mark.slow
def test_a_study_continues_and_two_processes_share_one_storage_without_repeating_a_draw(tmp_path, data):
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
    assert len(set(draws(again))) == len(again), draws(again)  # same --seed everywhere, no repeat


# ------------------------------------------------------------------------------------------------------
# Pruning, the time budget and the grid
# ------------------------------------------------------------------------------------------------------
def test_median_pruner_stops_trials_below_the_median_after_their_first_epoch(tmp_path, data, fake_train):
    """Each trial reports its (fake, exact) accuracy after each of two epochs. The reference, by hand: a trial is
    pruned after its first epoch when that accuracy lies below the median of the complete trials before it
    (MedianPruner, --prune-after 1); every other trial runs both epochs."""
    ts = tune(tmp_path, data, space_file(tmp_path), "--trials", "8", "--sampler", "random", "--prune-after", "1",
              "--epochs", "2")
    expected, complete = [], []
    for t in ts:
        first = t["intermediate_val_acc"]["1"]
        expected.append("PRUNED" if complete and first < statistics.median(complete) else "COMPLETE")
        complete += [first] if expected[-1] == "COMPLETE" else []
    assert [t["state"] for t in ts] == expected and "PRUNED" in expected, ts
    assert [t["epochs_done"] for t in ts] == [1 if state == "PRUNED" else 2 for state in expected]


@pytest.mark.slow
def test_time_budget_is_a_constraint_that_stops_and_excludes_slow_trials(tmp_path, data):
    """Every trial passes 0.001 s: it stops after its first (evaluated) epoch of two, completes as an
    infeasible trial (Optuna's constraint, which the samplers learn from), and is never the best."""
    import optuna

    ts = tune(tmp_path, data, space_file(tmp_path), "--trials", "2", "--max-train-seconds", "0.001",
              "--epochs", "2", "--pruner", "none")
    assert [(t["state"], t["epochs_done"], t["over_budget"], t["feasible"]) for t in ts] == \
        [("COMPLETE", 1, True, False)] * 2
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    assert all(t.constraints["train_seconds"] > 0 for t in study.trials)
    assert not (tmp_path / "s" / "best.toml").exists()  # no feasible trial, no best configuration
    assert json.loads((tmp_path / "s" / "study.json").read_text())["best"] is None


@pytest.mark.slow
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
    best = json.loads((out / "study.json").read_text())["best"]  # of equal values, any one
    assert best["value"] == max(t["value"] for t in ts if t["state"] == "COMPLETE")
    config, _ = parse_config(["--config", str(out / "best.toml")])
    assert (config.lr, config.cutout, config.width, config.epochs) == (best["params"]["lr"],
                                                                       best["params"]["cutout"], 4, 1.0)
    assert config.val_split == 0  # the recipe, not the search's split: it trains on every image
    from fastcifar.train import main as train_main

    assert train_main(["--config", str(out / "best.toml"), "--data-dir", str(data), "--device", "cpu",
                       "--out-dir", str(tmp_path / "best-run"), "--no-plots"]) == 0


# ------------------------------------------------------------------------------------------------------
# Comparable trials
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [
    (["--epochs", "2"], "--epochs 2.0 (the study's: 1.0)"),
    (["--width", "8"], "--width 8 (the study's: 4)"),
    (["--val-split", "120"], "--val-split 120 (the study's: 100)"),
    (["--split-seed", "1"], "--split-seed 1 (the study's: 0)"),
    (["--preset", "speedrun"], "--preset \"speedrun\" (the study's: \"default\")"),
    (["--objective", "accuracy-seconds"], "--objective"),
    (["--max-train-seconds", "60"], "--max-train-seconds 60.0 (the study's: not given)"),
    (["--space", "OTHER"], "--space: 'lr' is"),
])
def test_a_study_refuses_a_command_with_other_settings(one_trial_study, data, capsys, change, named):
    space = one_trial_study / "space.toml"
    if change[0] == "--space":
        change = ["--space", str(space_file(one_trial_study, SPACE.replace("0.8", "0.9"), "other.toml"))]
    code = run_cli(main, tune_args(one_trial_study, data, space, "--trials", "2", *change))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err and "--new-study" in err, err
    assert len(trials(one_trial_study / "s")) == 1


@pytest.fixture(scope="module")
def one_trial_study(tmp_path_factory, data) -> Path:
    """A study 's' of one trial made with SPACE and TINY, in the returned folder."""
    folder = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastcifar.train, "train", fake_training([]))
        tune(folder, data, space_file(folder), "--trials", "1")
    return folder


def test_another_seed_or_device_continues_the_study(tmp_path, data, fake_train):
    """Where and with which seed a trial trains is recorded per trial, not a setting of the study."""
    space = space_file(tmp_path)
    tune(tmp_path, data, space, "--trials", "1")
    ts = tune(tmp_path, data, space, "--trials", "2", "--seed", "3", "--device", "auto", "--eval-every", "2")
    assert [t["seed"] for t in ts] == [0, 3]


def test_new_study_replaces_a_study_of_other_settings_and_continues_one_of_the_same(tmp_path, data, fake_train,
                                                                                    capsys):
    space = space_file(tmp_path)
    tune(tmp_path, data, space, "--trials", "3")
    (tmp_path / "s" / "best-per-budget").mkdir()
    capsys.readouterr()
    ts = tune(tmp_path, data, space, "--trials", "1", "--epochs", "2", "--new-study")
    assert f"--new-study: deleted the earlier study 's' in sqlite:///{tmp_path / 'tune.db'} and its outputs in " \
        f"{tmp_path / 's'}" in capsys.readouterr().err
    assert len(ts) == 1 and ts[0]["base"] and ts[0]["config"]["epochs"] == 2.0  # the old trials' files went
    summary = json.loads((tmp_path / "s" / "study.json").read_text())
    assert summary["settings"]["epochs"] == 2.0 and summary["trials"] == {"COMPLETE": 1}
    assert not (tmp_path / "s" / "best-per-budget").exists()
    ts = tune(tmp_path, data, space, "--trials", "2", "--epochs", "2", "--new-study")  # same settings: continues
    assert [t["number"] for t in ts] == [0, 1]


# ------------------------------------------------------------------------------------------------------
# Storage URLs, the default space, two objectives
# ------------------------------------------------------------------------------------------------------
def test_storage_password_is_masked_in_everything_printed_or_written(tmp_path, data, fake_train, capsys,
                                                                     monkeypatch):
    import fastcifar.tune_study

    url = "postgresql://tuner:s3cret-pw@db.example:5432/studies"
    code = run_cli(main, tune_args(tmp_path, data, space_file(tmp_path), "--storage", url))
    assert code == 2 and "s3cret" not in capsys.readouterr().err  # the driver is missing: the error says so
    real_open = fastcifar.tune_study.open_storage
    monkeypatch.setattr(fastcifar.tune_study, "open_storage", lambda _: real_open(f"sqlite:///{tmp_path / 'x.db'}"))
    tune(tmp_path, data, space_file(tmp_path), "--trials", "2", "--storage", url)
    printed = "".join(capsys.readouterr())
    written = [p.read_text() for p in (tmp_path / "s").rglob("*") if p.suffix in (".json", ".toml", ".csv")]
    assert "tuner:***@db.example" in printed and "s3cret" not in printed
    assert len(written) > 3 and not any("s3cret" in text for text in written)


def test_without_space_the_default_one_cycle_space_is_searched(tmp_path, data, fake_train):
    ts = tune(tmp_path, data, None, "--trials", "1", "--no-enqueue-base", "--batch-size", "128")
    assert set(ts[0]["params"]) == {"lr", "pct_start", "div_factor", "final_div_factor", "weight_decay",
                                    "label_smoothing", "batch_size"}
    summary = json.loads((tmp_path / "s" / "study.json").read_text())
    assert "DEFAULT_SPACE" in summary["space"]


def pareto_reference(ts: list[dict]) -> list[int]:
    """Trial numbers no other trial beats on both accuracy (higher) and cost (lower), by brute force."""
    done = [t for t in ts if t["state"] == "COMPLETE"]
    beaten = lambda t: any(o["value"] >= t["value"] and o["cost"] <= t["cost"]  # noqa: E731
                           and (o["value"], o["cost"]) != (t["value"], t["cost"]) for o in done)
    return sorted(t["number"] for t in done if not beaten(t))


def test_two_objectives_write_the_pareto_front_and_the_best_recipe_per_budget(tmp_path, data, fake_train):
    ts = tune(tmp_path, data, space_file(tmp_path), "--trials", "8", "--objective", "accuracy-seconds",
              "--sampler", "random", "--plots")
    out = tmp_path / "s"
    assert all(t["cost"] == t["train_seconds"] for t in ts)
    front = list(csv.DictReader((out / "pareto.csv").open()))
    assert sorted(int(r["number"]) for r in front) == pareto_reference(ts)
    assert [float(r["cost"]) for r in front] == sorted(float(r["cost"]) for r in front)  # cheapest first
    for row in front:  # one recipe per point of the front
        config, _ = parse_config(["--config", str(out / row["toml"])])
        assert config.lr == float(row["lr"])
    assert sorted(p.name for p in (out / "best-per-budget").iterdir()) == sorted(
        Path(r["toml"]).name for r in front)
    best = json.loads((out / "study.json").read_text())["best"]
    assert best["value"] == max(float(r["value"]) for r in front)
    assert all((out / f"{name}.png").stat().st_size > 0 for name in ("pareto", "history", "importances", "slice"))
    # under a budget: the most accurate trial that costs no more
    budget = float(front[0]["cost"])
    tune(tmp_path, data, space_file(tmp_path), "--trials", "8", "--objective", "accuracy-seconds",
         "--sampler", "random", "--budget", str(budget))
    config, _ = parse_config(["--config", str(out / "best.toml")])
    assert config.lr == float(front[0]["lr"])


def test_accuracy_flops_counts_the_work_of_each_trials_run(tmp_path, data, fake_train):
    """FLOPs grow with the width and the epochs: 300 training and 100 validation images here."""
    from fastcifar.flops import recipe_flops

    space = space_file(tmp_path, "[width]\nchoices = [4, 8]\n\n[epochs]\nchoices = [1.0, 2.0]\n")
    ts = tune(tmp_path, data, space, "--trials", "4", "--objective", "accuracy-flops", "--sampler", "grid")
    for t in ts:
        assert t["cost"] == t["flops"] == recipe_flops(TrainConfig(**t["config"]), 300, 100)["per_run"]
    by_params = {(t["params"]["width"], t["params"]["epochs"]): t["cost"] for t in ts}
    assert by_params[(8, 1.0)] > by_params[(4, 1.0)] and by_params[(4, 2.0)] > by_params[(4, 1.0)], by_params
    assert json.loads((tmp_path / "s" / "study.json").read_text())["cost"].startswith("FLOPs")


def test_nsga2_searches_two_objectives(tmp_path, data, fake_train):
    """Generations of two: the base and a random trial, then children of the best."""
    ts = tune(tmp_path, data, space_file(tmp_path), "--trials", "5", "--objective", "accuracy-seconds",
              "--sampler", "nsga2", "--startup-trials", "2")
    assert [t["state"] for t in ts] == ["COMPLETE"] * 5
    front = list(csv.DictReader((tmp_path / "s" / "pareto.csv").open()))
    assert sorted(int(r["number"]) for r in front) == pareto_reference(ts)


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------
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
    ("[batch_size]\nchoices = [16, 32]\nwidth = 8\n", [], "'width' is inside the table [batch_size]"),
    ("[prep_kernel]\nchoices = [2, 5]\n", [], "'prep_kernel' in"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\nlgo = true\n", [], "unknown key 'lgo'"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--budget", "5"], "--budget needs --objective accuracy-seconds"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--objective", "accuracy-flops", "--pruner", "median"],
     "--pruner median needs --objective accuracy"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--sampler", "nsga2", "--startup-trials", "1"], "population of >= 2"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--lr", "-1"], "error: invalid --lr (-1.0)"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--resume", "runs/x"], "--resume is for fastcifar.train"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--trials", "0"], "invalid --trials (0)"),
    ("[lr]\nlow = 0.1\nhigh = 1.0\n", ["--max-train-seconds", "0"], "invalid --max-train-seconds (0.0)"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, data, capsys, space, extra, message):
    path = space_file(tmp_path, space)
    code = run_cli(main, ["--space", str(path), "--data-dir", str(data), *TINY, *extra,
                          "--out-dir", str(tmp_path / "out"), "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.db").exists()  # nothing created before the inputs are checked


def test_a_space_without_a_grid_is_refused_before_the_data_is_read(tmp_path, capsys):
    """--sampler grid with a continuous range: the grid's message, although the data directory does not exist."""
    path = space_file(tmp_path, "[lr]\nlow = 0.1\nhigh = 1.0\n")
    code = run_cli(main, ["--space", str(path), "--data-dir", str(tmp_path / "no-data"), *TINY, "--sampler", "grid",
                          "--out-dir", str(tmp_path / "out"), "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    assert code == 2 and "needs a finite set of values for 'lr'" in capsys.readouterr().err


def test_without_optuna_the_error_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` does where it is not installed
    assert run_cli(main, ["--val-split", "100"]) == 2
    assert capsys.readouterr().err == "fastcifar: error: optuna is not installed: pip install 'fastcifar[tune]'\n"


def test_an_interrupted_trial_is_recorded_as_failed_and_the_study_continues(tmp_path, data, fake_train, monkeypatch,
                                                                           capsys):
    def stopped(config, **kw):  # what train() does on Ctrl-C: checkpoint, then SystemExit(130)
        raise SystemExit(130)

    space = space_file(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(fastcifar.train, "train", stopped)
        code = run_cli(main, tune_args(tmp_path, data, space, "--trials", "2"))
    assert code == 130 and "run the same command again" in capsys.readouterr().err
    tune(tmp_path, data, space, "--trials", "2")
    rows = list(csv.DictReader((tmp_path / "s" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE"]  # the failure counts towards --trials


class PruningTrial:
    """The trial methods Objective.epoch_callback calls; its pruner always says stop."""

    def __init__(self):
        self.user_attrs, self.reported = {}, []

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return True


@pytest.mark.parametrize("max_train_seconds", [None, 1.0])
def test_the_last_epoch_is_never_stopped_by_the_pruner_or_the_time_budget(max_train_seconds):
    """Stopping after the last epoch saves nothing and throws away a finished result. Sabotage: `before_last`
    dropped from the pruning or the over-budget test of epoch_callback."""
    from optuna import TrialPruned

    from fastcifar.tune import Objective, OverBudget

    objective = Objective(space=None, base=TrainConfig(), out=Path("unused"), cost=None,
                          max_train_seconds=max_train_seconds, split_sizes=(0, 0))
    trial = PruningTrial()
    on_epoch = objective.epoch_callback(trial, last_epoch=2)
    row = {"epoch": 1, "test_acc": 0.5, "total_seconds": 5.0}
    with pytest.raises(OverBudget if max_train_seconds else TrialPruned):
        on_epoch(row)
    on_epoch({**row, "epoch": 2})  # the last: neither stops it
    assert trial.user_attrs["epochs_done"] == 2

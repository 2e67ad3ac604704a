"""python -m fastcifar.compare on tiny data: paired seeds, statistics, resume, validation split, errors."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

stats = pytest.importorskip("scipy.stats")

import fastcifar.train  # noqa: E402
from fastcifar.compare import analyse, format_report, main, markdown_rows, parse_arm, reproduce_command, \
    save_strip_plot  # noqa: E402
from fastcifar.errors import run_cli  # noqa: E402
from fastcifar.stats import MIN_RELATIVE_SPREAD, holm  # noqa: E402
from synthetic import write_learnable_dataset  # noqa: E402

REAL_TRAIN = fastcifar.train.train
COMMON = ["--width", "4", "--batch-size", "32", "--device", "cpu", "--epochs", "0.5", "--no-plots"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("data"), 20, 5)


def compare(out: Path, data: Path, *arms: str, seeds: int = 2, common=(), flags=()) -> dict:
    code = run_cli(main, [*arms, "--seeds", str(seeds), "--out-dir", str(out), *flags, "--",
                          "--data-dir", str(data), *COMMON, *common])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def counting(monkeypatch, calls: list, fail=lambda config: False):
    """fastcifar.train.train, counting its (seed, lr) calls; a run for which `fail(config)` holds trains at
    lr 1e30 and diverges for real."""
    def train(config, **kw):
        calls.append((config.seed, config.lr))
        return REAL_TRAIN(dataclasses.replace(config, lr=1e30) if fail(config) else config, **kw)

    monkeypatch.setattr(fastcifar.train, "train", train)


@pytest.mark.slow
def test_two_arms_paired_statistics_outputs_and_resume(tmp_path, data, monkeypatch):
    out = tmp_path / "cmp"
    arms = ("default", "slow=--lr 0.01 --label-smoothing 0")
    r = compare(out, data, *arms, seeds=3, flags=["--first-seed", "1"], common=["--no-amp"])  # fp32 on any CPU
    assert r["eval_split"] == "test" and set(r["arms"]) == {"default", "slow"}
    assert all(set(a["runs"]) == {"1", "2", "3"} for a in r["arms"].values())
    assert r["arms"]["slow"]["config"]["lr"] == 0.01 and r["arms"]["default"]["config"]["lr"] == 0.4
    c = r["analysis"]["comparisons"][0]
    a, b = ([r["arms"][n]["runs"][s]["acc"] for s in ("1", "2", "3")] for n in ("default", "slow"))
    diff = np.subtract(b, a)
    assert c["acc"]["n"] == 3 and c["acc"]["mean_diff"] == pytest.approx(diff.mean())
    if diff.std() > MIN_RELATIVE_SPREAD * np.abs(np.r_[a, b]).max():  # scipy directly, not fastcifar.stats
        test = stats.ttest_rel(b, a)
        assert c["acc"]["p_value"] == pytest.approx(test.pvalue)
        assert (c["acc"]["ci_low"], c["acc"]["ci_high"]) == pytest.approx(tuple(test.confidence_interval(0.95)))
        expected = ("kept" if c["acc"]["ci_low"] > 0 else "rejected" if c["acc"]["ci_high"] < 0 else
                    ("kept", "undecided", "not adopted"))
        assert c["verdict"].startswith(expected)
    else:
        assert c["acc"]["p_value"] is None and c["verdict"].startswith("undecided: no spread")
    assert r["markdown"][0].startswith("| slow vs default |") and r["markdown"][0].count("|") == 6
    assert (out / "strip.png").stat().st_size > 0 and (out / "row.md").read_text().startswith("| slow")

    # a second invocation trains nothing; more seeds train only the new ones
    calls = []
    counting(monkeypatch, calls)
    again = compare(out, data, *arms, seeds=3, flags=["--first-seed", "1"], common=["--no-amp"])
    assert calls == [] and again["arms"] == r["arms"]
    more = compare(out, data, *arms, seeds=4, flags=["--first-seed", "1"], common=["--no-amp"])
    assert sorted(calls) == [(4, 0.01), (4, 0.4)] and more["analysis"]["paired_seeds"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_row_carries_the_command_that_reproduces_it(tmp_path, data, monkeypatch):
    """Its seeds, confidence and margin: the command, run in the same directory, trains nothing and gives the
    same analysis. Sabotage: a command with --seeds N only (seeds 0..N-1) trains other seeds."""
    out = tmp_path / "cmp"
    r = compare(out, data, "default", "b=--lr 0.2", seeds=3,
                flags=["--first-seed", "5", "--confidence", "0.9", "--margin", "0.5"])
    command = r["command"]
    assert f"`{command}`" in r["markdown"][0] and command in (out / "row.md").read_text()
    assert "--first-seed 5 --seeds 3 --confidence 0.9 --margin 0.5" in command
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "fastcifar.compare"]
    calls = []
    counting(monkeypatch, calls)
    cut = argv.index("--")
    assert run_cli(main, [*argv[3:cut], "--out-dir", str(out), *argv[cut:]]) == 0
    again = json.loads((out / "results.json").read_text())
    assert calls == [] and again["analysis"] == r["analysis"] and again["command"] == command


@pytest.mark.slow
def test_validation_split_never_reads_the_test_set(tmp_path, data):
    shuffled = write_learnable_dataset(tmp_path / "shuffled", 20, 5, other_test_set=True)
    arms = ("default", "b=--lr 0.2")
    a = compare(tmp_path / "a", data, *arms, seeds=1, common=["--val-split", "50"])
    b = compare(tmp_path / "b", shuffled, *arms, seeds=1, common=["--val-split", "50"])
    assert a["eval_split"] == "val"
    runs = lambda r: {n: arm["runs"] for n, arm in r["arms"].items()}  # noqa: E731
    strip = lambda r: {n: {s: (v["acc"], v["acc_plain"]) for s, v in arm.items()}  # noqa: E731
                       for n, arm in runs(r).items()}
    assert strip(a) == strip(b)


def test_arm_specs(tmp_path):
    (tmp_path / "best.toml").write_text("lr = 0.3\n")
    assert parse_arm("speedrun", 0).argv == ["--preset", "speedrun"]
    assert parse_arm(str(tmp_path / "best.toml"), 0).name == "best"
    assert parse_arm("w=--whiten", 0).argv == ["--whiten"] and parse_arm("w=--whiten", 0).name == "w"
    assert parse_arm("--lr=0.6", 0).argv == ["--lr=0.6"]  # a flag's own '=' does not make a name
    arm = parse_arm("--lr 0.6 --label-smoothing 0.1", 0)
    assert arm.argv == ["--lr", "0.6", "--label-smoothing", "0.1"] and arm.name == "lr-0.6---label-smoothing-0.1"


@pytest.mark.parametrize("arms, message", [
    (["default", "missing.toml"], "config file not found (missing.toml)"),
    (["default", "fastest"], "is not a preset"),
    (["default", "default"], "share the name 'default'"),
    (["default"], "at least two arms"),
    (["default", "x=--lr -1"], "invalid --lr"),
    (["default", "v=--val-split 50"], "different --val-split"),
])
def test_bad_arms_exit_2_with_one_line(tmp_path, data, capsys, arms, message):
    code = run_cli(main, [*arms, "--out-dir", str(tmp_path / "out"), "--", "--data-dir", str(data), *COMMON])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, shown", [
    ("--margin", "0", "0.0"), ("--margin", "-0.1", "-0.1"), ("--margin", "nan", "nan"), ("--margin", "100", "100.0"),
    ("--seeds", "0", "0"), ("--confidence", "1", "1.0"), ("--confidence", "0", "0.0"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, data, capsys, flag, value, shown):
    code = run_cli(main, ["default", "b=--lr 0.2", flag, value, "--out-dir", str(tmp_path / "out"), "--",
                          "--data-dir", str(data), *COMMON])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"invalid {flag} ({shown})" in err, err
    assert not (tmp_path / "out").exists()


def test_unreadable_earlier_results_exit_2_before_anything_trains(tmp_path, data, capsys, monkeypatch):
    calls = []
    counting(monkeypatch, calls)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{not json")
    code = run_cli(main, ["default", "b=--lr 0.2", "--out-dir", str(tmp_path / "out"), "--", "--data-dir", str(data),
                          *COMMON])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot read earlier results" in err and "--out-dir" in err
    assert calls == []


@pytest.mark.slow
def test_changed_arm_configuration_is_refused_in_the_same_out_dir(tmp_path, data, capsys):
    compare(tmp_path / "cmp", data, "default", "b=--lr 0.2", seeds=1)
    code = run_cli(main, ["default", "b=--lr 0.3", "--seeds", "1", "--out-dir", str(tmp_path / "cmp"), "--",
                          "--data-dir", str(data), *COMMON])
    assert code == 2 and "arm 'b'" in capsys.readouterr().err


def test_an_arm_is_its_recipe_not_its_environment():
    """A rerun with another --eval-every, --device or --compile is the same arm (its finished seeds count);
    another --lr or --val-split is not. Sabotage: an environment field left in config.recipe_values."""
    from fastcifar.config import TrainConfig, recipe_values

    base = recipe_values(TrainConfig())
    assert recipe_values(TrainConfig(eval_every=3, device="cpu", compile=True, plots=False, seed=7)) == base
    assert recipe_values(TrainConfig(lr=0.5)) != base and recipe_values(TrainConfig(val_split=100)) != base


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_comparison_goes_on(tmp_path, data, monkeypatch, capsys):
    """Arm b diverges on seed 1 (lr 1e30): recorded with its error, seeds 0 and 2 still trained and paired;
    a rerun keeps the failure without training (or crashing); --retry-failed trains it again."""
    out, arms = tmp_path / "cmp", ("default", "b=--lr 0.2")
    calls = []
    counting(monkeypatch, calls, fail=lambda config: (config.seed, config.lr) == (1, 0.2))
    r = compare(out, data, *arms, seeds=3)
    assert sorted(calls) == [(s, lr) for s in (0, 1, 2) for lr in (0.2, 0.4)]
    failed = r["arms"]["b"]["runs"]["1"]
    assert failed["error"].startswith("UserError: loss became non-finite") and "acc" not in failed
    assert r["analysis"]["paired_seeds"] == [0, 2] and r["analysis"]["failed"] == 1
    assert r["analysis"]["failed_runs"] == [{"arm": "b", "seed": 1, "error": failed["error"]}]
    assert "1 failed run(s) left out" in r["markdown"][0] and "FAILED (UserError" in capsys.readouterr().out
    assert (out / "runs" / "b" / "seed-1" / "train.log").read_text().count("Traceback") == 1

    calls.clear()
    assert compare(out, data, *arms, seeds=3)["arms"] == r["arms"] and calls == []
    counting(monkeypatch, calls)
    again = compare(out, data, *arms, seeds=3, flags=["--retry-failed"])
    assert calls == [(1, 0.2)] and again["analysis"]["paired_seeds"] == [0, 1, 2] and again["analysis"]["failed"] == 0


def synthetic_runs(**arms: list) -> dict[str, dict[str, dict]]:
    """{arm: {seed: run}} from per-seed (accuracy, seconds) pairs; None is a failed run."""
    return {name: {str(s): {"error": "UserError: diverged"} if v is None else {"acc": v[0], "train_seconds": v[1]}
                   for s, v in enumerate(values)} for name, values in arms.items()}


def analysis_of(runs: dict[str, dict[str, dict]], margin: float = 0.1) -> dict:
    arms = [parse_arm(f"{name}=--lr 0.{i + 1}", i) for i, name in enumerate(runs)]
    return analyse(arms, runs, list(range(max(len(r) for r in runs.values()))), 0.95, margin)


BASE = [(0.80, 10.0), (0.82, 10.2), (0.81, 9.9), (0.83, 10.1)]  # (accuracy, seconds) per seed
FASTER, SLOWER = [-2.0, -2.1, -1.9, -2.05], [0.5, 0.45, 0.55, 0.5]  # seconds, with some spread


def shifted(acc: list[float], secs: list[float] = (0.1, -0.1, 0.05, 0.0), base=BASE) -> list:
    """`base`'s first len(acc) runs with these accuracy and time differences."""
    return [(a + da, s + ds) for (a, s), da, ds in zip(base, acc, secs)]


@pytest.mark.parametrize("b, base, verdict_starts, mentions", [
    # 1.2 points worse, 20% faster, n = 3: the interval [-3.7, +1.3] includes zero but is no equivalence
    (shifted([-0.022, -0.012, -0.002], FASTER), BASE, "undecided", "+-0.1 points"),
    (shifted([0.0001, -0.0001, 0.0, 0.0001], FASTER), BASE, "kept: faster at equal accuracy", "+-0.1 points"),
    (shifted([0.0001, -0.0001, 0.0, 0.0001], SLOWER), BASE, "not adopted", "+-0.1 points"),
    (shifted([0.010, 0.012, 0.011]), BASE, "kept: better", "above zero"),
    (shifted([-0.010, -0.012, -0.011], FASTER), BASE, "rejected", "below zero"),
    (shifted([0.01, 0.01], FASTER), BASE, "undecided", "fewer than 3 paired seeds"),  # scipy would say p = 0
    (shifted([0.01, 0.01, 0.01], FASTER), BASE, "undecided", "no spread"),
    # identical differences up to rounding: scipy's p is 4e-47
    (shifted([0.013] * 4, FASTER, base=[(0.1, 10), (0.2, 10), (0.3, 10), (0.4, 10)]),
     [(0.1, 10), (0.2, 10), (0.3, 10), (0.4, 10)], "undecided", "no spread"),
    (shifted([0.010, 0.012, 0.011]) + [None], BASE, "undecided", "failed on seed(s) 3"),
])
def test_verdict_needs_three_pairs_spread_and_equivalence_for_time(b, base, verdict_starts, mentions):
    c = analysis_of(synthetic_runs(a=base[:len(b)], b=b))["comparisons"][0]
    assert c["verdict"].startswith(verdict_starts) and mentions in c["verdict"], c["verdict"]
    if mentions in ("no spread", "fewer than 3 paired seeds"):
        assert c["acc"]["p_value"] is None and c["acc"]["ci_low"] is None


def test_several_arms_are_corrected_for_multiple_comparisons():
    """t = 5 at n = 3: the 95% interval excludes zero (kept alone), the Bonferroni 97.5% one with a second
    arm does not; p-values are Holm-adjusted and the correction is stated."""
    sd = 0.01 * 3 ** 0.5 / 5
    better = shifted([0.01 - sd, 0.01, 0.01 + sd])
    other = shifted([0.002, -0.004, 0.001])
    alone = analysis_of(synthetic_runs(a=BASE[:3], b=better))
    assert alone["comparisons"][0]["verdict"].startswith("kept: better") and alone["correction"].startswith("none")
    both = analysis_of(synthetic_runs(a=BASE[:3], b=better, c=other))
    cb, cc = both["comparisons"]
    assert cb["acc"]["confidence"] == pytest.approx(0.975) and cb["verdict"].startswith("undecided")
    assert [cb["acc"]["p_holm"], cc["acc"]["p_holm"]] == pytest.approx(holm([cb["acc"]["p_value"],
                                                                             cc["acc"]["p_value"]]))
    assert cb["acc"]["p_holm"] > cb["acc"]["p_value"]
    assert "97.5%" in both["correction"] and "Bonferroni" in both["correction"] and "Holm" in both["correction"]


def test_the_row_and_the_report_give_the_holm_adjusted_p_value():
    """Sabotage: the row and the report showing the raw p-value of a comparison when several arms are compared
    (it understates the evidence needed); they share the wording of the interval."""
    sd = 0.01 * 3 ** 0.5 / 5
    runs = synthetic_runs(a=BASE[:3], b=shifted([0.01 - sd, 0.01, 0.01 + sd]), c=shifted([0.002, -0.004, 0.001]))
    arms = [parse_arm(f"{name}=--lr 0.{i + 1}", i) for i, name in enumerate(runs)]
    result = {"eval_split": "test", "command": "python -m fastcifar.compare ...",
              "analysis": analyse(arms, runs, [0, 1, 2], 0.95, 0.1)}
    result["markdown"] = markdown_rows(result, arms, [], "test")
    report = format_report(result).splitlines()
    adjusted = [c["acc"]["p_holm"] != c["acc"]["p_value"] for c in result["analysis"]["comparisons"]]
    assert any(adjusted)
    for c, row, holm_shown in zip(result["analysis"]["comparisons"], result["markdown"], adjusted):
        p = f"p = {c['acc']['p_holm']:.2g}{' (Holm)' if holm_shown else ''};"
        assert p in row, row
        assert any(line.startswith(f"  {c['arm']} - a: ") and p in line for line in report), report


def test_strip_plot_means_use_paired_seeds_only(tmp_path, monkeypatch):
    """Seed 2 of arm a has no partner (b failed there): the bars average seeds 0 and 1 in both arms."""
    import matplotlib.axes

    runs = synthetic_runs(a=[(0.80, 10.0), (0.82, 12.0), (0.50, 30.0)], b=[(0.81, 9.0), (0.83, 11.0), None])
    arms = [parse_arm("a=--lr 0.1", 0), parse_arm("b=--lr 0.2", 1)]
    drawn = []
    real = matplotlib.axes.Axes.hlines
    monkeypatch.setattr(matplotlib.axes.Axes, "hlines",
                        lambda self, y, *a, **k: drawn.append(y) or real(self, y, *a, **k))
    save_strip_plot(tmp_path / "strip.png", arms, runs, [0, 1, 2], analyse(arms, runs, [0, 1, 2], 0.95, 0.1))
    assert drawn == pytest.approx([81.0, 82.0, 11.0, 10.0])
    assert (tmp_path / "strip.png").stat().st_size > 0


def test_the_command_keeps_a_failed_seed_inside_its_range():
    arms = [parse_arm("default", 0), parse_arm("b=--lr 0.2", 1)]
    command = reproduce_command(arms, ["--width", "4"], [5, 7], 0.9, 0.5)  # seed 6 failed
    argv = shlex.split(command)
    first, count = int(argv[argv.index("--first-seed") + 1]), int(argv[argv.index("--seeds") + 1])
    assert list(range(first, first + count)) == [5, 6, 7]
    assert argv[argv.index("--") + 1:] == ["--width", "4"]
    assert reproduce_command(arms, [], [], 0.9, 0.5) is None

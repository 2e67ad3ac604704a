"""python -m fastcifar.compare on tiny data: paired seeds, statistics, resume, validation split, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")

import fastcifar.train  # noqa: E402
from fastcifar.compare import main, parse_arm  # noqa: E402
from fastcifar.errors import run_cli  # noqa: E402
from synthetic import write_learnable_dataset  # noqa: E402

COMMON = ["--width", "4", "--batch-size", "32", "--device", "cpu", "--epochs", "0.5", "--no-plots"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("data"), 20, 5)


def compare(out: Path, data: Path, *arms: str, seeds: int = 2, common=()) -> dict:
    code = run_cli(main, [*arms, "--seeds", str(seeds), "--out-dir", str(out), "--",
                          "--data-dir", str(data), *COMMON, *common])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_two_arms_paired_statistics_outputs_and_resume(tmp_path, data, monkeypatch):
    out = tmp_path / "cmp"
    arms = ("default", "slow=--lr 0.01 --label-smoothing 0")
    r = compare(out, data, *arms)
    assert r["eval_split"] == "test" and set(r["arms"]) == {"default", "slow"}
    assert all(set(a["runs"]) == {"0", "1"} for a in r["arms"].values())
    assert r["arms"]["slow"]["config"]["lr"] == 0.01 and r["arms"]["default"]["config"]["lr"] == 0.4
    c = r["analysis"]["comparisons"][0]
    acc = [[r["arms"][n]["runs"][s]["acc"] for s in ("0", "1")] for n in ("default", "slow")]
    assert c["acc"]["mean_diff"] == pytest.approx(np.mean(np.subtract(acc[1], acc[0])))
    assert c["acc"]["p_value"] is not None and c["verdict"]
    assert r["markdown"][0].startswith("| slow vs default |") and r["markdown"][0].count("|") == 6
    assert (out / "strip.png").stat().st_size > 0 and (out / "row.md").read_text().startswith("| slow")

    # a second invocation trains nothing; more seeds train only the new ones
    calls = []

    def counting_train(config, **kw):
        calls.append((config.seed, config.lr))
        return real_train(config, **kw)

    real_train = fastcifar.train.train
    monkeypatch.setattr(fastcifar.train, "train", counting_train)
    again = compare(out, data, *arms)
    assert calls == [] and again["arms"] == r["arms"]
    more = compare(out, data, *arms, seeds=3)
    assert sorted(calls) == [(2, 0.01), (2, 0.4)] and len(more["analysis"]["paired_seeds"]) == 3


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
    arm = parse_arm("--lr 0.6 --label-smoothing 0.1", 0)
    assert arm.argv == ["--lr", "0.6", "--label-smoothing", "0.1"] and arm.name == "lr-0.6---label-smoothing-0.1"


@pytest.mark.parametrize("arms, message", [
    (["default", "missing.toml"], "config file not found (missing.toml)"),
    (["default", "fastest"], "is not a preset"),
    (["default", "default"], "share the name 'default'"),
    (["default"], "at least two arms"),
    (["default", "x=--lr -1"], "invalid --lr"),
])
def test_bad_arms_exit_2_with_one_line(tmp_path, data, capsys, arms, message):
    code = run_cli(main, [*arms, "--out-dir", str(tmp_path / "out"), "--", "--data-dir", str(data), *COMMON])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_changed_arm_configuration_is_refused_in_the_same_out_dir(tmp_path, data, capsys):
    compare(tmp_path / "cmp", data, "default", "b=--lr 0.2", seeds=1)
    code = run_cli(main, ["default", "b=--lr 0.3", "--seeds", "1", "--out-dir", str(tmp_path / "cmp"), "--",
                          "--data-dir", str(data), *COMMON])
    assert code == 2 and "arm 'b'" in capsys.readouterr().err


def test_an_arm_is_its_recipe_not_its_environment():
    """A rerun with another --eval-every, --device or --compile is the same arm (its finished seeds count);
    another --lr or --val-split is not. Sabotage: an environment field left in compare.recipe."""
    from fastcifar.compare import recipe
    from fastcifar.config import TrainConfig

    base = recipe(TrainConfig())
    assert recipe(TrainConfig(eval_every=3, device="cpu", compile=True, plots=False, seed=7)) == base
    assert recipe(TrainConfig(lr=0.5)) != base and recipe(TrainConfig(val_split=100)) != base

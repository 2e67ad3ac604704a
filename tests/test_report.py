"""fastcifar.report: summary.json written after each seed with its TTA fields (as the evaluate command reports
them), the images-per-second figure, and the console's percentages.

    pytest -q tests/test_report.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fastcifar.config import TrainConfig
from fastcifar.evaluate import main as evaluate_main
from fastcifar.report import epoch_row, format_summary
from fastcifar.train import train
from synthetic import write_learnable_dataset


FAST = dict(width=8, batch_size=32, device="cpu", lr=0.2, plots=False)


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return write_learnable_dataset(tmp_path_factory.mktemp("learnable"), train_per_class=24, test_per_class=4)


class Pruned(Exception):
    """What a tuner raises from on_epoch to stop a trial."""


@pytest.mark.slow
def test_summary_json_is_written_after_each_seed_and_on_epoch_can_stop_a_run(learnable, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(data_dir=str(learnable), out_dir=str(out), epochs=2, runs=3, eval_every=2, **FAST)
    rows = []

    def on_epoch(row):
        rows.append(row)
        if row["seed"] == 1:  # the second seed's first epoch: seed 0 is finished, seed 1 is not
            assert json.loads((out / "summary.json").read_text())["runs"]["seeds"] == [0]
            raise Pruned

    with pytest.raises(Pruned):
        train(config, on_epoch=on_epoch)
    summary = json.loads((out / "summary.json").read_text())  # the killed run keeps seed 0's results
    assert summary["runs"]["seeds"] == [0] and summary["complete"] is False and summary["runs"]["planned"] == 3
    assert [(r["seed"], r["epoch"]) for r in rows] == [(0, 1), (0, 2), (1, 1)]
    assert math.isnan(rows[0]["test_acc"]) and rows[1]["test_acc"] == summary["test_acc"]  # evaluated every 2nd epoch
    assert {"seed", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds"} <= set(rows[0])
    assert (out / "metrics.csv").read_text().count("\n") == 1 + 3  # the files written so far are intact
    assert (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_summary_records_tta_as_fields_and_matches_evaluate_json(learnable, tmp_path, capsys, train_seed):
    """The evaluate command repeats the run's evaluation: in fp32 at the run's batch size, the same arithmetic
    on every CPU. (bf16 at another batch size rounds otherwise, and this small model has near-ties.) Each
    evaluation's loss lies well below chance's ln 10 (three epochs take every seed below 1.3): a run that learned
    nothing fails (sabotage: train_epoch without its optimizer step)."""
    out = tmp_path / "run"
    summary = train(TrainConfig(data_dir=str(learnable), out_dir=str(out), epochs=3, tta_translate=1, amp=False,
                                seed=train_seed, **FAST))
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["accuracy_unit"] == "fraction" and summary["complete"] is True
    assert summary["tta"] == {"flip": True, "translate": 1,
                              "views": ["identity", "flip", "shift+1", "flip+shift+1", "shift-1", "flip+shift-1"]}
    plain, tta = summary["evaluations"]
    assert (plain["flip"], plain["translate"], plain["views"]) == (False, 0, ["identity"])
    assert plain["test_acc"] == summary["test_acc"] and tta["test_acc"] == summary["test_acc_tta"]
    assert (tta["flip"], tta["translate"], tta["views"]) == (True, 1, summary["tta"]["views"])
    assert plain["test_loss"] < math.log(10) - 0.5 and tta["test_loss"] < math.log(10) - 0.5, summary["evaluations"]
    assert summary["runs"]["per_seed"][0]["evaluations"] == summary["evaluations"]
    for key in ("device", "torch", "python", "cpu", "date", "fastcifar"):  # runtime.environment()
        assert summary[key], key

    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(out), "--data-dir", str(learnable), "--device", "cpu", "--no-amp",
                          "--batch-size", str(FAST["batch_size"]), "--tta-translate", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout is the JSON object alone
    assert report["accuracy_unit"] == "fraction" and report["test_images"] == 40
    assert [(e["flip"], e["translate"]) for e in report["evaluations"]] == [(False, 0), (True, 0), (True, 1)]
    for e in report["evaluations"]:
        assert set(e) == set(plain) and e["test_loss"] < math.log(10) - 0.5, e
    assert report["evaluations"][0]["test_acc"] == pytest.approx(summary["test_acc"])
    assert report["evaluations"][2]["test_acc"] == pytest.approx(summary["test_acc_tta"])
    assert report["environment"]["torch"]


def test_console_shows_accuracies_in_percent():
    row = {"seed": 0, "epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
           "test_acc": 0.9375, "epoch_seconds": 1.0, "total_seconds": 1.0}
    assert "50.00" in epoch_row(row) and "93.75" in epoch_row(row) and "0.9375" not in epoch_row(row)
    assert "train_acc %" in epoch_row({}, header=True)
    summary = {"runs": {"seeds": [0, 1], "mean": 0.9, "std": 0.01, "mean_tta": 0.91, "std_tta": 0.02,
                        "median_train_seconds": 3.0}, "tta": {"flip": True, "translate": 1}, "device": "cpu"}
    assert format_summary(summary) == ("2 run(s): test acc 90.00% +- 1.00, flip + translate 1 TTA 91.00% +- 2.00; "
                                       "median train 3.0s on cpu")


def test_an_epoch_row_keeps_its_width_when_a_value_is_missing():
    """Sabotage: a missing or NaN value printed as an empty string instead of a blank column (every later column
    would shift left)."""
    full = {"seed": 0, "epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
            "test_acc": 0.9375, "epoch_seconds": 1.0, "total_seconds": 1.0}
    gaps = {**full, "test_loss": float("nan"), "test_acc": float("nan"), "total_seconds": None}
    header = epoch_row({}, header=True)
    assert len(epoch_row(full)) == len(epoch_row(gaps)) == len(header)
    lone = epoch_row({"epoch_seconds": 1.0})  # right-aligned under its header, after seven blank columns
    assert lone.strip() == "1.00" and len(lone.rstrip()) == header.index("epoch_seconds") + len("epoch_seconds")


def test_the_summary_medians_are_the_middle_seeds_clocks():
    """Sabotage: a median key left out of `runs`, or the mean in its place (1, 2, 9 have mean 4)."""
    from fastcifar.report import run_summary
    from fastcifar.runtime import SEED_CLOCKS

    results = [{"seed": s, "test_acc": 0.5, "test_acc_tta": None, "images": 1, **{k: t for k in SEED_CLOCKS}}
               for s, t in enumerate([9.0, 1.0, 2.0])]
    runs = run_summary(TrainConfig(runs=3, tta=False), results, params=1, world_size=1, environment={},
                       clocks={})["runs"]
    assert {key: value for key, value in runs.items() if key.startswith("median_")} == {
        "median_train_seconds": 2.0, "median_run_seconds": 2.0, "median_wall_seconds": 2.0}


def test_images_per_second_is_the_last_seeds_images_over_its_training_seconds():
    """Sabotage: images_per_second not divided by train_seconds in report.run_summary."""
    from fastcifar.report import run_summary

    result = {"seed": 0, "test_acc": 0.5, "test_acc_tta": None, "images": 1000, "train_seconds": 4.0,
              "run_seconds": 5.0}
    summary = run_summary(TrainConfig(tta=False), [result], params=1, world_size=1, environment={"device": "cpu"},
                          clocks={})
    assert summary["images_per_second"] == 250.0


def test_the_summary_holds_every_clock_of_the_one_table():
    """Sabotage: run_summary leaving out the SESSION_CLOCKS (or a seed clock) it is given."""
    from fastcifar.report import run_summary
    from fastcifar.runtime import CLOCKS, SEED_CLOCKS, SESSION_CLOCKS

    result = {"seed": 0, "test_acc": 0.5, "test_acc_tta": None, "images": 1, **{k: 1.0 for k in SEED_CLOCKS}}
    session = {key: 2.0 for key in SESSION_CLOCKS}
    summary = run_summary(TrainConfig(tta=False), [result], params=1, world_size=1, environment={}, clocks=session)
    assert {key: summary[key] for key in CLOCKS} == {**{k: 1.0 for k in SEED_CLOCKS}, **session}
    assert all(summary["runs"][key] == [1.0] for key in SEED_CLOCKS)

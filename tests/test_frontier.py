"""bench/frontier.py: accuracy against PFLOP from speedrun reports and compare results."""

from __future__ import annotations

import importlib
import json

import pytest


def load_frontier():
    return importlib.import_module("bench.frontier")  # the repository root is on pytest's path (pyproject)


def test_points_come_from_both_report_kinds_with_their_own_tta_and_work(tmp_path):
    frontier = load_frontier()
    speedrun = {"preset": "speedrun", "fastcifar": {"runs": [
        {"acc": 0.93, "acc_tta": 0.94, "flops": 3.1e14}, {"acc": 0.93, "acc_tta": 0.95, "flops": 3.1e14},
        {"error": "UserError: boom"}]},
        "airbench": {"runs": [{"acc": 0.93, "acc_tta": 0.94, "flops": 3.6e14}]}}
    compare = {"arms": {"small": {"config": {"width": 8, "epochs": 2, "tta": False},
                                  "runs": {"0": {"acc": 0.5}, "1": {"acc": 0.7}}}}}
    (tmp_path / "s.json").write_text(json.dumps(speedrun))
    (tmp_path / "c.json").write_text(json.dumps(compare))
    points = frontier.load_points([str(tmp_path / "s.json"), str(tmp_path / "c.json")])
    by_name = {p["name"]: p for p in points}
    assert by_name["fastcifar[speedrun]"]["acc"]["mean"] == pytest.approx(0.945)  # own TTA, errors left out
    assert by_name["fastcifar[speedrun]"]["acc"]["n"] == 2 and by_name["airbench94"]["airbench"]
    from fastcifar.config import TrainConfig
    from fastcifar.flops import recipe_flops

    assert by_name["small"]["flops"] == recipe_flops(TrainConfig(width=8, epochs=2, tta=False), 50000, 10000)["per_run"]
    assert frontier.main([str(tmp_path / "f.png"), str(tmp_path / "s.json"), str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 1000
    table = frontier.markdown(points).splitlines()
    assert table[2].startswith("| small |") and "| 0.310 | 94.50 +- 0.71% | 2 |" in table[3]

"""bench/speedrun.py rewrites its --json report after every seed, so a run killed outright (SIGKILL, a lost
machine: no handler runs) keeps what finished.

    pytest -q tests/test_speedrun_json.py

Sabotage that fails here: the per-seed save() in speedrun.main dropped (the report written only at the end,
which a SIGTERM still reaches but a SIGKILL does not).
"""

from __future__ import annotations

import json

from test_speedrun import speedrun, trainer_summary, use_synthetic_data


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

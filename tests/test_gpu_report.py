"""bench/gpu_report.py: the parts and the summary bench/gpu.sh writes after every part."""

from __future__ import annotations

import json

from bench import gpu_report


def test_gpu_report_rewrites_parts_and_summary_from_each_parts_json(tmp_path):
    report = {"device": "cpu", "torch": "2.x", "data_source": "tiny", "table": "THE TABLE", "errors": ["seed 1: boom"],
              "fastcifar": {"runs": [{"seed": 0, "error": "UserError: boom"}]}}
    (tmp_path / "speedrun.json").write_text(json.dumps(report))
    parts = [gpu_report.parse_part("speedrun|1|12|failed"), gpu_report.parse_part("cuda-tests|||skipped (5s left)")]
    text = gpu_report.write_summary(tmp_path, "data.tar.gz", ["airbench skipped"], parts)
    written = json.loads((tmp_path / "parts.json").read_text())
    assert written["notes"] == ["airbench skipped"] and written["data"] == "data.tar.gz"
    assert written["parts"] == [{"name": "speedrun", "exit_code": 1, "seconds": 12, "status": "failed"},
                                {"name": "cuda-tests", "exit_code": None, "seconds": None, "status": "skipped (5s left)"}]
    assert (tmp_path / "summary.txt").read_text() == text
    lines = text.splitlines()
    assert "note: airbench skipped" in lines and "speedrun: failed, exit 1, 12 s wall" in lines
    assert "cuda-tests: skipped (5s left)" in lines and "THE TABLE" in lines and "error: seed 1: boom" in lines
    assert not gpu_report.fastcifar_finished(tmp_path / "speedrun.json")  # its only seed failed
    assert not gpu_report.fastcifar_finished(tmp_path / "absent.json")
    report["fastcifar"]["runs"].append({"seed": 1, "acc": 0.9})
    (tmp_path / "speedrun.json").write_text(json.dumps(report))
    assert gpu_report.main(["finished", str(tmp_path / "speedrun.json")]) == 0

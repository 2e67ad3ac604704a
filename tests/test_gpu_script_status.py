"""bench/gpu.sh reports a failed part: the part is marked failed in parts.json and summary.txt, and the script
exits non-zero (the next parts still run).

    pytest -q tests/test_gpu_script_status.py

Sabotage that fails here: `status=1` dropped from run_part (a failed part would leave exit code 0).
"""

from __future__ import annotations

import json

from test_speedrun import needs_bash, run_gpu_script


@needs_bash
def test_a_failing_part_is_recorded_and_makes_the_script_exit_non_zero(tmp_path):
    proc = run_gpu_script(tmp_path, tmp_path / "no-such-data.tar.gz", FASTCIFAR_GPU_ARMS="")
    out = tmp_path / "out"
    parts = json.loads((out / "parts.json").read_text())["parts"]
    failed = [p for p in parts if p["name"] != "cuda-tests"]
    assert failed and all(p["status"] == "failed" and p["exit_code"] not in (0, None) for p in failed), parts
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "speedrun: failed" in (out / "summary.txt").read_text()

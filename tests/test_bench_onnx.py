"""bench/test_onnx_cpu.py's tables, on a made-up benchmark result (the benchmark itself runs in minutes).

    pytest -q tests/test_bench_onnx.py
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bench_module():
    """bench/test_onnx_cpu.py, loaded by path (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("onnx_cpu_bench", REPO / "bench" / "test_onnx_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(backend: str, mode: str, batch: int, mean_s: float) -> dict:
    """One benchmark of a --benchmark-json file, as test_inference records it."""
    return {"stats": {"mean": mean_s},
            "extra_info": {"backend": backend, "mode": mode, "batch": batch, "precision": "f32", "threads": 2,
                           "images_per_s": round(batch / mean_s, 1), "macs_per_image": 1e6, "cpu": "test CPU",
                           "cpu_ghz": 3.0, "peak_macs_per_s": {}}}


# every number apart from the others, so a cell from the wrong run, mode or batch shows
BENCHMARKS = [result("ort-fp32", "latency", 1, 0.002), result("ort-fp32", "throughput", 256, 0.0512),
              result("ort-fp32-tta", "latency", 1, 0.009), result("ort-fp32-tta", "throughput", 256, 0.256),
              result("ort-fp32", "latency", 256, 0.064), result("ort-fp32-tta", "throughput", 1, 0.5)]


def keyed(benchmarks: list[dict]) -> dict:
    """summarize's index of the runs: (backend, mode, batch) -> benchmark."""
    return {(b["extra_info"]["backend"], b["extra_info"]["mode"], b["extra_info"]["batch"]): b for b in benchmarks}


def test_the_tta_table_sets_the_plain_file_beside_the_tta_file():
    """Columns: batch-1 latency ms (plain, TTA), batch-256 throughput images/s (plain, TTA), and how many times
    fewer images/s the TTA file does; a runtime without its four runs (OpenVINO here) has no row. Sabotage: the
    cells taken from another mode or batch, plain and TTA swapped, or the ratio inverted."""
    header, *rows = bench_module().tta_table(keyed(BENCHMARKS)).splitlines()
    assert re.split(r"\s{2,}", header.strip()) == ["file", "plain ms (1)", "TTA ms (1)", "plain img/s (256)",
                                                    "TTA img/s (256)", "TTA cost"]
    assert [row.split() for row in rows] == [["ort-fp32", "2.00", "9.00", "5000", "1000", "5.0x"]]


def test_summarize_ends_with_the_tta_table(tmp_path):
    """The --benchmark-json file read back: the main table's first row is the batch-1 plain run, the TTA table
    follows. Sabotage: summarize leaving the TTA table out."""
    bench = bench_module()
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": BENCHMARKS}))
    table = bench.summarize(str(path))
    assert table.endswith("\n\n" + bench.tta_table(keyed(BENCHMARKS)))
    assert table.splitlines()[1].split()[:6] == ["ort-fp32", "latency", "1", "f32", "2.00", "500"]

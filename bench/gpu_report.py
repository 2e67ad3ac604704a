"""What bench/gpu.sh writes besides each part's own JSON: the software lines of env.txt, parts.json and
summary.txt (rewritten after every part), and whether a speedrun part finished a fastcifar seed.

    python bench/gpu_report.py environment
    python bench/gpu_report.py summary OUT_DIR DATA --note TEXT --part 'speedrun|0|120|ok' ...
    python bench/gpu_report.py finished OUT_DIR/speedrun.json    # exit 0 when a fastcifar seed finished
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/gpu_report.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))


def environment() -> str:
    """Python, torch (with CUDA and the GPU) and airbench as this interpreter sees them; what is missing says so."""
    lines = [f"python {platform.python_version()} {sys.executable}"]
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
        lines.append(f"torch {torch.__version__} cuda {torch.version.cuda} available {torch.cuda.is_available()} {gpu}")
    except Exception as e:  # a broken install is a line of the report, not a crash
        lines.append(f"torch: not importable: {e}")
    try:
        from importlib.metadata import version

        import airbench

        lines.append(f"airbench {version('airbench')} {airbench.__file__}")
    except Exception as e:
        lines.append(f"airbench: not available: {type(e).__name__} {e}")
    return "\n".join(lines)


def parse_part(text: str) -> dict[str, Any]:
    """'name|exit code|seconds|status' (code and seconds empty for a skipped part) as a record."""
    name, code, seconds, status = text.split("|", 3)
    return {"name": name, "exit_code": int(code) if code else None, "seconds": int(seconds) if seconds else None,
            "status": status}


def part_text(out_dir: Path, part: dict[str, Any]) -> list[str]:
    """A part's results from its JSON: a speedrun report's table, or compare's rows with each arm's work."""
    try:
        report = json.loads((out_dir / f"{part['name']}.json").read_text())
    except (OSError, ValueError):
        return []  # the tests part has no JSON; a part killed before its first seed neither
    if "arms" in report:
        from fastcifar.config import TrainConfig
        from fastcifar.flops import recipe_flops

        lines = [f"[{part['name']}] compare, {report['eval_split']} split, seeds {report['seeds']}"]
        for name, arm in report["arms"].items():
            work = recipe_flops(TrainConfig(**arm["config"]), 50000, 10000)["per_run"] / 1e15
            lines.append(f"{name}: {work:.3f} PFLOP per run (50,000 train / 10,000 test images), "
                         f"{len(arm['runs'])} run(s)")
        return lines + (report.get("markdown") or ["(no finished runs)"])
    lines = [f"[{part['name']}] {report.get('device')}, torch {report.get('torch')}, {report.get('data_source')}",
             report.get("table") or "(no finished runs)"]
    if report.get("time_ratio_fastcifar_over_airbench"):
        lines.append(f"run ratio fastcifar/airbench: {report['time_ratio_fastcifar_over_airbench']:.2f}")
    return lines + [f"error: {e}" for e in report.get("errors") or []]


def write_summary(out_dir: Path, data: str, notes: Sequence[str], parts: Sequence[dict[str, Any]]) -> str:
    """parts.json and summary.txt in `out_dir`, each written whole; returns the summary's text."""
    from fastcifar.atomic import write_json, write_text

    write_json(out_dir / "parts.json", {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data": data,
                                        "notes": list(notes), "parts": list(parts)})
    lines = [f"=== summary ({time.strftime('%H:%M:%SZ', time.gmtime())}; data {data}) ==="]
    lines += [f"note: {note}" for note in notes]
    for p in parts:
        lines.append(f"{p['name']}: {p['status']}" + (f", exit {p['exit_code']}" if p["exit_code"] is not None else "")
                     + (f", {p['seconds']} s wall" if p["seconds"] is not None else ""))
    for p in parts:
        text = part_text(out_dir, p)
        lines += [""] + text if text else []
    summary = "\n".join(lines) + "\n"
    write_text(out_dir / "summary.txt", summary)
    return summary


def fastcifar_finished(report_path: Path) -> bool:
    """Whether a bench/speedrun.py report holds a fastcifar seed that finished (no report: none did)."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    return any(not r.get("error") for r in (report.get("fastcifar") or {}).get("runs", []))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_report.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("environment", help="print the software lines of env.txt")
    summary = commands.add_parser("summary", help="rewrite parts.json and summary.txt")
    summary.add_argument("out_dir", type=Path)
    summary.add_argument("data")
    summary.add_argument("--note", action="append", default=[])
    summary.add_argument("--part", action="append", default=[], type=parse_part, help="name|exit code|seconds|status")
    finished = commands.add_parser("finished", help="exit 0 when the speedrun report has a finished fastcifar seed")
    finished.add_argument("report", type=Path)
    args = parser.parse_args(argv)
    if args.command == "environment":
        print(environment())
    elif args.command == "summary":
        write_summary(args.out_dir, args.data, args.note, args.part)
    else:
        return 0 if fastcifar_finished(args.report) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speedrun benchmark: N seeds of a fastcifar preset, optionally against airbench94 on the same images.

    python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --preset speedrun --runs 5
    python bench/speedrun.py --data-dir .gpu/cifar10-gpu.tar.gz --preset speedrun --runs 5 \\
        --airbench --airbench-runs 5 --json /tmp/speedrun.json
    python bench/speedrun.py --data-dir DIR --preset default --runs 2 -- --width 16 --epochs 2 --device cpu
    python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --preset speedrun --runs 5 --airbench \\
        --json cpu.json -- --device cpu        # both methods on the CPU, same threads and precision

Everything after `--` goes to `fastcifar.train` (it overrides the preset; --runs, --seed, --out-dir and
--resume are ours); unless overridden the runs use `--no-plots --checkpoint-every 0`. Each seed is its own
in-process `fastcifar.train.main` call in its own run directory, so an error in one seed (a non-finite loss,
out of memory) is recorded for that seed and the rest continue. With `--airbench` (PyPI `airbench==0.1.8`,
`pip install fastcifar[bench]`) the methods alternate seed by seed, fastcifar first on even seeds, so both
meet the same clocks and temperature; airbench reads our decoded images as `cifar10/{train,test}.pt` from a
scratch directory. `--json OUT` holds every number, the machine and the command line, rewritten after every
seed, so a run cut short keeps what finished.

What each seconds column covers is CLOCK below, the one definition (also written into the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/speedrun.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402 (after the sys.path line)

from fastcifar.config import split_at_double_dash  # noqa: E402
from fastcifar.errors import UserError, first_line, run_cli  # noqa: E402
from fastcifar.evaluate import describe_views  # noqa: E402
from fastcifar.runtime import CLOCKS  # noqa: E402
from fastcifar.stats import describe  # noqa: E402

from bench.airbench_runner import (  # noqa: E402
    Airbench, NonFiniteLoss, airbench_on_cpu, require_airbench, timed_call)

THRESHOLD = 0.94
DEFAULT_TRAIN_FLAGS = ("--no-plots", "--checkpoint-every", "0")
PER_SEED_TRAIN_FLAGS = ("--runs", "--seed", "--out-dir", "--resume")  # speedrun sets these for each seed
FASTCIFAR, AIRBENCH = "fastcifar", "airbench94"
CLOCK = {  # what each seconds column covers; the trainer's own clocks are fastcifar.runtime.CLOCKS
    "run_seconds": f"for both methods, {CLOCKS['run_seconds']}. fastcifar: its summary's run_seconds; airbench94: "
                   "its own printed total_time_seconds (the final `eval` row), never replaced by another clock",
    "train_seconds": f"fastcifar only: its summary's train_seconds, {CLOCKS['train_seconds']}",
    "wall_seconds": "this harness's host clock, device synchronized, around each per-seed call: fastcifar's "
                    "includes its setup, warm-up and compilation (compile_seconds, apart); airbench's its loading "
                    "of train.pt/test.pt and its per-epoch evaluations. airbench's one-step warm-up (warmup94) "
                    "runs once before its first seed, in no column",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/speedrun.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train N seeds of a fastcifar preset (and optionally airbench94 on the same images, "
                    "interleaved seed by seed); report accuracy mean +- std, the fraction >= 94% and median "
                    "seconds on airbench's clock (run s), steps only and wall. Flags after `--` go to "
                    "fastcifar.train.",
        epilog="example: python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --preset speedrun "
               "--runs 5 --airbench --json out.json -- --epochs 10")
    p.add_argument("--data-dir", metavar="PATH", help="CIFAR-10 source (see fastcifar.data); default: the cache")
    p.add_argument("--preset", default="speedrun", help="fastcifar.config preset to benchmark")
    p.add_argument("--runs", type=int, default=5, help="seeds to train (seed .. seed+runs-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (fastcifar and airbench)")
    p.add_argument("--out-dir", metavar="DIR", help="fastcifar run directory (default: runs/speedrun-<preset>-<time>)")
    p.add_argument("--airbench", action="store_true", help="also run airbench94 (airbench==0.1.8) on the trainer's "
                   "device: CUDA, or the CPU (`-- --device cpu`) in the trainer's precision")
    p.add_argument("--airbench-runs", type=int, default=None, help="airbench seeds (default: --runs), interleaved "
                   "with fastcifar's seed by seed")
    p.add_argument("--work-dir", metavar="DIR", help="scratch directory for airbench's cifar10/*.pt "
                   "(default: a temporary directory, removed afterwards)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="accuracy counted as a success")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    from fastcifar.config import PRESETS, parse_config

    ours, train_flags = split_at_double_dash(argv)
    args = get_args_parser().parse_args(ours)
    if args.preset not in PRESETS:
        raise UserError(f"invalid --preset ({args.preset}): not in fastcifar.config.PRESETS; "
                        f"choose one of {', '.join(sorted(PRESETS))}")
    if args.runs < 1 or (args.airbench_runs is not None and args.airbench_runs < 1):
        raise UserError("invalid --runs/--airbench-runs: must be >= 1")
    if args.airbench_runs is None:
        args.airbench_runs = args.runs
    taken = [f for f in train_flags if f.split("=")[0] in PER_SEED_TRAIN_FLAGS]
    if taken:
        raise UserError(f"invalid trainer flag {taken[0]} after `--`: speedrun sets --runs 1, --seed and --out-dir "
                        "for each seed itself; use speedrun's own --runs, --seed and --out-dir")
    args.train_config, _ = parse_config(train_argv(args, args.seed, Path("unused"), train_flags))  # fails now
    return args, train_flags


def train_argv(args: argparse.Namespace, seed: int, out_dir: Path, extra: Sequence[str]) -> list[str]:
    """The fastcifar.train command line of one seed: ours first, so flags after `--` override them."""
    argv = ["--preset", args.preset, "--runs", "1", "--seed", str(seed), "--out-dir", str(out_dir), "--overwrite",
            *DEFAULT_TRAIN_FLAGS]
    return argv + (["--data-dir", args.data_dir] if args.data_dir else []) + list(extra)


def schedule(runs: int, airbench_runs: int) -> list[tuple[str, int]]:
    """(method, index) in running order: seed by seed, fastcifar first on even indices, airbench94 on odd ones,
    so neither method always meets the warmer GPU."""
    order: list[tuple[str, int]] = []
    for i in range(max(runs, airbench_runs)):
        pair = [(m, i) for m, n in ((FASTCIFAR, runs), (AIRBENCH, airbench_runs)) if i < n]
        order += pair[::-1] if i % 2 else pair
    return order


def at_least(values: Sequence[float], threshold: float) -> dict[str, Any] | None:
    if not values:
        return None
    k = int(sum(v >= threshold for v in values))
    return {"count": k, "runs": len(values), "fraction": k / len(values)}


def method_stats(records: Sequence[dict[str, Any]], threshold: float, own_tta: str | None) -> dict[str, Any]:
    """One method's numbers over its finished seeds; a seed with an error (a non-finite loss among them) is
    counted as failed and gives no accuracy. The success fraction uses the method's own TTA when it has one."""
    done = [r for r in records if not r.get("error")]

    def column(key: str) -> list[float]:
        return [float(r[key]) for r in done if r.get(key) is not None]

    acc, own, flops = column("acc"), column("acc_tta"), column("flops")
    return {
        "runs": len(records), "finished": len(done), "failed": len(records) - len(done),
        "acc": describe(acc), "acc_flip_tta": describe(column("acc_flip_tta")), "acc_tta": describe(own),
        "tta": own_tta if own else None,
        "at_least_threshold": {"threshold": threshold, "acc": at_least(acc, threshold),
                               "acc_tta": at_least(own, threshold), "primary": "acc_tta" if own else "acc"},
        "flops_per_run": flops[0] if flops else None,
        **{key: describe(column(key)) for key in CLOCK},
    }


def _pm(d: dict) -> str:
    """'mean +- std' in percent, 15 characters wide."""
    text = f"{100 * d['mean']:.2f} +- {100 * d['std']:.2f}" if d["n"] else "-"
    return f"{text:>15}"


def _median(d: dict) -> float | None:
    return d["median"] if d["n"] else None


def format_table(rows: list[tuple[str, dict[str, Any]]], reference: str | None = None) -> str:
    """One fixed-width table: seeds finished and failed, accuracies in %, success fractions, median run / steps /
    wall seconds, and the median run seconds relative to `reference`'s."""
    ref_s = _median(dict(rows)[reference]["run_seconds"]) if reference in dict(rows) else None
    thr_pct = f">={100 * rows[0][1]['at_least_threshold']['threshold']:g}%" if rows else ">=thr"
    head = (f"{'method':<24} {'runs':>5}  {'failed':>6}  {'acc %':>15}  {'flip TTA %':>15}  {'own TTA %':>15}  "
            f"{thr_pct:>7}  {thr_pct + ' TTA':>11}  {'PFLOP':>6}  {'run s':>8}  {'steps s':>8}  {'wall s':>8}  "
            f"{'run ratio':>9}")
    lines = [head, "-" * len(head)]
    for name, s in rows:
        thr = s["at_least_threshold"]
        plain, tta = (f"{f['count']}/{f['runs']}" if f else "-" for f in (thr["acc"], thr["acc_tta"]))
        run_s, steps_s, wall_s = (_median(s[k]) for k in CLOCK)
        ratio = f"{run_s / ref_s:8.2f}x" if (run_s and ref_s) else f"{'-':>9}"
        secs = "  ".join(f"{v:8.2f}" if v is not None else f"{'-':>8}" for v in (run_s, steps_s, wall_s))
        pflop = f"{s['flops_per_run'] / 1e15:6.3f}" if s.get("flops_per_run") else f"{'-':>6}"
        lines.append(f"{name:<24} {s['finished']:>2}/{s['runs']:<2}  {s['failed']:>6}  {_pm(s['acc'])}  "
                     f"{_pm(s['acc_flip_tta'])}  {_pm(s['acc_tta'])}  {plain:>7}  {tta:>11}  {pflop}  {secs}  {ratio}")
    return "\n".join(lines)


def fastcifar_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The one seed of a one-seed summary.json in this harness's terms."""
    (run,) = summary["runs"]["per_seed"]
    tta = summary.get("tta")  # the trainer's TTA as fields: {"flip": True, "translate": N, "views": [...]}
    own = run.get("test_acc_tta")
    name = describe_views(tta).removesuffix(" TTA") if tta and own is not None else None
    return {"seed": run.get("seed"), "acc": run["test_acc"], "acc_tta": own,
            "acc_flip_tta": own if name == "flip" else None, "tta": name,
            "run_seconds": run["run_seconds"], "train_seconds": run["train_seconds"],
            "trainer_wall_seconds": run.get("wall_seconds"), "compile_seconds": summary.get("compile_seconds"),
            "data_seconds": summary.get("data_seconds"), "flops": (summary.get("flops") or {}).get("per_run")}


def run_fastcifar_seed(argv: list[str], out_dir: Path) -> dict[str, Any]:
    """One seed through fastcifar.train.main in this process; its record from the summary.json it wrote."""
    import torch._dynamo

    from fastcifar import train

    # every seed compiles its own model under the same conditions: none inherits the graphs of the seeds
    # before it, and none meets dynamo's recompile limit (past it, dynamo falls back to eager silently)
    torch._dynamo.reset()
    _, wall = timed_call(lambda: train.main(argv))
    record = fastcifar_record(json.loads((out_dir / "summary.json").read_text()))
    return {**record, "wall_seconds": wall, "out_dir": str(out_dir)}


def build_report(argv: Sequence[str], args: argparse.Namespace, data_info: dict,
                 results: dict[str, dict], errors: list[str]) -> dict[str, Any]:
    """Everything as data: the machine, per-seed records of each method, their statistics and the table."""
    from fastcifar import runtime

    fast, ab = results.get(FASTCIFAR), results.get(AIRBENCH)
    rows = []
    for label, out in ((f"fastcifar[{args.preset}]", fast), (AIRBENCH, ab)):
        if out and out["runs"]:
            tta = next((r["tta"] for r in out["runs"] if r.get("tta") and not r.get("error")), None)
            rows.append((label, method_stats(out["runs"], args.threshold, tta)))
    medians = [_median(stats["run_seconds"]) for _, stats in rows]
    return {**runtime.environment(), "host": platform.node(), "python_executable": sys.executable,
            "command": shlex.join(["python", "bench/speedrun.py", *argv]), **data_info,
            "preset": args.preset, "threshold": args.threshold, "clock": CLOCK,
            "order": "interleaved seed by seed, fastcifar first on even seeds" if ab else "fastcifar seeds in order",
            "fastcifar": fast, "airbench": ab, "methods": dict(rows),
            "time_ratio_fastcifar_over_airbench": medians[0] / medians[1] if len(rows) == 2 and all(medians) else None,
            "table": format_table(rows, reference=AIRBENCH if ab else None) if rows else "", "errors": errors}


def footer(report: dict[str, Any]) -> str:
    lines = [f"device {report['device']}, torch {report['torch']}, data {report['data_source']} (first load "
             f"{report['data_first_load_seconds']:.1f} s); order: {report['order']}",
             "run s = airbench94's clock for both; steps s = fastcifar's steps only; wall s = host clock per seed "
             "(each column: `clock` in the JSON, CLOCK in bench/speedrun.py)"]
    compiles = [r["compile_seconds"] for r in report["fastcifar"]["runs"] if r.get("compile_seconds") is not None]
    if compiles:
        lines.append(f"fastcifar: warm-up/compile {compiles[0]:.1f} s on its first seed, median "
                     f"{float(np.median(compiles)):.1f} s per seed (in wall s, not in run s or steps s)")
    if report["airbench"] and report["airbench"].get("warmup_seconds") is not None:
        lines.append(f"airbench94: warmup94 {report['airbench']['warmup_seconds']:.1f} s once, before its first "
                     "seed (in no column)")
    if report["time_ratio_fastcifar_over_airbench"]:
        lines.append(f"run ratio = median run s / airbench94's: fastcifar/airbench = "
                     f"{report['time_ratio_fastcifar_over_airbench']:.2f}")
    return "\n".join(lines + [f"error: {e}" for e in report["errors"]])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    import torch

    from fastcifar.data import load_cifar10
    from fastcifar.runtime import amp_dtype, select_device

    config = args.train_config
    device = select_device(config.device)  # the trainer's; airbench runs on the same device
    airbench = require_airbench(device.type) if args.airbench else None  # fail before any training
    out_dir = Path(args.out_dir or f"runs/speedrun-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    data = load_cifar10(args.data_dir)  # decodes (and caches) once; each seed's trainer then reads the cache
    data_info = {"data_source": data.source, "data_dir": args.data_dir,
                 "data_first_load_seconds": time.perf_counter() - t0,
                 "train_images": len(data.train_labels), "test_images": len(data.test_labels)}
    results: dict[str, dict[str, Any]] = {FASTCIFAR: {"runs": [], "out_dir": str(out_dir)}}
    scratch = runner = None
    if airbench is not None:
        scratch = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="airbench-"))
        results[AIRBENCH] = {"runs": []}
        context = contextlib.nullcontext
        if device.type == "cpu":  # in fastcifar's precision on this CPU, as the comparison needs
            dtype = amp_dtype(device, config.amp, config.amp_dtype)
            results[AIRBENCH]["cpu_precision"] = str(dtype or torch.float32)
            context = lambda: airbench_on_cpu(airbench, dtype)  # noqa: E731
        runner = Airbench(airbench, data, scratch, results[AIRBENCH], context)
    errors: list[str] = []
    seed_errors = (UserError, NonFiniteLoss, torch.cuda.OutOfMemoryError)  # this seed only
    try:  # a stop (SIGTERM, Ctrl-C) ends here too: the JSON already holds every finished seed
        for method, index in schedule(args.runs, args.airbench_runs if airbench is not None else 0):
            seed = args.seed + index
            if results[method].get("error"):
                continue  # this method stopped on an error that every seed would repeat
            try:
                if method == FASTCIFAR:
                    record = run_fastcifar_seed(train_argv(args, seed, out_dir / f"seed-{seed}", extra),
                                                out_dir / f"seed-{seed}")
                else:
                    torch.cuda.empty_cache()
                    record = runner.run_seed(index, seed)
            except seed_errors as e:
                record = {"seed": seed, "error": f"{type(e).__name__}: {first_line(e)}"}
                errors.append(f"{method} seed {seed}: {record['error']}")
            except Exception as e:  # a bug or a changed airbench: the next seeds would fail the same way
                traceback.print_exc()
                results[method]["error"] = f"{type(e).__name__}: {first_line(e)}"
                errors.append(f"{method} stopped at seed {seed}: {results[method]['error']}")
                record = None
            if record is not None:
                results[method]["runs"].append(record)
            report = build_report(argv, args, data_info, results, errors)
            if args.json:
                from fastcifar.atomic import write_json

                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                write_json(args.json, report)
    finally:
        if scratch is not None and not args.work_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + report["table"] + "\n" + footer(report), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="speedrun"))

"""Speedrun benchmark: N seeds of a fastcifar preset, optionally against airbench94 on the same images.

    python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --preset speedrun --runs 5
    python bench/speedrun.py --data-dir .gpu/cifar10-jpeg.tar.gz --preset speedrun --runs 5 \\
        --airbench --airbench-runs 5 --json /tmp/speedrun.json
    python bench/speedrun.py --data-dir DIR --preset default --runs 2 -- --width 16 --epochs 2 --device cpu

Everything after `--` is passed to `fastcifar.train` unchanged (it overrides the preset). The seeds are
trained in-process by `fastcifar.train.main`, which warms up and compiles once, outside the timed region,
and reports compile and data-loading seconds separately. Unless overridden after `--`, the runs use
`--no-plots --checkpoint-every 0` (neither is timed, but both cost wall time).

Reported: mean +- std test accuracy, plain and with the preset's own TTA (flip, or flip + translate), the
fraction of runs >= 94% (on the TTA accuracy when the preset uses TTA; both are reported), median training
seconds, compile and data seconds.

`--airbench` also trains airbench94 (PyPI `airbench==0.1.8`, not a fastcifar dependency; install it, or
carry its wheel) on the SAME images: our decoded CIFAR-10 is written as `cifar10/train.pt`/`test.pt`
(uint8 N x 32 x 32 x 3 images, int64 labels, class names) into a scratch directory that is the working
directory during its runs, since airbench reads `./cifar10`. Its time is airbench's own
`total_time_seconds` (CUDA events around whitening init + training epochs + TTA evaluation, per-epoch
evaluation excluded), after `airbench.warmup94()`. airbench needs CUDA (`.cuda()`, CUDA events,
`torch.load(map_location=cuda)`), so without a GPU `--airbench` stops with an error before training.

`--json OUT` gets every number plus date, device, torch version, data source and the command line; it
is rewritten after each stage, so a run cut short (SIGTERM from `timeout`) still leaves what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import shlex
import shutil
import signal
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

from fastcifar.errors import UserError, run_cli  # noqa: E402
from fastcifar.stats import describe as describe_sample  # noqa: E402

THRESHOLD = 0.94
AIRBENCH_VERSION = "0.1.8"
DEFAULT_TRAIN_FLAGS = ("--no-plots", "--checkpoint-every", "0")
AIRBENCH_COLUMNS = ("run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds")


class Stopped(Exception):
    """SIGTERM/SIGINT outside the trainer (which handles them itself)."""

    def __init__(self, message: str, code: int = 143):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/speedrun.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train N seeds of a fastcifar preset (and optionally airbench94 on the same images); "
                    "report accuracy mean +- std, the fraction >= 94%% and median training time. "
                    "Flags after `--` go to fastcifar.train.",
        epilog="example: python bench/speedrun.py --data-dir ../shared/data/cifar10-png.tar.gz --preset speedrun "
               "--runs 5 --airbench --json out.json -- --epochs 10")
    p.add_argument("--data-dir", metavar="PATH", help="CIFAR-10 source (see fastcifar.data); default: the cache")
    p.add_argument("--preset", default="speedrun", help="fastcifar.config preset to benchmark")
    p.add_argument("--runs", type=int, default=5, help="seeds to train (seed .. seed+runs-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (fastcifar and airbench)")
    p.add_argument("--out-dir", metavar="DIR", help="fastcifar run directory (default: runs/speedrun-<preset>-<time>)")
    p.add_argument("--airbench", action="store_true", help="also run airbench94 (needs CUDA and airbench==0.1.8)")
    p.add_argument("--airbench-runs", type=int, default=None, help="airbench seeds (default: --runs)")
    p.add_argument("--work-dir", metavar="DIR", help="scratch directory for airbench's cifar10/*.pt "
                   "(default: a temporary directory, removed afterwards)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help="accuracy counted as a success")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(our flags, fastcifar.train flags): everything after the first `--` belongs to the trainer."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, train_flags = split_argv(argv)
    args = get_args_parser().parse_args(ours)
    from fastcifar.config import PRESETS

    if args.preset not in PRESETS:
        raise UserError(f"invalid --preset ({args.preset}): not in fastcifar.config.PRESETS; "
                        f"choose one of {', '.join(sorted(PRESETS))}")
    if args.runs < 1 or (args.airbench_runs is not None and args.airbench_runs < 1):
        raise UserError("invalid --runs/--airbench-runs: must be >= 1")
    if args.airbench_runs is None:
        args.airbench_runs = args.runs
    from fastcifar.config import parse_config

    parse_config(train_argv(args, Path("unused"), train_flags))  # bad trainer flags fail now, not after loading
    return args, train_flags


def train_argv(args: argparse.Namespace, out_dir: Path, extra: Sequence[str]) -> list[str]:
    """The fastcifar.train command line: ours first, so flags after `--` override them."""
    argv = ["--preset", args.preset, "--runs", str(args.runs), "--seed", str(args.seed),
            "--out-dir", str(out_dir), "--overwrite", *DEFAULT_TRAIN_FLAGS]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    return argv + list(extra)


# ------------------------------------------------------------------------------------------------------
# Statistics and the table
# ------------------------------------------------------------------------------------------------------
def describe(values: Sequence[float] | None) -> dict[str, Any] | None:
    """fastcifar.stats.describe of the values; None for no values (a method without TTA has none)."""
    return describe_sample(values) if values else None


def at_least(values: Sequence[float] | None, threshold: float) -> dict[str, Any] | None:
    if not values:
        return None
    k = int(sum(v >= threshold for v in values))
    return {"count": k, "runs": len(values), "fraction": k / len(values)}


def method_stats(acc: Sequence[float], acc_flip: Sequence[float] | None, acc_own_tta: Sequence[float] | None,
                 seconds: Sequence[float], threshold: float, own_tta_name: str | None) -> dict[str, Any]:
    """The numbers of one method. The success fraction uses the method's own TTA accuracy when it has one."""
    primary = "acc_tta" if acc_own_tta else "acc"
    return {
        "runs": len(acc), "acc": describe(acc), "acc_flip_tta": describe(acc_flip),
        "acc_tta": describe(acc_own_tta), "tta": own_tta_name,
        "at_least_threshold": {"threshold": threshold, "acc": at_least(acc, threshold),
                               "acc_tta": at_least(acc_own_tta, threshold), "primary": primary},
        "median_seconds": describe_sample(seconds)["median"],
        "seconds": [float(s) for s in seconds],
    }


def _pm(d: dict | None) -> str:
    """'mean +- std' in percent, 15 characters wide."""
    text = f"{100 * d['mean']:.2f} +- {100 * d['std']:.2f}" if d else "-"
    return f"{text:>15}"


def format_table(rows: list[tuple[str, dict[str, Any]]], reference: str | None = None) -> str:
    """One fixed-width table: accuracies in %, success fraction, median seconds, time relative to `reference`."""
    ref = dict(rows).get(reference) if reference else None
    ref_s = ref["median_seconds"] if ref else None
    thr_pct = f">={100 * rows[0][1]['at_least_threshold']['threshold']:g}%" if rows else ">=thr"
    head = (f"{'method':<24} {'runs':>4}  {'acc %':>15}  {'flip TTA %':>15}  {'own TTA %':>15}  "
            f"{thr_pct:>7}  {thr_pct + ' TTA':>11}  {'median s':>9}  {'time ratio':>10}")
    lines = [head, "-" * len(head)]
    for name, s in rows:
        thr = s["at_least_threshold"]
        plain, tta = (f"{f['count']}/{f['runs']}" if f else "-" for f in (thr["acc"], thr["acc_tta"]))
        sec = s["median_seconds"]
        ratio = f"{sec / ref_s:9.2f}x" if (sec and ref_s) else f"{'-':>10}"  # median time / the reference's
        sec_txt = f"{sec:9.2f}" if sec is not None else f"{'-':>9}"
        lines.append(f"{name:<24} {s['runs']:>4}  {_pm(s['acc'])}  {_pm(s['acc_flip_tta'])}  {_pm(s['acc_tta'])}  "
                     f"{plain:>7}  {tta:>11}  {sec_txt}  {ratio}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# fastcifar
# ------------------------------------------------------------------------------------------------------
def run_fastcifar(argv: list[str], out_dir: Path) -> dict[str, Any]:
    """Train via fastcifar.train.main in this process; its summary.json (rewritten after every seed, so a
    stopped run keeps its finished seeds)."""
    from fastcifar import train

    result: dict[str, Any] = {"argv": argv, "out_dir": str(out_dir)}
    try:
        train.main(argv)
        result["summary"] = json.loads((out_dir / "summary.json").read_text())
        result["complete"] = True
    except SystemExit as e:  # the trainer stopped on SIGINT/SIGTERM after checkpointing
        if e.code not in (130, 143):
            raise
        result.update(complete=False, error=f"stopped (exit {e.code})", salvaged=salvage_runs(out_dir))
    except Stopped as e:  # a signal before the trainer's own handler was installed
        result.update(complete=False, error=f"stopped ({e})", salvaged=salvage_runs(out_dir))
    return result


def salvage_runs(out_dir: Path) -> dict[str, Any]:
    """Seeds that finished before a stop: from summary.json, which the trainer rewrites after every seed;
    from metrics.csv (no TTA accuracy there) for a run that has none yet."""
    try:
        runs = json.loads((out_dir / "summary.json").read_text())["runs"]
        return {"seeds": runs["seeds"], "test_acc": runs["test_acc"], "test_acc_tta": runs["test_acc_tta"],
                "train_seconds": runs["train_seconds"]}
    except (OSError, KeyError, ValueError):
        pass
    try:
        epochs = json.loads((out_dir / "config.json").read_text())["epochs"]
        with open(out_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        return {"seeds": [], "test_acc": [], "train_seconds": []}
    seeds: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        seeds.setdefault(int(r["seed"]), []).append(r)
    # a seed is finished when a later seed has started, or when it reached the last epoch (a fractional
    # --epochs ends with a partial one) and was evaluated
    order = list(seeds)
    last_epoch = math.ceil(float(epochs))
    done = {s: rs for i, (s, rs) in enumerate(seeds.items()) if rs[-1]["test_acc"] and
            (i + 1 < len(order) or int(rs[-1]["epoch"]) == last_epoch)}
    return {"seeds": sorted(done), "test_acc": [float(done[s][-1]["test_acc"]) for s in sorted(done)],
            "train_seconds": [sum(float(r["epoch_seconds"]) for r in done[s]) for s in sorted(done)]}


def fastcifar_stats(result: dict[str, Any], threshold: float) -> dict[str, Any] | None:
    runs = result["summary"]["runs"] if "summary" in result else result.get("salvaged")
    if not runs or not runs["test_acc"]:
        return None
    tta = runs.get("test_acc_tta") or None
    translate = ((result.get("summary") or {}).get("tta") or {}).get("translate", 0)  # summary.json's TTA fields
    flip_only = not translate
    return method_stats(runs["test_acc"], tta if flip_only else None, tta, runs["train_seconds"], threshold,
                        (("flip" if flip_only else f"flip + translate {translate}") if tta else None))


# ------------------------------------------------------------------------------------------------------
# airbench
# ------------------------------------------------------------------------------------------------------
def require_airbench():
    """Import airbench, or raise UserError saying why it cannot run here (no CUDA, not installed)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--airbench needs a CUDA GPU: airbench 0.1.8 builds its net with .cuda(), loads its data "
                        "with map_location=cuda and times with CUDA events, and this machine has none; run "
                        "without --airbench here")
    try:
        import airbench
    except ImportError as e:
        raise UserError(f"--airbench needs the airbench package ({e}): pip install --no-deps "
                        f"airbench=={AIRBENCH_VERSION} (or install its wheel), or run without --airbench") from None
    if airbench_version() != AIRBENCH_VERSION:
        print(f"warning: airbench {airbench_version()} found; this harness was written for {AIRBENCH_VERSION} "
              f"(it parses its printed table)", file=sys.stderr)
    return airbench


def airbench_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("airbench")
    except metadata.PackageNotFoundError:
        return None


def write_airbench_data(data, root: Path) -> Path:
    """Our CifarData as airbench's `root/cifar10/{train,test}.pt`; returns the cifar10 directory."""
    import torch

    folder = root / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images = np.ascontiguousarray(getattr(data, f"{split}_images"), dtype=np.uint8)
        labels = np.asarray(getattr(data, f"{split}_labels"), dtype=np.int64)
        if split == "train":  # airbench whitens on train[:5000]: a class-sorted folder must not give it one class
            order = np.random.default_rng(0).permutation(len(labels))
            images, labels = images[order], labels[order]
        torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                    "classes": list(data.classes)}, folder / f"{split}.pt")
    return folder


def parse_airbench_log(text: str) -> dict[str, float] | None:
    """The final 'eval' row of airbench's verbose table: val_acc, tta_val_acc, total_time_seconds."""
    found = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(AIRBENCH_COLUMNS) and cells[1] == "eval":
            try:
                found = {k: float(cells[AIRBENCH_COLUMNS.index(k)]) for k in
                         ("val_acc", "tta_val_acc", "total_time_seconds")}
            except ValueError:
                continue
    return found


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (airbench reports its time only by printing it)."""

    def __init__(self, stream):
        self.stream, self.buffer_text = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.buffer_text.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def working_dir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_airbench(airbench, data, runs: int, seed: int, work_dir: Path, out: dict[str, Any] | None = None,
                 on_run=None) -> dict[str, Any]:
    """airbench94 `runs` times on `data`, after its own warm-up; per run its accuracies and times.

    Results go into `out` (made if None) as they come, so a caller keeps the finished runs of an
    interrupted call; `on_run()` is called after each run.
    """
    import torch

    from fastcifar.runtime import Timer

    out = {} if out is None else out
    results: list[dict[str, Any]] = []
    out.update({"version": airbench_version(), "work_dir": str(work_dir), "runs": results,
                "time": "airbench's own total_time_seconds: CUDA events around whitening init, "
                        "training epochs and TTA evaluation (per-epoch evaluation excluded)"})
    write_airbench_data(data, work_dir)
    timer_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: the tests' fake airbench
    with working_dir(work_dir):
        with Timer(timer_device) as warm:
            airbench.warmup94()  # one training step: cuDNN autotuning and lazy init, outside the timings
        out["warmup_seconds"] = warm.seconds
        test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
        for i in range(runs):
            torch.manual_seed(seed + i)  # airbench draws from the global generators and seeds nothing
            tee = _Tee(sys.stdout)
            with Timer(timer_device) as timer, contextlib.redirect_stdout(tee):
                model = airbench.train94(run=i, verbose=True)
            wall = timer.seconds
            parsed = parse_airbench_log(tee.buffer_text.getvalue()) or {}
            accs = [airbench.evaluate(model, test_loader, tta_level=level) for level in (0, 1, 2)]
            results.append({"seed": seed + i, "acc": accs[0], "acc_flip_tta": accs[1], "acc_tta": accs[2],
                            "seconds": parsed.get("total_time_seconds", wall), "call_seconds": wall,
                            "logged": parsed or None})
            del model
            if on_run is not None:
                on_run()
    return out


def airbench_stats(result: dict[str, Any], threshold: float) -> dict[str, Any] | None:
    runs = result.get("runs") or []
    if not runs:
        return None
    return method_stats([r["acc"] for r in runs], [r["acc_flip_tta"] for r in runs], [r["acc_tta"] for r in runs],
                        [r["seconds"] for r in runs], threshold, "flip+translate (tta_level 2)")


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------
def environment(argv: Sequence[str]) -> dict[str, Any]:
    from fastcifar import runtime

    return {**runtime.environment(), "host": platform.node(), "python_executable": sys.executable,
            "command": shlex.join(["python", "bench/speedrun.py", *argv])}


def build_report(env: dict, args: argparse.Namespace, data_info: dict, fast: dict | None,
                 ab: dict | None) -> dict[str, Any]:
    rows = []
    report: dict[str, Any] = {**env, **data_info, "preset": args.preset, "threshold": args.threshold,
                              "fastcifar": fast, "airbench": ab, "methods": {}}
    if fast is not None and (s := fastcifar_stats(fast, args.threshold)):
        summary = fast.get("summary") or {}
        s.update(compile_seconds=summary.get("compile_seconds"), data_seconds=summary.get("data_seconds"))
        rows.append((f"fastcifar[{args.preset}]", s))
    if ab is not None and (s := airbench_stats(ab, args.threshold)):
        rows.append(("airbench94", s))
    report["methods"] = dict(rows)
    names = dict(rows)
    if len(names) == 2:
        a, b = (names[n]["median_seconds"] for n in names)
        report["time_ratio_fastcifar_over_airbench"] = a / b if a and b else None
    report["table"] = format_table(rows, reference="airbench94" if "airbench94" in names else None) if rows else ""
    return report


def footer(report: dict[str, Any]) -> str:
    lines = [f"device {report['device']}, torch {report['torch']}, data {report.get('data_source')}"]
    fast = report["methods"].get(f"fastcifar[{report['preset']}]")
    if fast:
        c, d = fast.get("compile_seconds"), fast.get("data_seconds")
        warm = "no warm-up" if c is None else f"warm-up/compile {c:.1f} s"
        data_s = "?" if d is None else f"{d:.1f}"
        lines.append(f"fastcifar: median training seconds exclude {warm} and data loading ({data_s} s, after a "
                     f"first load of {report['data_first_load_seconds']:.1f} s); own TTA = {fast.get('tta') or 'none'}")
    if "airbench94" in report["methods"]:
        lines.append("airbench94: seconds = its own total_time_seconds (whitening + training + TTA eval, CUDA "
                     "events, warm-up excluded); own TTA = flip+translate")
    if report.get("time_ratio_fastcifar_over_airbench"):
        lines.append(f"time ratio = median seconds / airbench94's: fastcifar/airbench = "
                     f"{report['time_ratio_fastcifar_over_airbench']:.2f}")
    if report.get("errors"):
        lines += [f"error: {e}" for e in report["errors"]]
    return "\n".join(lines)


def _raise_stopped(signum, frame):
    raise Stopped(f"signal {signum}", 130 if signum == signal.SIGINT else 143)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    airbench = require_airbench() if args.airbench else None  # fail before any training
    env = environment(argv)
    out_dir = Path(args.out_dir or f"runs/speedrun-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")

    from fastcifar.data import load_cifar10

    t0 = time.perf_counter()
    data = load_cifar10(args.data_dir)  # decodes (and caches) once; the trainer then reads the cache
    data_info = {"data_source": data.source, "data_dir": args.data_dir,
                 "data_first_load_seconds": time.perf_counter() - t0,
                 "train_images": len(data.train_labels), "test_images": len(data.test_labels)}
    fast = ab = None
    errors: list[str] = []

    def save() -> dict[str, Any]:
        report = build_report(env, args, data_info, fast, ab)
        report["errors"] = errors
        if args.json:
            from fastcifar.atomic import write_json

            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_json(args.json, report)
        return report

    old = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            old[s] = signal.signal(s, _raise_stopped)
        except ValueError:  # not the main thread
            pass
    code = 0

    def crashed(part: str, e: Exception) -> None:  # one part's crash leaves the other's numbers in the report
        nonlocal code
        traceback.print_exc()
        errors.append(f"{part}: {type(e).__name__}: {e}")
        code = 1

    try:
        try:
            fast = run_fastcifar(train_argv(args, out_dir, extra), out_dir)
        except (Stopped, UserError):
            raise
        except Exception as e:
            crashed("fastcifar", e)
        else:
            if not fast.get("complete"):
                raise Stopped(fast.get("error", "stopped"), 130 if "130" in fast.get("error", "") else 143)
        save()
        if airbench is not None:
            import torch

            torch.cuda.empty_cache()
            scratch = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="airbench-"))
            ab = {}
            try:
                run_airbench(airbench, data, args.airbench_runs, args.seed, scratch, out=ab, on_run=save)
            except Stopped:
                raise
            except Exception as e:
                crashed("airbench", e)
            finally:
                if not args.work_dir:
                    shutil.rmtree(scratch, ignore_errors=True)
    except Stopped as e:
        errors.append(f"stopped early ({e}); results are partial")
        code = e.code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    report = save()
    print("\n" + report["table"] + "\n" + footer(report), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="speedrun"))

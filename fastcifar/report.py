"""What a run leaves for people and programs: the run directory, metrics.csv (a row per epoch, written as
it happens), the console rows and summary.json (rewritten after every seed), and their formatting.

    python -c "from fastcifar.report import epoch_row; print(epoch_row({}, header=True))"

Accuracies are fractions in every file (summary.json says so in `accuracy_unit`); the console shows
percentages.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fastcifar.atomic import write_text
from fastcifar.checkpoint import CHECKPOINT_FILE, MODEL_FILE
from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.evaluate import ACCURACY_UNIT, describe_views, tta_views
from fastcifar.runtime import SEED_CLOCKS, SESSION_CLOCKS
from fastcifar.stats import describe

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
RESULT_FILES = (SUMMARY_FILE, METRICS_FILE, MODEL_FILE, CHECKPOINT_FILE)
METRIC_COLUMNS = ("seed", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds")


def check_out_dir(config: TrainConfig, resume: bool) -> Path:
    """Refuse a file, or a directory with results, before anything is loaded or written."""
    out = Path(config.out_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir is a file ({out}): choose a directory path")
    existing = [f for f in RESULT_FILES if (out / f).exists()]
    if existing and not resume and not config.overwrite:
        raise UserError(f"run directory already has results ({out / existing[0]}): "
                        "use --overwrite to replace them, --resume to continue, or another --out-dir")
    return out


def create_out_dir(out: Path) -> None:
    """Create the run directory and prove it is writable (a full disk fails here, before training)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 65536)
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out-dir ({out}): {e.strerror}; choose a writable directory")


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    write_text(path, buf.getvalue())


# name, width, format, scale: accuracies are shown as percentages
_EPOCH_COLUMNS = [("seed", 5, "d", 1), ("epoch", 6, "d", 1), ("lr", 9, ".4f", 1), ("train_loss", 11, ".4f", 1),
                  ("train_acc", 11, ".2f", 100), ("test_loss", 10, ".4f", 1), ("test_acc", 10, ".2f", 100),
                  ("epoch_seconds", 14, ".2f", 1), ("total_seconds", 14, ".2f", 1)]


def epoch_row(row: dict[str, Any], header: bool = False) -> str:
    """One fixed-width line per epoch (airbench style); accuracies in percent."""
    if header:
        return " ".join(f"{name + (' %' if scale == 100 else ''):>{w}}" for name, w, _, scale in _EPOCH_COLUMNS)
    values = [row.get(name) for name, *_ in _EPOCH_COLUMNS]
    return " ".join(f"{v * scale:>{w}{fmt}}" if isinstance(v, (int, float)) and not math.isnan(v) else " " * w
                    for v, (_, w, fmt, scale) in zip(values, _EPOCH_COLUMNS))


def progress_bar(batches: Iterable, total: int, epoch: int) -> Iterable:
    """`batches` behind a tqdm bar on a terminal; as they are when stdout is a file or pipe."""
    if not sys.stdout.isatty():
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True)


def seed_line(result: dict[str, Any]) -> str:
    """The console line after a seed: each evaluation in percent and the training time."""
    views = "  ".join(f"{describe_views(e)} {100 * e['test_acc']:.2f}%" for e in result["evaluations"])
    return (f"seed {result['seed']}: test acc {views}  train {result['train_seconds']:.1f}s  "
            f"run {result['run_seconds']:.1f}s")


def work_line(flops: dict[str, Any]) -> str:
    """The work of one run (flops.recipe_flops) for the console."""
    return (f"work per run: {flops['per_run'] / 1e15:.4f} PFLOP (training {flops['train'] / 1e15:.4f}, final "
            f"evaluation {flops['eval'] / 1e15:.4f}; {flops['per_image_forward'] / 1e6:.1f} MFLOP per image forward)")


def run_summary(config: TrainConfig, results: Sequence[dict[str, Any]], *, params: int, world_size: int,
                environment: dict[str, Any], clocks: Mapping[str, float | None],
                flops: dict[str, Any] | None = None) -> dict[str, Any]:
    """What summary.json holds: the last seed's numbers at the top, every seed under `runs` and the per-seed
    results, with the invocation's SESSION_CLOCKS from `clocks` (runtime.CLOCKS). `flops` (flops.recipe_flops)
    is the work of one seed; its `total` covers every seed so far."""
    accs = [r["test_acc"] for r in results]
    ttas = [r["test_acc_tta"] for r in results if r["test_acc_tta"] is not None]
    seed_clocks = {key: [r.get(key) for r in results] for key in SEED_CLOCKS}
    acc_stats, tta_stats = describe(accs), describe(ttas)
    last = results[-1]
    return {
        "accuracy_unit": ACCURACY_UNIT, "complete": len(results) == config.runs,
        "eval_split": "val" if config.val_split else "test",  # what every test_* figure was measured on
        "test_acc": float(last["test_acc"]), "test_acc_tta": last["test_acc_tta"],
        "evaluations": last.get("evaluations", []),
        "tta": {"flip": True, "translate": config.tta_translate, "views": tta_views(True, config.tta_translate)}
        if config.tta else None,
        **{key: values[-1] for key, values in seed_clocks.items()}, **{key: clocks.get(key) for key in SESSION_CLOCKS},
        "images_per_second": float(last["images"] / last["train_seconds"]),
        "epochs": config.epochs, "params": params, "world_size": world_size, **environment,
        "flops": {**flops, "total": flops["per_run"] * len(results)} if flops else None,
        "runs": {"seeds": [r["seed"] for r in results], "test_acc": accs, "test_acc_tta": ttas, **seed_clocks,
                 "planned": config.runs, "mean": acc_stats["mean"], "std": acc_stats["std"],
                 "mean_tta": tta_stats["mean"], "std_tta": tta_stats["std"],
                 **{f"median_{key}": describe(seed_clocks[key])["median"]
                    for key in ("train_seconds", "run_seconds", "wall_seconds")},
                 "per_seed": list(results)},
    }


def reported_accuracy(summary: dict[str, Any]) -> float:
    """The accuracy a run reports as its own: with its TTA when it has one, else plain (a fraction)."""
    return float(summary["test_acc_tta"] if summary["test_acc_tta"] is not None else summary["test_acc"])


def format_summary(summary: dict[str, Any]) -> str:
    """The run summary for the console, in percent."""
    runs = summary["runs"]
    line = f"{len(runs['seeds'])} run(s): test acc {100 * runs['mean']:.2f}% +- {100 * runs['std']:.2f}"
    if runs["mean_tta"] is not None:
        line += f", {describe_views(summary['tta'])} {100 * runs['mean_tta']:.2f}% +- {100 * runs['std_tta']:.2f}"
    run = runs.get("median_run_seconds")
    line += f"; median train {runs['median_train_seconds']:.1f}s"
    line += (f", run {run:.1f}s" if run is not None else "") + f" on {summary['device']}"
    if summary.get("flops"):
        line += f"; {summary['flops']['per_run'] / 1e15:.4f} PFLOP per run"
    return line

"""Hyperparameter search with Optuna on a validation split; the test set is never read.

    python -m fastcifar.tune --space bench/tune_space.toml --data-dir ../shared/data/cifar10-png.tar.gz \\
        --val-split 5000 --width 16 --epochs 1.5 --device cpu --trials 12 --out-dir runs/tune/w16 \\
        --storage sqlite:///runs/tune/w16/study.db --study w16

Every training flag sets the base configuration (preset < --config < flags, as in fastcifar.train); the
--space TOML file (see fastcifar.search_space) says which fields each trial varies. Each trial is an
in-process training run on the training images minus --val-split held-out ones, evaluated on those; its
per-epoch validation accuracy goes to the pruner, which stops poor trials early. The objective is the
final validation accuracy (with the run's TTA when --tta is on, else plain); with --max-train-seconds T a
trial whose training clock passes T is stopped and counts as infeasible (pruned), so the study maximizes
accuracy subject to training seconds <= T.

The study lives in --storage (an SQLite file by default): running the command again continues it up to
--trials finished trials, and several processes (one per GPU, or on several machines with a PostgreSQL
or MySQL URL) can work on one study at the same time. Results are written as they happen:
OUT/trials/NNNN/ (the trial's run directory, train.log and trial.json), OUT/trials.csv, OUT/study.json and
OUT/best.toml (the best configuration, accepted by `python -m fastcifar.train --config`); at the end the
plots history.png, importances.png and slice.png (not with --no-plots).

Needs the `tune` extra: pip install -e ".[tune]".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from fastcifar.atomic import write_json, write_text
from fastcifar.config import TrainConfig, config_from_args, get_args_parser as train_args_parser, layered_args, \
    non_recipe_fields, to_dict, validate
from fastcifar.errors import UserError, first_line, run_cli
from fastcifar.report import reported_accuracy
from fastcifar.search_space import SearchSpace, load_search_space

# Fields left out of best.toml: where data and results live and how this machine runs, not the recipe.
NOT_IN_RECIPE = non_recipe_fields() | {"val_split", "split_seed"}  # best.toml trains on all images
DEFAULT_STORAGE = "sqlite:///runs/tune.db"


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("optuna is not installed: pip install -e \".[tune]\" (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def get_args_parser():
    parser = train_args_parser()
    parser.prog = "python -m fastcifar.tune"
    parser.description = ("Search training hyperparameters with Optuna on a validation split (--val-split N). "
                          "Training flags set the base configuration that --space varies; --seed seeds the "
                          "sampler and every trial's training; --out-dir is the study's output directory.")
    g = parser.add_argument_group("search")
    g.add_argument("--space", required=True, metavar="FILE", help="TOML search space (see fastcifar.search_space)")
    g.add_argument("--trials", type=int, default=20,
                   help="run until the study holds this many finished trials (complete, pruned or failed)")
    g.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe")
    g.add_argument("--startup-trials", type=int, default=10, help="TPE: random trials before it models")
    g.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    g.add_argument("--prune-after", type=int, default=5,
                   help="median pruner: finished trials before it stops any (n_startup_trials)")
    g.add_argument("--max-train-seconds", type=float, default=None, metavar="T",
                   help="objective under a time budget: a trial whose training passes T seconds is stopped")
    g.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="Optuna storage URL: sqlite:///FILE on one machine, postgresql://... or mysql://... across")
    g.add_argument("--study", default="fastcifar", help="study name inside the storage")
    g.add_argument("--enqueue-base", action=argparse.BooleanOptionalAction, default=True,
                   help="run the base configuration as the first trial (not with --sampler grid)")
    return parser


# ------------------------------------------------------------------------------------------------------
# Study pieces
# ------------------------------------------------------------------------------------------------------
def make_sampler(name: str, space: SearchSpace, seed: int, startup_trials: int = 10):
    optuna = import_optuna()
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True)


def make_pruner(name: str, prune_after: int = 5):
    optuna = import_optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=prune_after)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_storage(url: str):
    """An Optuna database storage for `url` (sqlite:///FILE, postgresql://..., mysql+pymysql://...; the
    last two need their driver). SQLite files get their folder created and a patient lock timeout, so
    several processes can share one file. Every running trial sends a heartbeat: the trial of a process
    that was killed is marked failed by the next process after `grace_period` seconds."""
    optuna = import_optuna()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    last: Exception | None = None
    # two processes creating the tables of a new file at the same moment: the loser sees "table already
    # exists" (OperationalError) or a duplicate alembic version (IntegrityError), and retries
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60,
                                              grace_period=300)
        except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a locked or unreachable database
            last = e
            if type(e).__name__ not in ("OperationalError", "IntegrityError"):
                break
            time.sleep(0.5 + attempt)
    raise UserError(f"cannot open --storage {url}: {first_line(last)}")


def base_params(space: SearchSpace, base: TrainConfig) -> dict[str, Any] | None:
    """The base configuration's value of every searched field, or None when one lies outside the space."""
    params = {}
    for p in space.params:
        value = getattr(base, p.name)
        inside = value in p.choices if p.kind == "choice" else p.low <= value <= p.high
        if not inside:
            return None
        params[p.name] = value
    return params


def recipe_toml(config: TrainConfig, header: Sequence[str] = ()) -> str:
    """`config` as a TOML file for `python -m fastcifar.train --config`: every recipe field, none of the
    machine's or run's (NOT_IN_RECIPE), so it trains the same recipe under any --preset."""
    lines = [f"# {line}" for line in header]
    for name, value in to_dict(config).items():
        if name in NOT_IN_RECIPE or value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)
        elif isinstance(value, float):
            text = repr(value) if math.isfinite(value) else None
        else:
            text = str(value)
        if text is not None:
            lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"


class Objective:
    """One trial = one in-process training run of the base configuration with the trial's values."""

    def __init__(self, space: SearchSpace, base: TrainConfig, out: Path, max_train_seconds: float | None):
        self.space, self.base, self.out, self.max_train_seconds = space, base, out, max_train_seconds

    def __call__(self, trial) -> float:
        optuna = import_optuna()
        from fastcifar.train import train

        values = {p.name: p.suggest(trial) for p in self.space.params}
        run_dir = trial_dir(self.out, trial.number)
        config = dataclasses.replace(self.space.apply(self.base, values), out_dir=str(run_dir), overwrite=True,
                                     runs=1, plots=False, checkpoint_every=0)
        trial.set_user_attr("config", to_dict(config))
        last_epoch = math.ceil(config.epochs)

        def on_epoch(row: dict[str, Any]) -> None:
            trial.set_user_attr("epochs_done", row["epoch"])
            trial.set_user_attr("train_seconds", row["total_seconds"])
            if self.max_train_seconds is not None and row["total_seconds"] > self.max_train_seconds:
                trial.set_user_attr("over_budget", True)
                raise optuna.TrialPruned(f"training passed {self.max_train_seconds}s")
            if not math.isnan(row["test_acc"]):
                trial.report(row["test_acc"], row["epoch"])
                # stopping after the last epoch saves nothing and would throw away a finished result
                if row["epoch"] < last_epoch and trial.should_prune():
                    raise optuna.TrialPruned(f"val acc {row['test_acc']:.4f} at epoch {row['epoch']}")

        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):
            summary = train(config, on_epoch=on_epoch)
        trial.set_user_attr("val_acc", summary["test_acc"])
        trial.set_user_attr("val_acc_tta", summary["test_acc_tta"])
        trial.set_user_attr("train_seconds", summary["train_seconds"])
        return reported_accuracy(summary)


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


# ------------------------------------------------------------------------------------------------------
# Outputs, written after every trial
# ------------------------------------------------------------------------------------------------------
def trial_record(t) -> dict[str, Any]:
    intermediate = dict(sorted(t.intermediate_values.items()))
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "val_acc": t.user_attrs.get("val_acc"), "val_acc_tta": t.user_attrs.get("val_acc_tta"),
            "train_seconds": t.user_attrs.get("train_seconds"), "epochs_done": t.user_attrs.get("epochs_done"),
            "intermediate_val_acc": {str(k): v for k, v in intermediate.items()},
            "base": bool(t.user_attrs.get("base")), "over_budget": bool(t.user_attrs.get("over_budget")),
            "error": t.user_attrs.get("error"),
            "seconds": t.duration.total_seconds() if t.duration else None, "config": t.user_attrs.get("config")}


def write_trials_csv(path: Path, records: list[dict[str, Any]]) -> None:
    names = sorted({k for r in records for k in r["params"]})
    columns = ["number", "state", "value", "val_acc", "val_acc_tta", "train_seconds", "epochs_done", "base",
               "over_budget", "last_intermediate"] + names
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in records:
        last = list(r["intermediate_val_acc"].values())[-1] if r["intermediate_val_acc"] else None
        writer.writerow({**{c: r.get(c) for c in columns[:9]}, "last_intermediate": last,
                         **{n: r["params"].get(n) for n in names}})
    write_text(path, buf.getvalue())


def write_outputs(study, out: Path, args, base: TrainConfig) -> dict[str, Any]:
    """trials.csv, study.json and best.toml from everything the storage holds (all processes' trials)."""
    optuna = import_optuna()
    trials = study.get_trials(deepcopy=False)
    records = [trial_record(t) for t in trials]
    write_trials_csv(out / "trials.csv", records)
    complete = [r for r in records if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: r["value"]) if complete else None
    base_trial = next((r for r in records if r["base"]), None)
    counts = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    summary = {"study": study.study_name, "storage": args.storage, "eval_split": "val",
               "val_split": base.val_split, "split_seed": base.split_seed, "seed": base.seed,
               "sampler": args.sampler, "pruner": args.pruner, "max_train_seconds": args.max_train_seconds,
               "objective": "validation accuracy (with the run's TTA when on)", "space": args.space,
               "trials": {k: v for k, v in counts.items() if v}, "best": best and _brief(best),
               "base": base_trial and _brief(base_trial)}
    write_json(out / "study.json", summary)
    if best is not None and best["config"]:
        config = TrainConfig(**best["config"])
        header = [f"best of study '{study.study_name}' ({args.storage}), trial {best['number']}:",
                  f"validation accuracy {best['value']:.4f} on {base.val_split} held-out training images "
                  f"(split seed {base.split_seed})",
                  "train it: python -m fastcifar.train --config THIS_FILE --data-dir ..."]
        write_text(out / "best.toml", recipe_toml(config, header))
    return summary


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("number", "state", "value", "val_acc", "val_acc_tta", "train_seconds", "params")}


def save_plots(study, out: Path) -> list[str]:
    """history.png, importances.png and slice.png; a plot that needs more trials is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    optuna = import_optuna()
    from optuna.visualization import matplotlib as vis

    written = []
    for name, plot in (("history", vis.plot_optimization_history), ("importances", vis.plot_param_importances),
                       ("slice", vis.plot_slice)):
        try:
            with warnings.catch_warnings():  # "too few trials" notes from optuna and matplotlib layout notes
                warnings.simplefilter("ignore")
                axes = plot(study)
            figure = np.ravel(axes)[0].figure
            panels = len(np.ravel(axes)) if name == "slice" else 1
            figure.set_size_inches(max(6.4, figure.get_size_inches()[0], 3.2 * panels), 4.8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure.tight_layout()
            figure.savefig(out / f"{name}.png", dpi=100)
            plt.close(figure)
            written.append(f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError) as e:
            print(f"skipped {name}.png: {first_line(e)}", file=sys.stderr)
    return written


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------
def check_data(base: TrainConfig) -> None:
    """Load the data and make the split once up front: a wrong path or --val-split fails before any trial."""
    from fastcifar.data import load_cifar10, validation_split

    data = load_cifar10(base.data_dir, download=base.download or None)
    validation_split(data, base.val_split, base.split_seed)


def main(argv: Sequence[str] | None = None) -> int:
    optuna = import_optuna()
    args = layered_args(get_args_parser(), argv)
    base = config_from_args(args)
    validate(base)
    if args.resume:
        raise UserError("--resume is for fastcifar.train: run the same tune command again to continue a study")
    if base.val_split <= 0:
        raise UserError("tune needs a validation split, so the test set is never read: pass --val-split N "
                        "(e.g. 5000)")
    if args.trials < 1:
        raise UserError(f"invalid --trials ({args.trials}): must be >= 1")
    space = load_search_space(args.space, base)
    if args.sampler == "grid":
        space.grid()  # a range without a step fails here, naming the field
    check_data(base)
    out = Path(base.out_dir or f"runs/tune/{args.study}")
    out.mkdir(parents=True, exist_ok=True)
    study_args = dict(storage=open_storage(args.storage), study_name=args.study, direction="maximize",
                      sampler=make_sampler(args.sampler, space, base.seed, args.startup_trials),
                      pruner=make_pruner(args.pruner, args.prune_after))
    try:  # creating the study is atomic in the storage: of several processes starting together, one does
        study = optuna.create_study(**study_args)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(**{k: v for k, v in study_args.items() if k != "direction"}), False
    if args.enqueue_base and args.sampler != "grid" and created:
        params = base_params(space, base)
        if params is None:
            print("base configuration lies outside the search space: not enqueued", file=sys.stderr)
        else:
            study.enqueue_trial(params, user_attrs={"base": True})

    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                       optuna.trial.TrialState.FAIL)

    def after_trial(study, trial) -> None:
        record = trial_record(trial)
        write_json(trial_dir(out, trial.number) / "trial.json", record)
        write_outputs(study, out, args, base)
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        print(f"trial {trial.number:4d} {trial.state.name.lower():8s} value {value}  "
              f"epochs {record['epochs_done']}  train {record['train_seconds'] or 0:.1f}s  {trial.params}",
              flush=True)
        if len(study.get_trials(deepcopy=False, states=finished_states)) >= args.trials:
            study.stop()

    def objective(trial) -> float:
        try:
            return Objective(space, base, out, args.max_train_seconds)(trial)
        except UserError as e:  # e.g. a diverging lr: this trial fails, the study goes on
            trial.set_user_attr("error", str(e))
            print(f"trial {trial.number} failed: {e}", file=sys.stderr)
            raise
        except SystemExit as e:  # Ctrl-C or SIGTERM during training: Optuna records an interrupt as a failure
            trial.set_user_attr("error", "interrupted")
            print(f"trial {trial.number} interrupted; run the same command again to continue the study",
                  file=sys.stderr)
            raise KeyboardInterrupt from e

    done = len(study.get_trials(deepcopy=False, states=finished_states))
    print(f"study '{args.study}' in {args.storage}: {done} finished trial(s), running until {args.trials}; "
          f"sampler {args.sampler}, pruner {args.pruner}, outputs in {out}", flush=True)
    if done < args.trials:
        study.optimize(objective, n_trials=args.trials - done, catch=(UserError,), callbacks=[after_trial])
    summary = write_outputs(study, out, args, base)
    if base.plots:  # --no-plots skips them (each trial's own plots are always off)
        save_plots(study, out)
    best, base_trial = summary["best"], summary["base"]
    if best:
        print(f"best: trial {best['number']}, validation accuracy {best['value']:.4f}, {best['params']}"
              f" -> {out / 'best.toml'}")
    if base_trial and base_trial["value"] is not None:
        print(f"base configuration (trial {base_trial['number']}): {base_trial['value']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.tune"))

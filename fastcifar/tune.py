"""Hyperparameter search with Optuna on a validation split; the test set is never read.

    python -m fastcifar.tune --data-dir ../shared/data/cifar10-png.tar.gz --val-split 5000 --width 16 \\
        --epochs 1.5 --device cpu --trials 12 --out-dir runs/tune/w16 \\
        --storage sqlite:///runs/tune/w16/study.db --study w16

Training flags set the base configuration, --space (fastcifar.search_space) what each trial varies; the study
(tune_study), how it is shared and continued, and what it writes (tune_report): docs/tune-and-compare.md.

Needs the `tune` extra: pip install -e ".[tune]".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from fastcifar.config import TrainConfig, config_from_args, get_args_parser as train_args_parser, layered_args, \
    validate
from fastcifar.errors import UserError, require, run_cli
from fastcifar.report import reported_accuracy
from fastcifar.search_space import SearchSpace, load_search_space

if TYPE_CHECKING:  # tune_study imports optuna, which main imports with a one-line error where it is missing
    from fastcifar.tune_study import Goal


def get_args_parser():
    from fastcifar.tune_study import GOALS

    parser = train_args_parser()
    parser.prog = "python -m fastcifar.tune"
    parser.description = ("Search training hyperparameters with Optuna on a validation split (--val-split N). "
                          "Training flags set the base configuration that the search space varies; --seed "
                          "seeds the samplers and is every trial's training seed; --out-dir is the study's "
                          "output directory.")
    g = parser.add_argument_group("search")
    g.add_argument("--space", metavar="FILE", default=None,
                   help="TOML search space (see fastcifar.search_space); None: its DEFAULT_SPACE, the One "
                        "Cycle schedule (lr, pct_start, div factors), weight decay, label smoothing, batch size")
    g.add_argument("--objective", choices=list(GOALS), default="accuracy",
                   help="maximize validation accuracy; accuracy-seconds and accuracy-flops also minimize "
                        "training seconds or the FLOPs of a run, and write the Pareto front")
    g.add_argument("--trials", type=int, default=20,
                   help="run until the study holds this many finished trials (complete, pruned or failed)")
    g.add_argument("--sampler", choices=("tpe", "random", "grid", "nsga2"), default="tpe",
                   help="each trial's sampler is seeded by --seed and the trial's number")
    g.add_argument("--startup-trials", type=int, default=10,
                   help="TPE: random trials before it models; NSGA-II: its population size")
    g.add_argument("--pruner", choices=("median", "hyperband", "none"), default=None,
                   help="None: median with --objective accuracy, none with two objectives (Optuna prunes "
                        "single-objective studies only)")
    g.add_argument("--prune-after", type=int, default=5,
                   help="median pruner: finished trials before it stops any (n_startup_trials)")
    g.add_argument("--max-train-seconds", type=float, default=None, metavar="T",
                   help="constraint: a trial whose training passes T seconds is infeasible, stopped at its next "
                        "evaluated epoch and never the best")
    g.add_argument("--budget", type=float, default=None, metavar="COST",
                   help="two objectives: best.toml is the most accurate trial whose training seconds or FLOPs "
                        "are <= COST; None: the most accurate of all")
    g.add_argument("--storage", default="sqlite:///runs/tune.db",
                   help="Optuna storage URL: sqlite:///FILE on one machine, postgresql://... or mysql://... across")
    g.add_argument("--study", default="fastcifar", help="study name inside the storage")
    g.add_argument("--new-study", action="store_true",
                   help="when --storage holds a study of this name made with other settings (space, objective, "
                        "epochs, width, split, base recipe), delete it and its outputs in --out-dir and start "
                        "afresh instead of refusing; a study with the same settings continues, so every worker "
                        "may be given this flag (to redo one, choose another --study)")
    g.add_argument("--enqueue-base", action=argparse.BooleanOptionalAction, default=True,
                   help="run the base configuration as the first trial (not with --sampler grid)")
    return parser


def check_search_args(args: argparse.Namespace, base: TrainConfig, two_objectives: bool) -> None:
    validate(base)
    if args.resume:
        raise UserError("--resume is for fastcifar.train: run the same tune command again to continue a study")
    if base.val_split <= 0:
        raise UserError("tune needs a validation split, so the test set is never read: pass --val-split N "
                        "(e.g. 5000)")
    if args.trials < 1:
        raise UserError(f"invalid --trials ({args.trials}): must be >= 1")
    if args.sampler == "nsga2" and args.startup_trials < 2:
        raise UserError(f"invalid --startup-trials ({args.startup_trials}): NSGA-II needs a population of >= 2")
    if args.max_train_seconds is not None and not args.max_train_seconds > 0:
        raise UserError(f"invalid --max-train-seconds ({args.max_train_seconds}): must be > 0")
    if two_objectives and args.pruner not in (None, "none"):
        raise UserError(f"--pruner {args.pruner} needs --objective accuracy: Optuna prunes single-objective "
                        "studies only")
    if args.budget is not None and not two_objectives:
        raise UserError("--budget needs --objective accuracy-seconds or accuracy-flops (with accuracy alone, "
                        "--max-train-seconds is the budget)")


class OverBudget(Exception):
    """(accuracy, train_seconds) of a trial whose training passed --max-train-seconds, raised to stop it."""


@dataclasses.dataclass
class Objective:
    space: SearchSpace
    base: TrainConfig
    out: Path
    cost: str | None                  # the second objective's user attribute: train_seconds or flops
    max_train_seconds: float | None
    split_sizes: tuple[int, int]      # training and validation images, for the FLOPs of a run

    def __call__(self, trial) -> float | tuple[float, float]:
        try:
            return self.run(trial)
        except UserError as e:  # e.g. a diverging lr: this trial fails, the study goes on
            trial.set_user_attr("error", str(e))
            print(f"trial {trial.number} failed: {e}", file=sys.stderr)
            raise
        except SystemExit as e:  # Ctrl-C or SIGTERM during training: Optuna records an interrupt as a failure
            trial.set_user_attr("error", "interrupted")
            print(f"trial {trial.number} interrupted; run the same command again to continue the study",
                  file=sys.stderr)
            raise KeyboardInterrupt from e

    def run(self, trial) -> float | tuple[float, float]:
        from fastcifar.flops import recipe_flops
        from fastcifar.train import train
        from fastcifar.tune_report import trial_dir

        values = {p.name: p.suggest(trial) for p in self.space.params}
        run_dir = trial_dir(self.out, trial.number)
        config = dataclasses.replace(self.space.apply(self.base, values), out_dir=str(run_dir), overwrite=True,
                                     runs=1, plots=False, checkpoint_every=0)
        trial.set_user_attr("config", dataclasses.asdict(config))
        trial.set_user_attr("seed", config.seed)
        # counted on the meta device, before training: known for a trial stopped early too
        flops = recipe_flops(config, *self.split_sizes)["per_run"]
        trial.set_user_attr("flops", flops)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):
                summary = train(config, on_epoch=self.epoch_callback(trial, math.ceil(config.epochs)))
            accuracy, seconds = reported_accuracy(summary), summary["train_seconds"]
            trial.set_user_attr("val_acc", summary["test_acc"])
            trial.set_user_attr("val_acc_tta", summary["test_acc_tta"])
        except OverBudget as stop:
            accuracy, seconds = stop.args
            trial.set_user_attr("val_acc", accuracy)
        trial.set_user_attr("train_seconds", seconds)
        if self.max_train_seconds is not None:
            # Optuna's own constraint: the samplers learn from it, best_trial(s) leave infeasible trials out
            trial.set_constraint("train_seconds", seconds - self.max_train_seconds)
            trial.set_user_attr("over_budget", seconds > self.max_train_seconds)
        return accuracy if self.cost is None else (accuracy, {"flops": flops, "train_seconds": seconds}[self.cost])

    def epoch_callback(self, trial, last_epoch: int):
        """Per epoch: record progress; stop an evaluated epoch over budget (before the last, which
        finishes anyway); with one objective, report to the pruner and stop when it says so."""
        from optuna import TrialPruned

        def on_epoch(row: dict[str, Any]) -> None:
            trial.set_user_attr("epochs_done", row["epoch"])
            trial.set_user_attr("train_seconds", row["total_seconds"])
            evaluated, before_last = not math.isnan(row["test_acc"]), row["epoch"] < last_epoch
            over = self.max_train_seconds is not None and row["total_seconds"] > self.max_train_seconds
            if evaluated and before_last and over:
                raise OverBudget(row["test_acc"], row["total_seconds"])
            if evaluated and self.cost is None:
                trial.report(row["test_acc"], row["epoch"])
                # stopping after the last epoch saves nothing and would throw away a finished result
                if before_last and trial.should_prune():
                    raise TrialPruned(f"val acc {row['test_acc']:.4f} at epoch {row['epoch']}")

        return on_epoch


def check_data(base: TrainConfig) -> tuple[int, int]:
    """(training, validation) images; loading the data up front fails a wrong path or --val-split early."""
    from fastcifar.data import load_cifar10, validation_split

    data = load_cifar10(base.data_dir, download=base.download or None)
    split = validation_split(data, base.val_split, base.split_seed)
    return len(split.train_labels), len(split.test_labels)


def open_tune_study(args: argparse.Namespace, base: TrainConfig, space: SearchSpace, goal: Goal,
                    about: dict[str, Any], out: Path, sampler: Any) -> Any:
    """--study in --storage, created, continued or replaced (its outputs deleted); a new one runs the base first."""
    from fastcifar.tune_report import remove_outputs
    from fastcifar.tune_study import make_pruner, open_storage, open_study, study_settings

    settings = study_settings(base, space, args.preset, goal, args.max_train_seconds)
    study, status = open_study(open_storage(args.storage), args.study, goal, sampler,
                               make_pruner(about["pruner"], args.prune_after), settings, args.storage, args.new_study)
    if status == "replaced":
        remove_outputs(out)
        print(f"--new-study: deleted the earlier study '{args.study}' in {about['storage']} and its outputs in {out}",
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    if args.enqueue_base and args.sampler != "grid" and status != "continued":
        params = {p.name: getattr(base, p.name) for p in space.params}
        if not all(p.contains(params[p.name]) for p in space.params):
            print("base configuration lies outside the search space: not enqueued", file=sys.stderr)
        else:
            study.enqueue_trial(params, user_attrs={"base": True})
    return study


def after_each_trial(out: Path, goal: Goal, about: dict[str, Any], budget: float | None) -> Callable[..., None]:
    from fastcifar.atomic import write_json
    from fastcifar.tune_report import trial_dir, trial_record, write_outputs

    def after_trial(study, trial) -> None:
        record = trial_record(trial, goal)
        write_json(trial_dir(out, trial.number) / "trial.json", record)
        write_outputs(study, out, goal, about, budget)
        value = f"{record['value']:.4f}" if record["value"] is not None else "-"
        cost = f"  {goal.cost_label} {record['cost']:.4g}" if record["cost"] is not None else ""
        print(f"trial {record['number']:4d} {record['state'].lower():8s} accuracy {value}{cost}  epochs "
              f"{record['epochs_done']}  train {record['train_seconds'] or 0:.1f}s  {record['params']}", flush=True)

    return after_trial


def main(argv: Sequence[str] | None = None) -> int:
    optuna = require("optuna", "tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no per-trial log lines, nor experimental notes
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from fastcifar.plots import save_figure
    from fastcifar.tune_report import draw_plots, write_outputs
    from fastcifar.tune_study import FINISHED, GOALS, display_url, make_sampler

    args = layered_args(get_args_parser(), argv)
    base = config_from_args(args)
    goal = GOALS[args.objective]
    check_search_args(args, base, goal.cost is not None)
    space = load_search_space(args.space, base)
    # before the data is loaded: --sampler grid refuses a space without a finite grid
    sampler = make_sampler(args.sampler, space, base.seed, args.startup_trials)
    split_sizes = check_data(base)
    out = Path(base.out_dir or f"runs/tune/{args.study}")
    about = {"storage": display_url(args.storage), "sampler": args.sampler,
             "pruner": args.pruner or ("none" if goal.cost else "median"), "space": space.source,
             "max_train_seconds": args.max_train_seconds}  # the invocation, for study.json
    study = open_tune_study(args, base, space, goal, about, out, sampler)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    print(f"study '{args.study}' in {about['storage']}: {done} finished trial(s), running until {args.trials}; "
          f"objective {goal.name}, sampler {args.sampler}, pruner {about['pruner']}, outputs in {out}", flush=True)
    if done < args.trials:
        study.optimize(Objective(space, base, out, goal.cost, args.max_train_seconds, split_sizes),
                       n_trials=args.trials - done, catch=(UserError,),
                       callbacks=[after_each_trial(out, goal, about, args.budget),
                                  optuna.study.MaxTrialsCallback(args.trials, states=FINISHED)])  # of every process
    summary = write_outputs(study, out, goal, about, args.budget)
    if base.plots:  # --no-plots skips them (each trial's own plots are always off)
        for name, figure in draw_plots(study, goal):
            save_figure(figure, out / f"{name}.png")
    print_result(summary, out, goal.cost_label)
    return 0


def print_result(summary: dict[str, Any], out: Path, cost_label: str) -> None:
    best, base_trial = summary["best"], summary["base"]
    if summary.get("pareto"):
        print(f"Pareto front ({len(summary['pareto'])} trials, cheapest first; {out / 'pareto.csv'}):")
        for r in summary["pareto"]:
            print(f"  trial {r['number']:4d}  accuracy {r['value']:.4f}  {cost_label} {r['cost']:.4g}  {r['params']}")
    if best:
        print(f"best: trial {best['number']}, validation accuracy {best['value']:.4f}, {best['params']}"
              f" -> {out / 'best.toml'}")
    elif summary["budget"] is not None:
        print(f"no trial within --budget {summary['budget']:g}: no best.toml", file=sys.stderr)
    if base_trial and base_trial["value"] is not None:
        print(f"base configuration (trial {base_trial['number']}): {base_trial['value']:.4f}")


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.tune"))

"""What a study leaves in its output directory (OUTPUT_FILES, trials/, best-per-budget/; docs/tune-and-compare.md
says what each holds), rewritten from the storage after every trial; the plots at the end.

    python -c "from fastcifar.tune_report import recipe_toml; from fastcifar.config import TrainConfig; \\
print(recipe_toml(TrainConfig()))"
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import optuna

from fastcifar.atomic import atomic_path, write_json, write_text
from fastcifar.config import TrainConfig
from fastcifar.errors import first_line
from fastcifar.plots import pyplot
from fastcifar.search_space import NOT_SEARCHABLE
from fastcifar.tune_study import SETTINGS_KEY, Goal

BUDGET_DIR = "best-per-budget"
OUTPUT_FILES = ("study.json", "trials.csv", "best.toml", "pareto.csv", "pareto.png", "history.png",
                "importances.png", "slice.png")
ACCURACY_LABEL = "validation accuracy"


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def remove_outputs(out: Path) -> None:
    for name in ("trials", BUDGET_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)


def recipe_toml(config: TrainConfig, header: Sequence[str] = ()) -> str:
    """`config` as a TOML file for `python -m fastcifar.train --config`: every recipe field, none of the
    machine's or run's, nor the validation split (NOT_SEARCHABLE: best.toml trains on all images), so it
    trains the same recipe under any --preset."""
    lines = [f"# {line}" for line in header]
    for name, value in asdict(config).items():
        # JSON's scalars are TOML's (a float as repr, a string with escapes TOML reads); inf and nan are not
        if name not in NOT_SEARCHABLE and value is not None and (isinstance(value, str) or math.isfinite(value)):
            lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def trial_record(t, goal: Goal) -> dict[str, Any]:
    """One trial as data (trial.json, a row of trials.csv): `value` is its validation accuracy, `cost` its
    second objective (two objectives only); `feasible` is False when it broke --max-train-seconds."""
    values = t.values or [None, None]
    attrs = t.user_attrs
    return {"number": t.number, "state": t.state.name, "value": values[0],
            "cost": values[1] if goal.cost else None, "seed": attrs.get("seed"),
            "params": t.params, "val_acc": attrs.get("val_acc"), "val_acc_tta": attrs.get("val_acc_tta"),
            "train_seconds": attrs.get("train_seconds"), "flops": attrs.get("flops"),
            "epochs_done": attrs.get("epochs_done"),
            "intermediate_val_acc": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "last_intermediate": t.intermediate_values.get(t.last_step),
            "base": bool(attrs.get("base")), "over_budget": bool(attrs.get("over_budget")),
            "feasible": all(v <= 0 for v in t.constraints.values()), "error": attrs.get("error"),
            "seconds": t.duration.total_seconds() if t.duration else None, "config": attrs.get("config")}


TRIAL_COLUMNS = ("number", "state", "value", "cost", "val_acc", "val_acc_tta", "train_seconds", "flops",
                 "epochs_done", "seed", "base", "over_budget", "feasible", "last_intermediate")


def write_csv(path: Path, records: list[dict[str, Any]], columns: Sequence[str]) -> None:
    names = sorted({k for r in records for k in r["params"]})
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, *names], lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, **r["params"]} for r in records)  # no parameter shares a name with a column


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("number", "state", "value", "cost", "val_acc", "val_acc_tta", "train_seconds", "flops", "seed", "params")
    return {k: r[k] for k in keys}


def pareto_front(study, goal: Goal) -> list[dict[str, Any]]:
    """The feasible trials no other trial beats on both accuracy and cost (Optuna's best_trials), cheapest first."""
    if goal.cost is None:
        return []
    records = [trial_record(t, goal) for t in study.best_trials]
    return sorted(records, key=lambda r: (r["cost"], -r["value"], r["number"]))


def best_trial(study, goal: Goal, front: list[dict[str, Any]], budget: float | None) -> dict[str, Any] | None:
    """The most accurate feasible trial; with two objectives, of the front within `budget` (any cost when None)."""
    if goal.cost is None:
        try:
            return trial_record(study.best_trial, goal)
        except ValueError:  # no complete, feasible trial yet
            return None
    within = [r for r in front if budget is None or r["cost"] <= budget]
    return max(within, key=lambda r: (r["value"], -r["cost"])) if within else None


def write_outputs(study, out: Path, goal: Goal, about: dict[str, Any], budget: float | None) -> dict[str, Any]:
    """trials.csv, study.json, best.toml (with two objectives the front's files) from every process's trials."""
    trials = study.get_trials(deepcopy=False)
    records = [trial_record(t, goal) for t in trials]
    write_csv(out / "trials.csv", records, TRIAL_COLUMNS)
    front = pareto_front(study, goal)
    best = best_trial(study, goal, front, budget)
    base_trial = next((r for r in records if r["base"]), None)
    settings = study.user_attrs.get(SETTINGS_KEY, {})
    summary = {"study": study.study_name, **about, "eval_split": "val", "objective": goal.name,
               "directions": goal.directions, "cost": goal.cost_label or None, "budget": budget,
               "settings": settings, "trials": dict(Counter(t.state.name for t in trials)),
               "best": best and _brief(best), "base": base_trial and _brief(base_trial)}
    if goal.cost:
        summary["pareto"] = [_brief(r) for r in front]
        write_pareto(out, front, goal, study.study_name, settings)
    write_json(out / "study.json", summary)
    if best is not None:
        within = [f"the most accurate trial with {goal.cost_label} <= {budget:g}"] if budget is not None else []
        write_recipe(out / "best.toml", best, goal, settings,
                     f"best of study '{study.study_name}' ({about['storage']}), trial {best['number']}", *within,
                     "train it: python -m fastcifar.train --config THIS_FILE --data-dir ...")
    return summary


def write_recipe(path: Path, r: dict[str, Any], goal: Goal, settings: dict[str, Any], *title: str) -> None:
    results = [f"{ACCURACY_LABEL} {r['value']:.4f} on {settings.get('val_split')} held-out training images "
               f"(split seed {settings.get('split_seed')}), training seed {r['seed']}"]
    if goal.cost:
        results.append(f"{goal.cost_label}: {r['cost']:.4g}")
    write_text(path, recipe_toml(TrainConfig(**r["config"]), [*title, *results]))


def write_pareto(out: Path, front: list[dict[str, Any]], goal: Goal, study_name: str, settings: dict[str, Any]) -> None:
    (out / BUDGET_DIR).mkdir(exist_ok=True)
    for r in front:
        r["toml"] = f"{BUDGET_DIR}/trial-{r['number']:04d}.toml"
        write_recipe(out / r["toml"], r, goal, settings, f"trial {r['number']} of study '{study_name}': the most "
                     f"accurate trial with {goal.cost_label} <= {r['cost']:.4g}")
    for stale in set((out / BUDGET_DIR).glob("trial-*.toml")) - {out / r["toml"] for r in front}:
        stale.unlink()
    write_csv(out / "pareto.csv", front, ("number", "value", "cost", "val_acc", "val_acc_tta", "train_seconds",
                                          "flops", "seed", "toml"))


def draw_plots(study, goal: Goal) -> Iterator[tuple[str, Any]]:
    from optuna.visualization import matplotlib as vis

    # with one objective Optuna knows the direction and draws the best value so far; with two, the first
    accuracy = {"target_name": ACCURACY_LABEL, "target": (lambda t: t.values[0]) if goal.cost else None}
    plots = {"history": lambda: vis.plot_optimization_history(study, **accuracy),
             "importances": lambda: vis.plot_param_importances(study, **accuracy),
             "slice": lambda: readable_slice(vis.plot_slice(study, **accuracy))}
    if goal.cost:
        plots["pareto"] = lambda: pareto_plot(study, goal)
    for name, plot in plots.items():
        # constrained layout from the figure's creation on: colour bars get room of their own
        with warnings.catch_warnings(), pyplot().rc_context({"figure.constrained_layout.use": True}):
            warnings.simplefilter("ignore")  # "too few trials" notes from optuna
            try:
                axes = plot()
            except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError) as e:
                print(f"skipped {name}.png: {first_line(e)}", file=sys.stderr)
                continue
        figure = np.ravel(axes)[0].figure
        if name == "history":  # wider than the default: one point per trial
            figure.set_size_inches(8.5, 4.8)
        yield name, figure


def readable_slice(axes):
    """Optuna's slice plot with room for every panel and x tick labels that do not overlap (matplotlib's
    minor log tick labels run into each other on narrow panels): log axes at 1 and 3 times powers of ten."""
    from matplotlib.category import StrCategoryLocator
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    panels = np.ravel(axes)
    panels[0].figure.set_size_inches(2.8 * len(panels) + 1.2, 3.6)
    for ax in panels:
        if ax.get_xscale() == "log":
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif not isinstance(ax.xaxis.get_major_locator(), StrCategoryLocator):  # choices keep one tick each
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(axis="x", labelrotation=30)
    return axes


def pareto_plot(study, goal: Goal):
    """Optuna's Pareto-front plot (cost against accuracy; the front red, infeasible trials grey), the front
    joined as the best accuracy reachable at each cost, its points and the base configuration numbered."""
    from optuna.visualization import matplotlib as vis

    ax = vis.plot_pareto_front(study, targets=lambda t: (t.values[1], t.values[0]),
                               target_names=[goal.cost_label, ACCURACY_LABEL])
    front = pareto_front(study, goal)
    ax.step([r["cost"] for r in front], [r["value"] for r in front], where="post", color="tab:red", alpha=0.4)
    if goal.cost == "flops":
        ax.set_xscale("log")
    ax.autoscale_view()
    to_axes = ax.transScale + ax.transLimits  # data -> fractions of the axes, log scale included
    last = None
    for r in front:  # the trial numbers, each where the previous one leaves room
        here = to_axes.transform((r["cost"], r["value"]))
        if last is None or abs(here[0] - last[0]) > 0.07 or abs(here[1] - last[1]) > 0.045:
            ax.annotate(f"#{r['number']}", (r["cost"], r["value"]), textcoords="offset points", xytext=(5, -12),
                        fontsize=8)
            last = here
    base = next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                 if t.user_attrs.get("base")), None)
    if base is not None:
        ax.annotate(f"#{base.number} base", (base.values[1], base.values[0]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_title(f"study '{study.study_name}': {ACCURACY_LABEL} against {goal.cost_label}")
    ax.figure.set_size_inches(7.5, 5)
    return ax

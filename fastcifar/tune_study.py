"""The Optuna study behind fastcifar.tune: its storage, samplers, pruners, objectives and the settings that
make its trials comparable (a later invocation with other settings is refused, naming the flag).

    python -c "from fastcifar.tune_study import display_url; print(display_url('postgresql://me:pw@db/s'))"
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

from fastcifar.config import TrainConfig, recipe_values
from fastcifar.errors import UserError, first_line
from fastcifar.search_space import SearchSpace

SETTINGS_KEY = "fastcifar_settings"  # the study's user attribute holding study_settings()
FINISHED = tuple(s for s in optuna.trial.TrialState if s.is_finished())  # complete, pruned, failed: the --trials


@dataclass(frozen=True)
class Goal:
    """What a study optimizes: validation accuracy, and with two objectives a cost to minimize as well."""

    name: str
    cost: str | None = None       # the trial user attribute that is the second objective
    cost_label: str = ""          # how plots and tables name it

    @property
    def directions(self) -> list[str]:
        return ["maximize"] + (["minimize"] if self.cost else [])


GOALS = {goal.name: goal for goal in (
    Goal("accuracy"),
    Goal("accuracy-seconds", "train_seconds", "training seconds"),
    Goal("accuracy-flops", "flops", "FLOPs per run"),  # training + final evaluation (fastcifar.flops)
)}


def _parsed(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError:
        return None


def display_url(url: str) -> str:
    """`url` with its password masked, for everything printed or written (sqlalchemy renders it)."""
    parsed = _parsed(url)
    if parsed is None:  # mask anything between user: and @
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)
    return parsed.render_as_string(hide_password=True)


def open_storage(url: str):
    """An Optuna database storage for `url`. SQLite files get their folder created and a patient lock
    timeout, so several processes can share one file. Every running trial sends a heartbeat: the trial of
    a process that was killed is marked failed by the next process after `grace_period` seconds."""
    parsed = _parsed(url)
    sqlite = url.startswith("sqlite:")
    if sqlite and parsed is not None and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 120}} if sqlite else {}
    # two processes creating the tables of a new file at the same moment: the loser sees "table already
    # exists" (OperationalError) or a duplicate alembic version (IntegrityError), and retries
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=300)
        except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a locked or unreachable database
            reason = first_line(e)
            if type(e).__name__ not in ("OperationalError", "IntegrityError"):
                break
            time.sleep(0.5 + attempt)
    if parsed is not None and parsed.password:  # a driver may quote the URL back
        reason = reason.replace(parsed.password, "***")
    raise UserError(f"cannot open --storage {display_url(url)}: {reason}")


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler made afresh for each trial, seeded by a SeedSequence of (seed, trial number): one seeded
    sampler per process would draw the same values in every process given the same --seed, and again in a resumed
    invocation. Trial numbers are unique within a study, so no two trials share a draw, and a study run from scratch
    is reproducible from its seed. Samplers keep their state in the storage, so a fresh one per trial loses nothing."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}

    def _of(self, trial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._samplers:
            seed = np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]
            self._samplers[trial.number] = self._make(int(seed))
        return self._samplers[trial.number]

    def before_trial(self, study, trial) -> None:
        self._of(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._of(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._of(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._of(trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)


def make_sampler(name: str, space: SearchSpace, seed: int, startup_trials: int):
    """The --sampler, seeded per trial; the grid sampler as it is, since it already gives trial N the N-th
    point of its (seeded) shuffle of the grid. TPE's settings are spelled out because Optuna's defaults
    change between releases: multivariate TPE, and the constant liar that keeps parallel workers apart."""
    samplers = optuna.samplers
    if name == "grid":
        return samplers.GridSampler(space.grid(), seed=seed)
    make = {"random": lambda s: samplers.RandomSampler(seed=s),
            "nsga2": lambda s: samplers.NSGAIISampler(population_size=startup_trials, seed=s),
            "tpe": lambda s: samplers.TPESampler(seed=s, n_startup_trials=startup_trials, multivariate=True,
                                                 constant_liar=True)}
    return TrialSeededSampler(make[name], seed)


def make_pruner(name: str, prune_after: int):
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=prune_after),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3),
            "none": optuna.pruners.NopPruner}[name]()


def study_settings(base: TrainConfig, space: SearchSpace, preset: str, goal: Goal,
                   max_train_seconds: float | None) -> dict[str, Any]:
    """Everything the trials of one study must share, as JSON data. Not --seed (recorded per trial), nor where
    and how trials run (device, data path, torch.compile), so machines of several kinds can share one study."""
    searched = {p.name for p in space.params}
    recipe = {name: value for name, value in recipe_values(space.apply(base, {})).items() if name not in searched}
    settings = {"preset": preset, "objective": goal.name, "max_train_seconds": max_train_seconds,
                "space": space.describe(), **recipe}
    return json.loads(json.dumps(settings))  # as the storage gives it back: tuples become lists


def first_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    key = next((k for k in {**current, **stored} if stored.get(k) != current.get(k)), None)
    if key is None:
        return None
    old, new = stored.get(key), current.get(key)
    if key == "space":  # the first field whose range, choices or fixed value differs
        old, new = ({**space["fixed"], **space["params"]} for space in (old, new))
        name = next(n for n in {**new, **old} if old.get(n) != new.get(n))
        return (f"--space: '{name}' is {json.dumps(new.get(name, 'not searched'))} here, "
                f"{json.dumps(old.get(name, 'not searched'))} in the study")
    old, new = ("not given" if value is None else json.dumps(value) for value in (old, new))
    return f"--{key.replace('_', '-')} {new} (the study's: {old})"


def open_study(storage, name: str, goal: Goal, sampler, pruner, settings: dict[str, Any], url: str,
               replace: bool = False) -> tuple[Any, str]:
    """(the study `name`, "created", "continued" or "replaced"). A study of that name made under other
    settings is a UserError naming the first flag that differs; with `replace` it is deleted and made
    anew. Creating is atomic in the storage: of several processes starting together, one creates."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=goal.directions,
                                    sampler=sampler, pruner=pruner)
        study.set_user_attr(SETTINGS_KEY, settings)
        return study, "created"
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)
    stored = study.user_attrs.get(SETTINGS_KEY)
    if stored is None:  # its creator is about to record them, or it predates them: these are its settings
        study.set_user_attr(SETTINGS_KEY, settings)
    difference = first_difference(stored or settings, settings)
    if difference is None:
        return study, "continued"
    if not replace:
        raise UserError(f"study '{name}' in {display_url(url)} was made with other settings, so its trials are "
                        f"not comparable with this command's: {difference}; use the study's settings, another "
                        "--study name, or --new-study to replace it")
    with contextlib.suppress(KeyError):  # another worker replaced it first
        optuna.delete_study(study_name=name, storage=storage)
    study, status = open_study(storage, name, goal, sampler, pruner, settings, url)
    return study, "replaced" if status == "created" else status  # continued: another worker replaced it

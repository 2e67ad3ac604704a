"""fastcifar.tune_study: a storage URL's password never shows, whether the URL parses or a driver quotes it; each
--sampler and --pruner name builds its own kind; a changed setting is named with both of its values."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

import fastcifar.tune_study as tune_study  # noqa: E402
from fastcifar.config import TrainConfig  # noqa: E402
from fastcifar.errors import UserError  # noqa: E402
from fastcifar.search_space import load_search_space  # noqa: E402
from tune_helpers import space_file  # noqa: E402


def test_display_url_masks_the_password_and_keeps_the_rest():
    url = "postgresql://tuner:s3cret-pw@db.example:5432/studies"
    assert tune_study.display_url(url) == "postgresql://tuner:***@db.example:5432/studies"
    assert tune_study.display_url("sqlite:///runs/tune.db") == "sqlite:///runs/tune.db"


def test_an_unparseable_url_still_has_its_password_masked():
    shown = tune_study.display_url("postgresql+psycopg2//tuner:s3cret-pw@db.example/x")  # the colon forgotten
    assert "s3cret" not in shown and "tuner:***@db.example" in shown


def test_a_storage_error_that_quotes_the_url_is_masked(monkeypatch):
    url = "postgresql://tuner:s3cret-pw@db.example:5432/studies"

    class OperationalError(Exception):
        pass

    def refuse(u, **kwargs):
        raise OperationalError(f"could not connect to {u} (password s3cret-pw rejected)")

    monkeypatch.setattr(tune_study.optuna.storages, "RDBStorage", refuse)
    monkeypatch.setattr(tune_study.time, "sleep", lambda s: None)
    with pytest.raises(UserError) as caught:
        tune_study.open_storage(url)
    assert "s3cret" not in str(caught.value) and "tuner:***@db.example" in str(caught.value)


GRID_SPACE = "[lr]\nlow = 0.2\nhigh = 0.6\nstep = 0.4\n\n[cutout]\nchoices = [0, 8]\n"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # TPE's multivariate, constant liar
@pytest.mark.parametrize("name, kind, settings", [
    ("random", "RandomSampler", {}),
    ("nsga2", "NSGAIISampler", {"population_size": 5}),
    ("tpe", "TPESampler", {"n_startup_trials": 5, "multivariate": True, "constant_liar": True}),
])
def test_each_sampler_name_builds_its_sampler_per_trial(tmp_path, monkeypatch, name, kind, settings):
    """Sabotage: a name mapped to another sampler (random building TPE), or TPE's settings dropped."""
    made = []
    for cls in ("RandomSampler", "NSGAIISampler", "TPESampler"):
        real = getattr(optuna.samplers, cls)
        monkeypatch.setattr(optuna.samplers, cls,
                            lambda _real=real, _cls=cls, **kw: made.append((_cls, kw)) or _real(**kw))
    space = load_search_space(space_file(tmp_path, GRID_SPACE), TrainConfig())
    sampler = tune_study.make_sampler(name, space, seed=0, startup_trials=5)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for _ in range(2):
        study.ask().suggest_float("lr", 0.2, 0.6)
    assert [cls for cls, _ in made] == [kind, kind]  # one per trial
    assert all(kw.items() >= settings.items() and "seed" in kw for _, kw in made)
    assert made[0][1]["seed"] != made[1][1]["seed"]


def test_the_grid_sampler_walks_the_spaces_grid(tmp_path):
    space = load_search_space(space_file(tmp_path, GRID_SPACE), TrainConfig())
    sampler = tune_study.make_sampler("grid", space, seed=0, startup_trials=5)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    study = optuna.create_study(sampler=sampler)
    points = {(t.suggest_float("lr", 0.2, 0.6), t.suggest_categorical("cutout", [0, 8]))
              for t in (study.ask() for _ in range(4))}
    assert points == {(lr, cutout) for lr in (0.2, 0.6) for cutout in (0, 8)}


@pytest.mark.parametrize("name, kind", [("median", "MedianPruner"), ("hyperband", "HyperbandPruner"),
                                        ("none", "NopPruner")])
def test_each_pruner_name_builds_its_pruner(name, kind):
    assert type(tune_study.make_pruner(name, prune_after=3)) is getattr(optuna.pruners, kind)


def test_first_difference_names_the_flag_with_this_commands_value_then_the_studys():
    """Sabotage: the two sides swapped, or one side showing the other's value."""
    def settings(lr_high: float, epochs: float | None, cutout: dict | None) -> dict:
        params = {"lr": {"kind": "float", "low": 0.2, "high": lr_high, "log": False, "step": None}}
        if cutout is not None:
            params["cutout"] = cutout
        return {"preset": "default", "space": {"params": params, "fixed": {"width": 4}}, "epochs": epochs}

    choice = {"kind": "choice", "choices": [0, 8]}
    study = settings(0.8, 1.0, choice)
    assert tune_study.first_difference(study, settings(0.8, 1.0, choice)) is None
    assert tune_study.first_difference(study, settings(0.8, 2.0, choice)) == "--epochs 2.0 (the study's: 1.0)"
    assert tune_study.first_difference(study, settings(0.8, None, choice)) == "--epochs not given (the study's: 1.0)"
    assert tune_study.first_difference(study, settings(0.9, 1.0, choice)) == (
        '--space: \'lr\' is {"kind": "float", "low": 0.2, "high": 0.9, "log": false, "step": null} here, '
        '{"kind": "float", "low": 0.2, "high": 0.8, "log": false, "step": null} in the study')
    assert tune_study.first_difference(study, settings(0.8, 1.0, None)) == (
        '--space: \'cutout\' is "not searched" here, {"kind": "choice", "choices": [0, 8]} in the study')

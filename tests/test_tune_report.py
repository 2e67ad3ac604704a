"""fastcifar.tune_report: best.toml's recipe round-trips through TrainConfig; the slice plot stays readable and
every plot draws the accuracy; trials.csv's exact bytes."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from fastcifar import tune_report  # noqa: E402
from fastcifar.config import PRESETS, load_toml, parse_config  # noqa: E402
from fastcifar.tune_report import draw_plots, recipe_toml, write_csv  # noqa: E402
from fastcifar.tune_study import GOALS  # noqa: E402


def test_recipe_toml_round_trips_through_train_config(tmp_path):
    config, _ = parse_config(["--preset", "speedrun", "--lr", "1e-05", "--out-dir", "x", "--val-split", "9"])
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(config, ["a comment"]))
    loaded = load_toml(path)
    assert "out_dir" not in loaded and "val_split" not in loaded and "compile" not in loaded
    again, _ = parse_config(["--config", str(path)])
    for name, value in loaded.items():
        assert getattr(again, name) == getattr(config, name), name
    assert again.lr == 1e-05 and again.whiten and again.epochs == PRESETS["speedrun"]["epochs"]


def overlapping(boxes: list) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


def test_slice_plot_panels_colour_bar_and_tick_labels_do_not_overlap():
    """Seven parameters, two of them on a log scale over two decades: every panel, the colour bar and
    every tick label of an axis get their own room."""
    import optuna

    def objective(trial):
        trial.suggest_float("lr", 0.1, 2.0, log=True)
        trial.suggest_float("weight_decay", 5e-5, 5e-3, log=True)
        for name in ("pct_start", "label_smoothing", "div_factor"):
            trial.suggest_float(name, 0.0, 1.0)
        trial.suggest_categorical("batch_size", [128, 256, 512])
        return trial.suggest_categorical("translate", [2, 4]) / 10

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=12)
    figure = dict(draw_plots(study, GOALS["accuracy"]))["slice"]
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    assert len(figure.axes) == 8  # seven panels and the colour bar
    assert overlapping([ax.get_window_extent(renderer) for ax in figure.axes]) == []
    for ax in figure.axes[:-1]:
        labels = [t.get_window_extent(renderer) for t in ax.get_xticklabels(which="both")
                  if t.get_visible() and t.get_text()]
        assert overlapping(labels) == [], (ax.get_xlabel(), [t.get_text() for t in ax.get_xticklabels(which="both")])


@pytest.mark.parametrize("goal", ["accuracy", "accuracy-seconds"])
def test_every_plot_draws_the_accuracy(monkeypatch, goal):
    """With two objectives Optuna must be told which to draw: the first, the accuracy. Sabotage: the target
    picking the cost (values[1]), or the label lost."""
    from optuna.visualization import matplotlib as vis

    from fastcifar.plots import pyplot

    seen = {}

    def spy(name):
        def plot(study, target=None, target_name=None):
            seen[name] = (target, target_name)
            return pyplot().subplots()[1]
        return plot

    for name in ("plot_optimization_history", "plot_param_importances", "plot_slice"):
        monkeypatch.setattr(vis, name, spy(name))
    monkeypatch.setattr(tune_report, "pareto_plot", lambda study, goal: pyplot().subplots()[1])
    two = GOALS[goal].cost is not None
    study = optuna.create_study(directions=GOALS[goal].directions)
    for acc, cost in [(0.5, 30.0), (0.7, 10.0)]:
        trial = study.ask()
        trial.suggest_float("lr", 0.1, 1.0)
        study.tell(trial, [acc, cost] if two else acc)
    figures = dict(draw_plots(study, GOALS[goal]))
    assert list(figures) == ["history", "importances", "slice", *(["pareto"] if two else [])]
    assert len(seen) == 3
    for name, (target, label) in seen.items():
        assert label == "validation accuracy", name
        if two:
            assert [target(t) for t in study.trials] == [0.5, 0.7], name
        else:  # Optuna draws the one objective, and knows its direction
            assert target is None, name
    pyplot().close("all")


def test_trials_csv_is_the_columns_then_the_sorted_parameters_with_newline_line_ends(tmp_path):
    records = [{"number": 0, "value": 0.5, "state": "COMPLETE", "params": {"lr": 0.1, "cutout": 8}},
               {"number": 1, "value": None, "state": "PRUNED", "params": {"lr": 0.25}}]
    write_csv(tmp_path / "trials.csv", records, ("number", "state", "value"))
    assert (tmp_path / "trials.csv").read_bytes() == (b"number,state,value,cutout,lr\n"
                                                      b"0,COMPLETE,0.5,8,0.1\n"
                                                      b"1,PRUNED,,,0.25\n")
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]  # no temporary file left

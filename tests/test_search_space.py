"""fastcifar.search_space: the TOML format its docstring shows, field types and grid values, the default space,
and the checks on fixed values, booleans and grids."""

from __future__ import annotations

import pytest

import fastcifar.search_space
from fastcifar.config import TrainConfig, parse_config
from fastcifar.errors import UserError
from fastcifar.search_space import DEFAULT_SPACE, load_search_space
from tune_helpers import space_file


def docstring_example() -> str:
    """The indented TOML example of fastcifar.search_space's docstring."""
    doc = fastcifar.search_space.__doc__
    block = doc[doc.index("    width = 16"):doc.index("Integer fields")]
    return "\n".join(line[4:] for line in block.splitlines())


def test_the_docstring_example_space_loads(tmp_path):
    space = load_search_space(space_file(tmp_path, docstring_example()), TrainConfig())
    assert space.fixed == {"width": 16}
    assert [p.name for p in space.params] == ["lr", "epochs", "batch_size"]


def test_space_types_and_grid_values(tmp_path):
    space = load_search_space(space_file(tmp_path, "width = 8\n[epochs]\nlow = 1\nhigh = 2\nstep = 0.5\n\n"
                                                   "[batch_size]\nlow = 128\nhigh = 512\nstep = 128\n\n"
                                                   "[prep_kernel]\nchoices = [2, 3]\n"), TrainConfig())
    assert space.grid() == {"epochs": [1.0, 1.5, 2.0], "batch_size": [128, 256, 384, 512], "prep_kernel": [2, 3]}
    assert space.fixed == {"width": 8} and space.apply(TrainConfig(), {"epochs": 1.5}).width == 8
    assert "lr" in {p.name for p in load_search_space(None, TrainConfig()).params}


def test_a_grid_needs_a_finite_set_of_values_for_every_field(tmp_path):
    """--sampler grid walks SearchSpace.grid(): a float range needs a step (or choices)."""
    space = load_search_space(space_file(tmp_path, "[lr]\nlow = 0.1\nhigh = 1.0\n\n[cutout]\nchoices = [0, 8]\n"),
                              TrainConfig())
    with pytest.raises(UserError, match="--sampler grid needs a finite set of values for 'lr'"):
        space.grid()


def test_the_default_space_samples_rates_and_decays_on_a_log_scale():
    """Sabotage caught: `log = true` dropped from DEFAULT_SPACE's lr or weight_decay (a linear draw between
    0.1 and 2.0 would spend nine tenths of the trials above 0.3)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    space = tomllib.loads(DEFAULT_SPACE)
    assert space["lr"].get("log") is True and space["weight_decay"].get("log") is True


@pytest.mark.parametrize("preset", ["default", "speedrun"])
def test_the_default_space_holds_each_presets_values(preset):
    """Either recipe can run as the first trial of a search without --space."""
    base, _ = parse_config(["--preset", preset])
    assert all(p.contains(getattr(base, p.name)) for p in load_search_space(None, base).params)


@pytest.mark.parametrize("text, message", [
    ("width = 0\n\n[lr]\nlow = 0.1\nhigh = 1.0\n", "fixed values in"),
    ("width = true\n", "'width' in"),
    ("[lr]\nchoices = [0.1, true]\n", "'lr' in"),
], ids=["fixed-width-0", "width-true", "lr-choice-true"])
def test_fixed_values_are_checked_and_a_boolean_is_no_number(tmp_path, text, message):
    """Sabotage: _check_values without the fixed values (a bad one blamed on a range, or not checked at all in a
    space of fixed values only); _checked_value taking true for an int or float (width = true trains width 1)."""
    with pytest.raises(UserError, match=message):
        load_search_space(space_file(tmp_path, text), TrainConfig())

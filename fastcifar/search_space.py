"""A hyperparameter search space read from TOML: which training fields to vary, over what values.

    python -m fastcifar.tune --space bench/tune_space_cpu.toml --val-split 5000 --data-dir ...

One table per training field (the flag name with underscores), holding a range or a list of choices; a
plain value fixes the field for every trial. Fixed values and one-line tables come first: TOML puts every
key after a `[table]` header into that table, so a `width = 16` below `[batch_size]` would be one of its keys.

    width = 16                                    # fixed
    lr = {low = 0.1, high = 1.0, log = true}      # a float range; log = true samples its logarithm (rates, decays)
    epochs = {low = 1.0, high = 2.0, step = 0.5}  # a range with a step is discrete (what --sampler grid needs)

    [batch_size]                                  # choices, for any field (the only way to vary a string or bool)
    choices = [256, 512]

Integer fields get integer ranges. Every value is checked against the training validation up front, so a
bad bound fails before the first trial, naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fastcifar.config import TrainConfig, field_choices, non_recipe_fields, read_toml, tomllib, validate
from fastcifar.errors import UserError

# Fields a search must not vary: where and how a trial runs, and the seed and split it is compared on.
NOT_SEARCHABLE = non_recipe_fields() | {"val_split", "split_seed"}

# The search without --space: the One Cycle schedule and the regularizers; every range holds the default and
# speedrun presets' values (either runs as the first trial); rates and factors vary on a log scale.
DEFAULT_SPACE = """
lr = {low = 0.1, high = 2.0, log = true}
pct_start = {low = 0.1, high = 0.5}
div_factor = {low = 5.0, high = 100.0, log = true}
final_div_factor = {low = 2.0, high = 1000.0, log = true}
weight_decay = {low = 5e-5, high = 5e-3, log = true}
label_smoothing = {low = 0.0, high = 0.3}
batch_size = {choices = [128, 256, 512, 1024]}
"""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                       # "int", "float" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        return value in self.choices if self.kind == "choice" else self.low <= value <= self.high

    def grid_values(self, source: str) -> list[Any]:
        if self.kind == "choice":
            return list(self.choices)
        if self.step is None and self.kind == "float":
            raise UserError(f"--sampler grid needs a finite set of values for '{self.name}' in {source}: "
                            "give it choices = [...] or a step")
        step = self.step or 1
        count = int((self.high - self.low) / step + 1e-9) + 1  # low < high: truncation is floor
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]


@dataclass
class SearchSpace:
    params: list[Param]
    fixed: dict[str, Any]
    source: str

    def describe(self) -> dict[str, Any]:
        """The space as JSON data: what a study records, so a later invocation can tell a changed space."""
        params = {p.name: {"kind": p.kind, "choices": list(p.choices)} if p.kind == "choice" else
                  {"kind": p.kind, "low": p.low, "high": p.high, "log": p.log, "step": p.step}
                  for p in self.params}
        return {"params": params, "fixed": dict(self.fixed)}

    def grid(self) -> dict[str, list[Any]]:
        return {p.name: p.grid_values(self.source) for p in self.params}

    def apply(self, base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
        return dataclasses.replace(base, **self.fixed, **values)


def load_search_space(path: str | Path | None, base: TrainConfig) -> SearchSpace:
    """The TOML search space at `path` (DEFAULT_SPACE when None), checked against the `base` it modifies."""
    if path is None:
        data, source = tomllib.loads(DEFAULT_SPACE), "the default space (fastcifar.search_space.DEFAULT_SPACE)"
    else:
        data, source = read_toml(path, "search space file", "--space"), str(path)
    if not data:
        raise UserError(f"search space is empty ({source}): add a table such as [lr] low = 0.1 high = 1.0")
    kinds = {f.name: str(f.type) for f in fields(TrainConfig)}  # "int", "float", "bool", "str | None", ...
    params, fixed = [], {}
    for name, spec in data.items():
        if name not in kinds:
            raise UserError(f"unknown field '{name}' in search space ({source}): keys are the training flag "
                            "names with underscores, see python -m fastcifar.train --help")
        if name in NOT_SEARCHABLE:
            raise UserError(f"'{name}' cannot be searched ({source}): set it with --{name.replace('_', '-')} "
                            "on the command line instead")
        if isinstance(spec, dict):
            params.append(_param(name, spec, kinds, source))
        else:
            fixed[name] = _checked_value(name, spec, kinds[name], source)
    space = SearchSpace(params, fixed, source)
    _check_values(space, base)
    return space


def _param(name: str, spec: dict[str, Any], kinds: dict[str, str], source: str) -> Param:
    kind, where = kinds[name], f"[{name}] in {source}"
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown and unknown[0] in kinds:
        raise UserError(f"'{unknown[0]}' is inside the table {where}, since TOML puts every key after a [table] "
                        f"header into it: move '{unknown[0]} = ...' above the first table to fix it")
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}': a table holds choices = [...], or low and high "
                        "(and optionally log or step)")
    if "choices" in spec:
        choices = spec["choices"]
        if len(spec) > 1 or not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: use either a non-empty choices = [...] list or low/high, not both")
        return Param(name, "choice", choices=tuple(_checked_value(name, c, kind, source) for c in choices))
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: a range needs low and high (and optionally log or step), "
                        f"got {', '.join(sorted(spec)) or 'nothing'}")
    if kind not in ("int", "float"):
        raise UserError(f"{where}: '{name}' is a {kind} field, so it takes choices = [...], not a range")
    low, high = (_checked_value(name, spec[k], kind, source) for k in ("low", "high"))
    step = _checked_value(name, spec["step"], kind, source) if "step" in spec else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false")
    if not low < high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    if log and (low <= 0 or step not in (None, 1)):
        raise UserError(f"{where}: a log range needs low > 0 and no step")
    if step is not None and step <= 0:
        raise UserError(f"{where}: step must be > 0")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _checked_value(name: str, value: Any, kind: str, source: str) -> Any:
    """`value` as the field's type (an int is accepted for a float field), or a UserError."""
    allowed = field_choices(name)
    if allowed is not None:  # a Literal[...] field: its own values, whatever their type
        if value not in allowed:
            raise UserError(f"'{name}' in {source} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "bool | None": isinstance(value, bool)}.get(kind, isinstance(value, str))
    if not ok:
        raise UserError(f"'{name}' in {source} must be {kind.replace(' | None', '')} values, got {value!r}")
    return float(value) if kind == "float" else value


def _check_values(space: SearchSpace, base: TrainConfig) -> None:
    checks = [({}, "fixed values")] + [({p.name: v}, f"search space value {p.name} = {v!r}") for p in space.params
                                       for v in (p.choices if p.kind == "choice" else (p.low, p.high))]
    for values, what in checks:
        try:
            validate(space.apply(base, values))
        except UserError as e:
            raise UserError(f"{what} in {space.source} {'is' if values else 'are'} invalid: {e}") from None

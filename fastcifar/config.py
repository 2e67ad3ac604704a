"""Training configuration: one dataclass, the presets, TOML files and the argparse parser built from them.

Precedence, lowest first: dataclass defaults < `--preset` < `--config FILE` < flags on the command line.
Every field is a flag (`batch_size` -> `--batch-size`; booleans get `--x/--no-x`), so `--help` lists them
all with their defaults, and `config.json` in a run directory is `dataclasses.asdict(config)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from fastcifar.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    # data
    data_dir: str | None = None        # image-folder tree/archive or official CIFAR-10 files; None = cache/download
    download: bool = False             # fetch the official files into the cache when missing
    out_dir: str | None = None         # run directory; None = runs/<preset>-<timestamp>
    overwrite: bool = False            # allow replacing an existing run directory's results
    pipeline: str = "gpu"              # gpu = device-resident fast loader; albumentations = the reference
    workers: int = 2                   # DataLoader workers for the albumentations pipeline
    val_split: int = 0                 # hold out N training images (stratified) and evaluate on them, not the test set
    split_seed: int = 0                # which N images --val-split holds out
    # model
    width: int = 64                    # prep-layer channels; stages are width x (1, 2, 4, 8)
    logit_scale: float = 0.125         # logits multiplier (Page); 1.0 = plain net
    # schedule (OneCycleLR, stepped per batch)
    epochs: float = 24                 # passes over the data; a fraction ends the last one early (airbench: 9.9)
    batch_size: int = 512              # per process; with torchrun the global batch is this x world size
    optimizer: str = "sgd"             # sgd (Nesterov) or adam
    lr: float = 0.4                    # peak learning rate of the one cycle
    pct_start: float = 0.21            # fraction of steps spent warming up (5 of 24 epochs)
    div_factor: float = 20.0           # initial lr = lr / div_factor
    final_div_factor: float = 200.0    # final lr = initial lr / final_div_factor
    anneal: str = "linear"             # linear or cos
    momentum: float = 0.9              # SGD momentum / Adam beta1 at the ends of the cycle
    min_momentum: float = 0.85         # ... cycled down to this at the peak lr (set equal to disable)
    weight_decay: float = 5e-4         # L2 on all weights, with the mean-reduced loss (Page's 5e-4*512 on the sum)
    label_smoothing: float = 0.2
    whiten: bool = False               # patch-whitening init of the first conv (airbench's trick)
    bn_weight: bool = True             # train the BatchNorm scales; --no-bn-weight freezes them at 1 (airbench)
    bias_lr: float = 1.0               # lr multiplier for BatchNorm biases, same decay per step (airbench: 64)
    lookahead: bool = False            # every 5 steps pull the weights back to their EMA (airbench); ends on the EMA
    # augmentation
    translate: int = 4                 # random-crop padding, pixels
    pad_mode: str = "reflect"          # reflect or zeros
    flip: bool = True
    alt_flip: bool = False             # flip each image every other epoch (airbench) instead of at random
    cutout: int = 8                    # side of the cutout square, pixels; 0 disables
    # speed
    device: str = "auto"               # auto, cuda, mps or cpu
    amp: bool = True                   # bf16 autocast where supported, else fp16 + GradScaler
    channels_last: bool = True
    compile: bool | None = None        # torch.compile; None = on for CUDA only (compiling costs minutes on a CPU)
    compile_mode: str = "default"      # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune
    sync_bn: bool = False              # torchrun on CUDA: BatchNorm statistics over the global batch
    # runs and evaluation
    seed: int = 0
    runs: int = 1                      # seeds seed .. seed+runs-1; reports mean +- std
    eval_every: int = 1                # evaluate every N epochs (and always after the last)
    tta: bool = True                   # also report flip test-time augmentation
    tta_translate: int = 0             # TTA also averages views shifted by +-this many pixels (0: flip only)
    checkpoint_every: int = 1          # write a resumable checkpoint every N epochs (0: never)
    plots: bool = True                 # curves.png, confusion.png, misclassified.png


PRESETS: dict[str, dict[str, Any]] = {
    # Page-style ResNet-9 recipe: >= 94% in 24 epochs on a GPU with the default net.
    "default": {},
    # The original notebook: Adam + One Cycle + albumentations on the CPU, no AMP, no compile.
    "seed": dict(optimizer="adam", lr=4.79e-2, weight_decay=1e-4, pct_start=5 / 24, div_factor=100.0,
                 final_div_factor=100.0, anneal="linear", momentum=0.95, min_momentum=0.85, epochs=24,
                 batch_size=512, label_smoothing=0.0, logit_scale=1.0, pipeline="albumentations",
                 amp=False, compile=False, channels_last=False, tta=False),
    # The speedrun recipe. Tricks chosen on the CPU proxy (width 16, 5.5 epochs; bench/RESULTS.md): batch 256,
    # lr 0.6, label smoothing 0.1, logit scale 0.25, patch-whitening init, translate 2 without cutout, flip +
    # translate TTA. 10 epochs is David Page's count for 94% with a similar bag of tricks; not yet measured
    # on a GPU.
    "speedrun": dict(epochs=10, batch_size=256, lr=0.6, label_smoothing=0.1, logit_scale=0.25, whiten=True,
                     translate=2, cutout=0, tta_translate=1),
}

CHOICES = {"pipeline": ("gpu", "albumentations"), "optimizer": ("sgd", "adam"), "anneal": ("linear", "cos"),
           "pad_mode": ("reflect", "zeros"), "device": ("auto", "cuda", "mps", "cpu"),
           "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """Flag errors become UserError: one line and exit code 2 through run_cli, not a page of usage."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m fastcifar.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the custom ResNet-9 on CIFAR-10 with One Cycle. Defaults are the 'default' preset.")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="recipe whose values become the defaults")
    parser.add_argument("--config", metavar="FILE", help="TOML file of field = value; overrides the preset")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    comments = _field_comments()
    for f in fields(TrainConfig):
        kind = {"bool": bool, "bool | None": bool, "int": int, "float": float}.get(str(f.type), str)
        kw: dict[str, Any] = dict(default=f.default, help=comments.get(f.name, " "))
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
        parser.add_argument(_flag(f.name), dest=f.name, **kw)
    return parser


def _field_comments() -> dict[str, str]:
    """The `# ...` comment after each field above, reused as its --help text (one source of truth)."""
    import inspect

    out: dict[str, str] = {}
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):  # installed without sources: --help simply has no descriptions
        return out
    for line in source.splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip().replace("%", "%%")
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found ({path}): check the --config path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file is not valid TOML ({path}): {e}") from None
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}' in config file ({path}): "
                        f"keys are the flag names with underscores, see --help")
    return data


def layered_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with the preset's and the config file's values as defaults, so explicit flags win."""
    first, _ = parser.parse_known_args(argv)
    defaults = dict(PRESETS[first.preset])
    if first.config:
        defaults.update(load_toml(first.config))
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def parse_config(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse the command line into a validated TrainConfig (plus the namespace for --resume/--debug)."""
    args = layered_args(get_args_parser(), argv)
    config = config_from_args(args)
    validate(config)
    return config, args


def validate(c: TrainConfig) -> None:
    """Check every value up front, so a run never fails an hour in because of a typo."""
    checks = [
        (c.epochs > 0, "epochs", "must be > 0"),
        (c.batch_size >= 1, "batch_size", "must be >= 1"),
        (c.width >= 1, "width", "must be >= 1"),
        (c.lr > 0, "lr", "must be > 0"),
        (0 < c.pct_start < 1, "pct_start", "must be between 0 and 1 (exclusive)"),
        (c.div_factor > 0 and c.final_div_factor > 0, "div_factor", "div factors must be > 0"),
        (0 <= c.momentum < 1, "momentum", "must be in [0, 1)"),
        (0 <= c.min_momentum <= c.momentum, "min_momentum", f"must be in [0, --momentum={c.momentum}]; "
                                                             "lower it together with --momentum"),
        (c.weight_decay >= 0, "weight_decay", "must be >= 0"),
        (c.bias_lr > 0, "bias_lr", "must be > 0"),
        (0 <= c.label_smoothing < 1, "label_smoothing", "must be in [0, 1)"),
        (0 <= c.translate <= 16, "translate", "must be between 0 and 16 pixels"),
        (0 <= c.cutout <= 32, "cutout", "must be between 0 and 32 pixels"),
        (0 <= c.tta_translate <= 4, "tta_translate", "must be between 0 and 4 pixels"),
        (c.runs >= 1, "runs", "must be >= 1"),
        (c.eval_every >= 1, "eval_every", "must be >= 1"),
        (c.checkpoint_every >= 0, "checkpoint_every", "must be >= 0"),
        (c.workers >= 0, "workers", "must be >= 0"),
        (c.val_split >= 0, "val_split", "must be >= 0 (0: evaluate on the test set)"),
        (c.logit_scale > 0, "logit_scale", "must be > 0"),
    ]
    for name, choices in CHOICES.items():
        value = getattr(c, name)
        checks.append((value in choices, name, f"must be one of {', '.join(choices)} (got {value!r})"))
    for ok, name, what in checks:
        if not ok:
            raise UserError(f"invalid {_flag(name)} ({getattr(c, name)!r}): {what}")


def to_dict(c: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(c)

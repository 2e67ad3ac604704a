"""Training configuration: one dataclass, the presets, TOML files and the argparse parser built from them.

Precedence, lowest first: dataclass defaults < `--preset` < `--config FILE` < flags on the command line.
Every field is a flag (`batch_size` -> `--batch-size`; booleans get `--x/--no-x`) whose help text, aliases and
allowed values (`Literal[...]`) live with the field. Fields marked `environment=True` describe where a run
executes and may change on `--resume`; all others are the recipe.

    python -m fastcifar.train --help
"""

from __future__ import annotations

import argparse
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Collection, Literal, Sequence

from fastcifar.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover  (Python 3.10: the tomli backport)
    import tomli as tomllib


def option(default: Any, help: str, *, aliases: tuple[str, ...] = (), environment: bool = False) -> Any:
    """A TrainConfig field with its --help text, extra flag names and whether --resume may change it."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "environment": environment})


@dataclass
class TrainConfig:
    # data
    data_dir: str | None = option(
        None, 'image-folder tree/archive or official CIFAR-10 files; None = cache/download', environment=True)
    download: bool = option(False, 'fetch the official files into the cache when missing', environment=True)
    out_dir: str | None = option(
        None, 'run directory (default: runs/YYYYmmdd-HHMMSS, the start time)', aliases=("--output-dir",))
    overwrite: bool = option(False, "allow replacing an existing run directory's results")
    pipeline: Literal["gpu", "albumentations"] = option(
        "gpu", 'gpu = the device-resident fast loader (on any --device); albumentations = the reference')
    workers: int = option(2, 'DataLoader workers for the albumentations pipeline', aliases=("-j",), environment=True)
    val_split: int = option(0, 'hold out N training images (stratified) and evaluate on them instead of the test set')
    split_seed: int = option(0, 'which N images --val-split holds out')
    # model
    width: int = option(64, 'prep-layer channels; stages are width x (1, 2, 4, 8)')
    widths: str = option('', 'prep,layer1,layer2,layer3 channels, e.g. 24,64,256,256; empty = from --width')
    residual: str = option('1,3', 'layers (of 1,2,3) followed by a residual block; empty = none')
    prep_kernel: Literal[3, 2] = option(3, 'first conv: 3 = 3x3 padded; 2 = 2x2 unpadded patches (airbench)')
    activation: Literal["relu", "gelu"] = option("relu", 'activation after every BatchNorm')
    bn_momentum: float = option(0.1, "BatchNorm running-stats momentum, PyTorch's convention (airbench: 0.4)")
    logit_scale: float = option(0.125, 'logits multiplier (Page); 1.0 = plain net')
    plain: str = option('', 'layers (of 1,2,3) followed by one more conv-BN-activation, no skip (airbench); '
                        'empty = none')
    prep_bn: bool = option(True, 'BatchNorm after the first conv; --no-prep-bn: a conv bias instead (airbench)')
    bn_eps: float = option(1e-5, "BatchNorm eps (PyTorch's default; airbench: 1e-12)")
    fc_bias: bool = option(True, 'bias of the final linear layer (airbench: none)')
    dirac: bool = option(False, "identity init of each conv's first in_channels filters (airbench)")
    # schedule (OneCycleLR, stepped per batch)
    epochs: float = option(24, 'passes over the data; a fraction ends the last one early (airbench: 9.9)')
    step_rounding: Literal["round", "ceil"] = option(
        "round", 'whole steps of --epochs x steps per epoch: round (9.9 x 48 = 475) or ceil (airbench: 476)')
    batch_size: int = option(512, 'per process; with torchrun the global batch is this x world size', aliases=("-b",))
    optimizer: Literal["sgd", "adam", "muon"] = option(
        "sgd", 'sgd (Nesterov), adam, or muon: torch.optim.Muon for the conv filters, SGD for the rest')
    lr: float = option(0.4, 'peak learning rate of the one cycle')
    pct_start: float = option(0.21, 'fraction of steps spent warming up (5 of 24 epochs)')
    div_factor: float = option(20.0, 'initial lr = lr / div_factor')
    final_div_factor: float = option(200.0, 'final lr = initial lr / final_div_factor')
    anneal: Literal["linear", "cos"] = option("linear", 'lr annealing after the peak')
    muon_lr: float = option(0.05, '--optimizer muon: peak lr of the conv filters (scheduled like --lr)')
    muon_momentum: float = option(0.6, "--optimizer muon: Muon's Nesterov momentum (airbench94_muon: 0.6)")
    momentum: float = option(0.9, 'SGD momentum / Adam beta1 at the ends of the cycle')
    min_momentum: float = option(0.85, '... cycled down to this at the peak lr (set equal to disable)')
    weight_decay: float = option(5e-4, "L2 on all weights, with the mean-reduced loss (Page's 5e-4*512 on the sum)")
    label_smoothing: float = option(0.2, 'cross-entropy label smoothing')
    whiten: bool = option(False, "patch-whitening init of the first conv (airbench's trick)")
    whiten_bias_epochs: float = option(
        0.0, 'with --whiten and N > 0: the whitened conv stays frozen and the bias after it (its BatchNorm\'s, or '
        'its own with --no-prep-bn) trains '
        'for the first N epochs only (airbench: 3); 0 = the first layer trains like the others')
    whiten_bias_stop: Literal["lr", "grad"] = option(
        "lr", 'how that bias stops: lr = its scheduled lr becomes 0 (compiled graphs stay valid); grad = '
        "requires_grad off (airbench), which also skips the next layer's input gradient; one more compilation")
    bn_weight: bool = option(True, 'train the BatchNorm scales; --no-bn-weight freezes them at 1 (airbench)')
    bias_lr: float = option(1.0, 'lr multiplier for BatchNorm biases, same decay per step (airbench: 64)')
    lookahead: bool = option(False, 'every 5 steps pull the weights back to their EMA (airbench); ends on the EMA')
    # augmentation
    translate: int = option(4, 'random-crop padding, pixels')
    pad_mode: Literal["reflect", "zeros"] = option(
        "reflect", 'padding of the random crop; zeros = the channel mean after normalization')
    flip: bool = option(True, 'random horizontal flips')
    alt_flip: bool = option(False, 'flip each image every other epoch (airbench) instead of at random')
    cutout: int = option(8, 'side of the cutout square, pixels; 0 disables')
    # speed
    device: str = option("auto", 'auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N', environment=True)
    amp: bool = option(True, 'autocast in --amp-dtype (fp16 adds a GradScaler)')
    amp_dtype: Literal["auto", "bf16", "fp16"] = option(
        "auto", 'auto = bf16 where the device computes in it natively (CUDA capability >= 8.0, a CPU with '
        'AVX-512 BF16/AMX/Arm BF16); else fp16 on a GPU, fp32 (no autocast) on a CPU')
    channels_last: bool = option(True, 'channels_last memory format for images and weights')
    compile: bool | None = option(
        None, 'torch.compile; None = on for CUDA only (compiling costs minutes on a CPU)', environment=True)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = option(
        "default", 'torch.compile mode; reduce-overhead adds CUDA graphs', environment=True)
    sync_bn: bool = option(False, 'torchrun on CUDA: BatchNorm statistics over the global batch')
    # runs and evaluation
    seed: int = option(0, 'the first seed; also seeds the data order and augmentation')
    runs: int = option(1, 'seeds seed .. seed+runs-1; reports mean +- std')
    eval_every: int = option(1, 'evaluate every N epochs (and always after the last)', environment=True)
    tta: bool = option(True, 'also report flip test-time augmentation')
    tta_translate: int = option(0, 'TTA also averages views shifted by +-this many pixels (0: flip only)')
    checkpoint_every: int = option(1, 'write a resumable checkpoint every N epochs (0: never)', environment=True)
    plots: bool = option(True, 'curves.png, confusion.png, misclassified.png', environment=True)


# The speedrun recipe, measured in bench/RESULTS.md: 94% at airbench94's budget of work (0.36 PFLOP per run), a
# smaller net of the family with airbench94's optimizer settings in this trainer's units. airbench's lr and weight
# decay are "decoupled": per 1024 images of a summed loss, divided by Nesterov's step gain 1 + 1 / (1 - momentum).
# For our mean loss, lr = 11.5 / (1 + 1 / 0.15) = 1.5 and weight_decay = its per-step decay / lr = 0.0153 / 11.5.
_SPEEDRUN: dict[str, Any] = dict(
    widths="24,64,256,256",  # channels of prep, layer1..3: airbench94's; a quarter of the classic net's FLOPs
    residual="1,3",          # a residual block (two convs) after layers 1 and 3: where airbench has one conv
    prep_kernel=2,           # 2x2 unpadded patches into the first conv: 12 dims, 24 whitening filters
    activation="gelu",       # after every BatchNorm (airbench)
    bn_momentum=0.4,         # weight of each batch in the running stats (airbench's 0.6 is 1 - this)
    whiten=True,             # first conv = patch whitening of 5000 training images, frozen
    prep_bn=False,           # no BatchNorm after it: the whitening conv has a bias (1x the lr) and a GELU
    whiten_bias_epochs=3,    # epochs that bias trains, then stops (airbench: 3) ...
    whiten_bias_stop="grad",  # ... by requires_grad, which also skips layer 1's input gradient from then on
    dirac=True,              # each conv starts as the identity on its first in_channels filters (airbench)
    bn_eps=1e-12,            # BatchNorm eps: airbench's; 1e-5 lets the smallest variances shrink the signal
    fc_bias=False,           # no bias in the final linear layer: label smoothing keeps the classes balanced
    bn_weight=False,         # BatchNorm scales frozen at 1: the next conv scales freely
    bias_lr=64.0,            # BatchNorm biases: 64x the lr per step, 1/64 the weight decay (same decay per step)
    lookahead=True,          # every 5 steps the weights jump back to their EMA; the run ends on the EMA
    epochs=9.9,              # passes over the 50,000 training images (airbench94's budget) ...
    step_rounding="ceil",    # ... as ceil(48 x 9.9) = 476 steps of batch 1024
    batch_size=1024,         # images per step
    lr=1.5,                  # peak lr per step of the mean loss: airbench's 11.5 per 1024 images, decoupled
    weight_decay=1.33e-3,    # per unit lr per step (mean loss): airbench's 0.0153 per 1024 images / 11.5
    momentum=0.85,           # Nesterov, constant ...
    min_momentum=0.85,       # ... (equal: no momentum cycle)
    pct_start=0.23,          # fraction of the steps spent rising to the peak lr
    div_factor=5.0,          # the first step's lr is 1/5 = 0.2x the peak
    final_div_factor=0.2 / 0.07,  # relative to the first step's: the last step's lr is 0.07x the peak
    anneal="linear",         # straight lines up and down: airbench's triangle
    label_smoothing=0.2,     # of the one-hot targets, spread over the 10 classes
    logit_scale=1 / 9,       # multiplies the logits: keeps early softmax outputs soft at this high lr
    alt_flip=True,           # each image mirrored every other epoch (a random phase) instead of at random
    translate=2,             # random crops shifted up to 2 pixels (reflect padding)
    cutout=0,                # no cutout: 9.9 epochs are too few for it to pay
    tta_translate=1)         # final evaluation: flip + shifts by +-1 pixel, 6 views (airbench's TTA level 2)

PRESETS: dict[str, dict[str, Any]] = {
    # Page-style ResNet-9 recipe: >= 94% in 24 epochs on a GPU with the default net.
    "default": {},
    # The original notebook: Adam + One Cycle + albumentations on the CPU, no AMP, no compile.
    "seed": dict(optimizer="adam", lr=4.79e-2, weight_decay=1e-4, pct_start=5 / 24, div_factor=100.0,
                 final_div_factor=100.0, anneal="linear", momentum=0.95, min_momentum=0.85, epochs=24,
                 batch_size=512, label_smoothing=0.0, logit_scale=1.0, pipeline="albumentations",
                 amp=False, compile=False, channels_last=False, tta=False),
    "speedrun": _SPEEDRUN,
    # airbench94 0.1.8 itself in this trainer: the speedrun preset's values, and those where speedrun departs.
    "airbench94": {**_SPEEDRUN, **dict(
        residual="",             # no residual blocks ...
        plain="1,2,3",           # ... but one more conv-BN-GELU after each layer: airbench's ConvGroup
        weight_decay=0.0153 / 11.5)},  # per unit lr per step (mean loss): airbench's 0.0153 per 1024 images
}

# Fields that say where a run executes, not what it trains: --resume honours new values for them.
ENVIRONMENT_FIELDS = frozenset(f.name for f in fields(TrainConfig) if f.metadata["environment"])


def field_choices(name: str) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` field, or None for a free one."""
    hint = typing.get_type_hints(TrainConfig)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def non_recipe_fields() -> frozenset[str]:
    """Fields that are not the recipe: the environment plus where results go and which seeds run."""
    return ENVIRONMENT_FIELDS | {"out_dir", "overwrite", "seed", "runs"}


def recipe_values(config: TrainConfig) -> dict[str, Any]:
    """What identifies a recipe: every field of `config` but the non_recipe_fields()."""
    return {k: v for k, v in asdict(config).items() if k not in non_recipe_fields()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """Flag errors become UserError: one line and exit code 2 through run_cli, not a page of usage."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def split_at_double_dash(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(a wrapper's own flags, the training flags): everything after the first `--` goes to training."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut], argv[cut + 1:]


def get_args_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The parser; with `suppress_defaults`, flags not given are absent from the namespace (value_sources)."""
    parser = ArgumentParser(
        prog="python -m fastcifar.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the custom ResNet-9 on CIFAR-10 with One Cycle. Defaults are the 'default' preset.")
    none = argparse.SUPPRESS if suppress_defaults else None
    parser.add_argument("--preset", default=none or "default", choices=sorted(PRESETS),
                        help="recipe whose values become the defaults")
    parser.add_argument("--config", metavar="FILE", default=none,
                        help="TOML file of field = value; overrides the preset")
    parser.add_argument("--resume", metavar="RUN_DIR", default=none,
                        help="continue the run in RUN_DIR (or from RUN_DIR/checkpoint.pt) from its last checkpoint; "
                             "recipe flags must agree with the checkpoint, environment flags may change")
    parser.add_argument("--debug", action="store_true", default=none or False,
                        help="show tracebacks instead of one-line errors")
    parser.add_argument("--print-config", action="store_true", default=none or False,
                        help="print every field's value, where it came from and its meaning, then exit")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        types = (hints[f.name], *typing.get_args(hints[f.name]))  # `int | None` -> (int | None, int, NoneType)
        choices = field_choices(f.name)
        kw: dict[str, Any] = dict(default=none or f.default, help=f.metadata["help"].replace("%", "%%"))
        if bool in types:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            scalar = type(choices[0]) if choices else next(t for t in (int, float, str) if t in types)
            kw.update(type=scalar, choices=choices)
        names = sorted([_flag(f.name), *f.metadata["aliases"]], key=lambda name: name.startswith("--"))
        parser.add_argument(*names, dest=f.name, **kw)  # a short name first: usage shows the first name
    return parser


def read_toml(path: str | Path, what: str, flag: str) -> dict[str, Any]:
    """The TOML file at `path` (a `what` given by `flag`), or a one-line UserError saying what is wrong."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found ({path}): check the {flag} path") from None
    except OSError as e:  # a directory, no permission, ...
        raise UserError(f"cannot read {what} ({path}): {e.strerror}; check the {flag} path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} is not valid TOML ({path}): {e}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    data = read_toml(path, "config file", "--config")
    if unknown := sorted(set(data) - {f.name for f in fields(TrainConfig)}):
        raise UserError(f"unknown key '{unknown[0]}' in config file ({path}): "
                        f"keys are the flag names with underscores, see --help")
    return data


def layered_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with the preset's and the config file's values as defaults, so explicit flags win."""
    first, _ = parser.parse_known_args(argv)
    parser.set_defaults(**{**PRESETS[first.preset], **(load_toml(first.config) if first.config else {})})
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def parse_config(argv: Sequence[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The command line as a validated TrainConfig and its namespace, plus `args.sources` (value_sources) and
    `args.explicit`: the fields set on the command line, by --config or by an explicit --preset."""
    args = layered_args(get_args_parser(), argv)
    config = config_from_args(args)
    validate(config)
    args.sources = value_sources(argv)
    args.explicit = frozenset(name for name, source in args.sources.items() if source != "default")
    if args.sources["width"] == "flag" and config.widths:  # --widths (a preset's too) sets every stage
        raise UserError(f"invalid --width ({config.width}) with --widths ({config.widths}), which sets every "
                        "stage: scale --widths instead")
    return config, args


def value_sources(argv: Sequence[str] | None) -> dict[str, str]:
    """Where each field's value comes from: 'flag', 'config' (the --config file), 'preset NAME' or 'default'."""
    given = vars(get_args_parser(suppress_defaults=True).parse_args(argv))
    preset = PRESETS[given.get("preset", "default")]
    toml = load_toml(given["config"]) if "config" in given else {}
    return {f.name: "flag" if f.name in given else "config" if f.name in toml else
            f"preset {given['preset']}" if f.name in preset else "default" for f in fields(TrainConfig)}


def format_config(config: TrainConfig, sources: dict[str, str]) -> str:
    """One line per field: name, value, where it came from, and its --help text (the unit and meaning)."""
    return "\n".join(f"{f.name:<19} {getattr(config, f.name)!r:<22} {sources[f.name]:<19} {f.metadata['help']}"
                     for f in fields(TrainConfig))


def resume_config(saved: dict[str, Any], requested: TrainConfig, explicit: Collection[str] | None,
                  run_dir: str) -> TrainConfig:
    """The config of a resumed run: the checkpoint's recipe (load_resume checked it) with the environment fields the
    user set (those in `explicit`; None: all). A recipe field set otherwise than in the checkpoint is a UserError."""
    config = TrainConfig(**saved)
    for name in sorted(explicit if explicit is not None else (f.name for f in fields(TrainConfig))):
        new, old = getattr(requested, name), getattr(config, name)
        if name in ENVIRONMENT_FIELDS:
            setattr(config, name, new)
        elif name == "out_dir":
            if new is not None and Path(new).resolve() != Path(run_dir).resolve():
                raise UserError(f"{_flag(name)} ({new}) conflicts with --resume {run_dir}: a resumed run stays "
                                f"in its directory; drop {_flag(name)}")
        elif new != old:
            raise UserError(f"{_flag(name)} {new!r} conflicts with the checkpoint's {old!r}: --resume keeps the "
                            f"recipe of the run; drop {_flag(name)} or start a new run")
    config.out_dir = str(run_dir)
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    """Check every value up front, so a run never fails an hour in because of a typo."""
    widths, residual, plain = _int_list(c.widths), _int_list(c.residual), _int_list(c.plain)
    bounds = [(lambda v: v > 0, "must be > 0", ("epochs", "lr", "bias_lr", "logit_scale", "bn_eps", "muon_lr")),
              (lambda v: v >= 1, "must be >= 1", ("batch_size", "width", "runs", "eval_every")),
              (lambda v: v >= 0, "must be >= 0", ("weight_decay", "checkpoint_every", "workers")),
              (lambda v: 0 <= v < 1, "must be in [0, 1)", ("momentum", "label_smoothing", "muon_momentum"))]
    checks = [(ok(getattr(c, name)), name, what) for ok, what, names in bounds for name in names]
    checks += [
        (0 < c.pct_start < 1, "pct_start", "must be between 0 and 1 (exclusive)"),
        (c.div_factor > 0 and c.final_div_factor > 0, "div_factor", "div factors must be > 0"),
        (0 <= c.min_momentum <= c.momentum, "min_momentum", f"must be in [0, --momentum={c.momentum}]; "
                                                             "lower it together with --momentum"),
        (0 <= c.translate <= 16, "translate", "must be between 0 and 16 pixels"),
        (0 <= c.cutout <= 32, "cutout", "must be between 0 and 32 pixels"),
        # a reflection pad wider than 4 pixels shows more mirror than image
        (0 <= c.tta_translate <= 4, "tta_translate", "must be between 0 and 4 pixels"),
        (c.val_split >= 0, "val_split", "must be >= 0 (0: evaluate on the test set)"),
        (widths is not None and len(widths) in (0, 4) and all(w >= 1 for w in widths), "widths",
         "must be four channel counts >= 1, e.g. 24,64,256,256"),
        *[(layers is not None and set(layers) <= {1, 2, 3}, name, "must list layers among 1,2,3 (comma-separated), "
           "or be empty") for name, layers in (("residual", residual), ("plain", plain))],
        (0 < c.bn_momentum <= 1, "bn_momentum", "must be in (0, 1]"),
        (c.whiten_bias_epochs >= 0 and (c.whiten or not c.whiten_bias_epochs), "whiten_bias_epochs",
         "must be >= 0, and needs --whiten"),
        (bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(c.device))), "device",
         "must be auto, cpu, mps, cuda or cuda:N"),
    ]
    checks += [(getattr(c, f.name) in choices, f.name, f"must be one of {', '.join(map(str, choices))}")
               for f in fields(TrainConfig) if (choices := field_choices(f.name)) is not None]
    for ok, name, what in checks:
        if not ok:
            raise UserError(f"invalid {_flag(name)} ({getattr(c, name)!r}): {what}")


def _int_list(text: str) -> list[int] | None:
    """'24, 64' -> [24, 64]; '' -> []; None when an item is not an integer."""
    try:
        return [int(item) for item in str(text).split(",") if item.strip()]
    except ValueError:
        return None


def model_options(c: TrainConfig) -> dict[str, Any]:
    """The ModelConfig keyword arguments that the recipe sets."""
    return dict(width=c.width, logit_scale=c.logit_scale, widths=tuple(_int_list(c.widths)) or None,
                residual=tuple(_int_list(c.residual)), prep_kernel=c.prep_kernel, activation=c.activation,
                bn_momentum=c.bn_momentum, plain=tuple(_int_list(c.plain)), prep_bn=c.prep_bn, bn_eps=c.bn_eps,
                fc_bias=c.fc_bias, dirac=c.dirac)

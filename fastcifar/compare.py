"""A/B test of training configurations over the same seeds (paired), with a confidence interval.

    python -m fastcifar.compare default runs/tune/w16/best.toml --seeds 3 --out-dir runs/compare/best \\
        -- --data-dir ../shared/data/cifar10-png.tar.gz --width 16 --epochs 1.5 --device cpu

Each ARM is `[NAME=]SPEC`, SPEC being a preset name (`default`, `speedrun`), a TOML file for
`fastcifar.train --config`, or a quoted flag string (`"--lr 0.6 --label-smoothing 0.1"`; a single flag
without a value needs a name: `whiten=--whiten`). Flags after `--` apply to every arm, after its own
values. Every arm trains once per seed (seed-major order, so a stopped comparison stays paired), on the
test set, or with --val-split N on N held-out training images instead.

Reported per arm: mean +- std of the accuracy (with the arm's TTA when it has one, else plain) and of the
training seconds; per later arm against the first: the paired difference with a 95% t interval and the
paired t-test's p-value (fastcifar.stats), a verdict, and a markdown row for bench/RESULTS.md. OUT gets
results.json (rewritten after every run, so a second invocation skips finished runs; --seeds can grow),
runs/<arm>/seed-<s>/ (each run's directory) and strip.png (per-seed accuracy and time, pairs joined).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from fastcifar.atomic import write_json, write_text
from fastcifar.config import PRESETS, ArgumentParser, TrainConfig, non_recipe_fields, parse_config, \
    split_at_double_dash, to_dict
from fastcifar.errors import UserError, run_cli
from fastcifar.report import reported_accuracy
from fastcifar.stats import describe, paired_comparison

# Fields that differ between the runs of one arm, or do not change what is measured.


@dataclasses.dataclass
class Arm:
    name: str
    spec: str
    argv: list[str]  # the arm's own training flags


def parse_arm(text: str, index: int) -> Arm:
    """`[NAME=]SPEC` -> Arm; SPEC is a preset, a TOML file or a flag string."""
    name, spec = "", text.strip()
    head, sep, rest = spec.partition("=")
    if sep and head and not head.startswith("-") and " " not in head and "/" not in head:
        name, spec = head, rest.strip()
    if spec in PRESETS:
        argv = ["--preset", spec]
    elif spec.startswith("-"):
        argv = shlex.split(spec)
    elif spec.endswith(".toml") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise UserError(f"arm {index + 1}: config file not found ({spec}): check the path")
        argv = ["--config", spec]
    else:
        raise UserError(f"arm {index + 1} ({spec!r}) is not a preset ({', '.join(PRESETS)}), an existing .toml "
                        "file or a flag string starting with --")
    if not name:
        name = Path(spec).stem if argv[0] == "--config" else spec if argv[0] == "--preset" else \
            "".join(c if c.isalnum() or c in "._" else "-" for c in spec.lstrip("-")).strip("-")[:40]
    return Arm(name, spec, argv)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fastcifar.compare", description=__doc__.split("\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            epilog="Training flags for every arm go after --, e.g. -- --width 16 --epochs 2")
    parser.add_argument("arms", nargs="+", metavar="ARM", help="[NAME=]preset, TOML file or quoted flag string")
    parser.add_argument("--seeds", type=int, default=3, help="runs per arm, seeds --first-seed onwards")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="results directory (default runs/compare/<arm names>)")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def arm_config(arm: Arm, common: list[str], seed: int, run_dir: Path) -> TrainConfig:
    """The arm's configuration for one seed: its flags, then the common ones, then the run's own."""
    config, _ = parse_config([*arm.argv, *common, "--seed", str(seed), "--runs", "1", "--out-dir", str(run_dir),
                              "--overwrite", "--checkpoint-every", "0"])
    return config


def recipe(config: TrainConfig) -> dict[str, Any]:
    """What identifies an arm: every field but the environment and the run bookkeeping (config.py)."""
    return {k: v for k, v in to_dict(config).items() if k not in non_recipe_fields()}


def load_results(path: Path) -> dict[str, Any] | None:
    import json

    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read earlier results ({path}): {e}; remove it or use another --out-dir") from None


def analyse(arms: list[Arm], runs: dict[str, dict[str, dict]], seeds: list[int],
            confidence: float) -> dict[str, Any]:
    """Per-arm descriptions over the seeds every arm has finished, and each later arm against the first."""
    paired = [s for s in seeds if all(str(s) in runs[a.name] for a in arms)]
    per_arm = {}
    for arm in arms:
        rs = [runs[arm.name][str(s)] for s in paired]
        per_arm[arm.name] = {"acc": describe([r["acc"] for r in rs]),
                             "train_seconds": describe([r["train_seconds"] for r in rs])}
    first = arms[0].name
    comparisons = []
    for arm in arms[1:]:
        a = [runs[first][str(s)] for s in paired]
        b = [runs[arm.name][str(s)] for s in paired]
        acc = paired_comparison([r["acc"] for r in a], [r["acc"] for r in b], confidence)
        secs = paired_comparison([r["train_seconds"] for r in a], [r["train_seconds"] for r in b], confidence)
        comparisons.append({"arm": arm.name, "against": first, "acc": acc, "train_seconds": secs,
                            "verdict": verdict(acc, secs)})
    return {"paired_seeds": paired, "arms": per_arm, "comparisons": comparisons}


def verdict(acc: dict[str, Any], secs: dict[str, Any]) -> str:
    """Kept only when the accuracy interval excludes zero upwards, or time drops at equal accuracy."""
    if acc["ci_low"] is None:
        return "undecided: fewer than 2 paired seeds"
    if acc["ci_low"] > 0:
        return "kept: better, the interval excludes zero"
    if acc["ci_high"] < 0:
        return "rejected: worse, the interval excludes zero"
    if secs["ci_high"] is not None and secs["ci_high"] < 0:
        return "kept: saves time at equal accuracy (the accuracy interval includes zero)"
    return "not adopted: the interval includes zero"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _diff(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def markdown_rows(result: dict[str, Any], arms: list[Arm], common: list[str], split: str) -> list[str]:
    """One bench/RESULTS.md row (trick | setting | result | verdict | command) per later arm."""
    rows = []
    stats = result["analysis"]
    seeds = stats["paired_seeds"]
    first = arms[0]
    for arm, c in zip(arms[1:], stats["comparisons"]):
        if not seeds:
            continue
        a, b = stats["arms"][first.name], stats["arms"][arm.name]
        acc, secs = c["acc"], c["train_seconds"]
        p = "-" if acc["p_value"] is None else f"{acc['p_value']:.2g}"
        text = (f"{_pct(b['acc']['mean'])} +- {_pct(b['acc']['std'])}% vs {_pct(a['acc']['mean'])} +- "
                f"{_pct(a['acc']['std'])}%: {_diff(acc['mean_diff'])} points "
                f"[{_pct(acc['ci_low'])}, {_pct(acc['ci_high'])}], p = {p}; training "
                f"{b['train_seconds']['mean']:.1f} s vs {a['train_seconds']['mean']:.1f} s")
        command = ("`python -m fastcifar.compare " + " ".join(shlex.quote(f"{x.name}={x.spec}") for x in (first, arm))
                   + f" --seeds {len(seeds)}" + (" -- " + " ".join(shlex.quote(t) for t in common) if common else "")
                   + "`")
        rows.append(f"| {arm.name} vs {first.name} | {' '.join(common) or 'preset values'}; seeds "
                    f"{', '.join(map(str, seeds))}; {split} set | {text} | {c['verdict']} | {command} |")
    return rows


def save_strip_plot(path: Path, arms: list[Arm], runs: dict[str, dict[str, dict]], seeds: list[int]) -> None:
    """Per-seed accuracy and training seconds, one column per arm, the runs of one seed joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(arms), 4))
    for ax, key, label in ((axes[0], "acc", "accuracy (%)"), (axes[1], "train_seconds", "training seconds")):
        scale = 100 if key == "acc" else 1
        for s in seeds:
            xs = [i for i, a in enumerate(arms) if str(s) in runs[a.name]]
            ys = [runs[arms[i].name][str(s)][key] * scale for i in xs]
            ax.plot(xs, ys, "-o", color="0.6", markersize=0, linewidth=0.8)
            ax.scatter(xs, ys, zorder=3, label=f"seed {s}")
        for i, a in enumerate(arms):
            values = [r[key] * scale for r in runs[a.name].values()]
            if values:
                mean = sum(values) / len(values)
                ax.hlines(mean, i - 0.25, i + 0.25, color="black", linewidth=2, zorder=4)
        ax.set_xticks(range(len(arms)), [a.name for a in arms], rotation=15)
        ax.set_xlim(-0.5, len(arms) - 0.5)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    own, common = split_at_double_dash(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(own)
    if args.seeds < 1:
        raise UserError(f"invalid --seeds ({args.seeds}): must be >= 1")
    if not 0 < args.confidence < 1:
        raise UserError(f"invalid --confidence ({args.confidence}): must be between 0 and 1")
    arms = [parse_arm(text, i) for i, text in enumerate(args.arms)]
    names = [a.name for a in arms]
    if len(arms) < 2:
        raise UserError("compare needs at least two arms, e.g. default speedrun")
    if len(set(names)) < len(names):
        raise UserError(f"two arms share the name '{max(names, key=names.count)}': name them, e.g. a=... b=...")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out = Path(args.out_dir or "runs/compare/" + "-vs-".join(names))
    # every arm's configuration checked (and its flags parsed) before anything trains
    recipes = {a.name: recipe(arm_config(a, common, seeds[0], out)) for a in arms}
    split = "val" if any(r["val_split"] for r in recipes.values()) else "test"
    if split == "val" and len({r["val_split"] for r in recipes.values()}) > 1:
        raise UserError("arms use different --val-split values: pass --val-split after -- so all share one")
    results_path = out / "results.json"
    previous = load_results(results_path)
    runs: dict[str, dict[str, dict]] = {a.name: {} for a in arms}
    if previous:
        for name, earlier in previous.get("arms", {}).items():
            if name in recipes and earlier.get("config") == recipes[name]:
                runs[name] = earlier.get("runs", {})
            elif name in recipes:
                raise UserError(f"arm '{name}' in {results_path} was run with another configuration: "
                                "use another --out-dir (or remove that file to start again)")

    from fastcifar.train import train

    def save() -> dict[str, Any]:
        result = {"eval_split": split, "seeds": seeds, "common_flags": common, "confidence": args.confidence,
                  "arms": {a.name: {"spec": a.spec, "argv": a.argv, "config": recipes[a.name],
                                    "runs": runs[a.name]} for a in arms}}
        result["analysis"] = analyse(arms, runs, seeds, args.confidence)
        result["markdown"] = markdown_rows(result, arms, common, split)
        write_json(results_path, result)
        return result

    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for arm in arms:
            if str(seed) in runs[arm.name]:
                continue
            run_dir = out / "runs" / arm.name / f"seed-{seed}"
            config = arm_config(arm, common, seed, run_dir)
            print(f"{arm.name}, seed {seed}: training in {run_dir}", flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):
                summary = train(config)
            runs[arm.name][str(seed)] = {"acc": reported_accuracy(summary), "acc_plain": summary["test_acc"],
                                         "acc_tta": summary["test_acc_tta"], "train_seconds": summary["train_seconds"],
                                         "eval_split": summary.get("eval_split", split)}
            r = runs[arm.name][str(seed)]
            print(f"{arm.name}, seed {seed}: {split} acc {r['acc']:.4f}, train {r['train_seconds']:.1f}s", flush=True)
            save()
    result = save()
    save_strip_plot(out / "strip.png", arms, runs, seeds)
    write_text(out / "row.md", "\n".join(result["markdown"]) + "\n")
    print(format_report(result, arms))
    return 0


def format_report(result: dict[str, Any], arms: list[Arm]) -> str:
    stats = result["analysis"]
    lines = [f"{result['eval_split']} accuracy over seeds {stats['paired_seeds']}:"]
    for a in arms:
        d, t = stats["arms"][a.name]["acc"], stats["arms"][a.name]["train_seconds"]
        if d["n"]:
            lines.append(f"  {a.name:20s} {_pct(d['mean'])} +- {_pct(d['std'])}%   train {t['mean']:.1f} +- "
                         f"{t['std']:.1f}s")
    for c in stats["comparisons"]:
        acc = c["acc"]
        p = "-" if acc["p_value"] is None else f"{acc['p_value']:.3g}"
        lines.append(f"  {c['arm']} - {c['against']}: {_diff(acc['mean_diff'])} points, "
                     f"{int(100 * result['confidence'])}% CI [{_pct(acc['ci_low'])}, {_pct(acc['ci_high'])}], "
                     f"p = {p}; {c['verdict']}")
    lines += result["markdown"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.compare"))

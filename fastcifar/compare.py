"""A/B test of training configurations over the same seeds (paired), with a confidence interval.

    python -m fastcifar.compare default runs/tune/w16/best.toml --seeds 3 --out-dir runs/compare/best \\
        -- --data-dir ../shared/data/cifar10-png.tar.gz --width 16 --epochs 1.5 --device cpu

Each ARM is `[NAME=]SPEC`: a preset name, a TOML file for `fastcifar.train --config`, or a quoted flag
string (`"--lr 0.6 --label-smoothing 0.1"`; a single flag without a value needs a name: `whiten=--whiten`).
Flags after `--` apply to every arm, after its own. docs/tune-and-compare.md: the verdicts and what OUT holds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from fastcifar.atomic import write_json, write_text
from fastcifar.config import PRESETS, ArgumentParser, TrainConfig, parse_config, recipe_values, split_at_double_dash
from fastcifar.errors import UserError, first_line, run_cli
from fastcifar.plots import pyplot, save_figure
from fastcifar.report import reported_accuracy
from fastcifar.stats import bonferroni_confidence, describe, multiple_paired_comparisons

MEASURES = ("acc", "train_seconds")  # what each run records and each comparison compares


@dataclasses.dataclass
class Arm:
    name: str
    spec: str
    argv: list[str]  # the arm's own training flags


def parse_arm(text: str, index: int) -> Arm:
    name, spec = "", text.strip()
    head, sep, rest = spec.partition("=")
    if sep and head and not head.startswith("-") and " " not in head and "/" not in head:
        name, spec = head, rest.strip()
    if spec in PRESETS:
        argv, default_name = ["--preset", spec], spec
    elif spec.startswith("-"):
        argv = shlex.split(spec)
        default_name = "".join(c if c.isalnum() or c in "._" else "-" for c in spec.lstrip("-")).strip("-")[:40]
    elif spec.endswith(".toml") or Path(spec).is_file():  # a missing file fails in parse_config, before training
        argv, default_name = ["--config", spec], Path(spec).stem
    else:
        raise UserError(f"arm {index + 1} ({spec!r}) is not a preset ({', '.join(PRESETS)}), an existing .toml "
                        "file or a flag string starting with --")
    return Arm(name or default_name, spec, argv)


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fastcifar.compare", description=__doc__.split("\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            epilog="Training flags for every arm go after --, e.g. -- --width 16 --epochs 2")
    parser.add_argument("arms", nargs="+", metavar="ARM", help="[NAME=]preset, TOML file or quoted flag string")
    parser.add_argument("--seeds", type=int, default=3, help="runs per arm, seeds --first-seed onwards")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="results directory (default runs/compare/<arm names>)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="of the intervals, jointly when several arms are compared with the first")
    parser.add_argument("--margin", type=float, default=0.1, metavar="POINTS",
                        help="equal accuracy: the accuracy interval lies within this many points of zero; an arm "
                             "is kept for being faster only then")
    parser.add_argument("--retry-failed", action="store_true",
                        help="train runs recorded as failed again (by default a rerun leaves them failed)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def arm_config(arm: Arm, common: list[str], seed: int, run_dir: Path) -> TrainConfig:
    """The arm's configuration for one seed: its flags, then the common ones, then the run's own."""
    return parse_config([*arm.argv, *common, "--seed", str(seed), "--runs", "1", "--out-dir", str(run_dir),
                         "--overwrite", "--checkpoint-every", "0"])[0]


def finished(run: dict[str, Any] | None) -> bool:
    """A run that trained to the end (a failed one holds only its error)."""
    return run is not None and "error" not in run


def analyse(arms: list[Arm], runs: dict[str, dict[str, dict]], seeds: list[int], confidence: float,
            margin: float) -> dict[str, Any]:
    """Per-arm descriptions over the paired seeds (finished by every arm); each later arm against the first."""
    paired = [s for s in seeds if all(finished(runs[a.name].get(str(s))) for a in arms)]
    failed = [{"arm": a.name, "seed": s, "error": runs[a.name][str(s)]["error"]} for s in seeds for a in arms
              if "error" in runs[a.name].get(str(s), {})]

    def values(arm: Arm, key: str) -> list[float]:
        return [runs[arm.name][str(s)][key] for s in paired]

    first, later = arms[0], arms[1:]
    acc, secs = (multiple_paired_comparisons(values(first, key), [values(a, key) for a in later], confidence)
                 for key in MEASURES)
    comparisons = []
    for arm, a, t in zip(later, acc, secs):
        lost = [f["seed"] for f in failed if f["arm"] == arm.name and finished(runs[first.name].get(str(f["seed"])))]
        comparisons.append({"arm": arm.name, "against": first.name, "acc": a, "train_seconds": t,
                            "verdict": verdict(a, t, margin, lost)})
    each = bonferroni_confidence(confidence, len(later))  # the correction for several arms, in words
    correction = "none: one comparison" if len(later) == 1 else (
        f"{len(later)} comparisons against the first arm: each interval at {100 * each:.4g}% (Bonferroni, "
        f"{100 * confidence:.4g}% for all together), p-values Holm-adjusted (p_holm); verdicts read the intervals")
    return {"paired_seeds": paired, "failed": len(failed), "failed_runs": failed, "margin_points": margin,
            "correction": correction,
            "arms": {a.name: {key: describe(values(a, key)) for key in MEASURES} for a in arms},
            "comparisons": comparisons}


def verdict(acc: dict[str, Any], secs: dict[str, Any], margin: float, lost_seeds: Sequence[int] = ()) -> str:
    """Kept only when better, or faster at equal accuracy (within `margin` points); rejected when worse."""
    if acc["untested"]:
        return f"undecided: {acc['untested']}"
    low, high = acc["ci_low"], acc["ci_high"]
    if high < 0:
        return "rejected: worse, the accuracy interval lies below zero"
    if lost_seeds:
        return f"undecided: it failed on seed(s) {', '.join(map(str, lost_seeds))}, which the first arm finished"
    if low > 0:
        return "kept: better, the accuracy interval lies above zero"
    if not (-margin / 100 <= low and high <= margin / 100):
        return (f"undecided: the accuracy interval includes zero but reaches beyond +-{margin:g} points "
                "(--margin, equal accuracy): more seeds may decide")
    if secs["ci_high"] is not None and secs["ci_high"] < 0:
        return f"kept: faster at equal accuracy (the accuracy interval lies within +-{margin:g} points of zero)"
    return f"not adopted: equal accuracy within +-{margin:g} points, and not faster"


def _pct(x: float | None, sign: str = "") -> str:
    return "-" if x is None else f"{100 * x:{sign}.2f}"


def _interval(c: dict[str, Any]) -> str:
    """The accuracy difference, its interval and p-value (Holm-adjusted when that differs: several arms)."""
    acc = c["acc"]
    holm = " (Holm)" if acc["p_holm"] != acc["p_value"] else ""
    p = "-" if acc["p_value"] is None else f"{acc['p_holm']:.2g}{holm}"
    return (f"{_pct(acc['mean_diff'], '+')} points, {100 * acc['confidence']:.4g}% CI [{_pct(acc['ci_low'])}, "
            f"{_pct(acc['ci_high'])}], p = {p}")


def reproduce_command(arms: list[Arm], common: list[str], seeds: list[int], confidence: float,
                      margin: float) -> str | None:
    """The compare command that gives these results again (None without paired seeds): every arm (the correction
    depends on their number) and the range of the paired seeds (a seed that failed inside it fails again)."""
    if not seeds:
        return None
    parts = ["python -m fastcifar.compare", *(shlex.quote(f"{a.name}={a.spec}") for a in arms),
             f"--first-seed {seeds[0]} --seeds {seeds[-1] - seeds[0] + 1} --confidence {confidence} --margin {margin}"]
    return " ".join(parts + (["--", *map(shlex.quote, common)] if common else []))


def markdown_rows(result: dict[str, Any], arms: list[Arm], common: list[str], split: str) -> list[str]:
    """One bench/RESULTS.md row (trick | setting | result | verdict | command) per later arm."""
    stats = result["analysis"]
    seeds, first = stats["paired_seeds"], arms[0]
    if not seeds:
        return []
    failed = f"; {stats['failed']} failed run(s) left out" if stats["failed"] else ""
    a = stats["arms"][first.name]
    rows = []
    for arm, c in zip(arms[1:], stats["comparisons"]):
        b = stats["arms"][arm.name]
        text = (f"{_pct(b['acc']['mean'])} +- {_pct(b['acc']['std'])}% vs {_pct(a['acc']['mean'])} +- "
                f"{_pct(a['acc']['std'])}%: {_interval(c)}; training {b['train_seconds']['mean']:.1f} s vs "
                f"{a['train_seconds']['mean']:.1f} s")
        rows.append(f"| {arm.name} vs {first.name} | {' '.join(common) or 'preset values'}; seeds "
                    f"{', '.join(map(str, seeds))}; {split} set{failed} | {text} | {c['verdict']} | "
                    f"`{result['command']}` |")
    return rows


def save_strip_plot(path: Path, arms: list[Arm], runs: dict[str, dict[str, dict]], seeds: list[int],
                    analysis: dict[str, Any]) -> None:
    """Per-seed accuracy and training seconds per arm, a seed's runs joined; bars: means over the paired seeds."""
    paired = set(analysis["paired_seeds"])
    fig, axes = pyplot().subplots(1, 2, figsize=(4 + 1.6 * len(arms), 4), layout="tight")
    for ax, key, label in zip(axes, MEASURES, ("accuracy (%)", "training seconds")):
        scale = 100 if key == "acc" else 1
        for s in seeds:
            xs = [i for i, a in enumerate(arms) if finished(runs[a.name].get(str(s)))]
            ys = [runs[arms[i].name][str(s)][key] * scale for i in xs]
            ax.plot(xs, ys, "-o", color="0.6", markersize=0, linewidth=0.8)
            points = ax.scatter(xs, ys, zorder=3, label=f"seed {s}" if s in paired else f"seed {s} (unpaired)")
            if s not in paired:
                points.set_facecolor("none")
        for i, a in enumerate(arms):
            mean = analysis["arms"][a.name][key]["mean"]
            if mean is not None:
                ax.hlines(mean * scale, i - 0.25, i + 0.25, color="black", linewidth=2, zorder=4)
        ax.set_xticks(range(len(arms)), [a.name for a in arms], rotation=15)
        ax.set(xlim=(-0.5, len(arms) - 0.5), ylabel=label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def run_arm(arm: Arm, common: list[str], seed: int, out: Path, debug: bool = False) -> dict[str, Any]:
    """Train `arm` on `seed` in out/runs/<arm>/seed-<seed>/ (its output in train.log). A run that raises (a
    diverging lr, a full disk) returns {"error": ...}, its traceback in train.log; with `debug` it raises."""
    from fastcifar.train import train

    run_dir = out / "runs" / arm.name / f"seed-{seed}"
    config = arm_config(arm, common, seed, run_dir)
    print(f"{arm.name}, seed {seed}: training in {run_dir}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:
        try:
            with contextlib.redirect_stdout(log):
                summary = train(config)
        except Exception as e:  # any failure of one run is recorded; signals (SystemExit) still stop compare
            if debug:
                raise
            traceback.print_exc(file=log)
            error = f"{type(e).__name__}: {first_line(e)}"
            print(f"{arm.name}, seed {seed}: FAILED ({error}); recorded, the comparison goes on", flush=True)
            return {"error": error}
    run = {"acc": reported_accuracy(summary), "acc_plain": summary["test_acc"], "acc_tta": summary["test_acc_tta"],
           "train_seconds": summary["train_seconds"], "eval_split": summary.get("eval_split")}
    print(f"{arm.name}, seed {seed}: {run['eval_split']} acc {run['acc']:.4f}, train {run['train_seconds']:.1f}s",
          flush=True)
    return run


def check_args(args: argparse.Namespace) -> list[Arm]:
    for ok, flag, rule in ((args.seeds >= 1, "seeds", "must be >= 1"),
                           (0 < args.confidence < 1, "confidence", "must be between 0 and 1"),
                           (0 < args.margin < 100, "margin", "accuracy points, between 0 and 100")):  # NaN fails
        if not ok:
            raise UserError(f"invalid --{flag} ({getattr(args, flag)}): {rule}")
    arms = [parse_arm(text, i) for i, text in enumerate(args.arms)]
    names = [a.name for a in arms]
    if len(arms) < 2:
        raise UserError("compare needs at least two arms, e.g. default speedrun")
    if len(set(names)) < len(names):
        raise UserError(f"two arms share the name '{max(names, key=names.count)}': name them, e.g. a=... b=...")
    return arms


def earlier_runs(path: Path, recipes: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """{arm: {seed: run}} of an earlier results.json (none without one); an arm whose recipe changed is refused."""
    try:
        previous = json.loads(path.read_text()) if path.exists() else {}
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read earlier results ({path}): {e}; remove it or use another --out-dir") from None
    earlier = {name: arm for name, arm in previous.get("arms", {}).items() if name in recipes}
    for name, arm in earlier.items():
        if arm.get("config") != recipes[name]:
            raise UserError(f"arm '{name}' in {path} was run with another configuration: "
                            "use another --out-dir (or remove that file to start again)")
    return {name: earlier.get(name, {}).get("runs", {}) for name in recipes}


def save_results(path: Path, args: argparse.Namespace, arms: list[Arm], common: list[str], seeds: list[int],
                 recipes: dict[str, dict[str, Any]], runs: dict[str, dict[str, dict]]) -> dict[str, Any]:
    split = "val" if any(r["val_split"] for r in recipes.values()) else "test"
    analysis = analyse(arms, runs, seeds, args.confidence, args.margin)
    result = {"eval_split": split, "seeds": seeds, "common_flags": common, "confidence": args.confidence,
              "margin_points": args.margin,
              "command": reproduce_command(arms, common, analysis["paired_seeds"], args.confidence, args.margin),
              "arms": {a.name: {"spec": a.spec, "argv": a.argv, "config": recipes[a.name], "runs": runs[a.name]}
                       for a in arms}, "analysis": analysis}
    result["markdown"] = markdown_rows(result, arms, common, split)
    write_json(path, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    own, common = split_at_double_dash(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(own)
    arms = check_args(args)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out = Path(args.out_dir or "runs/compare/" + "-vs-".join(a.name for a in arms))
    # every arm's configuration checked (and its flags parsed) before anything trains
    recipes = {a.name: recipe_values(arm_config(a, common, seeds[0], out)) for a in arms}
    if len({r["val_split"] for r in recipes.values()}) > 1:
        raise UserError("arms use different --val-split values: pass --val-split after -- so all share one")
    runs = earlier_runs(out / "results.json", recipes)
    for seed in seeds:  # seed-major: a stopped comparison stays paired
        for arm in arms:
            earlier = runs[arm.name].get(str(seed))
            if earlier is None or (args.retry_failed and not finished(earlier)):
                runs[arm.name][str(seed)] = run_arm(arm, common, seed, out, args.debug)
                save_results(out / "results.json", args, arms, common, seeds, recipes, runs)
    result = save_results(out / "results.json", args, arms, common, seeds, recipes, runs)
    save_strip_plot(out / "strip.png", arms, runs, seeds, result["analysis"])
    write_text(out / "row.md", "\n".join(result["markdown"]) + "\n")
    print(format_report(result))
    return 0


def format_report(result: dict[str, Any]) -> str:
    stats = result["analysis"]
    lines = [f"{result['eval_split']} accuracy over the paired seeds {stats['paired_seeds']}:"]
    lines += [f"  {name:20s} {_pct(d['acc']['mean'])} +- {_pct(d['acc']['std'])}%   train "
              f"{d['train_seconds']['mean']:.1f} +- {d['train_seconds']['std']:.1f}s"
              for name, d in stats["arms"].items() if d["acc"]["n"]]
    lines += [f"  failed: {f['arm']}, seed {f['seed']}: {f['error']}" for f in stats["failed_runs"]]
    lines += [f"  {c['arm']} - {c['against']}: {_interval(c)}; {c['verdict']}" for c in stats["comparisons"]]
    lines.append(f"  correction: {stats['correction']}; {stats['failed']} failed run(s) left out")
    return "\n".join(lines + result["markdown"])


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.compare"))

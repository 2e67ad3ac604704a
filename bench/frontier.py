"""Accuracy against work: every candidate measured by bench/speedrun.py or fastcifar.compare, on one plot.

    python bench/frontier.py OUT.png speedrun.json ablations.json [more.json ...]

Each input is a bench/speedrun.py report (`--json`: fastcifar's preset and, with --airbench, airbench94) or a
`python -m fastcifar.compare` results.json (one point per arm, its work counted from the arm's recipe at
50,000 training and 10,000 test images). A point is the mean accuracy with the method's own TTA, its error
bar the standard deviation over seeds, at the PFLOP of one run; the 94% line and airbench94's budget are
drawn. The same points are printed as a markdown table. Only measured runs are drawn: nothing is estimated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fastcifar.stats import describe  # noqa: E402

AIRBENCH94_PFLOP = 0.36  # its published budget, drawn as a line


def speedrun_points(report: dict[str, Any], source: str) -> list[dict[str, Any]]:
    points = []
    for method, out in (("fastcifar[" + report.get("preset", "?") + "]", report.get("fastcifar")),
                        ("airbench94", report.get("airbench"))):
        runs = [r for r in (out or {}).get("runs", []) if not r.get("error")]
        accs = [r.get("acc_tta") if r.get("acc_tta") is not None else r["acc"] for r in runs]
        flops = next((r["flops"] for r in runs if r.get("flops")), None)
        if accs and flops:
            points.append({"name": method, "flops": flops, "acc": describe(accs), "source": source,
                           "airbench": method == "airbench94"})
    return points


def compare_points(results: dict[str, Any], source: str) -> list[dict[str, Any]]:
    from fastcifar.config import TrainConfig
    from fastcifar.flops import recipe_flops

    points = []
    for name, arm in results["arms"].items():
        accs = [r["acc"] for r in arm["runs"].values() if r.get("acc") is not None]
        if accs:
            flops = recipe_flops(TrainConfig(**arm["config"]), 50000, 10000)["per_run"]
            points.append({"name": name, "flops": flops, "acc": describe(accs), "source": source, "airbench": False})
    return points


def load_points(paths: Sequence[str]) -> list[dict[str, Any]]:
    points = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        points += compare_points(data, path) if "arms" in data else speedrun_points(data, path)
    return points


def markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| candidate | PFLOP per run | accuracy (own TTA) | n | source |", "|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: p["flops"]):
        acc = p["acc"]
        lines.append(f"| {p['name']} | {p['flops'] / 1e15:.3f} | {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f}% "
                     f"| {acc['n']} | {p['source']} |")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for p in points:
        style = dict(marker="s", color="tab:red") if p["airbench"] else dict(marker="o", color="tab:blue")
        ax.errorbar(p["flops"] / 1e15, 100 * p["acc"]["mean"], yerr=100 * p["acc"]["std"], capsize=3, **style)
        ax.annotate(p["name"], (p["flops"] / 1e15, 100 * p["acc"]["mean"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.axhline(94.0, color="grey", linestyle="--", linewidth=1)
    ax.axvline(AIRBENCH94_PFLOP, color="tab:red", linestyle=":", linewidth=1)
    ax.set_xlabel("PFLOP per run (training + final TTA evaluation)")
    ax.set_ylabel("test accuracy, own TTA (%)")
    ax.set_title("CIFAR-10: accuracy against work (blue: fastcifar, red: airbench94)")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python bench/frontier.py OUT.png REPORT.json [REPORT.json ...]", file=sys.stderr)
        return 2
    points = load_points(argv[1:])
    if not points:
        print("no finished runs in the reports", file=sys.stderr)
        return 2
    plot(points, Path(argv[0]))
    print(markdown(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())

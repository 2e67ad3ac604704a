#!/usr/bin/env bash
# The default recipe vs the original notebook's (--preset seed) at width 16,
# 10 epochs, on the lossless CIFAR-10. The two recipes train side by side (two cores), so their seconds per
# epoch are measured in one sitting under the same load; then a second seed of the default. One thread per
# process: the default run is one process, the seed run its trainer plus 2 albumentations DataLoader workers.
#
#   bash bench/cpu_recipes.sh [DATA] [OUT_DIR]      # ~25 minutes on a 2-core Zen 4
set -euo pipefail
data=${1:-../shared/data/cifar10-png.tar.gz}
out=${2:-runs/cpu-recipes}
common=(--data-dir "$data" --width 16 --epochs 10 --device cpu --no-plots --overwrite)
export OMP_NUM_THREADS=1
mkdir -p "$out"
python -m fastcifar.train "${common[@]}" --seed 1 --out-dir "$out/default-s1" > "$out/default-s1.log" 2>&1 &
python -m fastcifar.train "${common[@]}" --preset seed --out-dir "$out/seed" > "$out/seed.log" 2>&1
wait
python -m fastcifar.train "${common[@]}" --seed 0 --out-dir "$out/default-s0" > "$out/default-s0.log" 2>&1
python - "$out" <<'PY'
import csv, json, sys
from pathlib import Path
from fastcifar.stats import describe
out = Path(sys.argv[1])
def load(name):
    s = json.loads((out / name / "summary.json").read_text())
    rows = list(csv.DictReader((out / name / "metrics.csv").open()))
    return s, describe([float(r["epoch_seconds"]) for r in rows])["mean"]
print(f"{'run':<12} {'test acc':>9} {'flip TTA':>9} {'s/epoch':>8}")
for name in ("default-s0", "default-s1", "seed"):
    s, e = load(name)
    tta = f"{s['test_acc_tta']:.4f}" if s["test_acc_tta"] is not None else "-"
    print(f"{name:<12} {s['test_acc']:>9.4f} {tta:>9} {e:>8.1f}")
(_, fast), (_, seed) = load("default-s1"), load("seed")
print(f"seconds per epoch, seed preset / default (side by side): {seed / fast:.2f}x")
PY

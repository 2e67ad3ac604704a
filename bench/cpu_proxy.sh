#!/usr/bin/env bash
# The CPU proxy of the speedrun recipe: a quarter of its widths (`--preset speedrun --widths 6,16,64,64
# --epochs 5.5`) against the default recipe at width 16 (a quarter of 64) for 10 epochs, on the lossless
# CIFAR-10 (the preset's own 9.9 epochs are meant for the full-width net).
# Both recipes train at the same time, one thread each (two cores), so their seconds are measured in one
# sitting under the same load: the default for seeds 0 and 1, the speedrun preset for seeds 0, 1 and 2 (it
# finishes first, so the default's last minutes run alone: the time ratio errs in the default's favour).
# Each model is then re-evaluated plain, with flip TTA and with flip + translate TTA, so the two recipes
# can also be compared under the same test-time augmentation.
#
#   bash bench/cpu_proxy.sh [DATA] [OUT_DIR]      # ~22 minutes on a 2-core Zen 4
set -euo pipefail -m
data=${1:-../shared/data/cifar10-png.tar.gz}
out=${2:-runs/cpu-proxy}
common=(--data-dir "$data" --device cpu --no-plots --overwrite --eval-every 100)
export OMP_NUM_THREADS=1
mkdir -p "$out"
rm -rf "$out"/default-s? "$out"/speedrun-s?  # never summarize an earlier sitting's results
for seed in 0 1; do
    python -m fastcifar.train "${common[@]}" --width 16 --epochs 10 --seed $seed --out-dir "$out/default-s$seed" \
        > "$out/default-s$seed.log" 2>&1
done &
default_loop=$!  # its own process group (set -m), so one kill stops the loop and its current run
trap 'kill -- -"$default_loop" 2>/dev/null || true' EXIT  # a failed speedrun run stops the default's too
for seed in 0 1 2; do
    python -m fastcifar.train "${common[@]}" --preset speedrun --widths 6,16,64,64 --epochs 5.5 --seed $seed \
        --out-dir "$out/speedrun-s$seed" > "$out/speedrun-s$seed.log" 2>&1
done
wait "$default_loop"  # its exit status: a failed default run stops the script here
trap - EXIT
for run in "$out"/default-s? "$out"/speedrun-s?; do
    python -m fastcifar.evaluate --checkpoint "$run" --data-dir "$data" --device cpu --tta-translate 1 \
        --json > "$run/evaluate.json"
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
from fastcifar.stats import describe
out = Path(sys.argv[1])
mean = lambda values: describe(list(values))["mean"]
median = lambda values: describe(list(values))["median"]
def load(recipe):
    runs = []
    for run in sorted(out.glob(f"{recipe}-s?")):
        s = json.loads((run / "summary.json").read_text())
        views = [e["test_acc"] for e in json.loads((run / "evaluate.json").read_text())["evaluations"]]
        tta_name = f"flip + translate {s['tta']['translate']} TTA" if s["tta"]["translate"] else "flip TTA"
        runs.append({"acc": s["test_acc"], "own_tta": s["test_acc_tta"], "tta_name": tta_name, "plain": views[0],
                     "flip": views[1], "flip_translate": views[2], "seconds": s["train_seconds"]})
    return runs
print(f"{'recipe':<9} {'seeds':>5} {'reported (its TTA)':>19} {'plain':>7} {'flip':>7} {'flip+tr1':>9} {'train s':>8}")
res = {}
for recipe in ("default", "speedrun"):
    r = res[recipe] = load(recipe)
    print(f"{recipe:<9} {len(r):>5} {mean(x['own_tta'] for x in r):>19.4f} {mean(x['plain'] for x in r):>7.4f} "
          f"{mean(x['flip'] for x in r):>7.4f} {mean(x['flip_translate'] for x in r):>9.4f} "
          f"{median(x['seconds'] for x in r):>8.1f}   ({r[0]['tta_name']}; per seed "
          f"{', '.join(format(x['own_tta'], '.4f') for x in r)}; seconds {', '.join(format(x['seconds'], '.1f') for x in r)})")
d, f = res["default"], res["speedrun"]
ratio = median(x["seconds"] for x in f) / median(x["seconds"] for x in d)
gain = mean(x["own_tta"] for x in f) - mean(x["own_tta"] for x in d)
print(f"speedrun vs default: reported accuracy {gain * 100:+.2f} points, training seconds {ratio:.1%} "
      f"(target: >= +0 points in <= 60%)")
PY

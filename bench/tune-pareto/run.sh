#!/bin/bash
# A two-objective study on the CPU: validation accuracy against the FLOPs of a run, 12 trials of
# widths 8-16 and 0.2-0.6 epochs, the first one the default recipe at width 16 and 0.4 epochs; outputs
# copied to bench/tune-pareto/ (not the trial directories).
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
DATA=${FASTCIFAR_DATA:-../shared/data/cifar10-png.tar.gz}
python -m fastcifar.tune --objective accuracy-flops --space bench/tune-pareto/space.toml --data-dir $DATA \
    --val-split 5000 --width 16 --epochs 0.4 --device cpu --trials 12 --seed 0 --startup-trials 6 \
    --out-dir runs/tune/pareto --storage sqlite:///runs/tune/pareto/study.db --study pareto
cp -r runs/tune/pareto/{study.json,trials.csv,pareto.csv,pareto.png,best.toml,best-per-budget} bench/tune-pareto/

#!/bin/bash
# A 12-trial study (bench/RESULTS.md) at width 16, 0.4 epochs per trial, then best vs default, 3 seeds.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
DATA=${FASTCIFAR_DATA:-../shared/data/cifar10-png.tar.gz}
python -m fastcifar.tune --space bench/tune_space_cpu.toml --data-dir $DATA \
    --val-split 5000 --width 16 --epochs 0.4 --device cpu --trials 12 --seed 0 \
    --sampler tpe --startup-trials 5 --pruner median --prune-after 4 \
    --out-dir runs/tune/w16 --storage sqlite:///runs/tune/w16/study.db --study w16
python -m fastcifar.compare default best=runs/tune/w16/best.toml --seeds 3 \
    --out-dir runs/tune/compare-w16 -- --data-dir $DATA --width 16 --epochs 0.4 --device cpu

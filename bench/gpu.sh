#!/usr/bin/env bash
# One prepared GPU run, in parts, each under its own `timeout` and all inside one budget; a failed,
# timed-out or skipped part does not stop the next, and summary.txt and parts.json are rewritten after
# every part (bench/gpu_report.py):
#   1. speedrun    the speedrun preset against airbench94 on the same images, 5 + 5 seeds interleaved
#                  (compiled; if no compiled fastcifar seed finishes, the part reruns eager and says so)
#   2. ablations   python -m fastcifar.compare: the speedrun preset against variants (ARMS below), paired
#                  seeds, eager (accuracy and FLOPs do not depend on compilation)
#   3. cuda-tests  `pytest -m cuda tests/test_cuda.py`: what the CPU CI skips (compile, CUDA graphs, fp16, ...)
#   4. default     the default 24-epoch recipe, one seed
# bench/speedrun.py rewrites its JSON after every seed, and compare its results after every run, so a part
# cut off by its timeout keeps every seed that finished. Clock: CLOCK in bench/speedrun.py.
#
#   bash bench/gpu.sh OUT_DIR
#
# The GPU machine has Python 3.12, torch 2.11, no albumentations and no network. Prepare once, in the
# repository root (.gpu/ is git-ignored; copy it to the GPU machine with the checkout):
#   mkdir -p .gpu
#   cp ../shared/data/cifar10-gpu.tar.gz .gpu/          # 54 MB: lossless test split, JPEG q90 train split
#   pip download --no-deps -d .gpu/sdist airbench==0.1.8
#   pip wheel --no-deps -w .gpu/whl .gpu/sdist/airbench-0.1.8.tar.gz
# No airbench wheel in .gpu/whl: the speedrun part runs without airbench and says so.
#
# OUT_DIR gets (flat, <= 8 files): env.txt, log.txt (every part's output), summary.txt, parts.json,
# speedrun.json, ablations.json (compare's results.json), default.json. The summary is printed last.
#
# Environment (defaults in brackets):
#   PYTHON [python3]  FASTCIFAR_GPU_DATA [.gpu/cifar10-gpu.tar.gz]  FASTCIFAR_GPU_WHEELS [.gpu/whl]
#   FASTCIFAR_GPU_BUDGET [400 s from the start]: a part starts only with 30 s of it left and gets
#     min(its timeout, what is left)
#   FASTCIFAR_GPU_AIRBENCH [1; 0 in smoke mode]  FASTCIFAR_GPU_ARMS [ARMS below; empty = no ablations]
#   FASTCIFAR_GPU_SMOKE=1: the CPU smoke run that tests/test_speedrun.py makes: widths 4,8,8,8, 1 epoch,
#     batch 64, --device cpu, 2 + 1 seeds, two ablation arms over 2 seeds
#     FASTCIFAR_GPU_SMOKE=1 FASTCIFAR_GPU_DATA=/path/to/tiny PYTHON=.venv/bin/python bash bench/gpu.sh /tmp/out
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu.sh OUT_DIR" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || exit 2
OUT_DIR=$(cd "$1" && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
DATA=${FASTCIFAR_GPU_DATA:-$REPO/.gpu/cifar10-gpu.tar.gz}
WHEELS=${FASTCIFAR_GPU_WHEELS:-$REPO/.gpu/whl}
BUDGET=${FASTCIFAR_GPU_BUDGET:-400}
MIN_PART=30
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fastcifar-gpu.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
SITE=$SCRATCH/site
LOG=$OUT_DIR/log.txt
: > "$LOG"

# private cache (decoded data, compiled kernels): nothing from an earlier run is reused
export FASTCIFAR_HOME=$SCRATCH/home
export TORCHINDUCTOR_CACHE_DIR=$SCRATCH/inductor
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [ "${FASTCIFAR_GPU_SMOKE:-0}" = 1 ]; then
    RUNS=2 SEEDS=2 AIRBENCH=${FASTCIFAR_GPU_AIRBENCH:-0}
    ARMS=${FASTCIFAR_GPU_ARMS-'base=--preset speedrun
lr=--preset speedrun --lr 0.5'}
    TRAIN_FLAGS=(--widths 4,8,8,8 --epochs 1 --batch-size 64 --device cpu)
else
    RUNS=5 SEEDS=3 AIRBENCH=${FASTCIFAR_GPU_AIRBENCH:-1}
    # compare's arms: the speedrun preset first (every other arm is paired with it)
    ARMS=${FASTCIFAR_GPU_ARMS-'base=--preset speedrun
lr1.0=--preset speedrun --lr 1.0
lr2.0=--preset speedrun --lr 2.0
res123-e7=--preset speedrun --residual 1,2,3 --epochs 7
muon=--preset speedrun --optimizer muon'}
    TRAIN_FLAGS=()
fi

NOTES=()
# airbench comes from its carried wheel (the GPU image has none): no wheel, no airbench, and a note
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
airbench_wheels=("$WHEELS"/airbench-*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" \
        >>"$LOG" 2>&1 || NOTES+=("wheel install into $SITE failed (see log.txt)")
fi
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ "$AIRBENCH" = 1 ] && [ ${#airbench_wheels[@]} -eq 0 ]; then
    AIRBENCH=0
    NOTES+=("airbench skipped: no airbench-*.whl in $WHEELS (see this script's header for the copy step)")
elif [ "$AIRBENCH" = 1 ] && ! "$PY" -c "import airbench" >>"$LOG" 2>&1; then
    AIRBENCH=0
    NOTES+=("airbench skipped: its wheel did not import (see log.txt)")
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    echo "data: $DATA$([ "$(basename "$DATA")" = cifar10-gpu.tar.gz ] && echo ' (GPU copy: train JPEG q90, test lossless)')"
    echo "smoke: ${FASTCIFAR_GPU_SMOKE:-0}  runs: $RUNS  airbench: $AIRBENCH  budget: ${BUDGET}s"
    echo "extra train flags: ${TRAIN_FLAGS[*]:-none}; ablation arms (${SEEDS} seeds each): $(echo "$ARMS" | tr '\n' ';')"
    for note in ${NOTES[@]+"${NOTES[@]}"}; do echo "note: $note"; done
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
            --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" bench/gpu_report.py environment
} 2>&1 | tee "$OUT_DIR/env.txt" | tee -a "$LOG"

status=0
PARTS=()  # "name|exit code|seconds|what happened", in running order

write_summary() {
    local args=()
    for note in ${NOTES[@]+"${NOTES[@]}"}; do args+=(--note "$note"); done
    for part in ${PARTS[@]+"${PARTS[@]}"}; do args+=(--part "$part"); done
    "$PY" bench/gpu_report.py summary "$OUT_DIR" "$DATA" ${args[@]+"${args[@]}"} >>"$LOG" 2>&1
    echo "=== summary.txt and parts.json rewritten (${#PARTS[@]} part(s) so far) ===" >> "$LOG"
}

# run_part NAME TIMEOUT COMMAND...: COMMAND under `timeout` (capped by the budget left), output into log.txt
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt "$MIN_PART" ]; then
        echo "=== $name skipped: ${left}s of the ${BUDGET}s budget left ===" | tee -a "$LOG"
        PARTS+=("$name|||skipped (${left}s of the budget left)")
        write_summary
        return
    fi
    local start=$SECONDS
    echo | tee -a "$LOG"
    echo "=== $name: timeout ${limit}s: $* ===" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]} what=ok
    if [ "$rc" -ne 0 ]; then
        status=1
        what=failed
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="timed out after ${limit}s"
        echo "=== $name: exit code $rc ($what) ===" | tee -a "$LOG"
    fi
    PARTS+=("$name|$rc|$((SECONDS - start))|$what")
    write_summary
}

run_speedrun_part() {  # run_speedrun_part NAME TIMEOUT ARGS...: bench/speedrun.py writing OUT_DIR/NAME.json
    local name=$1 limit=$2
    shift 2
    run_part "$name" "$limit" "$PY" bench/speedrun.py --data-dir "$DATA" --json "$OUT_DIR/$name.json" \
        --out-dir "$SCRATCH/runs/$name" --work-dir "$SCRATCH/airbench" "$@"
}

airbench_flags=()
[ "$AIRBENCH" = 1 ] && airbench_flags=(--airbench)

# 1. the speedrun, compiled; eager again when no compiled fastcifar seed finished
run_speedrun_part speedrun 190 --preset speedrun --runs "$RUNS" ${airbench_flags[@]+"${airbench_flags[@]}"} \
    -- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
if [[ "${PARTS[-1]}" != *"|skipped"* ]] && ! "$PY" bench/gpu_report.py finished "$OUT_DIR/speedrun.json"; then
    NOTES+=("speedrun: no compiled fastcifar seed finished, so the part reran eager (--no-compile); see log.txt")
    run_speedrun_part speedrun-eager 190 --preset speedrun --runs "$RUNS" \
        ${airbench_flags[@]+"${airbench_flags[@]}"} -- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} --no-compile
fi

# 2. ablations: compare's paired seeds, eager; its results.json is copied out after the part, even a cut one
if [ -n "$ARMS" ]; then
    mapfile -t arms <<< "$ARMS"
    run_part ablations 150 "$PY" -m fastcifar.compare "${arms[@]}" --seeds "$SEEDS" \
        --out-dir "$SCRATCH/ablations" -- --data-dir "$DATA" --no-compile --no-plots --eval-every 100 \
        ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
    cp "$SCRATCH/ablations/results.json" "$OUT_DIR/ablations.json" 2>>"$LOG" && write_summary
fi

# 3. what the CPU CI skips
run_part cuda-tests 60 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py

# 4. the default recipe
run_speedrun_part default 100 --preset default --runs 1 -- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}

echo
cat "$OUT_DIR/summary.txt"
exit $status

#!/usr/bin/env bash
# One prepared GPU run (H200): the speedrun preset against airbench94 on the same images, then the
# default 24-epoch recipe, then (only if time is left) the speedrun preset at fewer epochs, so the epoch
# count can be chosen by measurement. About 7 minutes at most; every part has its own `timeout`, and a
# failed or timed-out part does not stop the next (a timed-out speedrun.py still writes the runs that
# finished).
#
#   bash bench/gpu.sh OUT_DIR
#
# Prepare here once (.gpu/ is git-ignored, so name it in the device call's `carry`):
#   mkdir -p .gpu/whl && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/
#   pip wheel --no-deps -w .gpu/whl airbench==0.1.8          # pure Python; the GPU image has no airbench
# Device call:  run(command="bash bench/gpu.sh $OUT", carry=[".gpu"], timeout_s=540)
#
# OUT_DIR gets (flat, <= 8 files): env.txt, speedrun.json, speedrun.log, default.json, default.log,
# sweep.json, sweep.log (when it ran), summary.txt. The summary table is printed last.
#
# CPU smoke test (tests/test_speedrun.py runs this on a tiny synthetic data set):
#   FASTCIFAR_GPU_SMOKE=1 FASTCIFAR_GPU_DATA=/path/to/tiny PYTHON=.venv/bin/python bash bench/gpu.sh /tmp/out
# SMOKE=1 means: width 4, 1 epoch, batch 64, --device cpu, 2 + 1 runs, no airbench, preset `speedrun` if
# it exists else `default`, private site dir, short timeouts, a 0.5-epoch sweep.
#
# Environment (defaults in brackets):
#   PYTHON [python3]  FASTCIFAR_GPU_DATA [.gpu/cifar10-jpeg.tar.gz]  FASTCIFAR_GPU_WHEELS [.gpu/whl]
#   FASTCIFAR_GPU_SITE [/tmp/site]  FASTCIFAR_GPU_PRESET [speedrun]  FASTCIFAR_GPU_RUNS [5]
#   FASTCIFAR_GPU_AIRBENCH_RUNS [5]  FASTCIFAR_GPU_DEFAULT_RUNS [3]  FASTCIFAR_GPU_AIRBENCH [1]
#   FASTCIFAR_GPU_T_SPEEDRUN [230 s]  FASTCIFAR_GPU_T_DEFAULT [170 s]
#   FASTCIFAR_GPU_SWEEP_EPOCHS [8; empty = no sweep]: the sweep part's --epochs for the speedrun preset; it
#   runs only when at least 60 s of FASTCIFAR_GPU_BUDGET [400 s, counted from the start] are left
#   FASTCIFAR_GPU_EXTRA [none]: extra fastcifar.train flags for both parts, e.g. "--eval-every 100"
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
SMOKE=${FASTCIFAR_GPU_SMOKE:-0}
DATA=${FASTCIFAR_GPU_DATA:-$REPO/.gpu/cifar10-jpeg.tar.gz}
WHEELS=${FASTCIFAR_GPU_WHEELS:-$REPO/.gpu/whl}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fastcifar-gpu.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT

# private cache (decoded data, compiled kernels): nothing from an earlier run is reused
export FASTCIFAR_HOME=$SCRATCH/home
export TORCHINDUCTOR_CACHE_DIR=$SCRATCH/inductor
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [ "$SMOKE" = 1 ]; then
    SITE=${FASTCIFAR_GPU_SITE:-$SCRATCH/site}
    RUNS=${FASTCIFAR_GPU_RUNS:-2}
    DEFAULT_RUNS=${FASTCIFAR_GPU_DEFAULT_RUNS:-1}
    AIRBENCH=${FASTCIFAR_GPU_AIRBENCH:-0}
    T_SPEEDRUN=${FASTCIFAR_GPU_T_SPEEDRUN:-120}
    T_DEFAULT=${FASTCIFAR_GPU_T_DEFAULT:-120}
    SWEEP_EPOCHS=${FASTCIFAR_GPU_SWEEP_EPOCHS-0.5}
    TRAIN_FLAGS=(--width 4 --epochs 1 --batch-size 64 --device cpu)
else
    SITE=${FASTCIFAR_GPU_SITE:-/tmp/site}
    RUNS=${FASTCIFAR_GPU_RUNS:-5}
    DEFAULT_RUNS=${FASTCIFAR_GPU_DEFAULT_RUNS:-3}
    AIRBENCH=${FASTCIFAR_GPU_AIRBENCH:-1}
    T_SPEEDRUN=${FASTCIFAR_GPU_T_SPEEDRUN:-230}
    T_DEFAULT=${FASTCIFAR_GPU_T_DEFAULT:-170}
    SWEEP_EPOCHS=${FASTCIFAR_GPU_SWEEP_EPOCHS-8}
    TRAIN_FLAGS=()
fi
AIRBENCH_RUNS=${FASTCIFAR_GPU_AIRBENCH_RUNS:-5}
BUDGET=${FASTCIFAR_GPU_BUDGET:-400}
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
TRAIN_FLAGS+=(${FASTCIFAR_GPU_EXTRA:-})

# wheels of pure-Python packages the GPU image lacks (airbench)
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" \
        || echo "WARNING: wheel install into $SITE failed" >&2
else
    echo "note: no wheels in $WHEELS"
fi
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}

if [ "$SMOKE" = 1 ] && [ -z "${FASTCIFAR_GPU_PRESET:-}" ]; then
    PRESET=$("$PY" -c 'from fastcifar.config import PRESETS; print("speedrun" if "speedrun" in PRESETS else "default")')
else
    PRESET=${FASTCIFAR_GPU_PRESET:-speedrun}
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    echo "data: $DATA"
    echo "smoke: $SMOKE  preset: $PRESET  runs: $RUNS  airbench: $AIRBENCH x $AIRBENCH_RUNS  default runs: $DEFAULT_RUNS"
    echo "timeouts: speedrun ${T_SPEEDRUN}s, default ${T_DEFAULT}s; sweep: epochs ${SWEEP_EPOCHS:-none} if 60s of" \
         "${BUDGET}s are left; extra train flags: ${TRAIN_FLAGS[*]:-none}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
            --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:
    print("torch: not importable:", e)
try:
    from importlib.metadata import version
    import airbench
    print("airbench", version("airbench"), airbench.__file__)
except Exception as e:
    print("airbench: not available:", type(e).__name__, e)
EOF
} 2>&1 | tee "$OUT_DIR/env.txt"

status=0
declare -A RC SECS

# run_part NAME TIMEOUT ARGS...: bench/speedrun.py ARGS under `timeout`, log and JSON into OUT_DIR
run_part() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo
    echo "=== $name: timeout ${limit}s: $PY bench/speedrun.py $* ==="
    timeout -k 15 "$limit" "$PY" bench/speedrun.py --data-dir "$DATA" --json "$OUT_DIR/$name.json" \
        --out-dir "$SCRATCH/runs/$name" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    RC[$name]=$rc
    SECS[$name]=$((SECONDS - start))
    if [ "$rc" -ne 0 ]; then
        status=1
        echo "=== $name: exit code $rc$([ "$rc" -eq 124 ] && echo ' (timed out)') ==="
    fi
}

extra=()
[ ${#TRAIN_FLAGS[@]} -gt 0 ] && extra=(-- "${TRAIN_FLAGS[@]}")
airbench_flags=()
[ "$AIRBENCH" = 1 ] && airbench_flags=(--airbench --airbench-runs "$AIRBENCH_RUNS")

run_part speedrun "$T_SPEEDRUN" --preset "$PRESET" --runs "$RUNS" ${airbench_flags[@]+"${airbench_flags[@]}"} \
    ${extra[@]+"${extra[@]}"}
run_part default "$T_DEFAULT" --preset default --runs "$DEFAULT_RUNS" ${extra[@]+"${extra[@]}"}
parts=(speedrun default)
left=$((BUDGET - SECONDS))
if [ -n "$SWEEP_EPOCHS" ] && [ "$left" -ge 60 ]; then
    run_part sweep "$left" --preset "$PRESET" --runs "$RUNS" -- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} \
        --epochs "$SWEEP_EPOCHS"
    parts+=(sweep)
elif [ -n "$SWEEP_EPOCHS" ]; then
    echo "=== sweep skipped: ${left}s of the ${BUDGET}s budget left ==="
fi

{
    echo
    echo "=== summary ($(date -u +%H:%M:%SZ); data $DATA) ==="
    for name in "${parts[@]}"; do
        echo "$name: exit ${RC[$name]}, ${SECS[$name]} s wall"
    done
    "$PY" - "$OUT_DIR" "${parts[@]}" <<'EOF'
import json, sys
from pathlib import Path
for name in sys.argv[2:]:
    path = Path(sys.argv[1]) / f"{name}.json"
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"\n[{name}] no results ({type(e).__name__})")
        continue
    print(f"\n[{name}] {r.get('device')}, torch {r.get('torch')}, {r.get('data_source')}")
    print(r.get("table") or "(no finished runs)")
    for m, s in r.get("methods", {}).items():
        if s.get("compile_seconds") is not None:
            print(f"{m}: compile {s['compile_seconds']:.1f} s, data {s['data_seconds']:.1f} s (not in train time)")
    if r.get("time_ratio_fastcifar_over_airbench"):
        print(f"time ratio fastcifar/airbench: {r['time_ratio_fastcifar_over_airbench']:.2f}")
    for e in r.get("errors") or []:
        print("error:", e)
EOF
} 2>&1 | tee "$OUT_DIR/summary.txt"
exit $status

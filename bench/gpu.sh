#!/usr/bin/env bash
# One prepared GPU run, in parts, each under its own `timeout` and all inside one budget; a failed,
# timed-out or skipped part does not stop the next, and the summary (summary.txt, parts.json) is rewritten
# after every part, never only at the end:
#   1. speedrun    the speedrun preset against airbench94 on the same images, interleaved seed by seed
#                  (compiled; if torch.compile fails, the part reruns eager and says so)
#   2. ablations   python -m fastcifar.compare: the speedrun preset against variants (FASTCIFAR_GPU_ARMS),
#                  paired seeds, eager (accuracy and FLOPs do not depend on compilation)
#   3. cuda-tests  `pytest -m cuda tests/test_cuda.py`: what the CPU CI skips (compile, CUDA graphs, fp16, ...)
#   4. default     the default 24-epoch recipe
# bench/speedrun.py rewrites its part's JSON after every seed, and compare its results after every run, so a
# part cut off by its timeout keeps every seed that finished. Clock: "run s" is airbench94's convention for
# both methods (bench/speedrun.py's docstring, bench/RESULTS.md); FLOPs per run next to it.
#
#   bash bench/gpu.sh OUT_DIR
#
# Prepare once, in the repository root (.gpu/ is git-ignored; copy it to the GPU machine with the checkout):
#   mkdir -p .gpu
#   cp ../shared/data/cifar10-gpu.tar.gz .gpu/          # 54 MB: lossless test split, JPEG q90 train split
#   pip download --no-deps -d .gpu/sdist airbench==0.1.8
#   pip wheel --no-deps -w .gpu/whl .gpu/sdist/airbench-0.1.8.tar.gz
# No airbench wheel in .gpu/whl: the speedrun part runs without airbench and says so.
#
# OUT_DIR gets (flat, <= 8 files): env.txt, log.txt (every part's output), summary.txt, parts.json,
# speedrun.json, ablations.json (compare's results.json), default.json. The summary is printed last.
#
# CPU smoke test (tests/test_speedrun.py runs this on a tiny synthetic data set):
#   FASTCIFAR_GPU_SMOKE=1 FASTCIFAR_GPU_DATA=/path/to/tiny PYTHON=.venv/bin/python bash bench/gpu.sh /tmp/out
# SMOKE=1 means: widths 4,8,8,8, 1 epoch, batch 64, --device cpu, 2 + 1 runs, no airbench unless asked for,
# preset `speedrun`, private site dir, two ablation arms over 2 seeds.
#
# Environment (defaults in brackets):
#   PYTHON [python3]  FASTCIFAR_GPU_DATA [.gpu/cifar10-gpu.tar.gz]  FASTCIFAR_GPU_WHEELS [.gpu/whl]
#   FASTCIFAR_GPU_SITE [/tmp/site]  FASTCIFAR_GPU_PRESET [speedrun]  FASTCIFAR_GPU_RUNS [5]
#   FASTCIFAR_GPU_AIRBENCH_RUNS [= runs]  FASTCIFAR_GPU_DEFAULT_RUNS [1]  FASTCIFAR_GPU_AIRBENCH [1]
#   FASTCIFAR_GPU_BUDGET [400 s, counted from the start]: no part runs past it; a part starts only with
#   FASTCIFAR_GPU_MIN_PART [30 s] left, and gets min(its timeout, what is left)
#   timeouts: FASTCIFAR_GPU_T_SPEEDRUN [190 s]  FASTCIFAR_GPU_T_ABLATIONS [150 s]  FASTCIFAR_GPU_T_TESTS [60 s]
#             FASTCIFAR_GPU_T_DEFAULT [100 s]
#   FASTCIFAR_GPU_ARMS [see below; empty = no ablations]: compare's arms, one per line
#   FASTCIFAR_GPU_SEEDS [3]: compare's --seeds
#   FASTCIFAR_GPU_EXTRA [none]: extra fastcifar.train flags for every training part, e.g. "--eval-every 100"
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
DATA=${FASTCIFAR_GPU_DATA:-$REPO/.gpu/cifar10-gpu.tar.gz}
WHEELS=${FASTCIFAR_GPU_WHEELS:-$REPO/.gpu/whl}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fastcifar-gpu.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
LOG=$OUT_DIR/log.txt
: > "$LOG"

# private cache (decoded data, compiled kernels): nothing from an earlier run is reused
export FASTCIFAR_HOME=$SCRATCH/home
export TORCHINDUCTOR_CACHE_DIR=$SCRATCH/inductor
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# compare's arms for the ablations part: the speedrun preset first (every other arm is paired with it)
DEFAULT_ARMS='base=--preset speedrun
lr1.0=--preset speedrun --lr 1.0
lr2.0=--preset speedrun --lr 2.0
res123-e7=--preset speedrun --residual 1,2,3 --epochs 7
muon=--preset speedrun --optimizer muon'
if [ "$SMOKE" = 1 ]; then
    SITE=${FASTCIFAR_GPU_SITE:-$SCRATCH/site}
    RUNS=${FASTCIFAR_GPU_RUNS:-2}
    DEFAULT_RUNS=${FASTCIFAR_GPU_DEFAULT_RUNS:-1}
    AIRBENCH=${FASTCIFAR_GPU_AIRBENCH:-0}
    ARMS=${FASTCIFAR_GPU_ARMS-'base=--preset speedrun
lr=--preset speedrun --lr 0.5'}
    SEEDS=${FASTCIFAR_GPU_SEEDS:-2}
    TRAIN_FLAGS=(--widths 4,8,8,8 --epochs 1 --batch-size 64 --device cpu)
else
    SITE=${FASTCIFAR_GPU_SITE:-/tmp/site}
    RUNS=${FASTCIFAR_GPU_RUNS:-5}
    DEFAULT_RUNS=${FASTCIFAR_GPU_DEFAULT_RUNS:-1}
    AIRBENCH=${FASTCIFAR_GPU_AIRBENCH:-1}
    ARMS=${FASTCIFAR_GPU_ARMS-$DEFAULT_ARMS}
    SEEDS=${FASTCIFAR_GPU_SEEDS:-3}
    TRAIN_FLAGS=()
fi
AIRBENCH_RUNS=${FASTCIFAR_GPU_AIRBENCH_RUNS:-$RUNS}
BUDGET=${FASTCIFAR_GPU_BUDGET:-400}
MIN_PART=${FASTCIFAR_GPU_MIN_PART:-30}
T_TESTS=${FASTCIFAR_GPU_T_TESTS:-60}
T_SPEEDRUN=${FASTCIFAR_GPU_T_SPEEDRUN:-190}
T_ABLATIONS=${FASTCIFAR_GPU_T_ABLATIONS:-150}
T_DEFAULT=${FASTCIFAR_GPU_T_DEFAULT:-100}
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
TRAIN_FLAGS+=(${FASTCIFAR_GPU_EXTRA:-})

NOTES=()
# airbench comes from its carried wheel (the GPU image has none): no wheel, no airbench, and a note
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
airbench_wheels=("$WHEELS"/airbench-*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" \
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

PRESET=${FASTCIFAR_GPU_PRESET:-speedrun}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    echo "data: $DATA$([ "$(basename "$DATA")" = cifar10-gpu.tar.gz ] && echo ' (GPU copy: train JPEG q90, test lossless)')"
    echo "smoke: $SMOKE  preset: $PRESET  runs: $RUNS  airbench: $AIRBENCH x $AIRBENCH_RUNS  default runs: $DEFAULT_RUNS"
    echo "budget ${BUDGET}s; timeouts: speedrun ${T_SPEEDRUN}s, ablations ${T_ABLATIONS}s, tests ${T_TESTS}s," \
         "default ${T_DEFAULT}s; extra train flags: ${TRAIN_FLAGS[*]:-none}"
    echo "ablation arms (${SEEDS} seeds each): $(echo "$ARMS" | tr '\n' ';')"
    for note in ${NOTES[@]+"${NOTES[@]}"}; do echo "note: $note"; done
    if command -v nvidia-smi >/dev/null 2>&1; then
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
} 2>&1 | tee "$OUT_DIR/env.txt" | tee -a "$LOG"

status=0
PARTS=()  # "name|exit code|seconds|what happened", in running order

# write_summary: parts.json and summary.txt from PARTS and each part's JSON; rewritten after every part
write_summary() {
    "$PY" - "$OUT_DIR" "$DATA" ${NOTES[@]+"${NOTES[@]/#/note:}"} ${PARTS[@]+"${PARTS[@]}"} <<'EOF' > "$OUT_DIR/summary.txt" 2>&1
import json, sys, time
from pathlib import Path

out, data = Path(sys.argv[1]), sys.argv[2]
notes = [a[5:] for a in sys.argv[3:] if a.startswith("note:")]
parts = [dict(zip(("name", "exit_code", "seconds", "status"), a.split("|", 3))) for a in sys.argv[3:]
         if not a.startswith("note:")]
for p in parts:
    p["exit_code"] = int(p["exit_code"]) if p["exit_code"] else None
    p["seconds"] = int(p["seconds"]) if p["seconds"] else None
tmp = out / "parts.json.tmp"
tmp.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data": data,
                           "notes": notes, "parts": parts}, indent=2) + "\n")
tmp.replace(out / "parts.json")
print(f"=== summary ({time.strftime('%H:%M:%SZ', time.gmtime())}; data {data}) ===")
for note in notes:
    print("note:", note)
for p in parts:
    print(f"{p['name']}: {p['status']}" + (f", exit {p['exit_code']}" if p["exit_code"] is not None else "")
          + (f", {p['seconds']} s wall" if p["seconds"] is not None else ""))
for p in parts:
    try:
        r = json.loads((out / f"{p['name']}.json").read_text())
    except (OSError, ValueError):
        continue  # the tests part has no JSON; a part killed before its first seed neither
    if "arms" in r:  # compare's results.json: its rows, with each arm's work per run
        from fastcifar.config import TrainConfig
        from fastcifar.flops import recipe_flops
        print(f"\n[{p['name']}] compare, {r['eval_split']} split, seeds {r['seeds']}")
        for name, arm in r["arms"].items():
            work = recipe_flops(TrainConfig(**arm["config"]), 50000, 10000)["per_run"] / 1e15
            print(f"{name}: {work:.3f} PFLOP per run (50,000 train / 10,000 test images), {len(arm['runs'])} run(s)")
        print("\n".join(r.get("markdown") or ["(no finished runs)"]))
        continue
    print(f"\n[{p['name']}] {r.get('device')}, torch {r.get('torch')}, {r.get('data_source')}")
    print(r.get("table") or "(no finished runs)")
    if r.get("time_ratio_fastcifar_over_airbench"):
        print(f"run ratio fastcifar/airbench: {r['time_ratio_fastcifar_over_airbench']:.2f}")
    for line in [f"WARNING: {n}" for n in r.get("notes") or []] + [f"error: {e}" for e in r.get("errors") or []]:
        print(line)
EOF
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
        --out-dir "$SCRATCH/runs/$name" "$@"
}

extra=()
[ ${#TRAIN_FLAGS[@]} -gt 0 ] && extra=(-- "${TRAIN_FLAGS[@]}")
airbench_flags=()
[ "$AIRBENCH" = 1 ] && airbench_flags=(--airbench --airbench-runs "$AIRBENCH_RUNS")

# 1. the speedrun, compiled; eager again when no compiled fastcifar seed finished
run_speedrun_part speedrun "$T_SPEEDRUN" --preset "$PRESET" --runs "$RUNS" \
    ${airbench_flags[@]+"${airbench_flags[@]}"} ${extra[@]+"${extra[@]}"}
if [[ "${PARTS[-1]}" != *"|skipped"* ]] && ! "$PY" - "$OUT_DIR/speedrun.json" >>"$LOG" 2>&1 <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
sys.exit(0 if any(not r.get("error") for r in (report.get("fastcifar") or {}).get("runs", [])) else 1)
EOF
then
    NOTES+=("speedrun: no compiled fastcifar seed finished, so the part reran eager (--no-compile); see log.txt")
    eager=(-- ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} --no-compile)
    run_speedrun_part speedrun-eager "$T_SPEEDRUN" --preset "$PRESET" --runs "$RUNS" \
        ${airbench_flags[@]+"${airbench_flags[@]}"} "${eager[@]}"
fi

# 2. ablations: compare's paired seeds, eager; its results.json is copied out after the part, even a cut one
if [ -n "$ARMS" ]; then
    mapfile -t arms <<< "$ARMS"
    run_part ablations "$T_ABLATIONS" "$PY" -m fastcifar.compare "${arms[@]}" --seeds "$SEEDS" \
        --out-dir "$SCRATCH/ablations" -- --data-dir "$DATA" --no-compile --no-plots --eval-every 100 \
        ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
    cp "$SCRATCH/ablations/results.json" "$OUT_DIR/ablations.json" 2>>"$LOG" && write_summary
fi

# 3. what the CPU CI skips
run_part cuda-tests "$T_TESTS" "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py

# 4. the default recipe
if [ "$DEFAULT_RUNS" -gt 0 ]; then
    run_speedrun_part default "$T_DEFAULT" --preset default --runs "$DEFAULT_RUNS" ${extra[@]+"${extra[@]}"}
fi

echo
cat "$OUT_DIR/summary.txt"
exit $status

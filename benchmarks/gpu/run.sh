#!/usr/bin/env bash
# Everything we want to know from a lent GPU machine (H100/H200, torch 2.11 + CUDA, no network), in one command
# run from the repository root of a copy of the working tree:
#
#   deps       install autoprec's missing dependencies (optuna & co.) from the carried wheels in .whl/
#              into a scratch folder on PYTHONPATH (benchmarks/gpu/wheels.py; never a torch)
#   machine    nvidia-smi -L, torch and CUDA versions, the device, TF32 settings, where optuna came from
#   tests      the tests that depend on a CUDA GPU (benchmarks/gpu/cuda_tests.txt), junit XML
#   calibrate  python -m autoprec calibrate --device cuda: the device profile tune prices formats with
#   gpu_speed  benchmarks/gpu_speed.py on GPT-2 small at a real step (8 x 1024 tokens): FP32 strict and TF32,
#              blanket BF16 and FP16 autocast, the tuned policy, each eager and compiled
#   fp8        (only when asked for, in GPU_RUN_STAGES: it does not fit in the 8 minutes beside the others)
#              benchmarks/fp8.py on the Llama-like stack at width 2048 at a real step (8 x 1024 tokens), compiled:
#              tune with FP8 candidates priced by the calibration, then BF16, torchao's default (every Linear) and
#              the tuned assignment, 100 steps each in native FP8: tokens/s and losses (each run's in fp8.log when
#              it ends)
#
# Each stage runs under its own time limit (the default stages in all at most 8 minutes: deps 20 s, machine 15 s,
# tests 110 s, calibrate 50 s, gpu_speed 260 s, each plus at most 5 s to die after the limit; fp8 110 s); a stage
# that fails does not stop the later ones. Everything lands in $OUT (default benchmarks/results/gpu): each stage's
# log, stages.json (each stage's exit code, seconds, limit), machine.json, tests.xml, profile.json, gpu_speed.json
# and gpu_speed.md
# (gpu_speed.partial.json instead where gpu_speed reached its limit: the tune's time, each variant's warm-up steps),
# fp8.json (written after each model).
# The exit code is 1 if any stage failed.
#
#   bash benchmarks/gpu/run.sh                       # on the GPU machine (carry .whl)
#   GPU_RUN_DRY=1 bash benchmarks/gpu/run.sh         # every stage in a tiny CPU form (tests/test_gpu_run.py)
#   GPU_RUN_STAGES="calibrate gpu_speed" bash benchmarks/gpu/run.sh    # some stages only
#   GPU_RUN_STAGES="deps calibrate fp8" bash benchmarks/gpu/run.sh       # FP8 on its own (an H100: calibrate first)
#
# Environment: OUT; GPU_RUN_DRY; GPU_RUN_STAGES; PYTHON (default python3); WHEELS (default .whl); DEPS (default a
# new temporary folder); T_DEPS, T_MACHINE, T_TESTS, T_CALIBRATE, T_GPU_SPEED, T_FP8 (limits, seconds);
# GPU_SPEED_ARGS (more arguments for gpu_speed.py, e.g. "--rounds 30"); FP8_ARGS (more for fp8.py).

set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd) || exit 2
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # paths given are the caller's
OUT=$(absolute "${OUT:-$ROOT/benchmarks/results/gpu}")
WHEELS=$(absolute "${WHEELS:-$ROOT/.whl}")
DEPS=$(absolute "${DEPS:-$(mktemp -d)}")
mkdir -p "$OUT" "$DEPS" || exit 2
cd "$ROOT" || exit 2
DRY=${GPU_RUN_DRY:-0}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
STAGES=${GPU_RUN_STAGES:-deps machine tests calibrate gpu_speed}
export PYTHONPATH="$DEPS:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export AUTOPREC_CACHE_DIR=${AUTOPREC_CACHE_DIR:-$OUT/autoprec-cache}  # calibrate's profile, read by gpu_speed's tune
export PYTHONUNBUFFERED=1

KILL_AFTER=5  # seconds a stage gets to die after its limit's SIGTERM, before SIGKILL
ENTRIES=()
FAILED=()

write_stages() {
    local IFS=,
    printf '{"dry": %s, "out": "%s", "stages": [%s], "failed": [%s]}\n' "$([ "$DRY" = 1 ] && echo true || echo false)" \
        "$OUT" "${ENTRIES[*]}" "$(for f in "${FAILED[@]}"; do printf '"%s"\n' "$f"; done | paste -sd, -)" \
        > "$OUT/stages.json"
}

# run_stage NAME LIMIT_S COMMAND...: the command under `timeout`, its output on the console and in $OUT/NAME.log
run_stage() {
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit} s): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k "$KILL_AFTER" "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    local seconds timed_out=false
    seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then timed_out=true; fi
    ENTRIES+=("{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $seconds, \"limit_s\": $limit, \"kill_after_s\": $KILL_AFTER, \"timed_out\": $timed_out, \"log\": \"$name.log\"}")
    if [ "$rc" -ne 0 ]; then FAILED+=("$name"); fi
    write_stages
    echo "=== $name: exit $rc after $seconds s"
}

mapfile -t CUDA_TESTS < <(grep -v -e '^#' -e '^[[:space:]]*$' benchmarks/gpu/cuda_tests.txt)
if [ "$DRY" = 1 ]; then
    export OMP_NUM_THREADS=1  # tiny tensors: one thread is as fast, and immune to a busy machine's contention
    CUDA_TESTS=("${CUDA_TESTS[0]}")  # collected and skipped on a CPU: the stage's plumbing, fast
    MACHINE=()
    CALIBRATE=(--device cpu --dtypes bf16 --seconds 0.5)
    SPEED=(--device cpu --size tiny --models gpt2 --batch 4 --seq 16 --rounds 1 --warmup 1 --backend eager)
    FP8=(--device cpu --models llama --width 32 --layers 1 --steps 3 --batch 2 --seq 16 --trials 2 --verify-steps 2
         --warmup 1 --threads 1 --compile --backend eager --assignments bf16 torchao tuned)
else
    MACHINE=(--require-cuda)
    CALIBRATE=(--device cuda --dtypes "fp16,bf16" --seconds 25)
    SPEED=(--models gpt2 --batch 8 --seq 1024 --rounds 15 --warmup 2)
    FP8=(--device cuda --models llama-2048 --big-steps 100 --batch 8 --seq 1024 --warmup 5 --compile
         --assignments bf16 torchao tuned)
fi
read -r -a SPEED_MORE <<< "${GPU_SPEED_ARGS:-}"
read -r -a FP8_MORE <<< "${FP8_ARGS:-}"
write_stages

run_stage deps "${T_DEPS:-20}" "$PYTHON" benchmarks/gpu/wheels.py install "$WHEELS" "$DEPS"
run_stage machine "${T_MACHINE:-15}" "$PYTHON" benchmarks/gpu/machine.py "$OUT" "${MACHINE[@]}"
run_stage tests "${T_TESTS:-110}" "$PYTHON" -m pytest -v -rs -p no:cacheprovider --durations=15 \
    --junitxml="$OUT/tests.xml" "${CUDA_TESTS[@]}"
run_stage calibrate "${T_CALIBRATE:-50}" "$PYTHON" -m autoprec calibrate "${CALIBRATE[@]}" --fresh \
    --out "$OUT/profile.json"
run_stage gpu_speed "${T_GPU_SPEED:-260}" "$PYTHON" benchmarks/gpu_speed.py "${SPEED[@]}" "${SPEED_MORE[@]}" \
    --out-dir "$OUT"
run_stage fp8 "${T_FP8:-110}" "$PYTHON" benchmarks/fp8.py "${FP8[@]}" "${FP8_MORE[@]}" --out "$OUT/fp8.json"

echo "=== stages: $(cat "$OUT/stages.json")"
[ "${#FAILED[@]}" -eq 0 ]

#!/usr/bin/env bash
# The GPU checks of issues #3 and #4 in one command (under 10 minutes), for a lent device
# machine (`device` tool) whose image has jax[cuda], flax, optax, orbax, torch and transformers
# but not this project:
#   1. train: one step of the ~1B-shaped model, bf16 compute, MFU against the data-sheet peak
#      (python -m benchmarks.train --model 1b; #4's target is 50%), never measured yet; attention
#      "auto", i.e. cuDNN's fused kernel (the deviceless compile, gpu_hlo.py --program train,
#      puts the MFU ceiling at 76%, against 42% with XLA's attention);
#   2. generate: the 7B-shaped random VipLlava in bf16, batch 1, decode tokens/s against the
#      HBM-bandwidth limit (python -m benchmarks.generate --model 7b; #3's target is 85%, stop 11: 63%);
#   3. the same decode with the while loop and its conditional inside XLA's command buffers
#      (CUDA graphs; XLA's default leaves WHILE and CONDITIONAL out, so every decode step waits
#      on the host for the loop predicate and for the greedy/sampled branch);
#   4. where that decode step's time goes: XLA's kernels by kind, with counts
#      (python -m benchmarks.profile_generate --model 7b);
#   5. if time is left, step 3 with XLA's dot merger raised so that each layer's gate and up
#      projections are one GEMV (gpu_hlo.py: 525 -> 493 kernels per 7B decode step), and
#   6. the train step at batch 16: on TPUs the deviceless estimate's MFU ceiling rises from 41%
#      to 51% when the rows per chip double (AdamW and other per-step costs spread over more
#      tokens, benchmarks/tpu_hlo.py), so if step 1 falls short of 50% this says whether the
#      batch is why. (XLA's attention, timed here before, is known to cap MFU at 42%.)
# Each step has its own timeout, and a step that would start past LATE seconds is skipped, so the
# command ends inside the device's 10-minute limit. Logs go to $OUT (or /tmp/gpu_out).
# Wheels of packages the image lacks may travel in .whl/ (see the device README); the image's
# own jax and flax run this code (a carried flax 0.12.8 did not import on its jax 0.11.2).
#   GPU_SMOKE=1 benchmarks/gpu.sh   # the same steps, shrunk to run on a CPU in a few minutes
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/gpu_out}"
W="${GPU_WORK:-/tmp/gpu_work}"
mkdir -p "$OUT" "$W"
OUT="$(cd "$OUT" && pwd)" W="$(cd "$W" && pwd)"  # absolute: the steps run from $REPO
cd "$REPO"  # the benchmarks run as modules of the checkout: python -m benchmarks.NAME
export PYTHONUNBUFFERED=1
SMOKE="${GPU_SMOKE:-}"
PY=python3
LATE=480  # seconds: no step starts after this
START=$(date +%s)
stamp() { echo "== $(( $(date +%s) - START )) s: $*" | tee -a "$OUT/summary.log"; }
late() { [ $(( $(date +%s) - START )) -gt "$LATE" ] && { stamp "skipped (late): $1"; return 0; }; return 1; }
# step NAME TIMEOUT LOG PYTHON_ARGS...: one benchmark run, its output in $OUT/LOG and on stdout
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    late "$name" && return
    stamp "$name"
    timeout "$limit" $PY "$@" 2>&1 | tee "$OUT/$log" | grep -v Warning
}

if [ -z "$SMOKE" ]; then
    rm -rf /tmp/site  # a warm machine keeps the last call's wheels
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$REPO"/.whl/*.whl && export PYTHONPATH=/tmp/site
    fi
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" >"$W/install.log" 2>&1 \
        || { echo "install failed"; cat "$W/install.log"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.log"
fi
$PY -c "import jax, flax, orbax.checkpoint as o, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__, 'transformers', transformers.__version__, jax.devices())" 2>&1 | tee -a "$OUT/summary.log"

if [ -z "$SMOKE" ]; then
    TRAIN=(--model 1b --dtype bfloat16 --batch 8 --text-tokens 447 --no-torch --repeat 3)
    GEN=(--model 7b --dtype bfloat16 --batches 1 --new-tokens 128 --no-torch)
    PROF=(--model 7b --dtype bfloat16 --batch 1 --new-tokens 129 --no-torch)
else
    TRAIN=(--batch 1 --text-tokens 16 --no-torch --repeat 1)
    GEN=(--batches 1 --new-tokens 4 --no-torch)
    PROF=(--batch 1 --new-tokens 5 --no-torch)
fi
step "train" 200 train_1b.log -m benchmarks.train "${TRAIN[@]}"
step "generate" 120 generate_7b.log -m benchmarks.generate "${GEN[@]}"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
    step "generate, loop in command buffers" 90 generate_7b_cmdbuf.log -m benchmarks.generate "${GEN[@]}"
step "decode profile" 100 profile_7b.log -m benchmarks.profile_generate "${PROF[@]}"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_dot_merger_threshold_mb=256" \
    step "generate, loop in command buffers, gate/up merged" 90 generate_7b_merged.log -m benchmarks.generate "${GEN[@]}"
[ -z "$SMOKE" ] && step "train, batch 16" 120 train_1b_b16.log -m benchmarks.train "${TRAIN[@]}" --batch 16
stamp "done"

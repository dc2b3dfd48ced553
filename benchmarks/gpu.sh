#!/usr/bin/env bash
# The GPU checks of issues #3, #4 and #5 in one command, for a lent device machine (`device`
# tool) whose image has jax[cuda], torch and transformers but not this project:
#   1. generate: the 7B-shaped random VipLlava in bf16, batch 1, decode tokens/s against the
#      HBM-bandwidth limit (benchmarks/generate.py --model 7b);
#   2. train: one step of the ~1B-shaped model, bf16 compute, MFU (benchmarks/train.py --model 1b),
#      XLA's attention, then cuDNN's fused attention;
#   3. the tiny VipLlava recipe (vipllava_jax/assets/tiny_vipllava) with ~7x the training images
#      of the CPU recipe (stage 2: batch 64 x 3000 steps over 96k scenes): is the synthetic task
#      learnable by this architecture when images are cheap?
# Logs go to $OUT (or /tmp/gpu_out). Wheels of the pure-Python dependencies the image lacks
# (tensorboardX; orbax-checkpoint 0.12.8) travel in .whl/ (see the device README). Not flax:
# 0.12.8 does not import on the image's jax 0.11.2; the image's own flax 0.12.10 runs this code.
#   GPU_SMOKE=1 benchmarks/gpu.sh   # the same steps, shrunk to run on a CPU in a few minutes
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/gpu_out}"
W="${GPU_WORK:-/tmp/gpu_work}"
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
SMOKE="${GPU_SMOKE:-}"
PY=python3
START=$(date +%s)
stamp() { echo "== $(( $(date +%s) - START )) s: $*" | tee -a "$OUT/summary.log"; }

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

# -- tiny recipe data, in the background while the benchmarks hold the GPU (CPU only) --------
if [ -z "$SMOKE" ]; then N=24000; MARKERS=8000; else N=200; MARKERS=100; fi
(
    cd "$W"
    export JAX_PLATFORMS=cpu  # the random init here must not take the GPU's memory
    $PY -m vipllava_jax.synthetic --out data --train $N --val 200 --test 400 --markers $MARKERS \
        --seed 0 --init-model init
    for k in 1 2 3; do  # three more sets of train scenes (other seeds) for the long run
        $PY -m vipllava_jax.synthetic --out data_$k --train $N --val 0 --test 0 --seed $k &
    done
    wait
    # one train file over the four sets, image paths relative to $W
    for d in data data_1 data_2 data_3; do
        sed "s#\"image\": \"images/#\"image\": \"$d/images/#" $d/train.jsonl
    done >train_all.jsonl
    echo "data done: $(wc -l <train_all.jsonl) train scenes"
) >"$OUT/tiny_data.log" 2>&1 &
DATA_PID=$!

# -- 1. generate, 7B-shaped, bf16, batch 1 -------------------------------------------------------
stamp "generate"
if [ -z "$SMOKE" ]; then
    timeout 150 $PY "$REPO/benchmarks/generate.py" --model 7b --dtype bfloat16 --batches 1 \
        --new-tokens 128 --no-torch 2>&1 | tee "$OUT/generate_7b.log" | grep -v Warning
else
    timeout 300 $PY "$REPO/benchmarks/generate.py" --batches 1 --new-tokens 4 --no-torch 2>&1 | tee "$OUT/generate_7b.log"
fi

# -- 2. train step, ~1B-shaped, bf16 compute, fp32 master weights -------------------------------
stamp "train"
if [ -z "$SMOKE" ]; then
    timeout 240 $PY "$REPO/benchmarks/train.py" --model 1b --dtype bfloat16 --batch 8 \
        --text-tokens 447 --no-torch --repeat 3 2>&1 | tee "$OUT/train_1b.log" | grep -v Warning
else
    timeout 300 $PY "$REPO/benchmarks/train.py" --batch 1 --text-tokens 16 --no-torch --repeat 1 2>&1 | tee "$OUT/train_1b.log"
fi

# -- 3. the tiny recipe, long ---------------------------------------------------------------------
stamp "tiny: waiting for data"
wait $DATA_PID
tail -2 "$OUT/tiny_data.log"
CFG="$REPO/vipllava_jax/assets/tiny_vipllava"
if [ -z "$SMOKE" ]; then S1=500; S2=3000; T2=160; WU=100; else S1=4; S2=6; T2=300; WU=1; fi
export_run() {  # a run's last complete checkpoint -> a model folder with the tokenizer
    $PY -c 'import sys; from vipllava_jax.training.loop import export_trained_model as e; e(*sys.argv[1:])' "$1" "$2"
}
(
    cd "$W"
    stamp "tiny stage 1 ($S1 steps, batch 16, the recipe's)"
    $PY -m vipllava_jax.train.cli --config "$CFG/warmup.toml" steps=$S1 save_every=$S1 log_every=100 train.warmup_steps=$WU
    export_run warmup warm
    stamp "tiny stage 2 (batch 64 x $S2 steps, 96k scenes; stopped after $T2 s if not done)"
    timeout $T2 $PY -m vipllava_jax.train.cli --config "$CFG/train.toml" data=train_all.jsonl image_folder=. \
        batch_size=64 steps=$S2 save_every=500 log_every=250 num_workers=8 worker_type=processes train.warmup_steps=$WU
    export_run train model
    stamp "tiny eval"
    timeout 90 $PY -m vipllava_jax.eval_cli --model model --data data/test.jsonl --out "$OUT/tiny_test_predictions.jsonl"
) >"$OUT/tiny_train.log" 2>&1
grep -E "step|accuracy|all|pairs|color|shape|left|right|count|where|Error|error" "$OUT/tiny_train.log" | tail -30

# -- 2b. the train step with cuDNN's fused attention ----------------------------------------------
if [ -z "$SMOKE" ]; then
    stamp "train, cuDNN attention"
    timeout 100 $PY "$REPO/benchmarks/train.py" --model 1b --dtype bfloat16 --batch 8 \
        --text-tokens 447 --no-torch --repeat 3 --attention cudnn 2>&1 | tee "$OUT/train_1b_cudnn.log" | grep -v Warning
fi
stamp "done"

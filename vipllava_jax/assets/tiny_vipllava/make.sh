#!/usr/bin/env bash
# Reproduces the embedded tiny VipLlava (vipllava_jax/assets/tiny_vipllava/model) from nothing:
#   synthetic data + tokenizer + random model -> vipllava-train (CPU) -> Orbax folder -> eval.
# Usage, from anywhere with the project installed (venv active):
#   vipllava_jax/assets/tiny_vipllava/make.sh [WORK_DIR] [--ship]
# --ship copies the result into the package (model/ and the test split in test/).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${1:-${TMPDIR:-/tmp}/tiny_vipllava}"
SHIP="${2:-}"
mkdir -p "$WORK"
cd "$WORK"

# 1. data (56000 train scenes x 7 questions, each seen once; 200 val / 400 test questions,
#    marked twins; 24000 single-object records for stage 1), the task's word-level tokenizer,
#    and the random model (Orbax folder + tokenizer) in init/
rm -rf data init objects stage1 train model
python -m vipllava_jax.synthetic --out data --train 56000 --val 200 --test 400 --objects 24000 \
    --seed 0 --init-model init

# a training run's last checkpoint -> a plain Orbax model folder with the tokenizer files
export_run() {
    python -c 'import sys; from vipllava_jax.training.loop import export_trained_model as e; e(*sys.argv[1:])' "$1" "$2"
}

# 2. train (paths in the configs are relative to this folder); wall and CPU time are printed.
#    Stage 1: single objects (objects.toml); stage 2: the task, from stage 1 (train.toml).
/usr/bin/env time -f "vipllava-train (stage 1): %e s wall, %U s user + %S s sys CPU" \
    vipllava-train --config "$HERE/objects.toml"
export_run objects stage1
/usr/bin/env time -f "vipllava-train (stage 2): %e s wall, %U s user + %S s sys CPU" \
    vipllava-train --config "$HERE/train.toml"

# 3. the last checkpoint -> the model folder
export_run train model

# 4. the accuracy table on the test split (and predictions)
vipllava-eval --model model --data data/test.jsonl --out test_predictions.jsonl

if [ "$SHIP" = "--ship" ]; then
    rm -rf "$HERE/model" "$HERE/test"
    cp -r model "$HERE/model"
    mkdir -p "$HERE/test/images"
    cp data/test.jsonl "$HERE/test/test.jsonl"
    cp -r data/images/test "$HERE/test/images/test"
    echo "shipped -> $HERE/model, $HERE/test"
fi

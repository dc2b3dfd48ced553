#!/usr/bin/env bash
# Reproduces the embedded tiny VipLlava (vipllava_jax/assets/tiny_vipllava/model) from nothing:
#   synthetic data + tokenizer + random model -> vipllava-train (CPU) -> Orbax folder -> eval.
# Usage, from anywhere in a checkout with the project installed (venv active):
#   [SEED=0] tools/tiny_vipllava/make.sh [WORK_DIR] [--ship]
# WORK_DIR (default $TMPDIR/tiny_vipllava) must be new, empty or one this script made before
# (it holds the marker file .tiny_vipllava_make): the script deletes its earlier results there.
# --ship copies the result into the package: vipllava_jax/assets/tiny_vipllava/model and the
# test split in vipllava_jax/assets/tiny_vipllava/test. SEED (default 0, the shipped model's)
# seeds the data, the random model and the order the stages read.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ASSETS="$REPO/vipllava_jax/assets/tiny_vipllava"  # where --ship puts the model and test split
MARKER=".tiny_vipllava_make"  # written into every work folder this script makes
die() { echo "make.sh: $*" >&2; exit 2; }

WORK="" SHIP=""
for arg in "$@"; do
    case "$arg" in
        --ship) SHIP="--ship" ;;
        -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | cut -c3-; exit 0 ;;
        -*) die "unknown option $arg (usage: make.sh [WORK_DIR] [--ship])" ;;
        *) [ -z "$WORK" ] || die "one work folder only (usage: make.sh [WORK_DIR] [--ship])"
           WORK="$arg" ;;
    esac
done
WORK="${WORK:-${TMPDIR:-/tmp}/tiny_vipllava}"
SEED="${SEED:-0}"
[ -z "$SHIP" ] || [ -d "$ASSETS" ] || die "--ship: no $ASSETS to ship into"
# The script deletes its earlier outputs in WORK (data, init, train, model, ...), so it only
# works in a folder it made: a foreign one may hold anything under those names (in a checkout,
# "make.sh ." would take the train/ package).
if [ -e "$WORK" ] || [ -L "$WORK" ]; then
    [ -d "$WORK" ] || die "$WORK exists and is not a folder"
    if [ -n "$(ls -A "$WORK")" ] && [ ! -f "$WORK/$MARKER" ]; then
        die "refusing $WORK: not empty and not made by make.sh (no $MARKER); name a new or empty folder"
    fi
fi
mkdir -p "$WORK"
echo "made by tools/tiny_vipllava/make.sh, which deletes its earlier results here" > "$WORK/$MARKER"
cd "$WORK"

# XLA settings for the 2-core CPU (README, "Fine-tuning"). The model is trained with them, so
# they are part of the recipe: other settings round differently and train another model.
# - Two XLA CPU devices, one per core. The configs' mesh "data=-1" splits each batch between
#   them. With one device, a task step's ~80 MB of temporaries is one allocation. glibc serves
#   it with a fresh mmap on every step, because a thread's arena holds at most 64 MB. That is
#   ~20000 page faults a step, and a fifth to a quarter of the CPU time goes to the kernel.
# - No YNNPACK fusions (the empty --xla_cpu_experimental_ynn_fusion_type=). At these widths
#   (96-256) its fused matmuls are slower than XLA's own.
# A stage-4 step in vipllava-train: median 0.142 s, against 0.186 s with one device and
# XLA's defaults.
CPU_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$CPU_FLAGS"

# 1. data: 80000 train records (each seen once; four in five a scene with the five questions,
#    one in five a single object), 200 val / 400 test questions (marked twins), the warm-up
#    splits of stages 1-3 (24000 single objects; 6400 more, also asked where they are; 32000
#    marked scenes asking the marked object's colour, or in three of ten its count, and three
#    records in ten single objects instead), a quarter of all training markers in the test
#    split's (evaluation) style, the task's word-level tokenizer, and the random model (Orbax
#    folder + tokenizer) in init/
rm -rf data init objects where color train stage1 stage2 stage3 model test_predictions.jsonl
# (tools/ is no installed package: the checkout goes on the path for this one command)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" python -m tools.synthetic --out data --train 80000 \
    --val 200 --test 400 --objects 24000 --where 6400 --color 32000 --train-objects 0.2 \
    --color-objects 0.3 --color-count 0.3 --constant-markers 0.25 --no-aux --seed "$SEED" --init-model init

# a training run's last checkpoint -> a plain Orbax model folder with the tokenizer files
export_run() {
    python -c 'import sys; from vipllava_jax.train import export_trained_model as e; e(*sys.argv[1:])' "$1" "$2"
}
train() {  # train CONFIG NAME: one vipllava-train run, its wall and CPU time printed
    /usr/bin/env time -f "vipllava-train ($2): %e s wall, %U s user + %S s sys CPU" \
        vipllava-train --config "$HERE/$1" seed="$SEED"
}

# 2. train (paths in the configs are relative to this folder), four runs, each from the last:
#    1 single objects, their shape and colour (objects.toml);
#    2 the same, also where the object is (where.toml);
#    3 marked scenes, one question, the marked object's colour (or, three in ten, its count;
#      color.toml): the decoder learns to attend to the marked object;
#    4 the task (train.toml).
START=$SECONDS
train objects.toml "stage 1, objects"
export_run objects stage1
train where.toml "stage 2, where"
export_run where stage2
train color.toml "stage 3, color"
export_run color stage3
train train.toml "stage 4, the task"
echo "training, the four stages and their exports: $((SECONDS - START)) s"

# 3. the last checkpoint -> the model folder
export_run train model

# 4. the accuracy table on the test split (and predictions)
vipllava-eval --model model --data data/test.jsonl --out test_predictions.jsonl

if [ "$SHIP" = "--ship" ]; then
    rm -rf "$ASSETS/model" "$ASSETS/test"
    cp -r model "$ASSETS/model"
    mkdir -p "$ASSETS/test/images"
    cp data/test.jsonl "$ASSETS/test/test.jsonl"
    cp -r data/images/test "$ASSETS/test/images/test"
    echo "shipped -> $ASSETS/model, $ASSETS/test"
fi

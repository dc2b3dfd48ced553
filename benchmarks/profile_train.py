"""Where a train step's time goes: XLA's own per-op timings, summed by op kind.

    python -m benchmarks.profile_train [--batch 4] [--text-tokens 128] [--top 25]

One step of benchmarks/train.py (the "bench-158M" model, stage "full", fp32, 1 device) under
`jax.profiler.trace`; prints milliseconds per op kind as benchmarks/profile_generate.py does
(`ynn_fusion` = the matmuls XLA hands to YNNPACK, `dot`/`convolution` = matmuls it emits itself,
`copy_*`/`transpose_*` = layout passes, `*_fusion` = elementwise passes).
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np
import torch

from benchmarks.generate import bench_config
from benchmarks.profile_generate import op_times, print_op_times
from benchmarks.train import make_batch
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.train import (
    TrainConfig,
    init_train_state,
    make_train_step,
    mesh_from_spec,
    shard_batch,
)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--remat", default="none")
    args = p.parse_args()
    from transformers import VipLlavaForConditionalGeneration as TorchModel

    torch.manual_seed(0)
    cfg = bench_config()
    with tempfile.TemporaryDirectory() as tmp:
        TorchModel(cfg).save_pretrained(tmp)
        model = VipLlavaForConditionalGeneration.from_pretrained(tmp)
    ids, labels, mask, pixels = make_batch(args.batch, args.text_tokens, cfg)
    mesh = mesh_from_spec("data=1", jax.devices()[:1])
    config = TrainConfig(stage="full", remat=args.remat)
    graphdef, state, shardings = init_train_state(model, config, mesh)
    del model
    step = make_train_step(graphdef, config, mesh, shardings)
    batch = shard_batch({"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
                         "attention_mask": mask.astype(np.int32), "pixel_values": pixels}, mesh)
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready((state, metrics))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        kinds, counts = op_times(trace_dir)
    print(f"batch {args.batch} x {ids.shape[1]} tokens, remat {args.remat}: "
          f"{sum(kinds.values()) / 1e3:.0f} ms in XLA ops ({sum(counts.values())} ops)")
    print_op_times(kinds, counts, args.top)


if __name__ == "__main__":
    main()

"""Train speed: one step (forward, backward, AdamW) of vipllava-jax against transformers' PyTorch.

    python benchmarks/train.py [--batch 4] [--text-tokens 128] [--repeat 3]

The "bench-158M" model of benchmarks/generate.py, fp32, same weights in both frameworks.
Batch: 4 rows of BOS + 256 image tokens + 128 text tokens (385 tokens), one 224 px image each;
labels on the text tokens only (the image positions are -100, as in LLaVA training).
Stage "full": the projector, the decoder and lm_head are trained, the vision tower is frozen.

    JAX:     init_train_state + make_train_step on a 1-device mesh, TrainConfig defaults
             (clip to global norm 1, AdamW lr 2e-5, no weight decay)
    PyTorch: model(..., labels=...).loss.backward(), clip_grad_norm_(1.0), torch.optim.AdamW
             (the same settings), zero_grad

Prints seconds per step (min of --repeat after one warm-up step), tokens/s, the JAX / PyTorch
ratio, and the fraction of this machine's matmul peak (jitted 2048x2048 fp32 matmul, measured
in this run) reached by each, counting model FLOPs per step as vipllava-train does for its MFU
(`training.loop.train_flops_per_token`: 6 per trainable weight, 2 per frozen vision weight,
attention 12 x layers x tokens x width, per token), next to XLA's own count of the step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import IMAGE_TOKEN, bench_config, machine_roofline  # noqa: E402

from vipllava_jax import VipLlavaForConditionalGeneration  # noqa: E402
from vipllava_jax.training import (  # noqa: E402
    TrainConfig, init_train_state, make_train_step, mesh_from_spec, shard_batch,
)
from vipllava_jax.training.loop import train_flops_per_token  # noqa: E402

IMAGE_TOKENS = 256


def make_batch(batch: int, text_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, IMAGE_TOKENS), IMAGE_TOKEN),
                          rng.integers(3, 32000, (batch, text_tokens))], axis=1)
    labels = np.where(ids == IMAGE_TOKEN, -100, ids)
    labels[:, 0] = -100
    pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
    return ids, labels, np.ones_like(ids), pixels


def bench_jax(path, data, repeat):
    ids, labels, mask, pixels = data
    model = VipLlavaForConditionalGeneration.from_pretrained(path, dtype="float32", param_dtype="float32")
    mesh = mesh_from_spec("data=1", jax.devices()[:1])
    config = TrainConfig(stage="full")
    graphdef, state, shardings = init_train_state(model, config, mesh)
    del model
    step = make_train_step(graphdef, config, mesh, shardings)
    batch = shard_batch({"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
                         "attention_mask": mask.astype(np.int32), "pixel_values": pixels}, mesh)
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(state.frozen))
    text = bench_config().text_config
    flops = ids.size * train_flops_per_token(
        state, num_layers=text.num_hidden_layers, hidden=text.hidden_size, seq_len=ids.shape[1])
    xla_flops = step.lower(state, batch).compile().cost_analysis().get("flops", float("nan"))

    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - t  # compile + one step
    losses = [float(metrics["loss"])]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        best = min(best, time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
    return best, first - best, losses, n_train, n_frozen, flops, xla_flops


def bench_torch(ref, data, repeat):
    ids, labels, mask, pixels = data
    ref.train()
    for name, p in ref.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    inputs = dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                  attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels))

    def one():
        loss = ref(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [one()]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        losses.append(one())
        best = min(best, time.perf_counter() - t)
    return best, losses


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    from transformers import VipLlavaForConditionalGeneration as TorchModel

    torch.manual_seed(0)
    ref = TorchModel(bench_config())
    data = make_batch(args.batch, args.text_tokens)
    tokens = data[0].shape[1]
    gflops, _ = machine_roofline()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        jt, jc, jl, n_train, n_frozen, flops, xla_flops = bench_jax(tmp, data, args.repeat)
    tt, tl = bench_torch(ref, data, args.repeat)
    n_tok = args.batch * tokens

    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}")
    print(f"model: {(n_train + n_frozen) / 1e6:.0f}M params fp32 ({n_train / 1e6:.1f}M trained, "
          f"{n_frozen / 1e6:.1f}M frozen vision); batch {args.batch} x {tokens} tokens; "
          f"{flops / 1e9:.0f} GFLOP per step (XLA counts {xla_flops / 1e9:.0f})")
    print(f"machine: matmul {gflops:.1f} GFLOP/s (jitted 2048x2048 fp32)")
    print(f"losses (first step, then timed): jax {' '.join(f'{x:.4f}' for x in jl)}")
    print(f"                                 torch {' '.join(f'{x:.4f}' for x in tl)}")
    print(f"{'':24}{'jax':>12}{'torch':>12}{'jax/torch':>12}")
    print(f"{'step (s)':24}{jt:12.3f}{tt:12.3f}{tt / jt:12.2f}x faster")
    print(f"{'tokens/s':24}{n_tok / jt:12.1f}{n_tok / tt:12.1f}{tt / jt:12.2f}x")
    print(f"{'GFLOP/s':24}{flops / jt / 1e9:12.1f}{flops / tt / 1e9:12.1f}")
    print(f"{'fraction of matmul peak':24}{flops / jt / 1e9 / gflops:12.0%}{flops / tt / 1e9 / gflops:12.0%}")
    print(f"{'compile (s)':24}{jc:12.1f}")


if __name__ == "__main__":
    main()

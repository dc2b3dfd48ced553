"""Train speed: one step (forward, backward, AdamW) of vipllava-jax against transformers' PyTorch.

    python -m benchmarks.train [--batch 4] [--text-tokens 128] [--repeat 3]

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
(`vipllava_jax.train.flops.train_flops_per_token`: 6 per trained weight and token, 2 per frozen vision
weight and image token, plus attention, causal in the decoder), next to XLA's own count.
All JAX steps run before the torch ones, not in turn: on a 2-core CPU the first JAX step after
a torch step took 9.3 s against 6.2 s (also after a 2 s pause), so alternating them would
charge JAX for what torch's step leaves behind.

On a GPU (JAX only, random init):

    python -m benchmarks.train --model 1b --dtype bfloat16 --batch 8 --text-tokens 447 --no-torch

"1b" is CLIP ViT-L/14 at 336 px (576 image tokens, frozen) + a TinyLlama-sized decoder (2048
wide x 22 layers, MLP 5632); `--dtype bfloat16` computes in bf16 with fp32 master weights and
optimizer state. MFU is then also printed against the card's data-sheet bf16 peak.
`--attention` is `TrainConfig.attention`: "auto" (the default: cuDNN's fused flash attention
on a GPU, Pallas splash attention on a TPU, XLA's elsewhere), "xla", "cudnn" or "pallas".
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch

from benchmarks.generate import (
    IMAGE_TOKEN,
    SHAPES,
    bench_config,
    datasheet,
    image_tokens,
    machine_roofline,
    random_model,
)
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.train import (
    TrainConfig,
    init_train_state,
    make_train_step,
    mesh_from_spec,
    shard_batch,
)
from vipllava_jax.train.config import ATTENTION
from vipllava_jax.train.flops import train_flops_per_token


def make_batch(batch: int, text_tokens: int, config, seed: int = 0):
    n_img, size = image_tokens(config), config.vision_config.image_size
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, n_img), IMAGE_TOKEN),
                          rng.integers(3, 32000, (batch, text_tokens))], axis=1)
    labels = np.where(ids == IMAGE_TOKEN, -100, ids)
    labels[:, 0] = -100
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return ids, labels, np.ones_like(ids), pixels


def bench_jax(model, data, repeat, remat="none", attention="auto"):
    ids, labels, mask, pixels = data
    mesh = mesh_from_spec("data=1", jax.devices()[:1])
    config = TrainConfig(stage="full", remat=remat, attention=attention)
    model_config = model.config
    graphdef, state, shardings = init_train_state(model, config, mesh)
    del model
    step = make_train_step(graphdef, config, mesh, shardings)
    batch = shard_batch({"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
                         "attention_mask": mask.astype(np.int32), "pixel_values": pixels}, mesh)
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(state.frozen))
    flops = ids.size * train_flops_per_token(state, model_config, seq_len=ids.shape[1])
    t = time.perf_counter()
    step = step.lower(state, batch).compile()  # compiled once: timed here, then run below
    compile_s = time.perf_counter() - t
    xla_flops = step.cost_analysis().get("flops", float("nan"))

    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    losses = [float(metrics["loss"])]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        best = min(best, time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
    return best, compile_s, losses, n_train, n_frozen, flops, xla_flops


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
    p.add_argument("--model", choices=sorted(SHAPES), default="bench-158M")
    p.add_argument("--dtype", default="float32", help="JAX compute dtype (parameters stay fp32)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--remat", default="none", help="TrainConfig.remat: none, dots or full")
    p.add_argument("--attention", choices=ATTENTION, default="auto")
    p.add_argument("--no-torch", action="store_true", help="JAX only (random init, no reference)")
    args = p.parse_args()
    cfg = bench_config(args.model)
    data = make_batch(args.batch, args.text_tokens, cfg)
    tokens = data[0].shape[1]
    gflops, _ = machine_roofline(args.dtype)
    sheet = datasheet()
    ref = None
    if args.no_torch:
        model = random_model(VipLlavaConfig.from_hf_dict(cfg.to_dict()), args.dtype, "float32")
    else:
        torch.set_num_threads(os.cpu_count())
        from transformers import VipLlavaForConditionalGeneration as TorchModel

        torch.manual_seed(0)
        ref = TorchModel(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_pretrained(tmp)
            model = VipLlavaForConditionalGeneration.from_pretrained(
                tmp, dtype=args.dtype, param_dtype="float32")
    jt, jc, jl, n_train, n_frozen, flops, xla_flops = bench_jax(
        model, data, args.repeat, args.remat, args.attention)
    tt, tl = bench_torch(ref, data, args.repeat) if ref is not None else (None, None)
    n_tok = args.batch * tokens

    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}")
    print(f"model: {args.model}, {(n_train + n_frozen) / 1e6:.0f}M params fp32 ({n_train / 1e6:.1f}M trained, "
          f"{n_frozen / 1e6:.1f}M frozen vision), compute {args.dtype}, remat {args.remat}, "
          f"attention {args.attention}; batch {args.batch} x {tokens} tokens; "
          f"{flops / 1e9:.0f} GFLOP per step (XLA counts {xla_flops / 1e9:.0f})")
    print(f"machine: matmul {gflops:.1f} GFLOP/s (jitted, {args.dtype})"
          + (f"; data sheet {sheet[0] / 1e12:.0f} TFLOP/s bf16" if sheet else ""))
    print(f"losses (first step, then timed): jax {' '.join(f'{x:.4f}' for x in jl)}")
    if tl is not None:
        print(f"                                 torch {' '.join(f'{x:.4f}' for x in tl)}")

    def row(name, fmt, of_step, ratio=""):
        """A table row: `of_step(seconds per step)` for JAX, then for torch when it ran."""
        line = f"{name:24}{of_step(jt):12{fmt}}"
        print(line if tt is None else f"{line}{of_step(tt):12{fmt}}{ratio}")

    print(f"{'':24}{'jax':>12}" + ("" if tt is None else f"{'torch':>12}{'jax/torch':>12}"))
    speedup = "" if tt is None else f"{tt / jt:12.2f}x"
    row("step (s)", ".3f", lambda t: t, speedup and speedup + " faster")
    row("tokens/s", ".1f", lambda t: n_tok / t, speedup)
    row("GFLOP/s", ".1f", lambda t: flops / t / 1e9)
    row("fraction of matmul peak", ".0%", lambda t: flops / t / 1e9 / gflops)
    if sheet:
        print(f"{'MFU (data-sheet peak)':24}{flops / jt / sheet[0]:12.1%}")
    print(f"{'compile (s)':24}{jc:12.1f}")


if __name__ == "__main__":
    main()

"""Generate speed: vipllava-jax against transformers' PyTorch model, same weights, same prompt.

    python benchmarks/generate.py [--new-tokens 32] [--dtype float32]

The "bench-158M" model: CLIP vision 384 wide x 12 layers at 224 px, patch 14 (256 image
tokens); Llama 768 wide x 12 layers, 12 heads, MLP 2048, vocab 32064. Prompt: BOS + 256 image
tokens + 32 text tokens. Prints prefill latency (prompt -> first token), decode tokens/s at batch 1 and 8, compile time,
the JAX / PyTorch ratios, and the machine's matmul GFLOP/s and copy GB/s measured in this run
with the fraction of the decode bandwidth limit (bytes of weights + cache read per step) reached.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax import generate as gen

IMAGE_TOKEN = 32000


def bench_config():
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig

    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                              num_attention_heads=6, image_size=224, patch_size=14)
    text = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, vocab_size=32064,
                       max_position_embeddings=2048)
    return VipLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=IMAGE_TOKEN, vision_feature_layer=[-2, -5, -8, -11, 6])


def prompt(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, 256), IMAGE_TOKEN),
                          rng.integers(3, 32000, (batch, 32))], axis=1)
    pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
    return ids, pixels, np.ones_like(ids)


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine_roofline():
    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t = timed(lambda: mm(a).block_until_ready(), 5)
    gflops = 2 * 2048**3 / t / 1e9
    src = np.ones(256 * 2**20 // 4, np.float32)  # 256 MiB
    dst = np.empty_like(src)
    t = timed(lambda: np.copyto(dst, src), 5)
    gbps = 2 * src.nbytes / t / 1e9  # read + write
    return gflops, gbps


# Decode speed = (time to generate N tokens - time to generate 1) / (N - 1) steps, for both
# frameworks: prefill cancels out, so the figure is the cached decode loop alone.

def bench_jax(model, batch, new_tokens):
    ids, pixels, mask = prompt(batch)
    graphdef, params = nnx.split(model)
    sampling = gen.SamplingParams(
        do_sample=np.bool_(False), temperature=np.float32(1), top_k=np.int32(0),
        top_p=np.float32(1), eos_ids=np.full(8, -1, np.int32), pad_id=np.int32(0))
    rng = jax.random.key(0)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(pixels), jnp.asarray(mask, jnp.int32))

    def run(n):
        return jax.block_until_ready(gen.run_generate(graphdef, params, *args, n, sampling, rng))

    t = time.perf_counter()
    run(new_tokens)
    compile_s = time.perf_counter() - t
    run(1)
    t_one, t_all = timed(lambda: run(1)), timed(lambda: run(new_tokens))
    return t_one, (new_tokens - 1) * batch / (t_all - t_one), compile_s - t_all


def bench_torch(model, batch, new_tokens):
    ids, pixels, mask = prompt(batch)
    inputs = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                  attention_mask=torch.tensor(mask))

    def run(n):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)

    run(1)
    t_one, t_all = timed(lambda: run(1)), timed(lambda: run(new_tokens))
    return t_one, (new_tokens - 1) * batch / (t_all - t_one)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    from transformers import VipLlavaForConditionalGeneration as TorchModel

    torch.manual_seed(0)
    ref = TorchModel(bench_config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model = VipLlavaForConditionalGeneration.from_pretrained(tmp)
    n_params = sum(p.numel() for p in ref.parameters())
    lm_bytes = 4 * sum(p.numel() for n, p in ref.named_parameters() if "vision_tower" not in n and "projector" not in n)

    gflops, gbps = machine_roofline()
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; model {n_params / 1e6:.0f}M params fp32")
    print(f"machine: matmul {gflops:.1f} GFLOP/s, memory copy {gbps:.1f} GB/s")
    print(f"{'':24}{'jax':>12}{'torch':>12}{'jax/torch':>12}")
    for batch in (int(b) for b in args.batches.split(",")):
        jp, jd, jc = bench_jax(model, batch, args.new_tokens)
        tp, td = bench_torch(ref, batch, args.new_tokens)
        # a decode step reads every LM weight once, plus the KV cache (~ prompt + half the new tokens)
        kv_bytes = 2 * 12 * batch * (289 + args.new_tokens // 2) * 768 * 4
        limit = gbps * 1e9 / (lm_bytes + kv_bytes) * batch
        print(f"batch {batch} prefill+1 token (s){jp:12.3f}{tp:12.3f}{tp / jp:12.2f}x faster")
        print(f"batch {batch} decode (tok/s)     {jd:12.1f}{td:12.1f}{jd / td:12.2f}x")
        print(f"batch {batch} compile (s)        {jc:12.1f}")
        print(f"batch {batch} decode vs bandwidth limit ({limit:.1f} tok/s): jax {jd / limit:.0%}, torch {td / limit:.0%}")


if __name__ == "__main__":
    main()

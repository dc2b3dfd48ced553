"""Generate speed: vipllava-jax against transformers' PyTorch model, same weights, same prompt.

    python -m benchmarks.generate [--new-tokens 32] [--batches 1,8]
    python -m benchmarks.generate --model 7b --dtype bfloat16 --batches 1 --new-tokens 128 --no-torch  # GPU

The "bench-158M" model: CLIP vision 384 wide x 12 layers at 224 px, patch 14 (256 image
tokens); Llama 768 wide x 12 layers, 12 heads, MLP 2048, vocab 32064. Prompt: BOS + 256 image
tokens + 32 text tokens. Prints prefill latency (prompt -> first token), decode tokens/s at batch 1 and 8, compile time,
the JAX / PyTorch ratios, and the machine's matmul GFLOP/s and copy GB/s measured in this run
with the fraction of the decode bandwidth limit (bytes of weights + cache read per step) reached.

"7b" is vip-llava-7b's shape with random weights (CLIP ViT-L/14 at 336 px, 576 image tokens;
Llama 4096 wide x 32 layers, MLP 11008), JAX only (`--no-torch`), for a GPU: the bandwidth
limit then uses the device's measured copy speed and, where the card is known, its data-sheet
HBM bandwidth.
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
from vipllava_jax.models.vipllava import generate as gen
from vipllava_jax.models.vipllava.config import VipLlavaConfig

IMAGE_TOKEN = 32000
TEXT_TOKENS = 32  # the prompt's text after BOS and the image tokens


# name -> (vision: hidden, MLP, layers, heads, image size; text: hidden, MLP, layers, heads)
SHAPES = {
    "bench-158M": ((384, 1536, 12, 6, 224), (768, 2048, 12, 12)),
    "7b": ((1024, 4096, 24, 16, 336), (4096, 11008, 32, 32)),    # vip-llava-7b
    "1b": ((1024, 4096, 24, 16, 336), (2048, 5632, 22, 32)),     # CLIP-L + a TinyLlama-sized decoder
}
# data-sheet dense bf16 FLOP/s and HBM bytes/s of the cards the benchmarks are run on, by a
# part of jax's device_kind (the first match wins: "TPU v5 lite" is v5e, "TPU v5" v5p)
DATASHEET = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "TPU v4": (275e12, 1.2e12),
             "TPU v5 lite": (197e12, 0.82e12), "TPU v5": (459e12, 2.76e12),
             "TPU v6 lite": (918e12, 1.64e12)}


def bench_config(name: str = "bench-158M"):
    """transformers' VipLlavaConfig of a named shape (random weights come from the model)."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig

    (vd, vm, vl, vh, size), (td, tm, tl, th) = SHAPES[name]
    vision = CLIPVisionConfig(hidden_size=vd, intermediate_size=vm, num_hidden_layers=vl,
                              num_attention_heads=vh, image_size=size, patch_size=14)
    text = LlamaConfig(hidden_size=td, intermediate_size=tm, num_hidden_layers=tl,
                       num_attention_heads=th, num_key_value_heads=th, vocab_size=32064,
                       max_position_embeddings=4096)
    return VipLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                          image_token_index=IMAGE_TOKEN, vision_feature_layer=[-2, -5, -8, -11, 6])


def image_tokens(config) -> int:
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2


def datasheet():
    """(bf16 FLOP/s, HBM bytes/s) of this device from its data sheet, or None."""
    kind = jax.devices()[0].device_kind
    return next((v for k, v in DATASHEET.items() if k in kind), None)


def prompt(batch: int, config=None, text_tokens: int = TEXT_TOKENS, seed: int = 0):
    config = config or bench_config()
    n_img, size = image_tokens(config), config.vision_config.image_size
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, n_img), IMAGE_TOKEN),
                          rng.integers(3, 32000, (batch, text_tokens))], axis=1)
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return ids, pixels, np.ones_like(ids)


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine_roofline(dtype="float32"):
    """(matmul GFLOP/s in `dtype`, memory-copy GB/s counting read + write), measured now: on
    a CPU a jitted 2048^3 matmul and a numpy copy of 256 MiB, on an accelerator an 8192^3
    matmul and a jitted elementwise pass over 2 GiB on the device."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = 2048 if on_cpu else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t = timed(lambda: mm(a).block_until_ready(), 5)
    gflops = 2 * n**3 / t / 1e9
    if on_cpu:
        src = np.ones(256 * 2**20 // 4, np.float32)  # 256 MiB
        dst = np.empty_like(src)
        t = timed(lambda: np.copyto(dst, src), 5)
        nbytes = src.nbytes
    else:
        x = jnp.ones(2**30, jnp.bfloat16)  # 2 GiB
        inc = jax.jit(lambda x: x + 1)
        inc(x).block_until_ready()
        t = timed(lambda: inc(x).block_until_ready(), 5)
        nbytes = x.nbytes
    return gflops, 2 * nbytes / t / 1e9  # read + write


# Decode speed = (time to generate N tokens - time to generate 1) / (N - 1) steps, for both
# frameworks: prefill cancels out, so the figure is the cached decode loop alone.

def bench_jax(model, batch, new_tokens, config=None):
    ids, pixels, mask = prompt(batch, config)
    graphdef, params = nnx.split(model)
    sampling = gen.SamplingParams.create()  # greedy, never stopping early
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


def bench_torch(model, batch, new_tokens, config=None):
    ids, pixels, mask = prompt(batch, config)
    inputs = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                  attention_mask=torch.tensor(mask))

    def run(n):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)

    run(1)
    t_one, t_all = timed(lambda: run(1)), timed(lambda: run(new_tokens))
    return t_one, (new_tokens - 1) * batch / (t_all - t_one)


def random_model(config: VipLlavaConfig, dtype: str, param_dtype: str | None = None
                 ) -> VipLlavaForConditionalGeneration:
    """Random weights for a speed benchmark, cheaply: one small jitted sampler per distinct
    shape. (`from_config`'s single jitted initialiser took over 150 s to build at 7B on an
    H200; it compiles for 21 s even at bench-158M on this CPU.) Matrices ~ N(0, 0.02^2),
    vectors (norm scales, biases) ones."""
    param_dtype = param_dtype or dtype
    graphdef, abstract = nnx.split(VipLlavaForConditionalGeneration.abstract(
        config, dtype=dtype, param_dtype=param_dtype))
    sample = jax.jit(lambda key, shape: (0.02 * jax.random.normal(key, shape)).astype(param_dtype),
                     static_argnums=1)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(abstract))))

    def fill(x):
        key = next(keys)
        return jnp.ones(x.shape, param_dtype) if x.ndim < 2 else sample(key, x.shape)

    return nnx.merge(graphdef, jax.tree.map(fill, abstract))


def decode_bytes(model, config, batch: int, new_tokens: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decode step must read: every decoder and lm_head
    weight (the embedding table is a one-row lookup, left out) and the KV cache (about the
    prompt + half the new tokens)."""
    def nbytes(tree, keep=lambda key: True):
        return sum(x.size * x.dtype.itemsize for path, x in jax.tree_util.tree_leaves_with_path(tree)
                   if keep(jax.tree_util.keystr(path)))

    lm = nnx.state(model.language_model)
    weights = nbytes(lm, lambda key: "embed_tokens" not in key)
    # an untied lm_head is its own matrix; a tied one reads the embedding table
    weights += nbytes(nnx.state(model.lm_head) if model.lm_head is not None else lm)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = jnp.dtype(model.dtype).itemsize
    kv = (2 * text.num_hidden_layers * batch * text.num_key_value_heads * head_dim * itemsize
          * (1 + image_tokens(config) + TEXT_TOKENS + new_tokens // 2))
    return weights, kv


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="bench-158M")
    p.add_argument("--dtype", default="float32", help="JAX compute and parameter dtype")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--no-torch", action="store_true", help="JAX only (random init, no reference)")
    args = p.parse_args()
    config = bench_config(args.model)
    if args.no_torch:
        t = time.perf_counter()
        model = random_model(VipLlavaConfig.from_hf_dict(config.to_dict()), args.dtype)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
        print(f"random init: {time.perf_counter() - t:.1f} s", flush=True)
        ref = None
    else:
        torch.set_num_threads(os.cpu_count())
        from transformers import VipLlavaForConditionalGeneration as TorchModel

        torch.manual_seed(0)
        ref = TorchModel(config).eval()
        with tempfile.TemporaryDirectory() as tmp:
            ref.save_pretrained(tmp)
            model = VipLlavaForConditionalGeneration.from_pretrained(tmp, dtype=args.dtype)
        n_params = sum(p.numel() for p in ref.parameters())

    gflops, gbps = machine_roofline(args.dtype)
    sheet = datasheet()
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; jax {jax.__version__}; "
          f"model {args.model}, {n_params / 1e6:.0f}M params {args.dtype}")
    print(f"machine: matmul {gflops:.1f} GFLOP/s ({args.dtype}), memory copy {gbps:.1f} GB/s"
          + (f"; data sheet {sheet[1] / 1e9:.0f} GB/s" if sheet else ""))
    print(f"{'':24}{'jax':>12}{'torch':>12}{'jax/torch':>12}")
    for batch in (int(b) for b in args.batches.split(",")):
        jp, jd, jc = bench_jax(model, batch, args.new_tokens, config)
        weights, kv = decode_bytes(model, config, batch, args.new_tokens)
        limits = {"measured copy": gbps * 1e9}
        if sheet:
            limits["data sheet"] = sheet[1]
        if ref is None:
            print(f"batch {batch} prefill+1 token (s){jp:12.3f}")
            print(f"batch {batch} decode (tok/s)     {jd:12.1f}")
        else:
            tp, td = bench_torch(ref, batch, args.new_tokens, config)
            print(f"batch {batch} prefill+1 token (s){jp:12.3f}{tp:12.3f}{tp / jp:12.2f}x faster")
            print(f"batch {batch} decode (tok/s)     {jd:12.1f}{td:12.1f}{jd / td:12.2f}x")
        print(f"batch {batch} compile (s)        {jc:12.1f}")
        for name, bw in limits.items():
            limit = bw / (weights + kv) * batch
            line = f"batch {batch} decode vs bandwidth limit, {name} ({limit:.1f} tok/s, " \
                   f"{(weights + kv) / 1e9:.2f} GB/step): jax {jd / limit:.0%}"
            print(line + ("" if ref is None else f", torch {td / limit:.0%}"))


if __name__ == "__main__":
    main()

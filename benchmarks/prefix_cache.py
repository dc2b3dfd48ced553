"""Questions per second for N questions about one image: the image + system prompt prefix
cached once (`prefix.cache_prefix` + `generate_from_prefix`) against recomputing it for every
question (`generate` on each full prompt), and against transformers' PyTorch generate.

    python -m benchmarks.prefix_cache [--questions 8] [--new-tokens 16] [--repeat 2]

Model: bench-158M (benchmarks/generate.py), float32, same random weights in both frameworks.
Prompt: BOS + a 32-token system prompt + 256 image tokens, then a question of 8-22 tokens and
`--new-tokens` greedy tokens (no early stop). Two ways to ask: batched (all questions in one
call; the recomputed and PyTorch runs left-pad the full prompts) and one after another. Every
figure includes the prefix's own cost (once per image when cached); best of `--repeat` runs
after a warm-up that compiles.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch

from benchmarks.generate import IMAGE_TOKEN, bench_config, image_tokens, timed
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.models.vipllava.prefix import cache_prefix, generate_from_prefix

SYSTEM_TOKENS = 32


def prompts(config, questions: int, seed: int = 0):
    """(prefix ids [1, P], pixels [1, 3, H, W], question token lists)."""
    rng = np.random.default_rng(seed)
    size = config.vision_config.image_size
    prefix = np.concatenate([[1], rng.integers(3, 32000, SYSTEM_TOKENS),
                             np.full(image_tokens(config), IMAGE_TOKEN)])[None].astype(np.int64)
    pixels = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    qs = [list(rng.integers(3, 32000, int(n))) for n in rng.integers(8, 23, questions)]
    return prefix, pixels, qs


def full_batch(prefix, pixels, qs):
    """The full prompts, left-padded into one batch (one image per row)."""
    longest = max(len(q) for q in qs)
    ids = np.zeros((len(qs), prefix.shape[1] + longest), np.int64)
    mask = np.zeros_like(ids)
    for i, q in enumerate(qs):
        row = np.concatenate([prefix[0], q])
        ids[i, -len(row):], mask[i, -len(row):] = row, 1
    return ids, np.repeat(pixels, len(qs), 0), mask


def jax_runs(model, prefix, pixels, qs, n):
    def block(x):
        return jax.block_until_ready(x)

    def cached_batched():
        block(generate_from_prefix(model, cache_prefix(model, prefix, pixels), qs, max_new_tokens=n, eos_token_id=[]))

    def cached_serial():
        cache = cache_prefix(model, prefix, pixels)
        for q in qs:
            block(generate_from_prefix(model, cache, [q], max_new_tokens=n, eos_token_id=[]))

    def recomputed_batched():
        ids, px, mask = full_batch(prefix, pixels, qs)
        model.generate(ids, px, mask, max_new_tokens=n, eos_token_id=[])

    def recomputed_serial():
        for q in qs:
            model.generate(np.concatenate([prefix, [q]], 1), pixels, max_new_tokens=n, eos_token_id=[])

    return {"jax, prefix cached": (cached_batched, cached_serial),
            "jax, prefix recomputed": (recomputed_batched, recomputed_serial)}


def torch_runs(ref, prefix, pixels, qs, n):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def batched():
        ids, px, mask = full_batch(prefix, pixels, qs)
        with torch.no_grad():
            ref.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                         attention_mask=torch.tensor(mask), **kw)

    def serial():
        for q in qs:
            ids = torch.tensor(np.concatenate([prefix, [q]], 1))
            with torch.no_grad():
                ref.generate(input_ids=ids, pixel_values=torch.tensor(pixels), **kw)

    return {"torch generate": (batched, serial)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    from transformers import VipLlavaForConditionalGeneration as TorchModel

    config = bench_config("bench-158M")
    torch.manual_seed(0)
    ref = TorchModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model = VipLlavaForConditionalGeneration.from_pretrained(tmp)
    prefix, pixels, qs = prompts(config, args.questions)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}; bench-158M float32; prefix {prefix.shape[1]} tokens, "
          f"{len(qs)} questions of {min(map(len, qs))}-{max(map(len, qs))} tokens, {args.new_tokens} new tokens")

    # the cached prefix answers as generate on the full prompts does
    ids, px, mask = full_batch(prefix, pixels, qs)
    same = generate_from_prefix(model, cache_prefix(model, prefix, pixels), qs,
                                max_new_tokens=args.new_tokens, eos_token_id=[])
    want = model.generate(ids, px, mask, max_new_tokens=args.new_tokens, eos_token_id=[])[:, -args.new_tokens:]
    print(f"cached-prefix tokens equal generate's: {bool((same == want).all())}")

    runs = jax_runs(model, prefix, pixels, qs, args.new_tokens)
    if not args.no_torch:
        runs |= torch_runs(ref, prefix, pixels, qs, args.new_tokens)
    rates = {}
    for name, fns in runs.items():
        for mode, fn in zip(("batched", "one by one"), fns, strict=True):
            t = time.perf_counter()
            fn()  # warm-up (compiles)
            warm = time.perf_counter() - t
            best = timed(fn, args.repeat)
            rates[name, mode] = len(qs) / best
            print(f"{name:24} {mode:11} {len(qs) / best:8.2f} questions/s  ({best:.2f} s; first run {warm:.1f} s)",
                  flush=True)
    for mode in ("batched", "one by one"):
        cached = rates["jax, prefix cached", mode]
        line = f"{mode}: cached / recomputed {cached / rates['jax, prefix recomputed', mode]:.2f}x"
        if ("torch generate", mode) in rates:
            line += (f", cached / torch {cached / rates['torch generate', mode]:.2f}x, "
                     f"recomputed / torch {rates['jax, prefix recomputed', mode] / rates['torch generate', mode]:.2f}x")
        print(line)


if __name__ == "__main__":
    main()

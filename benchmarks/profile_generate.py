"""Where generate's time goes: XLA's own per-op timings, summed by op kind.

    python -m benchmarks.profile_generate [--batch 8] [--new-tokens 1]
    python -m benchmarks.profile_generate --model 7b --dtype bfloat16 --batch 1 --new-tokens 129 --no-torch  # GPU

Runs `generate` on the "bench-158M" model of benchmarks/generate.py (prompt: BOS + 256 image
tokens + 32 text tokens) under `jax.profiler.trace`, reads the trace's op events and prints
the milliseconds per fusion kind (`ynn_fusion` = the matmuls XLA hands to YNNPACK, `dot` =
matmuls it emits itself, `copy_*`/`*_fusion` = elementwise and layout passes). With
`--new-tokens 1` it is the prefill alone; with many, mostly the decode loop. `--no-torch` takes
generate.py's cheap random init instead of transformers' (for the 7B shape on a GPU, where the
kinds and their counts show what a decode step spends beside reading the weights). The shares
are what to look at: on a shared machine the absolute times drift, the split between matmuls
and the rest much less.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import torch
from flax import nnx

from benchmarks.generate import SHAPES, bench_config, prompt, random_model
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.models.vipllava import generate as gen
from vipllava_jax.models.vipllava.config import VipLlavaConfig

RUNTIME = ("$", "ThunkExecutor", "Slinky", "PjRt", "Thunk", "PjitFunction", "CommonPjRt", "ParseArguments")


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """(op kind -> total microseconds, op kind -> ops run) in the trace; the kind is the HLO
    name without its number."""
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds, counts = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and not name.startswith(RUNTIME) and " " not in name:
            kind = re.sub(r"\.\d+$", "", name)
            kinds[kind] += e["dur"]
            counts[kind] += 1
    return kinds, counts


def print_op_times(kinds: collections.Counter, counts: collections.Counter, top: int) -> None:
    """The `top` kinds by time: milliseconds, share, ops run x microseconds each."""
    total = sum(kinds.values())
    for kind, us in kinds.most_common(top):
        n = counts[kind]
        print(f"{us / 1e3:10.1f} ms {us / total:6.1%} {n:7d} x {us / n:8.1f} us  {kind}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=1)
    p.add_argument("--model", choices=sorted(SHAPES), default="bench-158M")
    p.add_argument("--dtype", default="float32", help="compute and parameter dtype")
    p.add_argument("--no-torch", action="store_true", help="random init without transformers")
    args = p.parse_args()
    config = bench_config(args.model)
    if args.no_torch:
        model = random_model(VipLlavaConfig.from_hf_dict(config.to_dict()), args.dtype)
    else:
        from transformers import VipLlavaForConditionalGeneration as TorchModel

        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            TorchModel(config).save_pretrained(tmp)
            model = VipLlavaForConditionalGeneration.from_pretrained(tmp, dtype=args.dtype)
    ids, pixels, mask = prompt(args.batch, config)
    graphdef, params = nnx.split(model)
    sampling = gen.SamplingParams.create()  # greedy, never stopping early
    inputs = (jnp.asarray(ids, jnp.int32), jnp.asarray(pixels), jnp.asarray(mask, jnp.int32))

    def run():
        return jax.block_until_ready(gen.run_generate(
            graphdef, params, *inputs, args.new_tokens, sampling, jax.random.key(0)))

    run()  # compile
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run()
        kinds, counts = op_times(trace_dir)
    print(f"{args.model} {args.dtype}, batch {args.batch}, {args.new_tokens} new token(s): "
          f"{sum(kinds.values()) / 1e3:.0f} ms in XLA ops ({sum(counts.values())} ops)")
    print_op_times(kinds, counts, 15)


if __name__ == "__main__":
    main()

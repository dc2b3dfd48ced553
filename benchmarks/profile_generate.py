"""Where generate's time goes: XLA's own per-op timings, summed by op kind.

    python benchmarks/profile_generate.py [--batch 8] [--new-tokens 1]

Runs `generate` on the "bench-158M" model of benchmarks/generate.py (prompt: BOS + 256 image
tokens + 32 text tokens) under `jax.profiler.trace`, reads the trace's op events and prints
the milliseconds per fusion kind (`ynn_fusion` = the matmuls XLA hands to YNNPACK, `dot` =
matmuls it emits itself, `copy_*`/`*_fusion` = elementwise and layout passes). With
`--new-tokens 1` it is the prefill alone. The shares are what to look at: on a shared machine
the absolute times drift, the split between matmuls and the rest much less.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import bench_config, prompt  # noqa: E402

from vipllava_jax import VipLlavaForConditionalGeneration  # noqa: E402
from vipllava_jax import generate as gen  # noqa: E402

RUNTIME = ("$", "ThunkExecutor", "Slinky", "PjRt", "Thunk", "PjitFunction", "CommonPjRt", "ParseArguments")


def op_times(trace_dir: str) -> collections.Counter:
    """Op kind (the HLO name without its number) -> total microseconds in the trace."""
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and not name.startswith(RUNTIME) and " " not in name:
            kinds[re.sub(r"\.\d+$", "", name)] += e["dur"]
    return kinds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=1)
    args = p.parse_args()
    from transformers import VipLlavaForConditionalGeneration as TorchModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        TorchModel(bench_config()).save_pretrained(tmp)
        model = VipLlavaForConditionalGeneration.from_pretrained(tmp)
    ids, pixels, mask = prompt(args.batch)
    graphdef, params = nnx.split(model)
    sampling = gen.SamplingParams(
        do_sample=np.bool_(False), temperature=np.float32(1), top_k=np.int32(0),
        top_p=np.float32(1), eos_ids=np.full(8, -1, np.int32), pad_id=np.int32(0))
    inputs = (jnp.asarray(ids, jnp.int32), jnp.asarray(pixels), jnp.asarray(mask, jnp.int32))

    def run():
        return jax.block_until_ready(gen.run_generate(
            graphdef, params, *inputs, args.new_tokens, sampling, jax.random.key(0)))

    run()  # compile
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run()
        kinds = op_times(trace_dir)
    total = sum(kinds.values())
    print(f"batch {args.batch}, {args.new_tokens} new token(s): {total / 1e3:.0f} ms in XLA ops")
    for kind, us in kinds.most_common(15):
        print(f"{us / 1e3:10.1f} ms {us / total:6.1%}  {kind}")


if __name__ == "__main__":
    main()

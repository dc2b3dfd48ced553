"""What XLA's GPU compiler makes of generate's decode loop, on a machine without a GPU.

    pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"  # no GPU needed
    python benchmarks/gpu_hlo.py [--model 7b] [--spec benchmarks/specs/h200.txtpb] [--dump FILE]

Compiles the decode program (`vipllava_jax.generate._decode`: the whole `lax.while_loop`) of a
random-shaped model in bf16 at batch 1 for the card described by `--spec` (XLA's deviceless
compilation: a text-proto device description instead of a device), on abstract weights, so even
the 7B shape compiles in seconds on a laptop. Then reads the optimized HLO and prints, per decode
step, the instructions that run: fusions (kernels), library calls, copies (with the bytes they
move) and conditionals (with what each branch runs). That is what a step costs besides reading
the weights, the part of #3's bandwidth target that a CPU-only session can check.

What it cannot show: autotuning (without a device XLA takes default GEMM configs), the command
buffers XLA builds from the thunks after the HLO, and times. A lent GPU measures those
(benchmarks/gpu.sh). The spec is a subset of XLA's xla/backends/gpu/target_config/specs files
(fields that jaxlib's proto knows), with the H200's memory size and bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver here, by design

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate import SHAPES, TEXT_TOKENS, bench_config, image_tokens  # noqa: E402

from vipllava_jax import VipLlavaForConditionalGeneration  # noqa: E402
from vipllava_jax import generate as gen  # noqa: E402
from vipllava_jax.config import VipLlavaConfig  # noqa: E402

# HLO instructions that launch nothing: structure, views and control flow
NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while",
             "conditional", "call", "after-all", "partition-id", "replica-id"}
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
         "u64": 8, "f64": 8}


def compile_decode(model_name: str, spec: str, batch: int, new_tokens: int):
    """The optimized HLO text of the decode loop, compiled for the card in `spec`."""
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                        target_config=Path(spec).read_text())
    device = topo.devices[0]
    on_device = jax.sharding.SingleDeviceSharding(device)

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device)

    config = VipLlavaConfig.from_hf_dict(bench_config(model_name).to_dict())
    graphdef, params = nnx.split(VipLlavaForConditionalGeneration.abstract(config, dtype="bfloat16"))
    params = jax.tree.map(abstract, params)
    t = gen.bucket_length(1 + image_tokens(config) + TEXT_TOKENS)
    size = config.vision_config.image_size
    ids = abstract(jax.ShapeDtypeStruct((batch, t), jnp.int32))
    pixels = abstract(jax.ShapeDtypeStruct((batch, 3, size, size), jnp.float32))
    scalar = {"do_sample": bool, "temperature": jnp.float32, "top_k": jnp.int32,
              "top_p": jnp.float32, "pad_id": jnp.int32}
    sampling = gen.SamplingParams(eos_ids=abstract(jax.ShapeDtypeStruct((8,), jnp.int32)),
                                  **{k: abstract(jax.ShapeDtypeStruct((), d)) for k, d in scalar.items()})
    rng = abstract(jax.eval_shape(lambda: jax.random.key(0)))
    state = jax.eval_shape(
        lambda p, i, px, r, sp: gen.prefill(nnx.merge(graphdef, p), i, px, i, new_tokens, r, sp),
        params, ids, pixels, rng, sampling)
    stop = abstract(jax.ShapeDtypeStruct((), jnp.int32))
    start = time.perf_counter()
    compiled = gen._decode.lower(graphdef, params, jax.tree.map(abstract, state), sampling, stop).compile()
    print(f"{device.device_kind}: {model_name} decode loop, batch {batch}, bf16, compiled in "
          f"{time.perf_counter() - start:.1f} s")
    return compiled.as_text()


def computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            current.append(line.strip())
    return comps


def parse(line: str) -> tuple[str, str]:
    """(shape, opcode) of an instruction line."""
    m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\(", line)
    return (m.group(1), m.group(2)) if m else ("", "")


def nbytes(shape: str) -> int:
    return sum(BYTES.get(t, 4) * math.prod(int(n) for n in d.split(",") if n)
               for t, d in re.findall(r"(\w+)\[([\d,]*)\]", shape))


def report(comps: dict[str, list[str]], name: str, indent: str = "") -> None:
    """What one run of computation `name` launches, then each while/conditional inside it."""
    lines = comps[name]
    kinds = collections.Counter(op for _, op in map(parse, lines) if op not in NO_KERNEL)
    copies = [shape for shape, op in map(parse, lines) if op == "copy"]
    detail = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    print(f"{indent}{name}: {sum(kinds.values())} kernels" + (f" ({detail})" if detail else ""))
    if copies:
        print(f"{indent}  copies: {len(copies)}, {sum(map(nbytes, copies)) / 1e6:.1f} MB "
              f"(largest {max(copies, key=nbytes)})")
    for line in lines:
        _, op = parse(line)
        if op == "while":
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            print(f"{indent}  while loop, per iteration:")
            report(comps, body, indent + "    ")
        elif op == "conditional":
            found = re.search(r"branch_computations=\{([^}]*)\}", line)
            branches = ([b.strip().lstrip("%") for b in found.group(1).split(",")] if found else
                        re.search(r"true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+)",
                                  line).groups())
            print(f"{indent}  conditional, one of:")
            for branch in branches:
                report(comps, branch, indent + "    ")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="7b")
    p.add_argument("--spec", default=str(HERE / "specs" / "h200.txtpb"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dump", help="also write the optimized HLO to this file")
    args = p.parse_args()
    try:
        hlo = compile_decode(args.model, args.spec, args.batch, args.new_tokens)
    except (NotImplementedError, RuntimeError) as e:
        sys.exit(f"no CUDA compiler here ({e}); install jax's CUDA plugin, see the docstring")
    if args.dump:
        Path(args.dump).write_text(hlo)
    comps = computations(hlo)
    entry = re.search(r"^ENTRY %?([\w.\-]+) ", hlo, re.M).group(1)
    report(comps, entry)


if __name__ == "__main__":
    main()

"""What XLA's GPU compiler makes of generate's decode loop and of the train step, without a GPU.

    pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"  # no GPU needed
    python -m benchmarks.gpu_hlo [--model 7b] [--spec benchmarks/specs/h200.txtpb] [--dump FILE]
    python -m benchmarks.gpu_hlo --program train [--model 1b] [--attention xla]

Compiles a program of a random-shaped model in bf16 for the card described by `--spec` (XLA's
deviceless compilation: a text-proto device description instead of a device), on abstract
weights, so even the 7B shape compiles in seconds on a laptop:

    decode  generate's jitted decode loop (`vipllava_jax.models.vipllava.generate.decode`), the
            whole `lax.while_loop`, batch `--batch` (1)
    train   `vipllava_jax.train.make_train_step` as benchmarks/train.py runs it on a GPU: stage "full",
            fp32 master weights, batch 8 x (1 + 576 image + 447 text) tokens for "1b"

Then reads the optimized HLO and prints the instructions that run (per decode step, or per
train step): fusions (kernels), library calls, copies (with the bytes they move) and
conditionals (with what each branch runs), and a roofline of them: each kernel takes at least
max(its FLOPs / the data-sheet bf16 peak, the bytes of its operands and results / the HBM
bandwidth), summed by kind. That lower bound on the step time is what XLA's program leaves
for the kernels to reach, the part of #3's bandwidth and #4's MFU targets that a CPU-only
session can check: for train it gives the MFU ceiling (model FLOPs / bound / peak).

What it cannot show: autotuning (without a device XLA takes default GEMM configs; for train,
Triton GEMMs are switched off, since the default tiling fails on a fused transpose in the vision
tower, so every matmul is a cuBLAS call), the command buffers XLA builds from the thunks after
the HLO, how close each kernel gets to its bound, and times. A lent GPU measures those
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

from benchmarks.generate import DATASHEET, SHAPES, TEXT_TOKENS, bench_config, image_tokens  # noqa: E402
from vipllava_jax import VipLlavaForConditionalGeneration  # noqa: E402
from vipllava_jax.models.vipllava import generate as gen  # noqa: E402
from vipllava_jax.models.vipllava.config import VipLlavaConfig  # noqa: E402
from vipllava_jax.train import (  # noqa: E402
    TrainConfig,
    abstract_train_state,
    data_sharding,
    make_train_step,
    mesh_from_spec,
)
from vipllava_jax.train.config import ATTENTION  # noqa: E402
from vipllava_jax.train.flops import train_flops_per_token  # noqa: E402

HERE = Path(__file__).resolve().parent  # benchmarks/, where specs/ lives

NVLINK = 450e9  # bytes/s each way between H100/H200 SXM cards (NVLink 4: 900 GB/s both ways)
COLLECTIVE = re.compile(r"all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute")
# HLO instructions that launch nothing: structure, views and control flow
NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while",
             "conditional", "call", "after-all", "partition-id", "replica-id"}
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
         "u64": 8, "f64": 8}


def target_devices(spec: str, count: int = 1):
    """`count` compile-only devices (one host) of the card `spec` (a device-description text
    proto) describes."""
    return topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                        target_config=Path(spec).read_text()).devices


def target_device(spec: str):
    return target_devices(spec)[0]


def _decode_loop(graphdef, params, state, sampling, stop_at):
    return gen.decode(nnx.merge(graphdef, params), state, sampling, stop_at)


# The decode program `generate` compiles (its jit is private to the library), rebuilt from the
# public `decode` the same way: graphdef static, the decode state donated.
DECODE = jax.jit(_decode_loop, static_argnums=0, donate_argnums=2)


def compile_decode(model_name: str, spec: str, batch: int, new_tokens: int):
    """The optimized HLO text of the decode loop, compiled for the card in `spec`."""
    device = target_device(spec)
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
    compiled = DECODE.lower(graphdef, params, jax.tree.map(abstract, state), sampling, stop).compile()
    print(f"{device.device_kind}: {model_name} decode loop, batch {batch}, bf16, compiled in "
          f"{time.perf_counter() - start:.1f} s")
    return compiled.as_text()


def mesh_size(mesh_spec: str) -> int:
    """The number of devices a mesh spec without -1 names, e.g. "data=2,fsdp=4" -> 8."""
    return math.prod(int(size) for _, size in (a.split("=") for a in mesh_spec.split(",")))


def abstract_bench_state(model_name: str, devices, config: TrainConfig, mesh_spec: str):
    """(mesh, model config, graphdef, state, shardings) of benchmarks/train.py's model
    (bf16 compute, fp32 master weights and AdamW state) on a mesh of `devices` (`mesh_spec`,
    no -1), every array abstract (`abstract_train_state`)."""
    mesh = mesh_from_spec(mesh_spec, devices[:mesh_size(mesh_spec)])
    cfg = VipLlavaConfig.from_hf_dict(bench_config(model_name).to_dict())
    model = VipLlavaForConditionalGeneration.abstract(cfg, dtype="bfloat16", param_dtype="float32")
    return (mesh, cfg, *abstract_train_state(model, config, mesh))


def compile_train(model_name: str, devices, batch: int, text_tokens: int, config: TrainConfig,
                  mesh_spec: str = "data=1"):
    """(compiled step, model FLOPs, devices used) of one train step, compiled for `devices`
    (compile-only ones): benchmarks/train.py's step on `abstract_bench_state`."""
    mesh, cfg, graphdef, state, shardings = abstract_bench_state(model_name, devices, config, mesh_spec)
    t = 1 + image_tokens(cfg) + text_tokens
    size = cfg.vision_config.image_size
    rows = jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=data_sharding(mesh))
    data = {"input_ids": rows, "labels": rows, "attention_mask": rows, "pixel_values":
            jax.ShapeDtypeStruct((batch, 3, size, size), jnp.float32, sharding=data_sharding(mesh))}
    flops = batch * t * train_flops_per_token(state, cfg, seq_len=t)
    begin = time.perf_counter()
    compiled = make_train_step(graphdef, config, mesh, shardings).lower(state, data).compile()
    memory = compiled.memory_analysis()
    print(f"{mesh.devices.flat[0].device_kind} x {mesh.size} ({mesh_spec}): {model_name} train "
          f"step, batch {batch} x {t} tokens, "
          f"bf16 compute, attention {config.attention}, remat {config.remat}, compiled in "
          f"{time.perf_counter() - begin:.1f} s; {flops / 1e12:.1f} model TFLOP per step; "
          f"{memory.temp_size_in_bytes / 1e9:.1f} GB of temporaries")
    return compiled, flops, mesh.size


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


def dims(shape: str) -> list[int]:
    """The dimensions of a (first) array shape, e.g. bf16[8,1024]{1,0} -> [8, 1024]."""
    return [int(n) for n in re.search(r"\[([\d,]*)\]", shape).group(1).split(",") if n]


def shape_table(hlo: str) -> dict[str, str]:
    """Instruction name -> its shape, over every computation."""
    return {m.group(1): m.group(2) for m in re.finditer(
        r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) [\w\-]+\(", hlo, re.M)}


def operands(line: str) -> list[str]:
    m = re.search(r" [\w\-]+\(([^)]*)\)", line.split(" = ", 1)[1])
    return [a.strip().lstrip("%") for a in m.group(1).split(",") if a.strip()] if m else []


def dot_flops(out_shape: str, lhs_shape: str, contracting: str) -> int:
    """2 x the multiply-adds of a matmul; `contracting` lists the lhs contracting dimensions,
    as HLO prints them ("1") or cuBLAS's backend config does ('"1"')."""
    lhs = dims(lhs_shape)
    k = math.prod(lhs[int(i.strip('"'))] for i in contracting.split(",") if i)
    return 2 * math.prod(dims(out_shape)) * k


def cost(line: str, comps: dict[str, list[str]], shapes: dict[str, str]) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one kernel: its matmuls' FLOPs (cuBLAS calls, dots inside Triton
    fusions, cuDNN attention) and the bytes of its operands and results (for an in-place
    dynamic-update-slice fusion, of the update only; cuBLAS workspaces left out)."""
    shape, op = parse(line)
    args = operands(line)
    out = nbytes(re.sub(r"s8\[\d+\]\{0\}", "", shape))
    moved = out + sum(nbytes(shapes.get(a, "")) for a in args)
    flops = 0.0
    target = re.search(r'custom_call_target="([^"]*)"', line)
    if target and "gemm_backend_config" in line:
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line).group(1)
        flops = dot_flops(shape, shapes[args[0]], contracting)
    elif target and "fmha" in target.group(1):  # q [B, T, N, H] against k [B, S, K, H]
        b, t, n, h = dims(shapes[args[0]])
        s = dims(shapes[args[1]])[1]
        flops = 4 * b * n * t * s * h * (0.5 if "CAUSAL" in line else 1)
        flops *= 2.5 if "Backward" in target.group(1) else 1  # dQ, dK, dV and P again
    elif op == "fusion":
        called = comps.get(re.search(r"calls=%?([\w.\-]+)", line).group(1), [])
        for inner in called:
            if parse(inner)[1] == "dot":
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inner).group(1)
                flops += dot_flops(parse(inner)[0], shapes[operands(inner)[0]], contracting)
        if called and "dynamic-update-slice(" in called[-1]:
            moved = 2 * (moved - out - max(nbytes(shapes.get(a, "")) for a in args))
    return flops, moved


def roofline(comps, name: str, shapes, peak: float, bandwidth: float, model_flops=None,
             devices: int = 1) -> float:
    """Prints the lower bound on the time of one run of computation `name` on each device, by
    kernel kind, and the memory-bound kernels' share by the jax operation they came from.

    Each kernel takes at least max(FLOPs / peak, bytes / bandwidth), one after the other; a
    collective its bytes / NVLINK, counted at its start. Collectives may overlap the kernels,
    so the bound is max(kernels, collectives). `model_flops` are the whole step's, over
    `devices`. Returns the bound in seconds."""
    by_kind = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    by_source = collections.Counter()
    for line in comps[name]:
        shape, op = parse(line)
        if op in NO_KERNEL:
            continue
        flops, moved = cost(line, comps, shapes)
        seconds = max(flops / peak, moved / bandwidth)
        if COLLECTIVE.match(op):
            seconds = 0.0 if op.endswith("-done") else nbytes(shape) / NVLINK
        target = re.search(r'custom_call_target="([^"]*)"', line)
        kind = target.group(1) if target else op
        if op == "fusion":
            kind = "gemm fusion" if flops else "fusion " + re.search(r"kind=(\w+)", line).group(1)
        elif target and flops and "fmha" not in kind:  # cuBLAS: by input -> output type
            kind = "gemm {}->{}".format(shapes[operands(line)[0]].split("[")[0],
                                        shape.strip("(").split("[")[0])
        row = by_kind[kind]
        row[0] += 1
        row[1] += flops
        row[2] += moved
        row[3] += seconds
        if not flops:
            source = re.search(r'op_name="([^"]*)"', line)
            source = source.group(1).split(";")[0] if source else "(no jax op)"
            by_source[re.sub(r"jit\([\w]+\)/", "", source)] += seconds
    links = sum(row[3] for kind, row in by_kind.items() if COLLECTIVE.match(kind))
    kernels = sum(row[3] for row in by_kind.values()) - links
    total = max(kernels, links)
    print(f"roofline ({peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.1f} TB/s): {total * 1e3:.2f} ms"
          + (f" (kernels {kernels * 1e3:.2f} ms, collectives {links * 1e3:.2f} ms)" if links else ""))
    print(f"  {'kernel kind':30}{'count':>7}{'TFLOP':>9}{'GB':>9}{'ms':>9}")
    for kind, (n, flops, moved, seconds) in sorted(by_kind.items(), key=lambda kv: -kv[1][3]):
        print(f"  {kind:30}{n:7}{flops / 1e12:9.2f}{moved / 1e9:9.1f}{seconds * 1e3:9.2f}")
    print("  memory-bound kernels by jax operation (ms):")
    for source, seconds in by_source.most_common(8):
        print(f"    {seconds * 1e3:7.2f}  {source}")
    if model_flops:
        print(f"MFU ceiling: {model_flops / total / peak / devices:.1%} ({model_flops / 1e12:.1f} "
              f"model TFLOP on {devices} device(s) in {total * 1e3:.1f} ms)")
    return total


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
    p.add_argument("--program", choices=["decode", "train"], default="decode")
    p.add_argument("--model", choices=sorted(SHAPES), help="default: 7b (decode), 1b (train)")
    p.add_argument("--spec", default=str(HERE / "specs" / "h200.txtpb"))
    p.add_argument("--batch", type=int, help="default: 1 (decode), 8 (train)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode")
    p.add_argument("--text-tokens", type=int, default=447, help="train")
    p.add_argument("--attention", choices=ATTENTION, default="auto", help="train: TrainConfig.attention")
    p.add_argument("--remat", default="none", help="train: TrainConfig.remat")
    p.add_argument("--mesh", default="data=1", help="train: a mesh spec of this many cards")
    p.add_argument("--dump", help="also write the optimized HLO to this file")
    args = p.parse_args()
    if args.program == "train":  # before XLA reads its flags (see the docstring)
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"
    model_flops, devices = None, 1
    try:
        if args.program == "decode":
            hlo = compile_decode(args.model or "7b", args.spec, args.batch or 1, args.new_tokens)
        else:
            config = TrainConfig(stage="full", attention=args.attention, remat=args.remat)
            compiled, model_flops, devices = compile_train(
                args.model or "1b", target_devices(args.spec, mesh_size(args.mesh)),
                args.batch or 8, args.text_tokens, config, args.mesh)
            hlo = compiled.as_text()
    except (NotImplementedError, RuntimeError) as e:
        sys.exit(f"no CUDA compiler here ({e}); install jax's CUDA plugin, see the docstring")
    if args.dump:
        Path(args.dump).write_text(hlo)
    comps = computations(hlo)
    entry = re.search(r"^ENTRY %?([\w.\-]+) ", hlo, re.M).group(1)
    report(comps, entry)
    peak, bandwidth = next(v for k, v in DATASHEET.items() if k in target_device(args.spec).device_kind)
    shapes = shape_table(hlo)
    if args.program == "decode":
        body = re.search(r"body=%?([\w.\-]+)", "\n".join(comps[entry])).group(1)
        print("one decode step (the loop body):")
        roofline(comps, body, shapes, peak, bandwidth)
    else:
        roofline(comps, entry, shapes, peak, bandwidth, model_flops, devices)


if __name__ == "__main__":
    main()

"""What XLA's TPU compiler makes of the train step, without a TPU.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"  # libtpu; no TPU needed
    # (into an environment with the test extras and torch: the shapes come from generate.py)
    python -m benchmarks.tpu_hlo [--topology v5p:2x2x1 | v5e:2x2 | v6e:2x2] [--mesh fsdp=4]
                                 [--model 1b] [--attention xla pallas]

Compiles benchmarks/train.py's step (stage "full", bf16 compute, fp32 master weights and AdamW
state; batch 8 x (1 + 576 image + 447 text) tokens for "1b") for a TPU slice named by
`--topology`, with no TPU attached (libtpu's compile-only devices, as MaxText's train_compile
does), once for each `--attention` (`TrainConfig.attention`: "xla" is XLA's dense-mask
attention, "pallas" JAX's Pallas splash-attention kernel), and prints per chip:

    estimate  XLA:TPU's own estimate of the step's time (`cost_analysis()["optimal_seconds"]`)
    MFU       the ceiling that estimate leaves: model FLOPs / chips / estimate / bf16 peak
    flops     the FLOPs XLA counts in the program (the kernel skips the blocks its mask rules
              out, so "pallas" counts fewer than "xla", which computes every [T, T] score)
    memory    arguments (parameters, AdamW state, batch) and temporaries, against the HBM

and then the estimate of the step's AdamW update alone (global-norm clipping included), the part
of the step that does not grow with the batch.

The estimate is the compiler's cost model, not a measurement, and it is not comparable across
chip generations' scheduling; a TPU measures the step (benchmarks/train.py). What it does show
without one: that the step compiles for the slice, fits its memory, and how much of the step
the attention kernel costs. Peaks are the data sheets' bf16 dense figures.
"""

from __future__ import annotations

import argparse
import sys

import jax
import optax
from jax.experimental import topologies

from benchmarks.generate import DATASHEET, SHAPES
from benchmarks.gpu_hlo import abstract_bench_state, compile_train, mesh_size
from vipllava_jax.train import TrainConfig, make_optimizer
from vipllava_jax.train.config import ATTENTION

# topology prefix -> HBM bytes per chip, from the data sheets (peaks: generate.DATASHEET)
HBM = {"v5e": 16e9, "v5p": 95e9, "v6e": 32e9}


def cost_of(compiled) -> dict:
    """`compiled.cost_analysis()` as one dict (some jax versions wrap it in a list)."""
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list) else cost


def optimizer_estimate(model_name: str, devices, config: TrainConfig, mesh_spec: str) -> tuple[float, int]:
    """(XLA:TPU's estimate in seconds, trained parameters) of the train step's optimizer update
    alone (`make_optimizer(config)` on fp32 parameters and gradients sharded as in the step)."""
    *_, state, shardings = abstract_bench_state(model_name, devices, config, mesh_spec)
    opt = make_optimizer(config)

    def update(params, opt_state, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(update, out_shardings=(shardings.params, shardings.opt_state), donate_argnums=(0, 1))
    seconds = cost_of(step.lower(state.params, state.opt_state, state.params).compile())["optimal_seconds"]
    return seconds, sum(x.size for x in jax.tree.leaves(state.params))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:2x2x1", help="a libtpu topology name, e.g. v5e:2x2")
    p.add_argument("--mesh", default="fsdp=4", help="a mesh spec over (some of) its chips")
    p.add_argument("--model", choices=sorted(SHAPES), default="1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=447)
    p.add_argument("--attention", nargs="+", choices=[a for a in ATTENTION if a != "cudnn"],
                   default=["xla", "pallas"])
    p.add_argument("--remat", default="none", help="TrainConfig.remat")
    args = p.parse_args()
    chip = args.topology.split(":")[0]
    if chip not in HBM:  # (v4's compile-only topology has two devices per chip: no mesh of it)
        sys.exit(f"--topology {args.topology!r}: not one of the chips here, {sorted(HBM)}")
    hbm = HBM[chip]
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    except Exception as e:  # noqa: BLE001 (libtpu missing, or an unknown topology)
        sys.exit(f"no TPU compiler for {args.topology!r} here ({e}); install jax[tpu], see the docstring")
    peak = next(v for k, v in DATASHEET.items() if k in devices[0].device_kind)[0]
    if mesh_size(args.mesh) > len(devices):
        sys.exit(f"--mesh {args.mesh} needs {mesh_size(args.mesh)} chips; {args.topology} has {len(devices)}")
    rows = []
    for attention in args.attention:
        config = TrainConfig(stage="full", attention=attention, remat=args.remat)
        compiled, model_flops, chips = compile_train(args.model, devices, args.batch,
                                                     args.text_tokens, config, args.mesh)
        cost = cost_of(compiled)
        memory = compiled.memory_analysis()
        seconds = cost["optimal_seconds"]
        used = memory.argument_size_in_bytes + memory.temp_size_in_bytes
        rows.append((attention, seconds, model_flops / chips / max(seconds, 1e-30) / peak, cost["flops"],
                     memory.argument_size_in_bytes, memory.temp_size_in_bytes, used))
    print(f"\n{args.model} train step on {args.topology} ({args.mesh}), per chip "
          f"({peak / 1e12:.0f} TFLOP/s bf16, {hbm / 1e9:.0f} GB HBM):")
    print(f"  {'attention':10}{'estimate ms':>13}{'MFU':>8}{'TFLOP':>9}{'args GB':>9}{'temps GB':>10}"
          f"{'of HBM':>8}")
    for attention, seconds, mfu, flops, arguments, temps, used in rows:
        # libtpu 0.0.42 gives v5e and v6e compile-only programs a negative estimate: no figure
        estimate = f"{seconds * 1e3:13.1f}{mfu:8.1%}" if seconds > 0 else f"{'n/a':>13}{'n/a':>8}"
        print(f"  {attention:10}{estimate}{flops / 1e12:9.2f}"
              f"{arguments / 1e9:9.2f}{temps / 1e9:10.2f}{used / hbm:8.0%}")
    seconds, trained = optimizer_estimate(args.model, devices, TrainConfig(stage="full"), args.mesh)
    if seconds > 0:
        print(f"  of which the AdamW update alone ({trained / 1e9:.2f}B fp32 parameters): "
              f"{seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

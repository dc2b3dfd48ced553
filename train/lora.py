"""LoRA adapters on the language model's projections: train `A [in, r]` and `B [r, out]`,
keep the base weights frozen, merge `W + (alpha / r) A B` back for export.

    x --base kernel W [in, out] (frozen)----------------------------+--> y
      \\--A [in, r] (trainable)--> [.., r] --B [r, out] (trainable)--/ x (alpha / r)

`add_lora` swaps each targeted `nnx.Linear` of the decoder for a `LoRALinear` that keeps the
very same `kernel` and `bias` variables (so their paths, `...q_proj.kernel`, and their
checkpoint names do not change) and adds `lora_a` / `lora_b` of type `LoRAParam`, which the
"lora" training stage selects. As in peft, A starts uniform(+-1/sqrt(in)) and B at zero, so an
adapted model starts out equal to its base. `merge_lora` folds the adapters into the kernels
and puts plain `layers.Linear`s back: the result saves, converts and loads like any VipLlava.

No dropout on the adapter input: VipLlava has none elsewhere, and a deterministic step keeps
resumed runs bit-equal to uninterrupted ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vipllava_jax.nn.layers import Linear, on_rows

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class LoRAParam(nnx.Param):
    """A LoRA factor: trainable in stage "lora", where the base weights are frozen."""


class LoRALinear(nnx.Module):
    """`x W + b + (alpha / rank) (x A) B`, holding the base layer's own `kernel` / `bias`."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        din, dout = base.kernel.shape
        axes = base.kernel.get_metadata().get("out_sharding") or (None, None)
        self.kernel = base.kernel
        self.bias = base.bias
        self.dtype = base.dtype
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(din)  # peft: kaiming_uniform_(a=sqrt(5))
        self.lora_a = LoRAParam(
            jax.random.uniform(rngs.params(), (din, rank), base.param_dtype, -bound, bound),
            out_sharding=(axes[0], None))
        self.lora_b = LoRAParam(jnp.zeros((rank, dout), base.param_dtype), out_sharding=(None, axes[1]))

    def __call__(self, x: jax.Array) -> jax.Array:
        return on_rows(self._rows, x)  # as layers.Linear: no transposed copy of x in backward

    def _rows(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = x @ self.kernel[...].astype(dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        low = (x @ self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)
        return y + (self.scale * low).astype(dtype)

    def merged(self) -> Linear:
        """A plain `layers.Linear` with `W + scale * A B` (computed in float32), same variables'
        metadata, so paths and shardings are those of the layer before `add_lora`."""
        kernel = self.kernel[...]
        delta = self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))
        din, dout = kernel.shape
        linear = nnx.eval_shape(lambda: Linear(
            din, dout, use_bias=self.bias is not None, dtype=self.dtype, param_dtype=kernel.dtype,
            rngs=nnx.Rngs(0)))
        linear.kernel = nnx.Param((kernel.astype(jnp.float32) + delta).astype(kernel.dtype),
                                  **self.kernel.get_metadata())
        linear.bias = self.bias
        return linear


def _decoder_blocks(model: nnx.Module) -> Iterator[nnx.Module]:
    """The modules holding the targeted projections: each layer's self_attn and mlp (none in
    a model without a Llama decoder, e.g. the VisionEncoderDecoder captioner)."""
    lm = getattr(model, "language_model", None)
    for layer in lm.layers if lm is not None else ():
        yield layer.self_attn
        yield layer.mlp


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {list(TARGETS)}, got {list(targets)}")
    return targets


def add_lora(model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str] = TARGETS,
             seed: int = 0) -> nnx.Module:
    """Puts LoRA adapters on `targets` of every decoder layer of `model` (in place; returned)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = check_targets(targets)
    rngs = nnx.Rngs(seed)
    with nnx.use_eager_sharding(False):  # placed later, by the train state's shardings
        for block in _decoder_blocks(model):
            for name in targets:
                if hasattr(block, name):
                    base = getattr(block, name)
                    if isinstance(base, LoRALinear):
                        raise ValueError(f"{name} already has a LoRA adapter")
                    setattr(block, name, LoRALinear(base, rank=rank, alpha=alpha, rngs=rngs))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel (in place; returned). No-op without adapters."""
    with nnx.use_eager_sharding(False):  # the merged kernel keeps the base kernel's placement
        for block in _decoder_blocks(model):
            for name in TARGETS:
                layer = getattr(block, name, None)
                if isinstance(layer, LoRALinear):
                    setattr(block, name, layer.merged())
    return model

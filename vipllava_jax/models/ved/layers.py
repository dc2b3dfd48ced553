"""Small pieces the VED modules share on top of `vipllava_jax.nn.layers`."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from vipllava_jax.nn.layers import ACTIVATIONS, DType, activation


def ved_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """transformers' ACT2FN, plus GPT-2's "gelu_new" (the tanh approximation)."""
    if name == "gelu_new":
        return ACTIVATIONS["gelu_pytorch_tanh"]
    return activation(name)


def embed(num: int, dim: int, axes: tuple[str, str], *, dtype: DType, param_dtype: DType,
          rngs: nnx.Rngs) -> nnx.Embed:
    """An nnx.Embed (table `[num, dim]`, as nn.Embedding stores it) with logical axis names."""
    return nnx.Embed(
        num, dim, dtype=dtype, param_dtype=param_dtype, embedding_init=nnx.initializers.normal(0.02),
        embedding_metadata={"out_sharding": axes}, rngs=rngs,
    )

"""Building blocks shared by the vision tower, the projector and the decoder.

Norms compute in float32 whatever the compute dtype (as transformers does for RMSNorm and as
mixed precision needs for LayerNorm), then cast back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vipllava_jax.nn.sharding import logical_to_spec

DType = jnp.dtype | type | str


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names. "gelu" is the exact (erf) GELU; jax.nn.gelu defaults to tanh.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def on_rows(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """`f` (a map `[N, in] -> [N, out]`) applied to `x` `[..., in]` flattened to 2-D.

    On CPU, XLA computes the weight gradient `x^T dy` of a 2-D matmul from the operands as they
    are, where for `[B, T, in]` inputs it first copies the activations into a transposed layout
    (the `copy_*` fusions of benchmarks/profile_train.py). Same numerics either way.
    """
    y = f(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Linear(nnx.Linear):
    """An nnx.Linear applied `on_rows`: same parameters and numerics, a faster CPU backward."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return on_rows(super().__call__, x)


def linear(
    din: int,
    dout: int,
    axes: tuple[str, str],
    *,
    bias: bool,
    dtype: DType,
    param_dtype: DType,
    rngs: nnx.Rngs,
) -> Linear:
    """A `Linear` (kernel `[in, out]`) whose kernel and bias carry logical axis names."""
    return Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata={"out_sharding": axes},
        bias_metadata={"out_sharding": axes[1:]},
        rngs=rngs,
    )


class LayerNorm(nnx.Module):
    """LayerNorm with two-pass variance in float32; params `scale`, `bias` as in Flax."""

    def __init__(self, dim: int, *, eps: float, dtype: DType, param_dtype: DType, axis: str = "norm"):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale (transformers' order)."""

    def __init__(self, dim: int, *, eps: float, dtype: DType, param_dtype: DType):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def rope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, factor: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[batch, seq, head_dim]` in float32, transformers' rotate_half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] / factor * inv_freq  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, head_dim]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, N, H]` rotated by cos/sin `[B, T, H]` (rotate_half: no weight permutation)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


@struct.dataclass
class KeyLengths:
    """An attention mask as a fused kernel takes it: row b's real keys are its first
    `lengths[b]` (right padding), plus causal and sliding-window limits.

    For a right-padded batch it admits exactly the keys of `decoder_mask`, without a
    `[B, 1, T, S]` array. (A padding query that sees no key, possible with a sliding window,
    gets the kernel's output instead of zeros; no real token reads it.) `attention`
    hands it to `jax.nn.dot_product_attention` with `implementation`: "cudnn" (cuDNN's flash
    attention, GPUs, bf16/fp16) or "xla" (the same call compiled by XLA, for CPU tests); or,
    with "pallas", to JAX's Pallas splash-attention kernel for TPUs (`pallas_tpu_attention`).
    """

    lengths: jax.Array | None  # [B] int32; None: every key is real
    causal: bool = struct.field(pytree_node=False, default=False)
    sliding_window: int | None = struct.field(pytree_node=False, default=None)
    implementation: str = struct.field(pytree_node=False, default="cudnn")


# The kernels a stack with a fused path takes (its `kernel=` argument; per part, a model's
# `attention=`): None is the dense-mask path; "xla" is `jax.nn.dot_product_attention`'s XLA
# implementation of the fused call (for CPU tests).
ATTENTION_KERNELS = (None, "cudnn", "xla", "pallas")


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | KeyLengths | None, scale: float
) -> jax.Array:
    """Softmax attention, q `[B, T, N, H]`, k/v `[B, S, K, H]` (K divides N: GQA).

    mask: bool `[B, 1, T, S]` (True = may attend), None, or `KeyLengths` (a fused kernel).
    With a boolean mask, a query that may attend no key (a left-padding row) outputs zeros,
    as torch's scaled_dot_product_attention does; this keeps padded rows, and a loss that
    reads them, equal to transformers'.
    """
    if isinstance(mask, KeyLengths):
        if mask.implementation == "pallas":
            return pallas_tpu_attention(q, k, v, mask, scale)
        window = None if mask.sliding_window is None else (mask.sliding_window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=mask.causal, key_value_seq_lengths=mask.lengths,
            local_window_size=window, implementation=mask.implementation)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)  # [B, T, N, H]
    if mask is None:
        return out
    sees_any = jnp.any(mask, axis=-1)[:, 0, :, None, None]  # [B, T, 1, 1]
    return jnp.where(sees_any, out, 0).astype(out.dtype)



def attention_with_weights(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float
) -> tuple[jax.Array, jax.Array]:
    """`attention` with a boolean (or no) mask, written out so that it can also return the
    post-softmax weights `[B, N, T, S]` (transformers' eager attention: float32 softmax, cast
    to the compute dtype). A query that may attend no key gets zero weights and outputs zeros.
    Used only when a caller asks for the weights: the default path stays fused."""
    b, t, n, h = q.shape
    g = n // k.shape[2]  # query heads per KV head (GQA)
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))  # [B, S, N, H]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0)
    probs = probs.astype(q.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v), probs

# Sequence lengths the Pallas TPU kernel tiles by: the splash kernel's default blocks, 128 x 128.
PALLAS_BLOCK = 128


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: KeyLengths,
                         scale: float) -> jax.Array:
    """`attention` with `KeyLengths` on JAX's Pallas splash-attention kernel for TPUs
    (`jax.experimental.pallas.ops.tpu.splash_attention`, forward and backward): no
    `[B, N, T, S]` scores in HBM, and the blocks a causal or sliding-window mask rules out are
    skipped. Same shapes and results as `attention`.

    The kernel runs on one row, `[N, T, H]` queries on `[K, S, H]` keys (GQA natively), with
    sequences in whole blocks of `PALLAS_BLOCK` and a mask fixed when it is built: causal,
    sliding window (Mistral) or none (the vision tower). Rows are vmapped; sequences are padded
    at the end with keys in segment 0, real keys are segment 1 (right padding), so a padding
    query attends only padding keys and no real query sees one. On a mesh the kernel, which XLA
    cannot partition, runs under `shard_map`: rows over the data axes, heads over the tensor
    axis (KV heads are repeated when the tensor axis does not divide them). The kernel scales
    the queries before the product instead of the scores after it.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q.shape
    s = k.shape[1]
    lengths = jnp.full((b,), s, jnp.int32) if mask.lengths is None else mask.lengths
    q_len, kv_len = (-(-x // PALLAS_BLOCK) * PALLAS_BLOCK for x in (t, s))
    mesh = jax.sharding.get_abstract_mesh()
    heads = None if mesh.empty else logical_to_spec(("batch", "heads", None, None), (b, n, q_len, h), mesh)
    kv_heads = None if mesh.empty else logical_to_spec(("batch", "kv_heads", None, None),
                                                       (b, k.shape[2], kv_len, h), mesh)
    if kv_heads != heads:
        k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))  # one KV head per query head

    def heads_first(x, length):  # [B, L, N, H] -> [B, N, length, H], zeros at the end
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q, k, v = heads_first(q * jnp.asarray(scale, q.dtype), q_len), heads_first(k, kv_len), heads_first(v, kv_len)
    # segment ids: 1 for a real key (its own position for a query), 0 for padding
    q_seg = (jnp.arange(q_len)[None] < jnp.minimum(lengths, t)[:, None]).astype(jnp.int32)
    kv_seg = (jnp.arange(kv_len)[None] < lengths[:, None]).astype(jnp.int32)
    if mask.sliding_window is not None:  # the keys of `attention`'s local_window_size
        one_head = splash.LocalMask((q_len, kv_len), window_size=(mask.sliding_window - 1, 0), offset=0)
    elif mask.causal:
        one_head = splash.CausalMask((q_len, kv_len))
    else:
        one_head = splash.FullMask((q_len, kv_len))

    def kernel(q, k, v, q_seg, kv_seg):  # this shard's rows and heads
        row = splash.make_splash_mha(splash.MultiHeadMask([one_head] * q.shape[1]),
                                     head_shards=1, q_seq_shards=1)
        return jax.vmap(lambda *a: row(*a[:3], segment_ids=splash.SegmentIds(*a[3:])))(q, k, v, q_seg, kv_seg)

    if heads is not None:
        rows = jax.sharding.PartitionSpec(heads[0], None)
        kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(heads, heads, heads, rows, rows),
                               out_specs=heads, check_vma=False)
    out = kernel(q, k, v, q_seg, kv_seg)  # [B, N, q_len, H]
    return out[:, :, :t].transpose(0, 2, 1, 3)


def check_kernel(kernel: str | None) -> str | None:
    """`kernel`, if it is one of `ATTENTION_KERNELS`."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    return kernel


def check_attention(attention: Mapping[str, str | None] | None, parts: Mapping[str, object],
                    owner: str) -> dict[str, str | None]:
    """`attention` (part name -> `ATTENTION_KERNELS` entry) as a dict, after checking that it
    names only `parts` (the parts of `owner` that have a fused path) and known kernels.
    None is the empty dict: every part on its dense masks."""
    attention = dict(attention or {})
    unknown = sorted(set(attention) - set(parts))
    if unknown:
        raise ValueError(f"{owner} has no fused attention path in {unknown} "
                         f"(parts that have one: {sorted(parts)})")
    for kernel in attention.values():
        check_kernel(kernel)
    return attention


def remat_layer(layer: nnx.Module, policy: Callable[..., bool] | None) -> Callable:
    """`layer` itself when `policy` is None; else a call of `layer` under `nnx.remat`
    (`jax.checkpoint`) with that policy: the backward pass recomputes the layer's
    activations, keeping only those the policy saves.

    Stacks apply it per layer, not around their whole forward: checkpointing the whole loss
    would recompute the forward in one piece before the backward and keep every activation
    again (no saving).
    """
    if policy is None:
        return layer
    return functools.partial(nnx.remat(lambda layer, *args: layer(*args), policy=policy), layer)


# One (keys, values) pair per layer, each [B*K, S, H]: row b*K + k holds batch row b's KV
# head k (see layers.cached_attention), S = the cache length.
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


def decoder_mask(
    kv_mask: jax.Array, q_slots: jax.Array, k_slots: jax.Array, sliding_window: int | None,
) -> jax.Array:
    """bool `[B, 1, T, S]`: query t may attend key s.

    A key is visible when it holds a real token (`kv_mask[b, s]`: not padding, already
    written), is not in the future (`k <= q`) and, for Mistral, is within the window
    (`q - k < sliding_window`). Slots are indices in the sequence / cache, not RoPE position
    ids. Example, T = S = 4, left padding of 1 (`kv_mask = [0, 1, 1, 1]`):

        q\\k 0 1 2 3
        0   . . . .     <- a padding query sees nothing; its output is zeros, never used
        1   . x . .
        2   . x x .
        3   . x x x
    """
    q = q_slots[:, :, None]  # [B, T, 1]
    k = k_slots[:, None, :]  # [B, 1, S]
    mask = (k <= q) & kv_mask[:, None, :].astype(bool)
    if sliding_window is not None:
        mask &= q - k < sliding_window
    return mask[:, None]  # [B, 1, T, S]


def cache_update(cache: jax.Array, new: jax.Array, index) -> jax.Array:
    """Writes a chunk's keys or values `new [B, T, K, H]` into `cache [B*K, S, H]` at slots
    `index .. index+T-1` (cache row `b*K + k` is batch row b's KV head k)."""
    b, t, k, h = new.shape
    rows = new.transpose(0, 2, 1, 3).reshape(b * k, t, h).astype(cache.dtype)
    return jax.lax.dynamic_update_slice(cache, rows, (0, index, 0))


def cached_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
    """Attention over a KV cache stored as rows of (batch, KV head): q `[B, T, N, H]`, k/v
    `[B*K, S, H]`, mask bool `[B, 1, T, S]`.

    Both einsums are matmuls batched over the cache rows, with the cache as it is stored.
    (`jax.nn.dot_product_attention` wants `[B, S, K, H]` and would relayout the whole cache at
    every decode step. A `[B, K, S, H]` cache needs its (B, K) axes merged for the matmuls, and
    for that reshape XLA:CPU computed the K-cache update twice and copied the cache four times
    per step.) Same semantics as `attention` (float32 softmax, zeros for a query
    that sees no key).
    """
    b, t, n, h = q.shape
    rows, s, _ = k.shape
    kv_heads = rows // b
    g = n // kv_heads  # query heads per KV head (GQA)
    q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(rows, g * t, h)
    scores = jnp.einsum("rqh,rsh->rqs", q, k, preferred_element_type=jnp.float32) * scale
    visible = jnp.broadcast_to(mask[:, :, None], (b, kv_heads, g, t, s)).reshape(rows, g * t, s)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0).astype(v.dtype)
    out = jnp.einsum("rqs,rsh->rqh", probs, v)  # [B*K, G*T, H]
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)

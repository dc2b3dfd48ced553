"""CLIP vision tower, returning the hidden states VipLlava selects.

Parameter names follow transformers' `CLIPVisionTransformer` (embeddings.patch_embedding,
encoder.layers.N.self_attn.q_proj, pre_layrnorm [sic], post_layernorm, ...), so converting a
checkpoint is a matter of transposes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipllava_jax.models.vipllava.config import CLIPVisionConfig
from vipllava_jax.nn.layers import DType, KeyLengths, LayerNorm, activation, attention, check_kernel, linear
from vipllava_jax.nn.sharding import constrain


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        self.dtype = dtype
        self.class_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (d,), param_dtype), out_sharding=("embed",)
        )
        # kernel [kh, kw, in, out]; transformers stores the conv as [out, in, kh, kw].
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
            use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=nnx.initializers.normal(0.02),
            kernel_metadata={"out_sharding": ("conv", "conv", "conv", "embed")}, rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.num_patches + 1, d, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata={"out_sharding": ("seq", "embed")}, rngs=rngs,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # [B, H, W, C]
        x = self.patch_embedding(x)  # [B, H/p, W/p, D]
        b, _, _, d = x.shape
        x = x.reshape(b, -1, d)  # [B, N, D], row-major patches as in transformers
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)  # [B, N+1, D]
        return x + self.position_embedding.embedding[...].astype(self.dtype)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = linear(d, d, ("embed", "heads"), **kw)
        self.out_proj = linear(d, d, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, mask: KeyLengths | None = None) -> jax.Array:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = attention(q, k, v, mask=mask, scale=self.head_dim**-0.5)  # [B, T, N, H]
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **norm)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = CLIPMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: KeyLengths | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(cfg.num_hidden_layers)]
        )


class CLIPVisionModel(nnx.Module):
    """Embeddings -> pre_layrnorm -> encoder layers; returns the requested hidden states."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, **norm)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Kept only so that checkpoints round-trip: VipLlava never applies it.
        self.post_layernorm = LayerNorm(cfg.hidden_size, **norm)

    def __call__(self, pixel_values: jax.Array, layers: tuple[int, ...], *,
                 kernel: str | None = None) -> list[jax.Array]:
        """Hidden states `[B, N+1, D]` at `layers`, indexed like transformers' `hidden_states`.

        Index 0 is the embedding output after pre_layrnorm and index i the output of layer i;
        negative indices count from the end. Layers deeper than the deepest index are not run.
        `kernel` is the attention kernel (`ATTENTION_KERNELS`; None: XLA's dense attention).
        """
        check_kernel(kernel)
        n = self.config.num_hidden_layers
        wanted = [i % (n + 1) for i in layers]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x}
        mask = None if kernel is None else KeyLengths(None, implementation=kernel)  # no padding
        for i in range(max(wanted)):
            x = constrain(self.encoder.layers[i](x, mask), ("batch", "seq", None))
            states[i + 1] = x
        return [states[i] for i in wanted]

"""The BEiT image encoder of a VisionEncoderDecoder model (TrOCR-base's and -large's).

    pixel_values [B, C, H, W] --patch conv--> [B, P, D] --prepend CLS--> (+ absolute position
    embeddings when the config has them) --pre-LN layers with a relative position bias and
    layer scale--> layernorm (Identity with use_mean_pooling, BEiT's default) --> [B, S, D]

    layer: x = x + lambda_1 * attn(LN(x), bias); x = x + lambda_2 * mlp(LN(x))
      (lambda_*: per-channel layer scale when layer_scale_init_value > 0, else 1)
    bias [N, S, S]: a table `[(2h-1)(2w-1) + 3, N]` indexed by each pair's relative patch offset
      (3 more rows: CLS to patch, patch to CLS, CLS to CLS); per layer, or one shared by all

Parameter paths equal the keys transformers writes (the legacy names: `encoder.layer.N.attention.
attention.query`, `lambda_1`, `attention.attention.relative_position_bias.relative_position_bias_
table`, shared `encoder.relative_position_bias...`). The key projection has no bias. The pooler
(a LayerNorm with use_mean_pooling) and the mask token are kept for round trips, never applied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipllava_jax.models.ved.config import ViTConfig
from vipllava_jax.models.ved.encoder import ViTDense, ViTPatchEmbeddings
from vipllava_jax.models.ved.layers import ved_activation
from vipllava_jax.nn.layers import DType, LayerNorm, linear


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """transformers' `BeitRelativePositionBias.generate_relative_position_index`: int `[S, S]`
    (S = h*w + 1, CLS first), each pair's row of the bias table."""
    h, w = window
    num = (2 * h - 1) * (2 * w - 1) + 3
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)  # [2, hw]
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # [hw, hw, 2]
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    index = np.zeros((h * w + 1,) * 2, np.int64)
    index[1:, 1:] = rel.sum(-1)
    index[0, :] = num - 3  # CLS to patch
    index[:, 0] = num - 2  # patch to CLS
    index[0, 0] = num - 1  # CLS to CLS
    return index


class BeitRelativePositionBias(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, param_dtype: DType):
        self.window = cfg.patch_grid
        num = (2 * self.window[0] - 1) * (2 * self.window[1] - 1) + 3
        self.relative_position_bias_table = nnx.Param(jnp.zeros((num, cfg.num_attention_heads), param_dtype),
                                                      out_sharding=(None, None))

    def __call__(self) -> jax.Array:
        """The bias `[N, S, S]`, float32."""
        index = relative_position_index(self.window)
        return jnp.transpose(self.relative_position_bias_table[...].astype(jnp.float32)[index], (2, 0, 1))


class BeitSelfAttention(nnx.Module):
    """transformers' `attention.attention`: q/k/v (no key bias) and the layer's own bias table."""

    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = linear(d, d, ("embed", "heads"), bias=True, **kw)
        self.key = linear(d, d, ("embed", "heads"), bias=False, **kw)
        self.value = linear(d, d, ("embed", "heads"), bias=True, **kw)
        self.relative_position_bias = (BeitRelativePositionBias(cfg, param_dtype=param_dtype)
                                       if cfg.use_relative_position_bias else None)


class BeitAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.attention = BeitSelfAttention(cfg, **kw)
        self.output = ViTDense(cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """x `[B, S, D]`, bias float32 `[N, S, S]` or None (eager attention, float32 softmax)."""
        b, s, _ = x.shape
        split = lambda y: y.reshape(b, s, self.num_heads, self.head_dim)  # [B, S, N, H]
        a = self.attention
        q, k, v = split(a.query(x)), split(a.key(x)), split(a.value(x))
        scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        if a.relative_position_bias is not None:
            bias = a.relative_position_bias() if bias is None else bias + a.relative_position_bias()
        if bias is not None:
            scores = scores + bias[None]
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnts,bsnh->btnh", weights, v)
        return self.output.dense(out.reshape(b, s, -1))


class BeitLayer(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        d = cfg.hidden_size
        self.act = ved_activation(cfg.hidden_act)
        self.attention = BeitAttention(cfg, **kw)
        self.intermediate = ViTDense(d, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.output = ViTDense(cfg.intermediate_size, d, ("mlp", "embed"), **kw)
        self.layernorm_before = LayerNorm(d, **norm)
        self.layernorm_after = LayerNorm(d, **norm)
        scale = cfg.layer_scale_init_value
        self.lambda_1 = nnx.Param(jnp.full((d,), scale, param_dtype), out_sharding=("embed",)) if scale > 0 else None
        self.lambda_2 = nnx.Param(jnp.full((d,), scale, param_dtype), out_sharding=("embed",)) if scale > 0 else None

    def _scaled(self, lam, y):
        return y if lam is None else lam[...].astype(y.dtype) * y

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        x = x + self._scaled(self.lambda_1, self.attention(self.layernorm_before(x), bias))
        h = self.act(self.intermediate.dense(self.layernorm_after(x)))
        return x + self._scaled(self.lambda_2, self.output.dense(h))


class BeitEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        token = lambda: nnx.Param(init(rngs.params(), (1, 1, d), param_dtype), out_sharding=(None, None, "embed"))
        self.cls_token = token()
        self.mask_token = token() if cfg.use_mask_token else None
        self.patch_embeddings = ViTPatchEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, cfg.seq_len, d), param_dtype), out_sharding=(None, "seq", "embed")
        ) if cfg.use_absolute_position_embeddings else None

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = self.patch_embeddings(jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype))  # [B, P, D]
        b, _, d = x.shape
        x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, d)), x], axis=1)
        return x if self.position_embeddings is None else x + self.position_embeddings[...].astype(self.dtype)


class BeitEncoder(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.relative_position_bias = (BeitRelativePositionBias(cfg, param_dtype=param_dtype)
                                       if cfg.use_shared_relative_position_bias else None)
        self.layer = nnx.List(
            [BeitLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )


class BeitPooler(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType):
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)


class BeitModel(nnx.Module):
    """embeddings -> layers -> layernorm (none with use_mean_pooling): the last hidden state."""

    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = BeitEmbeddings(cfg, **kw)
        self.encoder = BeitEncoder(cfg, **kw)
        norm = dict(dtype=dtype, param_dtype=param_dtype)
        self.layernorm = None if cfg.use_mean_pooling else LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **norm)
        self.pooler = BeitPooler(cfg, **norm) if cfg.use_mean_pooling else None

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = self.embeddings(pixel_values)
        shared = self.encoder.relative_position_bias
        bias = None if shared is None else shared()
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x if self.layernorm is None else self.layernorm(x)

"""The ViT / DeiT image encoder of a VisionEncoderDecoder model.

    pixel_values [B, C, H, W] --patch conv--> [B, P, D] --prepend CLS (and DeiT's distillation
    token)--> + position embeddings [B, S, D] --pre-LN layers--> layernorm --> [B, S, D]

Parameter paths equal the keys transformers writes (`embeddings.patch_embeddings.projection`,
`encoder.layer.N.attention.attention.query`, `layernorm_before`, ...), so the converter only
transposes. The pooler is kept so that checkpoints round-trip, but never applied: VED's decoder
attends the last hidden state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipllava_jax.models.ved.config import ViTConfig
from vipllava_jax.models.ved.layers import ved_activation
from vipllava_jax.nn.layers import DType, LayerNorm, attention, linear


class ViTPatchEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        p = cfg.patch_size
        # kernel [kh, kw, in, out]; transformers stores the conv as [out, in, kh, kw].
        self.projection = nnx.Conv(
            cfg.num_channels, cfg.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID",
            dtype=dtype, param_dtype=param_dtype, kernel_init=nnx.initializers.normal(0.02),
            kernel_metadata={"out_sharding": ("conv", "conv", "conv", "embed")},
            bias_metadata={"out_sharding": ("embed",)}, rngs=rngs,
        )

    def __call__(self, pixels_nhwc: jax.Array) -> jax.Array:
        x = self.projection(pixels_nhwc)  # [B, H/p, W/p, D]
        return x.reshape(x.shape[0], -1, x.shape[-1])  # [B, P, D], row-major as transformers


class ViTEmbeddings(nnx.Module):
    """Shapes as stored by transformers: tokens `[1, 1, D]`, positions `[1, S, D]`."""

    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        token = lambda: nnx.Param(init(rngs.params(), (1, 1, d), param_dtype), out_sharding=(None, None, "embed"))
        self.cls_token = token()
        self.distillation_token = token() if cfg.model_type == "deit" else None
        self.patch_embeddings = ViTPatchEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, cfg.seq_len, d), param_dtype), out_sharding=(None, "seq", "embed")
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # [B, H, W, C]
        x = self.patch_embeddings(x)  # [B, P, D]
        b, _, d = x.shape
        specials = [self.cls_token] + ([self.distillation_token] if self.distillation_token is not None else [])
        tokens = [jnp.broadcast_to(t[...].astype(self.dtype), (b, 1, d)) for t in specials]
        x = jnp.concatenate([*tokens, x], axis=1)  # [B, S, D]
        return x + self.position_embeddings[...].astype(self.dtype)


class ViTSelfAttention(nnx.Module):
    """transformers' `attention.attention`: the q/k/v projections."""

    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = linear(d, d, ("embed", "heads"), **kw)
        self.key = linear(d, d, ("embed", "heads"), **kw)
        self.value = linear(d, d, ("embed", "heads"), **kw)


class ViTDense(nnx.Module):
    """A module holding one `dense` linear (transformers' `attention.output`, `intermediate`, `output`)."""

    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, dtype, param_dtype, rngs):
        self.dense = linear(din, dout, axes, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ViTAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.attention = ViTSelfAttention(cfg, **kw)
        self.output = ViTDense(cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        split = lambda y: y.reshape(b, s, self.num_heads, self.head_dim)  # [B, S, N, H]
        a = self.attention
        out = attention(split(a.query(x)), split(a.key(x)), split(a.value(x)), mask=None,
                        scale=self.head_dim**-0.5)  # [B, S, N, H]
        return self.output.dense(out.reshape(b, s, -1))


class ViTLayer(nnx.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.act = ved_activation(cfg.hidden_act)
        self.layernorm_before = LayerNorm(cfg.hidden_size, **norm)
        self.attention = ViTAttention(cfg, **kw)
        self.layernorm_after = LayerNorm(cfg.hidden_size, **norm)
        self.intermediate = ViTDense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.output = ViTDense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.layernorm_before(x))
        h = self.act(self.intermediate.dense(self.layernorm_after(x)))
        return x + self.output.dense(h)


class ViTEncoder(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [ViTLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )


class ViTModel(nnx.Module):
    """embeddings -> encoder layers -> layernorm: the last hidden state `[B, S, D]`."""

    def __init__(self, cfg: ViTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg, **kw)
        self.encoder = ViTEncoder(cfg, **kw)
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.pooler = ViTDense(cfg.hidden_size, cfg.pooler_output_size, ("embed", "mlp"), **kw)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)

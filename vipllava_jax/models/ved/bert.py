"""BERT as a VED decoder (`BertLMHeadModel` with is_decoder and add_cross_attention).

    input_ids [B, T] --word + position + token-type-0 embeddings, LayerNorm--> [B, T, D]
    --layers (post-LN: LN(x + self-attn(x)), LN(x + cross-attn(x)), LN(x + FFN(x)))-->
    cls.predictions: transform (dense, act, LayerNorm) --> decoder (tied to word_embeddings
    by default) + bias --> logits

Paths equal transformers' keys under `decoder.` (`bert.encoder.layer.N.attention.self.query`,
`cls.predictions.transform.dense`, ...). As in transformers 5, a tied head adds
`cls.predictions.bias`; an untied one has its own `cls.predictions.decoder` weight and bias
(and `cls.predictions.bias` is kept, unused, so checkpoints round-trip).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vipllava_jax.models.ved.attention import CrossKV, KVCache, causal_mask, cross_attention, self_attention
from vipllava_jax.models.ved.config import DecoderConfig
from vipllava_jax.models.ved.layers import embed, ved_activation
from vipllava_jax.nn.layers import DType, LayerNorm, linear, remat_layer


class BertQKV(nnx.Module):
    """transformers' `attention.self` / `crossattention.self`: the three projections."""

    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = linear(d, d, ("embed", "heads"), **kw)
        self.key = linear(d, d, ("embed", "heads"), **kw)
        self.value = linear(d, d, ("embed", "heads"), **kw)


class BertOutput(nnx.Module):
    """dense, then LayerNorm(residual + dense(x)) (BERT is post-LN)."""

    def __init__(self, cfg: DecoderConfig, din: int, axes, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.dense = linear(din, cfg.hidden_size, axes, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nnx.Module):
    """Self- or cross-attention followed by its output block; attribute names as transformers'."""

    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.self = BertQKV(cfg, **kw)
        self.output = BertOutput(cfg, cfg.hidden_size, ("heads", "embed"), **kw)

    def _split(self, y: jax.Array) -> jax.Array:
        return y.reshape(*y.shape[:2], self.num_heads, self.head_dim)  # [B, T, N, H]

    def causal(self, x, mask, kv=None, index=None):
        b, t, _ = x.shape
        p = self.self
        out, kv = self_attention(self._split(p.query(x)), self._split(p.key(x)), self._split(p.value(x)),
                                 mask, self.head_dim**-0.5, kv, index)
        return self.output(out.reshape(b, t, -1), x), kv

    def keys_values(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._split(self.self.key(encoder_hidden)), self._split(self.self.value(encoder_hidden))

    def cross(self, x, k, v):
        b, t, _ = x.shape
        out = cross_attention(self._split(self.self.query(x)), k, v, self.head_dim**-0.5)
        return self.output(out.reshape(b, t, -1), x)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.dense = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), bias=True,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class BertLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ved_activation(cfg.hidden_act)
        self.attention = BertAttention(cfg, **kw)
        self.crossattention = BertAttention(cfg, **kw)
        self.intermediate = BertIntermediate(cfg, **kw)
        self.output = BertOutput(cfg, cfg.intermediate_size, ("mlp", "embed"), **kw)

    def __call__(self, x, cross_k, cross_v, mask, kv=None, index=None):
        x, kv = self.attention.causal(x, mask, kv, index)
        x = self.crossattention.cross(x, cross_k, cross_v)
        return self.output(self.act(self.intermediate.dense(x)), x), kv


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.hidden_size, ("seq", "embed"), **kw)
        self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), **kw)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        # A decoder sees token type 0 everywhere (transformers' default token_type_ids).
        # Row 0 of the table, read directly: nnx.Embed cannot broadcast a scalar id over a
        # one-row table (type_vocab_size=1).
        words = self.word_embeddings(input_ids)
        x = words + self.token_type_embeddings.embedding[0].astype(words.dtype)
        return self.LayerNorm(x + self.position_embeddings(positions)[None])


class BertEncoder(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [BertLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )


class BertModel(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = BertEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class BertPredictionHeadTransform(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.act = ved_activation(cfg.hidden_act)
        self.dense = linear(cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), bias=True,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.transform = BertPredictionHeadTransform(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = None if cfg.tie_word_embeddings else linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=True, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), param_dtype), out_sharding=("vocab",))


class BertOnlyMLMHead(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.predictions = BertLMPredictionHead(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class BertLMHeadModel(nnx.Module):
    """The decoder interface VED uses (GPT-2's has the same methods)."""

    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.bert = BertModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cls = BertOnlyMLMHead(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def cross_kv(self, encoder_hidden: jax.Array) -> CrossKV:
        """Each layer's cross-attention keys and values `[B_img, S_enc, N, H]`, computed once."""
        return tuple(layer.crossattention.keys_values(encoder_hidden) for layer in self.bert.encoder.layer)

    def init_cache(self, batch: int, length: int) -> KVCache:
        cfg = self.config
        shape = (batch * cfg.num_attention_heads, length, cfg.head_dim)  # see layers.cached_attention
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.bert.encoder.layer)

    def __call__(self, input_ids, cross_kv: CrossKV, attention_mask=None, cache: KVCache | None = None,
                 index=0, *, remat: Callable[..., bool] | None = None) -> tuple[jax.Array, KVCache | None]:
        """Same contract as `GPT2LMHeadModel.__call__`."""
        b, t = input_ids.shape
        x = self.bert.embeddings(input_ids, index + jnp.arange(t))  # [B, T, D]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        mask = causal_mask(attention_mask, index, t, None if cache is None else cache[0][0].shape[1])
        new_cache = []
        for i, layer in enumerate(self.bert.encoder.layer):
            x, kv = remat_layer(layer, remat)(x, *cross_kv[i], mask, None if cache is None else cache[i], index)
            new_cache.append(kv)
        return x, None if cache is None else tuple(new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        head = self.cls.predictions
        h = head.transform(hidden)
        if head.decoder is None:
            table = self.bert.embeddings.word_embeddings.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", h, table) + head.bias[...].astype(self.dtype)
        return head.decoder(h)

"""TrOCR's, BART's and mBART's decoders as VED decoders (`TrOCRForCausalLM`, `BartForCausalLM`,
`MBartForCausalLM`): one fairseq layout with three sets of switches.

    input_ids [B, T] --embed_tokens (x sqrt(D) with scale_embedding) + embed_positions (learned,
    row = position + 2; TrOCR may use fixed sinusoidal ones counted from the pad id)-->
    layernorm_embedding (BART, mBART; TrOCR when its config says) --> layers --> [mBART: the final
    layer_norm] --> head (TrOCR: `output_projection`, BART: `lm_head`; tied to embed_tokens by
    default) --> logits

    layer, post-norm (TrOCR, BART): x = LN(x + self_attn(x)); x = LN(x + encoder_attn(x));
      x = LN(x + fc2(act(fc1(x))))
    layer, pre-norm (mBART): x = x + self_attn(LN(x)); ... (the same three, each norm first)

Paths equal transformers' keys under `decoder.` (`model.decoder.layers.N.self_attn.q_proj`, ...).
TrOCR's cross-attention reads the encoder's width (`cross_attention_hidden_size`) directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipllava_jax.models.ved.attention import CrossKV, KVCache, causal_mask, cross_attention, self_attention
from vipllava_jax.models.ved.config import DecoderConfig
from vipllava_jax.models.ved.layers import embed, ved_activation
from vipllava_jax.nn.layers import DType, LayerNorm, linear, remat_layer

POSITION_OFFSET = 2  # fairseq's learned position table starts 2 rows in


def sinusoidal_table(num: int, dim: int, padding_idx: int) -> np.ndarray:
    """TrOCR's fixed sinusoidal positions (`TrOCRSinusoidalPositionalEmbedding.get_embedding`),
    float32 `[num, dim]`, the pad row zero."""
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
    angles = np.arange(num, dtype=np.float32)[:, None] * freq[None]
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        table = np.concatenate([table, np.zeros((num, 1), np.float32)], axis=1)
    table[padding_idx] = 0
    return table.astype(np.float32)


def pad_positions(input_ids: jax.Array, index, padding_idx: int) -> jax.Array:
    """fairseq's positions from the pad id (RoBERTa, TrOCR's sinusoidal ones): the real tokens
    count up from pad + 1 after the `index` cached ones, pad tokens stay at pad."""
    real = (input_ids != padding_idx).astype(jnp.int32)
    return (jnp.cumsum(real, axis=1) + index) * real + padding_idx


class BartAttention(nnx.Module):
    """q/k/v/out projections; `kdim` is the width keys and values are read from."""

    def __init__(self, cfg: DecoderConfig, kdim: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.k_proj = linear(kdim, d, ("embed", "heads"), **kw)
        self.v_proj = linear(kdim, d, ("embed", "heads"), **kw)
        self.q_proj = linear(d, d, ("embed", "heads"), **kw)
        self.out_proj = linear(d, d, ("heads", "embed"), **kw)

    def _split(self, y: jax.Array) -> jax.Array:
        return y.reshape(*y.shape[:2], self.num_heads, self.head_dim)  # [B, T, N, H]

    def causal(self, x, mask, kv=None, index=None):
        b, t, _ = x.shape
        out, kv = self_attention(self._split(self.q_proj(x)), self._split(self.k_proj(x)),
                                 self._split(self.v_proj(x)), mask, self.head_dim**-0.5, kv, index)
        return self.out_proj(out.reshape(b, t, -1)), kv

    def keys_values(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._split(self.k_proj(encoder_hidden)), self._split(self.v_proj(encoder_hidden))

    def cross(self, x, k, v):
        b, t, _ = x.shape
        out = cross_attention(self._split(self.q_proj(x)), k, v, self.head_dim**-0.5)
        return self.out_proj(out.reshape(b, t, -1))


class BartDecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        d = cfg.hidden_size
        self.pre_norm = cfg.pre_norm
        self.act = ved_activation(cfg.hidden_act)
        self.self_attn = BartAttention(cfg, d, **kw)
        self.self_attn_layer_norm = LayerNorm(d, **norm)
        self.encoder_attn = BartAttention(cfg, cfg.cross_attention_hidden_size or d, **kw)
        self.encoder_attn_layer_norm = LayerNorm(d, **norm)
        self.fc1 = linear(d, cfg.intermediate_size, ("embed", "mlp"), bias=True, **kw)
        self.fc2 = linear(cfg.intermediate_size, d, ("mlp", "embed"), bias=True, **kw)
        self.final_layer_norm = LayerNorm(d, **norm)

    def _residual(self, x, norm, fn):
        if self.pre_norm:
            y, extra = fn(norm(x))
            return x + y, extra
        y, extra = fn(x)
        return norm(x + y), extra

    def __call__(self, x, cross_k, cross_v, mask, kv=None, index=None):
        x, kv = self._residual(x, self.self_attn_layer_norm, lambda h: self.self_attn.causal(h, mask, kv, index))
        x, _ = self._residual(x, self.encoder_attn_layer_norm,
                              lambda h: (self.encoder_attn.cross(h, cross_k, cross_v), None))
        x, _ = self._residual(x, self.final_layer_norm, lambda h: (self.fc2(self.act(self.fc1(h))), None))
        return x, kv


class BartDecoder(nnx.Module):
    """transformers' `model.decoder`: embeddings, layers, and mBART's final `layer_norm`."""

    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        d = cfg.hidden_size
        self.embed_tokens = embed(cfg.vocab_size, d, ("vocab", "embed"), **kw)
        self.embed_positions = embed(cfg.max_position_embeddings + POSITION_OFFSET, d, ("seq", "embed"),
                                     **kw) if cfg.learned_positions else None
        self.layernorm_embedding = LayerNorm(d, **norm) if cfg.layernorm_embedding else None
        self.layers = nnx.List([BartDecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.layer_norm = LayerNorm(d, **norm) if cfg.pre_norm else None


class BartDecoderWrapper(nnx.Module):
    """transformers' `model` (a wrapper holding `decoder`, so the keys read `model.decoder.*`)."""

    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.decoder = BartDecoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class BartForCausalLM(nnx.Module):
    """The decoder interface VED uses (as GPT-2's); the head is `output_projection` for TrOCR,
    `lm_head` for BART and mBART, None when tied to `embed_tokens`."""

    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.head_name = "output_projection" if cfg.model_type == "trocr" else "lm_head"
        self.model = BartDecoderWrapper(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        setattr(self, self.head_name, None if cfg.tie_word_embeddings else linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        ))
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0

    def cross_kv(self, encoder_hidden: jax.Array) -> CrossKV:
        """Each layer's cross-attention keys and values `[B_img, S_enc, N, H]`, computed once."""
        return tuple(layer.encoder_attn.keys_values(encoder_hidden) for layer in self.model.decoder.layers)

    def init_cache(self, batch: int, length: int) -> KVCache:
        cfg = self.config
        shape = (batch * cfg.num_attention_heads, length, cfg.head_dim)  # see layers.cached_attention
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.model.decoder.layers)

    def embed(self, input_ids: jax.Array, index) -> jax.Array:
        dec = self.model.decoder
        t = input_ids.shape[1]
        x = dec.embed_tokens(input_ids) * jnp.asarray(self.embed_scale, self.dtype)
        if dec.embed_positions is not None:
            x = x + dec.embed_positions(index + jnp.arange(t) + POSITION_OFFSET)[None]
        else:
            # a constant of the program, not a parameter (transformers does not save it either)
            cfg = self.config
            table = sinusoidal_table(cfg.max_position_embeddings + cfg.pad_token_id + 1, cfg.hidden_size,
                                     cfg.pad_token_id)
            x = x + jnp.asarray(table)[pad_positions(input_ids, index, cfg.pad_token_id)].astype(x.dtype)
        return x if dec.layernorm_embedding is None else dec.layernorm_embedding(x)

    def __call__(self, input_ids, cross_kv: CrossKV, attention_mask=None, cache: KVCache | None = None,
                 index=0, *, remat: Callable[..., bool] | None = None) -> tuple[jax.Array, KVCache | None]:
        """Same contract as `GPT2LMHeadModel.__call__`."""
        b, t = input_ids.shape
        dec = self.model.decoder
        x = self.embed(input_ids, index)  # [B, T, D]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        mask = causal_mask(attention_mask, index, t, None if cache is None else cache[0][0].shape[1])
        new_cache = []
        for i, layer in enumerate(dec.layers):
            x, kv = remat_layer(layer, remat)(x, *cross_kv[i], mask, None if cache is None else cache[i], index)
            new_cache.append(kv)
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        return x, None if cache is None else tuple(new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        head = getattr(self, self.head_name)
        if head is None:
            table = self.model.decoder.embed_tokens.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", hidden, table)
        return head(hidden)

"""GPT-2 as a VED decoder: causal self-attention, cross-attention over the image, LM head.

    input_ids [B, T] --wte + wpe--> [B, T, D] --blocks (ln_1 -> self-attn, ln_cross_attn ->
    cross-attn, ln_2 -> MLP, each residual)--> ln_f --> lm_head (tied to wte by default) --> logits

Paths equal transformers' keys under `decoder.` (`transformer.h.N.attn.c_attn`, ...). GPT-2's
Conv1D stores its weight `[in, out]`, which is already our kernel layout: the converter does not
transpose these (see `ved/checkpoint.py`).
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


def _scale(cfg: DecoderConfig, layer_idx: int) -> float:
    scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= float(layer_idx + 1)
    return scale


class GPT2SelfAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim, self.scale = cfg.num_attention_heads, cfg.head_dim, _scale(cfg, layer_idx)
        self.c_attn = linear(d, 3 * d, ("embed", "heads"), **kw)  # q | k | v
        self.c_proj = linear(d, d, ("heads", "embed"), **kw)

    def __call__(self, x, mask, kv=None, index=None):
        b, t, _ = x.shape
        q, k, v = (y.reshape(b, t, self.num_heads, self.head_dim) for y in jnp.split(self.c_attn(x), 3, axis=-1))
        out, kv = self_attention(q, k, v, mask, self.scale, kv, index)  # [B, T, N, H]
        return self.c_proj(out.reshape(b, t, -1)), kv


class GPT2CrossAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim, self.scale = cfg.num_attention_heads, cfg.head_dim, _scale(cfg, layer_idx)
        self.q_attn = linear(d, d, ("embed", "heads"), **kw)
        self.c_attn = linear(d, 2 * d, ("embed", "heads"), **kw)  # k | v of the encoder output
        self.c_proj = linear(d, d, ("heads", "embed"), **kw)

    def keys_values(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, s, _ = encoder_hidden.shape
        k, v = jnp.split(self.c_attn(encoder_hidden), 2, axis=-1)
        return k.reshape(b, s, self.num_heads, self.head_dim), v.reshape(b, s, self.num_heads, self.head_dim)

    def __call__(self, x, k, v):
        b, t, _ = x.shape
        q = self.q_attn(x).reshape(b, t, self.num_heads, self.head_dim)
        return self.c_proj(cross_attention(q, k, v, self.scale).reshape(b, t, -1))


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ved_activation(cfg.hidden_act)
        self.c_fc = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.c_proj = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(cfg.hidden_size, **norm)
        self.attn = GPT2SelfAttention(cfg, layer_idx, **kw)
        self.ln_cross_attn = LayerNorm(cfg.hidden_size, **norm)
        self.crossattention = GPT2CrossAttention(cfg, layer_idx, **kw)
        self.ln_2 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = GPT2MLP(cfg, **kw)

    def __call__(self, x, cross_k, cross_v, mask, kv=None, index=None):
        attn, kv = self.attn(self.ln_1(x), mask, kv, index)
        x = x + attn
        x = x + self.crossattention(self.ln_cross_attn(x), cross_k, cross_v)
        return x + self.mlp(self.ln_2(x)), kv


class GPT2Model(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wte = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.wpe = embed(cfg.max_position_embeddings, cfg.hidden_size, ("seq", "embed"), **kw)
        self.h = nnx.List([GPT2Block(cfg, i, **kw) for i in range(cfg.num_hidden_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)


class GPT2LMHeadModel(nnx.Module):
    """The decoder interface VED uses (BERT's has the same methods)."""

    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.transformer = GPT2Model(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )

    def cross_kv(self, encoder_hidden: jax.Array) -> CrossKV:
        """Each layer's cross-attention keys and values `[B_img, S_enc, N, H]`, computed once."""
        return tuple(block.crossattention.keys_values(encoder_hidden) for block in self.transformer.h)

    def init_cache(self, batch: int, length: int) -> KVCache:
        cfg = self.config
        shape = (batch * cfg.num_attention_heads, length, cfg.head_dim)  # see layers.cached_attention
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.transformer.h)

    def __call__(self, input_ids, cross_kv: CrossKV, attention_mask=None, cache: KVCache | None = None,
                 index=0, *, remat: Callable[..., bool] | None = None) -> tuple[jax.Array, KVCache | None]:
        """input_ids `[B, T]` at positions `index .. index+T-1` -> final hidden `[B, T, D]`, cache.

        Without a cache the chunk attends itself (causal, `attention_mask [B, T]` marking real
        tokens); with one, it is written at slot `index` and attends every slot up to its own.
        `remat`: a `jax.checkpoint` policy to rematerialise each block with (None: none).
        """
        b, t = input_ids.shape
        t_model = self.transformer
        positions = index + jnp.arange(t)
        x = t_model.wte(input_ids) + t_model.wpe(positions)[None]  # [B, T, D]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        mask = causal_mask(attention_mask, index, t, None if cache is None else cache[0][0].shape[1])
        new_cache = []
        for i, block in enumerate(t_model.h):
            x, kv = remat_layer(block, remat)(x, *cross_kv[i], mask, None if cache is None else cache[i], index)
            new_cache.append(kv)
        return t_model.ln_f(x), None if cache is None else tuple(new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            table = self.transformer.wte.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", hidden, table)
        return self.lm_head(hidden)

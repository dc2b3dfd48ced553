"""RoBERTa as a VED decoder (`RobertaForCausalLM` with is_decoder and add_cross_attention).

BERT's layout (`roberta.embeddings`, `roberta.encoder.layer.N`, the modules of bert.py) with
two differences: positions count from the pad id (real tokens at pad + 1, pad + 2, ...; pad
tokens at pad), and the head is `lm_head`: dense, exact GELU, `layer_norm`, then `decoder`
(tied to word_embeddings by default) + `bias`. As BERT's, an untied head has its own
`lm_head.decoder` weight and bias, and `lm_head.bias` is kept, unused, so checkpoints round-trip.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vipllava_jax.models.ved.attention import CrossKV, KVCache, causal_mask
from vipllava_jax.models.ved.bart import pad_positions
from vipllava_jax.models.ved.bert import BertModel
from vipllava_jax.models.ved.config import DecoderConfig
from vipllava_jax.models.ved.layers import ved_activation
from vipllava_jax.nn.layers import DType, LayerNorm, linear, remat_layer


class RobertaLMHead(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ved_activation("gelu")  # transformers' RobertaLMHead applies exact GELU whatever hidden_act
        self.dense = linear(cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), bias=True, **kw)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.decoder = None if cfg.tie_word_embeddings else linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=True, **kw)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), param_dtype), out_sharding=("vocab",))


class RobertaForCausalLM(nnx.Module):
    """The decoder interface VED uses (as GPT-2's)."""

    def __init__(self, cfg: DecoderConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.roberta = BertModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = RobertaLMHead(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def cross_kv(self, encoder_hidden: jax.Array) -> CrossKV:
        """Each layer's cross-attention keys and values `[B_img, S_enc, N, H]`, computed once."""
        return tuple(layer.crossattention.keys_values(encoder_hidden) for layer in self.roberta.encoder.layer)

    def init_cache(self, batch: int, length: int) -> KVCache:
        cfg = self.config
        shape = (batch * cfg.num_attention_heads, length, cfg.head_dim)  # see layers.cached_attention
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.roberta.encoder.layer)

    def embed(self, input_ids: jax.Array, index) -> jax.Array:
        emb = self.roberta.embeddings
        words = emb.word_embeddings(input_ids)
        x = words + emb.token_type_embeddings.embedding[0].astype(words.dtype)  # token type 0 everywhere
        x = x + emb.position_embeddings(pad_positions(input_ids, index, self.config.pad_token_id))
        return emb.LayerNorm(x)

    def __call__(self, input_ids, cross_kv: CrossKV, attention_mask=None, cache: KVCache | None = None,
                 index=0, *, remat: Callable[..., bool] | None = None) -> tuple[jax.Array, KVCache | None]:
        """Same contract as `GPT2LMHeadModel.__call__`."""
        b, t = input_ids.shape
        x = self.embed(input_ids, index)  # [B, T, D]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        mask = causal_mask(attention_mask, index, t, None if cache is None else cache[0][0].shape[1])
        new_cache = []
        for i, layer in enumerate(self.roberta.encoder.layer):
            x, kv = remat_layer(layer, remat)(x, *cross_kv[i], mask, None if cache is None else cache[i], index)
            new_cache.append(kv)
        return x, None if cache is None else tuple(new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        head = self.lm_head
        h = head.layer_norm(head.act(head.dense(hidden)))
        if head.decoder is None:
            table = self.roberta.embeddings.word_embeddings.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", h, table) + head.bias[...].astype(self.dtype)
        return head.decoder(h)

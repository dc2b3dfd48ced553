"""The two attentions of a VED decoder layer, shared by GPT-2 and BERT.

Self-attention is causal and runs either over the chunk itself (a training / scoring forward)
or against a static KV cache (generation), as `LlamaAttention` does. Cross-attention attends
the encoder output, whose keys and values (`CrossKV`) are computed once per image, not per
beam: the queries of an image's beams are folded into one sequence, so beams never copy them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vipllava_jax.nn.layers import KVCache, attention, cache_update, cached_attention, decoder_mask

# One (keys, values) pair per layer, each [B_img, S_enc, N, H].
CrossKV = tuple[tuple[jax.Array, jax.Array], ...]

__all__ = ["CrossKV", "KVCache", "causal_mask", "cross_attention", "self_attention"]


def causal_mask(attention_mask: jax.Array, index, length: int, cache_len: int | None) -> jax.Array:
    """bool `[B, 1, T, S]` for a chunk of `length` tokens starting at slot `index`.

    Without a cache S = T and `attention_mask [B, T]` marks real tokens; with a cache of
    `cache_len` slots every written slot is real (decoder inputs are never padded in
    generation), and the slots not yet written are in the future of every query.
    """
    b = attention_mask.shape[0]
    q_slots = jnp.broadcast_to(index + jnp.arange(length), (b, length))
    if cache_len is None:
        return decoder_mask(attention_mask, q_slots, q_slots, None)
    k_slots = jnp.broadcast_to(jnp.arange(cache_len), (b, cache_len))
    return decoder_mask(jnp.ones((b, cache_len), bool), q_slots, k_slots, None)


def self_attention(q, k, v, mask, scale, kv=None, index=None):
    """q/k/v `[B, T, N, H]` -> `[B, T, N, H]`; with `kv` (cache `[B*N, S, H]` x 2), this
    chunk's keys and values are written at slot `index` first. Returns (out, kv)."""
    if kv is None:
        return attention(q, k, v, mask=mask, scale=scale), None
    kv = tuple(cache_update(c, new, index) for c, new in zip(kv, (k, v)))
    return cached_attention(q, *kv, mask=mask, scale=scale), kv


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """q `[B_img * beams, T, N, H]` over k/v `[B_img, S, N, H]` (no mask) -> `[B_img * beams, T, N, H]`.

    Rows are beam-major per image (image 0's beams, then image 1's ...), as generation lays
    them out; the beams' queries are attended as one longer query sequence.
    """
    bk, t, n, h = q.shape
    b = k.shape[0]
    folded = q.reshape(b, (bk // b) * t, n, h)  # [B_img, beams*T, N, H]
    return attention(folded, k, v, mask=None, scale=scale).reshape(bk, t, n, h)

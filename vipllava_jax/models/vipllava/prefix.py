"""A KV cache a caller holds (transformers' `past_key_values` / `use_cache`), and a prompt
prefix computed once and shared by several questions.

    model(ids, pixels, mask, use_cache=True)            -> logits, past_key_values (a `Cache`)
    model(next_ids, past_key_values=cache)               -> the next logits, the cache extended
    prefix = cache_prefix(model, image + system prompt)  -> vision tower and prefix run once
    generate_from_prefix(model, prefix, questions)       -> N answers (batched) after the prefix

A `Cache` has a fixed capacity (static shapes: one compiled program per chunk shape); each
call writes its chunk at slot `length`. Rows may hold padding anywhere (left padding of the
prompt, of each question after a shared prefix): padded slots are masked out of every later
attention, and RoPE positions count real tokens only, as `generate` counts them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.models.vipllava import generate as gen
from vipllava_jax.nn.layers import KVCache
from vipllava_jax.nn.sampling import SamplingParams, pick


@struct.dataclass
class Cache:
    kv: KVCache  # per decoder layer (keys, values) `[B*K, S, H]`
    kv_mask: jax.Array  # bool [B, S], slots holding real tokens
    length: jax.Array  # i32 [], slots written; the next chunk goes at slot `length`
    positions: jax.Array  # i32 [B], RoPE position of the next real token

    @property
    def capacity(self) -> int:
        return self.kv_mask.shape[1]

    @property
    def batch(self) -> int:
        return self.kv_mask.shape[0]


def new_cache(model, batch: int, capacity: int) -> Cache:
    """An empty cache of `capacity` slots per row."""
    return Cache(kv=model.language_model.init_cache(batch, capacity),
                 kv_mask=jnp.zeros((batch, capacity), bool), length=jnp.int32(0),
                 positions=jnp.zeros((batch,), jnp.int32))


def extend_cache(model, cache: Cache, inputs_embeds: jax.Array, attention_mask: jax.Array,
                 position_ids: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Runs the decoder on a chunk `[B, T, D]` written at slots `length .. length+T-1`: its
    final hidden states `[B, T, D]` and the extended cache. Positions default to the cache's
    count of real tokens plus the chunk's (`generate`'s convention)."""
    mask = attention_mask.astype(bool)
    counted = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    if position_ids is None:
        position_ids = cache.positions[:, None] + counted
    kv_mask = jax.lax.dynamic_update_slice(cache.kv_mask, mask, (0, cache.length))
    hidden, kv = model.language_model.extend(inputs_embeds, position_ids, kv_mask, cache.kv,
                                             cache.length)
    return hidden, Cache(kv=kv, kv_mask=kv_mask, length=cache.length + mask.shape[1],
                         positions=cache.positions + jnp.sum(mask, axis=-1, dtype=jnp.int32))


def check_room(cache: Cache, batch: int, new: int) -> None:
    """One-line errors for a chunk that does not fit a (concrete) cache."""
    if not isinstance(cache, Cache):
        raise VipLlavaError(f"past_key_values must be the Cache a previous call returned, got {type(cache).__name__}")
    if batch != cache.batch:
        raise VipLlavaError(f"past_key_values holds {cache.batch} rows, the inputs {batch}")
    if isinstance(cache.length, jax.core.Tracer):
        return
    used = int(cache.length)
    if used + new > cache.capacity:
        raise VipLlavaError(
            f"the cache holds {used} of {cache.capacity} slots and cannot take {new} more "
            f"(start it with a larger cache_length)")


def expand(cache: Cache, rows: int, extra: int) -> Cache:
    """A full cache (length == capacity) repeated to `rows` rows (from 1, or kept when it has
    `rows` already), with `extra` empty slots appended."""
    b = cache.batch
    reps = rows // b

    def grow(x):  # [b*K, S, H] -> [rows*K, S + extra, H]
        k = x.shape[0] // b
        x = jnp.broadcast_to(x.reshape(b, 1, k, *x.shape[1:]), (b, reps, k, *x.shape[1:]))
        x = x.reshape(rows * k, *x.shape[3:])
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0)))

    kv = jax.tree.map(grow, cache.kv)
    kv_mask = jnp.pad(jnp.repeat(cache.kv_mask, reps, axis=0), ((0, 0), (0, extra)))
    return Cache(kv=kv, kv_mask=kv_mask, length=cache.length,
                 positions=jnp.repeat(cache.positions, reps, axis=0))


# -- a prefix computed once --------------------------------------------------------------------

def cache_prefix(model, input_ids, pixel_values=None, attention_mask=None) -> Cache:
    """The cache of a prompt prefix (typically the system prompt and the image), exactly full,
    ready for `generate_from_prefix`. The prefix is left-padded to `generate`'s bucket, so
    that prefixes of similar length share one compiled program."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise VipLlavaError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    b, t = ids.shape
    mask = np.ones((b, t), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    pad = gen.bucket_length(t) - t
    ids = np.pad(ids, ((0, 0), (pad, 0)))
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    out = model(ids, pixel_values, mask, use_cache=True, cache_length=ids.shape[1])
    return out.past_key_values


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill_after(graphdef, params, prefix: Cache, input_ids, attention_mask, max_new_tokens,
                   rng, sampling: SamplingParams) -> gen.DecodeState:
    """The questions' chunk after the prefix and the first new token, as `generate.prefill`
    leaves them for `generate.decode` (cache capacity = prefix + questions + new tokens)."""
    model = nnx.merge(graphdef, params)
    n, t = input_ids.shape
    cache = expand(prefix, n, t + max_new_tokens)
    embeds = model.language_model.embed_tokens(input_ids)
    hidden, cache = extend_cache(model, cache, embeds, attention_mask)
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0].astype(jnp.float32)  # [N, V]
    token, done = pick(logits, rng, 0, sampling, jnp.zeros((n,), bool))
    tokens = jnp.full((n, max_new_tokens), sampling.pad_id, jnp.int32).at[:, 0].set(token)
    return gen.DecodeState(step=jnp.int32(1), tokens=tokens, done=done, logits=logits,
                           positions=cache.positions, kv_mask=cache.kv_mask, cache=cache.kv, rng=rng)


def generate_from_prefix(model, prefix: Cache, input_ids, attention_mask=None, *,
                         max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, eos_token_id=None, pad_token_id: int = 0,
                         seed: int = 0) -> np.ndarray:
    """The new tokens `[N, max_new_tokens]` of N continuations of one cached prefix.

    `input_ids`: `[N, T]` token ids after the prefix (no image tokens; left-padded rows with
    `attention_mask`), or a list of N token-id lists. `prefix` is `cache_prefix`'s cache, of
    one row (shared by all N) or of N rows. Sampling arguments as `generate`'s; row i's
    tokens equal `generate` on prefix + question i.
    """
    if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
        longest = max(len(q) for q in input_ids)
        ids = np.full((len(input_ids), longest), pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        for i, q in enumerate(input_ids):
            if len(q):
                ids[i, longest - len(q):], mask[i, longest - len(q):] = q, 1
    else:
        ids = np.asarray(input_ids, np.int32)
        if ids.ndim != 2:
            raise VipLlavaError(f"input_ids must be [N, seq] or a list of token lists, got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    n, t = ids.shape
    if mask.shape != ids.shape:
        raise VipLlavaError(f"attention_mask has shape {mask.shape}, input_ids has {ids.shape}")
    if (ids == model.config.image_token_index).any():
        raise VipLlavaError("the questions after a cached prefix hold image tokens: put the image in the prefix")
    if not isinstance(prefix, Cache) or prefix.batch not in (1, n):
        raise VipLlavaError(f"prefix must be a Cache of 1 or {n} rows (cache_prefix's), got "
                            f"{getattr(prefix, 'batch', type(prefix).__name__)}")
    if int(prefix.length) != prefix.capacity:
        raise VipLlavaError("prefix must be exactly full (cache_prefix's cache, before any other call)")
    if max_new_tokens < 1:
        raise VipLlavaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.config.text_config.max_position_embeddings
    longest = int(np.asarray(prefix.positions).max()) + int(mask.sum(-1).max())
    if longest + max_new_tokens > limit:
        raise VipLlavaError(f"prefix and question of {longest} tokens + max_new_tokens {max_new_tokens} "
                            f"exceed the model's context of {limit} tokens")
    pad = gen.bucket_length(t) - t  # questions share compiled programs by bucket
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    eos = model.config.text_config.eos_token_id if eos_token_id is None else eos_token_id
    sampling = SamplingParams.create(do_sample=do_sample, temperature=temperature, top_k=top_k,
                                     top_p=top_p, eos_token_id=eos, pad_id=pad_token_id)
    graphdef, params = nnx.split(model)
    state = _prefill_after(graphdef, params, prefix, jnp.asarray(ids), jnp.asarray(mask),
                           max_new_tokens, jax.random.key(seed), sampling)
    state = gen.decode_call(graphdef, params, state, sampling, np.int32(max_new_tokens))
    return np.asarray(state.tokens)

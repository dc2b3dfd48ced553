"""Token picking shared by every family's generate: sampling knobs as arrays, transformers'
logit warpers, and the greedy/sampled choice with EOS bookkeeping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SamplingParams:
    """Arrays, not Python numbers, so that changing them never recompiles."""

    do_sample: jax.Array  # bool []
    temperature: jax.Array  # f32 []
    top_k: jax.Array  # i32 [], 0 = off
    top_p: jax.Array  # f32 [], 1.0 = off
    eos_ids: jax.Array  # i32 [E] (-1 entries never match)
    pad_id: jax.Array  # i32 []

    @classmethod
    def create(cls, *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = 0,
               top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
               pad_id: int = 0) -> SamplingParams:
        """From Python values, as numpy scalars (unchecked; `generate` checks its arguments).
        The defaults pick greedily and never stop early (no EOS id)."""
        return cls(do_sample=np.bool_(do_sample), temperature=np.float32(temperature),
                   top_k=np.int32(top_k or 0), top_p=np.float32(top_p),
                   eos_ids=eos_array(eos_token_id), pad_id=np.int32(pad_id))



def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """transformers' warpers in their order: temperature, top-k, top-p (float32 logits)."""
    logits = logits / temperature
    v = logits.shape[-1]
    # top-k: drop everything below the k-th largest (k == 0: keep all)
    kth = jnp.sort(logits, axis=-1)[:, v - jnp.clip(top_k, 1, v)]  # [B]
    logits = jnp.where((top_k > 0) & (logits < kth[:, None]), -jnp.inf, logits)
    # top-p: drop the smallest tokens whose total probability is <= 1 - top_p (keep >= 1)
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop_sorted = (cum <= 1 - top_p).at[:, -1].set(False)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def pick_tokens(logits: jax.Array, rng: jax.Array, p: SamplingParams) -> jax.Array:
    def sample():
        filtered = filter_logits(logits, jnp.maximum(p.temperature, 1e-6), p.top_k, p.top_p)
        return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

    # A cond, not a select: greedy decoding skips the vocabulary sorts of the filters.
    return jax.lax.cond(p.do_sample, sample, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))



def pick(logits, rng, step, p: SamplingParams, done):
    """New token `step` from `logits [B, V]`: pad for rows already done; which rows now are."""
    token = pick_tokens(logits, jax.random.fold_in(rng, step), p)
    token = jnp.where(done, p.pad_id, token)  # [B]
    return token, done | jnp.any(token[:, None] == p.eos_ids[None, :], axis=-1)


def eos_array(eos_token_id) -> np.ndarray:
    """EOS ids (an int, a list or None) as int32 [E], padded with -1."""
    eos = [] if eos_token_id is None else eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    # A fixed length (padded with -1) keeps one compiled program for 1..8 EOS ids.
    width = max(8, len(eos))
    return np.array(eos + [-1] * (width - len(eos)), np.int32)

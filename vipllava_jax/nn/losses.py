"""Token losses shared by every family: summed NLL and counted tokens, so the train step can
take the mean once over a whole global batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # a label the loss does not count (transformers' convention)


def token_nll(logits: jax.Array, labels: jax.Array, *, shift: bool = True) -> tuple[jax.Array, jax.Array]:
    """Summed token negative log-likelihood and the number of tokens counted.

    With `shift` (decoder-only models, transformers' causal LM loss) position t predicts
    labels[t+1]; without (encoder-decoders, whose decoder input is the labels shifted right)
    position t predicts labels[t]. Labels equal to -100 are not counted. Float32.

    Args:
      logits: `[B, T, V]`, any float dtype.
      labels: int `[B, T]`.
    Returns:
      (sum of -log p over counted tokens, count), float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    targets = labels
    if shift:
        # The labels move left, not the logits: slicing [B, T, V] logits to T-1 positions
        # would copy them (and pad their gradient back), ~3% of a train step. The last
        # position predicts nothing.
        ignore = jnp.full_like(labels[:, :1], IGNORE_INDEX)
        targets = jnp.concatenate([labels[:, 1:], ignore], axis=1)  # [B, T]
    counted = targets != IGNORE_INDEX
    safe = jnp.where(counted, targets, 0)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # [B, T]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit  # [B, T]
    return jnp.sum(jnp.where(counted, nll, 0.0)), jnp.sum(counted).astype(jnp.float32)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """transformers' causal LM loss: predict labels[t+1] from position t, -100 ignored,
    mean over the counted tokens (computed in float32)."""
    nll_sum, count = token_nll(logits, labels)
    return nll_sum / count

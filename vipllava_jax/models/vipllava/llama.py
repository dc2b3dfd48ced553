"""The language model: a Llama (Vicuna) or Mistral decoder, named as in transformers.

`LlamaModel` maps input embeddings to final hidden states; the head lives on the VipLlava
model (tied to `embed_tokens` or not), as in transformers. `LlamaModel.extend` runs the same
layers against a preallocated static KV cache (prefill and decode for generation).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vipllava_jax.models.vipllava.config import TextConfig
from vipllava_jax.nn.layers import (
    DType,
    KeyLengths,
    KVCache,
    RMSNorm,
    activation,
    apply_rope,
    attention,
    attention_with_weights,
    cache_update,
    cached_attention,
    check_kernel,
    decoder_mask,
    linear,
    remat_layer,
    rope_cos_sin,
)
from vipllava_jax.nn.sharding import constrain

# The residual stream `[batch, seq, embed]` between layers: rows over the data axes, the
# hidden dimension whole (the `embed` rule shards parameters, not activations).
RESIDUAL = ("batch", "seq", None)


@struct.dataclass
class LlamaOutput:
    """What `LlamaModel` returns when asked for more than the last hidden state."""

    last_hidden_state: jax.Array  # [B, T, D], after the final norm
    hidden_states: tuple[jax.Array, ...] | None = None  # L+1 x [B, T, D]: embeddings, each layer
    attentions: tuple[jax.Array, ...] | None = None  # L x [B, N, T, S], post-softmax


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, h
        )
        kw = dict(bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, self.num_heads * h, ("embed", "heads"), **kw)
        self.k_proj = linear(d, self.num_kv_heads * h, ("embed", "kv_heads"), **kw)
        self.v_proj = linear(d, self.num_kv_heads * h, ("embed", "kv_heads"), **kw)
        self.o_proj = linear(self.num_heads * h, d, ("heads", "embed"), **kw)

    def __call__(self, x, cos, sin, mask, kv=None, index=None, *, output_attentions=False):
        """x `[B, T, D]`; with `kv` (cache `[B*K, S, H]` x 2), this chunk's keys and values
        are written at slot `index` and attention runs over the whole cache.

        Returns (output, kv), or with `output_attentions` (no cache, boolean mask) (output,
        kv, post-softmax weights `[B, N, T, S]`)."""
        b, t, _ = x.shape
        scale = self.head_dim**-0.5
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, N, H]
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if output_attentions:
            out, probs = attention_with_weights(q, k, v, mask=mask, scale=scale)  # [B, T, N, H]
            return self.o_proj(out.reshape(b, t, -1)), kv, probs
        if kv is None:
            out = attention(q, k, v, mask=mask, scale=scale)  # [B, T, N, H]
        else:
            kv = tuple(cache_update(c, new, index) for c, new in zip(kv, (k, v)))
            out = cached_attention(q, *kv, mask=mask, scale=scale)  # [B, T, N, H]
        return self.o_proj(out.reshape(b, t, -1)), kv


class LlamaMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)
        self.gate_proj = linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv=None, index=None, *, output_attentions=False):
        """(output, kv), and with `output_attentions` the attention weights third."""
        attn, kv, *probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index,
                                          output_attentions=output_attentions)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv, *probs


class LlamaModel(nnx.Module):
    """embed_tokens -> decoder layers -> norm."""

    def __init__(self, cfg: TextConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata={"out_sharding": ("vocab", "embed")}, rngs=rngs,
        )
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(
        self, inputs_embeds: jax.Array, attention_mask: jax.Array, position_ids: jax.Array, *,
        kernel: str | None = None, remat: Callable[..., bool] | None = None,
        output_hidden_states: bool = False, output_attentions: bool = False,
    ) -> jax.Array | LlamaOutput:
        """inputs_embeds `[B, T, D]`, attention_mask `[B, T]`, position_ids `[B, T]` -> `[B, T, D]`.

        With `output_hidden_states` or `output_attentions` (static flags; dense masks only),
        a `LlamaOutput` instead, holding what transformers' LlamaModel returns for them.

        kernel: the attention kernel (`ATTENTION_KERNELS`); None: dense masks, which any
          padding allows. A fused kernel needs right-padded rows (`KeyLengths`), as the
          training loaders make them.
        remat: a `jax.checkpoint` policy to rematerialise each layer with (`remat_layer`);
          None: every activation is kept.
        """
        b, t, _ = inputs_embeds.shape
        check_kernel(kernel)
        if output_hidden_states or output_attentions:
            return self._with_outputs(inputs_embeds, attention_mask, position_ids, kernel,
                                      output_hidden_states, output_attentions)
        if kernel is None:
            slots = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = decoder_mask(attention_mask, slots, slots, self.config.sliding_window)
        else:  # the same keys for a right-padded batch, as a fused kernel takes them
            mask = KeyLengths(jnp.sum(attention_mask, axis=-1, dtype=jnp.int32), causal=True,
                              sliding_window=self.config.sliding_window, implementation=kernel)
        cos, sin = self._rope(position_ids)
        x = inputs_embeds
        for layer in self.layers:
            x, _ = remat_layer(layer, remat)(x, cos, sin, mask)
            x = constrain(x, RESIDUAL)
        return self.norm(x)

    def _with_outputs(self, inputs_embeds, attention_mask, position_ids, kernel,
                      output_hidden_states, output_attentions) -> LlamaOutput:
        """`__call__` collecting every layer's input and/or attention weights (a separate
        trace, so that the default program is untouched)."""
        if kernel is not None:
            raise ValueError("output_hidden_states / output_attentions need dense attention "
                             f"(kernel=None), got kernel {kernel!r}")
        b, t, _ = inputs_embeds.shape
        slots = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = decoder_mask(attention_mask, slots, slots, self.config.sliding_window)
        cos, sin = self._rope(position_ids)
        x, states, weights = inputs_embeds, [inputs_embeds], []
        for layer in self.layers:
            x, _, *probs = layer(x, cos, sin, mask, output_attentions=output_attentions)
            x = constrain(x, RESIDUAL)
            states.append(x)
            weights += probs
        last = self.norm(x)
        # transformers' tuple: the embeddings, then each layer's output, the last one normed
        return LlamaOutput(
            last_hidden_state=last,
            hidden_states=tuple(states[:-1]) + (last,) if output_hidden_states else None,
            attentions=tuple(weights) if output_attentions else None,
        )

    def init_cache(self, batch: int, length: int) -> KVCache:
        cfg = self.config
        shape = (batch * cfg.num_key_value_heads, length, cfg.head_dim)
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in self.layers)

    def extend(
        self, inputs_embeds: jax.Array, position_ids: jax.Array, kv_mask: jax.Array,
        cache: KVCache, index: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Runs a chunk `[B, T, D]` that occupies cache slots `index .. index+T-1`.

        kv_mask `[B, S]` marks the slots holding real tokens once this chunk is written.
        Returns the chunk's final hidden states and the updated cache.
        """
        b, t, _ = inputs_embeds.shape
        s = cache[0][0].shape[1]
        q_slots = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        k_slots = jnp.broadcast_to(jnp.arange(s), (b, s))
        mask = decoder_mask(kv_mask, q_slots, k_slots, self.config.sliding_window)
        cos, sin = self._rope(position_ids)
        x, new_cache = inputs_embeds, []
        for layer, kv in zip(self.layers, cache, strict=True):
            x, kv = layer(x, cos, sin, mask, kv, index)
            x = constrain(x, RESIDUAL)
            new_cache.append(kv)
        return self.norm(x), tuple(new_cache)

    def _rope(self, position_ids):
        cfg = self.config
        return rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_factor)

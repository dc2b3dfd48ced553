"""The multi-layer projector (CLIP features of several layers -> the decoder's width) and the
merge of image features into the token embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.nn.layers import DType, LayerNorm, activation, linear


class VipLlavaMultiModalProjector(nnx.Module):
    """LayerNorm -> linear_1 -> GELU (exact) -> linear_2 over concatenated vision layers."""

    def __init__(self, cfg: VipLlavaConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        din = len(cfg.feature_layer_indices) * cfg.vision_config.hidden_size
        d = cfg.text_config.hidden_size
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projector_layernorm = LayerNorm(
            din, eps=cfg.projector_layernorm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.linear_1 = linear(din, d, ("vision_features", "embed"), **kw)
        self.act = activation(cfg.projector_hidden_act)
        self.linear_2 = linear(d, d, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(self.projector_layernorm(x))))


def merge_image_features(
    input_ids: jax.Array, inputs_embeds: jax.Array, image_features: jax.Array, image_token: int
) -> jax.Array:
    """Puts the k-th image feature at the k-th image-token position (row-major over the batch).

    Static shapes: a cumulative count turns each image-token position into its feature's index.
    `check_inputs` rejects a count mismatch on concrete inputs; under a caller's trace it
    cannot, so a mismatch there turns the embeddings into NaN (a NaN loss), never a silent fix.
    """
    b, t, d = inputs_embeds.shape
    is_image = input_ids == image_token  # [B, T]
    index = jnp.cumsum(is_image.reshape(-1)) - 1  # [B*T]
    features = image_features.reshape(-1, d).astype(inputs_embeds.dtype)  # [B_img*N, D]
    gathered = features[jnp.clip(index, 0, features.shape[0] - 1)].reshape(b, t, d)
    merged = jnp.where(is_image[..., None], gathered, inputs_embeds)
    counts_agree = jnp.sum(is_image) == features.shape[0]
    return jnp.where(counts_agree, merged, jnp.nan)

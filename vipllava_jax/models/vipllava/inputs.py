"""Checks of VipLlava's inputs on the host, before anything is traced or compiled."""

from __future__ import annotations

import jax
import numpy as np

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.models.vipllava.config import VipLlavaConfig


def check_inputs(config: VipLlavaConfig, input_ids, pixel_values, attention_mask, labels) -> None:
    """Clear errors for inconsistent inputs, before anything is traced or compiled.

    Checks that need values (the image-token count) run only on concrete arrays; under a
    trace they were the caller's job.
    """
    shape = np.shape(input_ids)
    if len(shape) != 2:
        raise VipLlavaError(f"input_ids must be [batch, seq], got shape {shape}")
    for name, x in (("attention_mask", attention_mask), ("labels", labels)):
        if x is not None and np.shape(x) != shape:
            raise VipLlavaError(f"{name} has shape {np.shape(x)}, input_ids has {shape}")
    vc = config.vision_config
    want = (vc.num_channels, vc.image_size, vc.image_size)
    if pixel_values is not None and (len(np.shape(pixel_values)) != 4 or np.shape(pixel_values)[1:] != want):
        raise VipLlavaError(
            f"pixel_values must be [num_images, {want[0]}, {want[1]}, {want[2]}], "
            f"got shape {np.shape(pixel_values)}"
        )
    if isinstance(input_ids, jax.core.Tracer):
        return
    check_token_ids(np.asarray(input_ids), config.text_config.vocab_size, "input_ids",
                    allowed=config.image_token_index)
    n_tokens = int(np.sum(np.asarray(input_ids) == config.image_token_index))
    n_images = 0 if pixel_values is None else np.shape(pixel_values)[0]
    n_features = n_images * config.num_image_tokens
    if n_tokens != n_features:
        raise VipLlavaError(
            f"image tokens and image features do not match: input_ids hold {n_tokens} image "
            f"tokens (id {config.image_token_index}) but {n_images} image(s) give {n_features} "
            f"features ({config.num_image_tokens} per image)"
        )


def check_token_ids(ids: np.ndarray, vocab_size: int, name: str, allowed: int | None = None) -> None:
    """Token ids must index the vocabulary (an embedding lookup would give NaN or wrap):
    `0 <= id < vocab_size`, or `allowed` (the image placeholder, replaced before the lookup)."""
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if allowed is not None:
        bad &= ids != allowed
    if bad.any():
        first = ids[bad].flat[0]
        raise VipLlavaError(
            f"{name} holds token id {int(first)} ({int(bad.sum())} out of range): ids must be in "
            f"[0, {vocab_size}) for this model's vocabulary")


def check_feature_layers(config: VipLlavaConfig, layers) -> tuple[int, ...] | None:
    """A per-call `vision_feature_layer`, as a tuple (None: the config's)."""
    if layers is None:
        return None
    layers = (layers,) if isinstance(layers, (int, np.integer)) else tuple(int(i) for i in layers)
    want = len(config.feature_layer_indices)
    n = config.vision_config.num_hidden_layers
    if len(layers) != want or not all(-(n + 1) <= i <= n for i in layers):
        raise VipLlavaError(f"vision_feature_layer must be {want} index(es) in [-{n + 1}, {n}] "
                            f"(the projector takes {want} layers), got {layers}")
    return layers

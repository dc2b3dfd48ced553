"""Where the model looks: the answer tokens' attention over an image's patch grid, drawn on
the image the model saw (for notebooks; drawing needs the `notebook` extra's matplotlib).

    grid = answer_attention(model, prompt_ids, pixel_values, answer_ids)   # [side, side]
    overlay(model_view(pixel_values[0]), grid)                              # a matplotlib Axes

The weights are the decoder's post-softmax attention (`output_attentions`), from the answer
tokens' queries to the image tokens' keys, averaged over the chosen layers, heads and answer
tokens. Patches are row-major, as CLIP orders them and the image tokens follow them.
"""

from __future__ import annotations

import numpy as np

from vipllava_jax.errors import VipLlavaError

# CLIP's normalisation (the VipLlava processor's image_mean / image_std)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_attention(attentions, input_ids, image_token: int, queries, *, row: int = 0, image: int = 0,
                    layers=None, heads=None) -> np.ndarray:
    """The attention of `queries` (positions in row `row`) on the `image`-th image of that row,
    as a `[side, side]` grid of patches summing to the share of attention the image got.

    attentions: the forward's `attentions` (per layer `[B, N, T, T]`); layers / heads: indices
    to average over (default all)."""
    ids = np.asarray(input_ids)[row]
    where = np.flatnonzero(ids == image_token)
    if where.size == 0:
        raise VipLlavaError(f"row {row} holds no image token ({image_token})")
    starts = np.flatnonzero(np.diff(np.concatenate([[-2], where])) != 1)  # first token of each image
    if image >= len(starts):
        raise VipLlavaError(f"row {row} holds {len(starts)} image(s), asked for image {image}")
    n = len(where) // len(starts)
    side = int(round(n**0.5))
    if side * side != n:
        raise VipLlavaError(f"{n} image tokens per image do not form a square patch grid")
    cols = where[starts[image]: starts[image] + n]
    layers = range(len(attentions)) if layers is None else layers
    weights = np.stack([np.asarray(attentions[i][row], np.float32) for i in layers])  # [L, N, T, T]
    if heads is not None:
        weights = weights[:, list(heads)]
    picked = weights[:, :, np.asarray(queries)][..., cols]  # [L, N, Q, n]
    return picked.mean(axis=(0, 1, 2)).reshape(side, side)


def answer_attention(model, prompt_ids, pixel_values, answer_ids, **kw) -> np.ndarray:
    """`image_attention` of the answer tokens (`answer_ids`, one row, e.g. `generate`'s new
    tokens) after the prompt (one row): one forward over prompt + answer with
    `output_attentions` (causal, so each answer token sees what it saw while generated)."""
    prompt = np.asarray(prompt_ids).reshape(1, -1)
    answer = np.asarray(answer_ids).reshape(1, -1)
    if answer.shape[1] == 0:
        raise VipLlavaError("answer_ids is empty: nothing attends the image")
    ids = np.concatenate([prompt, answer], axis=1)
    out = model(ids, pixel_values, output_attentions=True)
    queries = np.arange(prompt.shape[1] - 1, ids.shape[1] - 1)  # the positions that predicted the answer
    return image_attention(out.attentions, ids, model.config.image_token_index, queries, **kw)


def model_view(pixel_values, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """One image `[3, H, W]` of the processor's `pixel_values` back to uint8 `[H, W, 3]`: the
    resized, cropped and marked image exactly as the model saw it."""
    x = np.asarray(pixel_values, np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise VipLlavaError(f"pixel_values must be one image [3, H, W], got shape {x.shape}")
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return (np.clip(x.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)


def overlay(image, grid, *, ax=None, alpha: float = 0.5, cmap: str = "jet", title: str | None = None):
    """Draws `image` (`[H, W, 3]` array or PIL image) with `grid` (`[side, side]` weights)
    stretched over it as a heat map; returns the matplotlib Axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise VipLlavaError("overlay needs matplotlib: pip install 'vipllava-jax[notebook]'") from e
    image = np.asarray(image)
    grid = np.asarray(grid, np.float32)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    h, w = image.shape[:2]
    ax.imshow(image)
    scaled = grid / grid.max() if grid.max() > 0 else grid
    ax.imshow(scaled, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax

"""Markers as the embedded tiny model saw them in training: drawn on a small canvas, then
enlarged, so that a 48 px image gets lines a tiny ViT can see."""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image

from vipllava_jax.processing.images import load_image
from vipllava_jax.processing.visual_prompts import VisualPrompt, render_layer

# Markers are drawn as on an image MARKER_CANVAS pixels wide, then enlarged to the image: at
# the renderer's own scale (sizes proportional to the image side / 336) a 48 px image gets
# 1 px lines, which a tiny ViT trained from scratch on a CPU budget does not learn to see.
# 24 px gives 2 px lines on the task's 48 px scenes: seen with 16 px patches, and hiding less
# of the object than thicker ones (the experiments: docs/performance.md, "The embedded tiny model").
MARKER_CANVAS = 24


def draw_marker(image, vp: VisualPrompt, canvas: int = MARKER_CANVAS) -> PIL.Image.Image:
    """Draws `vp` onto `image` (PIL or array) with the marker sized for a MARKER_CANVAS-wide
    image (twice the renderer's line widths on the task's 48 px scenes): the marker layer is
    rendered small and enlarged (nearest) before it is alpha-composited, as the task's images
    are. Returns an RGB PIL image."""
    image = load_image(image)
    w, h = image.size
    f = min(1.0, canvas / min(w, h))  # never draw on a canvas larger than the image
    sw, sh = max(round(w * f), 1), max(round(h * f), 1)
    small = dataclasses.replace(
        vp,
        box=None if vp.box is None else tuple(v * f for v in vp.box),
        point=None if vp.point is None else tuple(v * f for v in vp.point),
        mask=None if vp.mask is None else _shrink_mask(vp.mask, (sw, sh)),
    )
    layer = render_layer((sw, sh), small).resize((w, h), PIL.Image.Resampling.NEAREST)
    return PIL.Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W] bool -> [size[1], size[0]]: a pixel is set when any pixel it covers was."""
    im = PIL.Image.fromarray(np.asarray(mask, np.uint8) * 255)
    return np.asarray(im.resize(size, PIL.Image.Resampling.BOX)) > 0

"""Visual prompts: markers drawn onto the image the way ViP-LLaVA's training data has them.

ViP-LLaVA does not encode regions; it sees them. Its data generator
(`llava/visual_prompt_generator.py` in the original repository) draws one of eight markers on a
transparent RGBA layer and alpha-composites the layer onto the image. This module reproduces
that with PIL + numpy, so a user can pass an image, a region and a marker type:

    vp = VisualPrompt(marker="rectangle", box=(40, 30, 120, 90), color="red")
    marked = draw_visual_prompt(image, vp)  # then ask "What is inside the red rectangle?"

Sizes scale with `s = max(image side) / 336` (the original's anchor). Two styles:

| marker       | `style="random"` (training data ranges)        | `style="constant"` (evaluation) |
|--------------|------------------------------------------------|---------------------------------|
| alpha        | 96-255 (filled mask 48-128)                    | 128                             |
| rectangle    | width 2-8 s                                    | width 3 s (the original's)      |
| ellipse      | width 2-8 s, 1-1.5 x the region's box          | width 3 s, sqrt(2) x the box (through its corners) |
| triangle     | width 2-8 s, 3 random vertices in the region, no angle > 150 deg, rounded joints | width 3 s, apex top-centre, base on the bottom corners |
| point        | filled ellipse radius 5-20 s, aspect 1 or 0.5-2, centre sampled near the region's centre | radius 8 s, aspect 1, at the centre |
| scribble     | width 2-12 s, cubic Bezier through 4 random region points | width 5 s, a fixed S-stroke |
| mask_contour | width 1-2 s around the mask's outline          | width 1 s                       |
| mask         | the mask filled                                | the mask filled                 |
| arrow        | width 1-6 s, length 0.8 x the region's short side to 50 s, random angle, tip jittered +-25% around the centre, head max(0.2-0.5 x length, 6 s), sometimes wobbly or with an open head | width 3 s, length 50 s, head 0.35 x length, from the upper right (or the first diagonal that stays in the image), filled head at the centre |

In both styles the arrow's head wings open +-60 degrees from the shaft and the shaft is the
length minus the head, as the original's. The original's evaluation ('constant') style fixes
only the alpha (128), the rectangle / ellipse / triangle width (3 s) and the point radius (8 s);
the rest of the constant column (the ellipse through the box's corners, the fixed triangle,
scribble and arrow, the point at the exact centre) is this project's own, so that an
evaluation prompt draws the same pixels every time.
`VisualPrompt(alpha=..., width=...)` overrides either style's alpha and outline width.

A region may be COCO polygons too (`VisualPrompt(polygons=[[x, y, x, y, ...], ...])`, several
for a region in parts): the mask, contour, scribble, triangle and point markers follow their
union, the rectangle, ellipse and arrow their bounding box (or `box`, when given). The original
samples the point, triangle and scribble in one of the polygons, chosen at random.

In both styles, positions that must lie inside a mask (not a box) are sampled with
`np.random.default_rng(seed)`, so a given prompt always draws the same pixels. The arrow's tip
is on the region (it points at it), and its tail is placed inside the image when some angle
allows it.

`VisualPrompt` and its validation live in `marker_spec`, the renderers in `markers`; this module
is the public one and re-exports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

from vipllava_jax.processing.images import load_image
from vipllava_jax.processing.marker_spec import (
    ANCHOR,
    COLORS,
    CONSTANT_ALPHA,
    MARKERS,
    STYLES,
    Box,
    Color,
    VisualPrompt,
    VisualPromptError,
)
from vipllava_jax.processing.markers import render_layer

__all__ = [
    "ANCHOR", "COLORS", "CONSTANT_ALPHA", "MARKERS", "STYLES", "Box", "Color", "VisualPrompt",
    "VisualPromptError", "crop_cuts_marker", "draw_visual_prompt", "draw_visual_prompts", "render_layer",
]


def draw_visual_prompt(image: Any, vp: VisualPrompt) -> PIL.Image.Image:
    """Draws one marker onto a copy of `image`.

    Args:
        image: a PIL image, an HxWx3 uint8 array (or a path).
        vp: the marker and its region.

    Returns:
        The marked RGB PIL image; `image` itself is not modified.

    Raises:
        VisualPromptError: the region lies outside the image or the mask's shape is not the
            image's.
    """
    return draw_visual_prompts(image, [vp])


def draw_visual_prompts(image: Any, vps: Sequence[VisualPrompt]) -> PIL.Image.Image:
    """Draws several markers, each on its own layer composited in order (later ones on top)."""

    out = load_image(image).convert("RGBA")
    for vp in vps:
        if not isinstance(vp, VisualPrompt):
            raise VisualPromptError(f"expected a VisualPrompt, got {type(vp).__name__}")
        out = PIL.Image.alpha_composite(out, render_layer(out.size, vp))
    return out.convert("RGB")


def crop_cuts_marker(
    image_size: tuple[int, int],
    vp: VisualPrompt,
    *,
    size: int | tuple[int, int] = ANCHOR,
    crop_size: tuple[int, int] | None = None,
) -> bool:
    """Whether resizing + center cropping (transformers' CLIP preprocessing) cuts off part of
    the marker `vp` draws on an image of `image_size = (width, height)`.

    Args:
        image_size: `(width, height)` of the image the marker is drawn on.
        vp: the marker.
        size: an int resizes the shortest edge to it (the long edge rounded down); a
            `(height, width)` pair resizes to exactly that.
        crop_size: `(height, width)` of the center crop; `(size, size)` by default.

    Returns:
        True if some pixel the marker changes falls outside the crop.
    """
    w, h = image_size
    if isinstance(size, int):
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        rh, rw = (new_long, size) if w <= h else (size, new_long)
    else:
        rh, rw = size
    if crop_size is None:
        crop_size = (size, size) if isinstance(size, int) else (rh, rw)
    ch, cw = crop_size
    alpha = np.asarray(render_layer((w, h), vp))[..., 3] > 0  # [H, W]
    rows = _kept(h, rh, ch)
    cols = _kept(w, rw, cw)
    return bool(alpha[~rows].any() or alpha[:, ~cols].any())


def _kept(n: int, resized: int, crop: int) -> np.ndarray:
    """Which of `n` original pixels along one axis survive resizing to `resized` and
    center-cropping to `crop` (a pixel survives when its centre lands inside the crop)."""
    top = (resized - crop) // 2  # negative: the crop pads instead of cutting
    centre = (np.arange(n) + 0.5) * resized / n
    return (centre >= top) & (centre < top + crop)

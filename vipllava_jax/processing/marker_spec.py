"""What a visual prompt is: the `VisualPrompt` value (marker, region, colour, style, seed), its
validation, and the marker names and colours it accepts. Drawing it: `visual_prompts`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Union

import numpy as np

from vipllava_jax.errors import VipLlavaError

MARKERS: tuple[str, ...] = (
    "rectangle", "ellipse", "triangle", "point", "scribble", "mask_contour", "mask", "arrow",
)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "lime": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "fuchsia": (255, 0, 255),
    "aqua": (0, 255, 255),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "gold": (255, 215, 0),
}

STYLES = ("constant", "random")
ANCHOR = 336  # the image side the original's pixel sizes refer to
CONSTANT_ALPHA = 128

Box = tuple[float, float, float, float]
Color = Union[str, tuple[int, int, int]]


class VisualPromptError(VipLlavaError):
    """A visual prompt that cannot be drawn: bad marker, colour, style or region."""


@dataclasses.dataclass(frozen=True)
class VisualPrompt:
    """One marker to draw on an image.

    Attributes:
        marker: one of `MARKERS` ("mask contour" and "mask-contour" are accepted too).
        box: `(x0, y0, x1, y1)` in pixels, x0 < x1 and y0 < y1, inside the image. Serves every
            marker: the mask markers use it as a rectangular mask, point samples inside it.
        point: `(x, y)` in pixels. The point marker is centred on it and the arrow's tip is on
            it; other markers use a small box around it (when no box or mask is given).
        mask: a boolean [H, W] array of the image's size (non-zero counts as True). Box markers
            use its bounding box.
        polygons: the region as COCO polygons: one flat `[x0, y0, x1, y1, ...]` list (3 points
            or more) or a list of them (a region in several parts), in pixels. The mask,
            contour, scribble, triangle and point markers follow their union, the others its
            bounding box (or `box`, when given). Not together with `mask`.
        color: a name from `COLORS` or an `(r, g, b)` tuple of ints 0-255.
        style: "constant" (evaluation values) or "random" (training ranges); see `visual_prompts`.
        seed: seeds `np.random.default_rng` for everything random.
        alpha: the marker's opacity 0-255, instead of the style's (constant 128, random 96-255).
        width: the line width in pixels of the outline markers (rectangle, ellipse, triangle,
            scribble, mask contour, arrow), instead of the style's; the point and mask markers
            are filled and do not use it. Overrides draw the same shapes as without them: the
            random style still draws the values it replaces.
    """

    marker: str
    box: Box | None = None
    point: tuple[float, float] | None = None
    mask: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    polygons: tuple[tuple[float, ...], ...] | None = None
    color: Color = "red"
    style: str = "constant"
    seed: int = 0
    alpha: int | None = None
    width: int | None = None

    def __post_init__(self):
        marker = str(self.marker).strip().lower().replace(" ", "_").replace("-", "_")
        if marker not in MARKERS:
            raise VisualPromptError(f"unknown marker {self.marker!r} (known: {', '.join(MARKERS)})")
        object.__setattr__(self, "marker", marker)
        if self.style not in STYLES:
            raise VisualPromptError(f"style must be 'constant' or 'random', got {self.style!r}")
        object.__setattr__(self, "color", _parse_color(self.color))
        if self.box is None and self.point is None and self.mask is None and self.polygons is None:
            raise VisualPromptError(
                f"the {marker} marker needs a region: pass box, point, mask or polygons")
        if self.alpha is not None and not _is_int(self.alpha, 0, 255):
            raise VisualPromptError(f"alpha must be an integer 0-255, got {self.alpha!r}")
        if self.width is not None and not _is_int(self.width, 1, 10_000):
            raise VisualPromptError(f"width must be a whole number of pixels >= 1, got {self.width!r}")
        if self.polygons is not None:
            if self.mask is not None:
                raise VisualPromptError("pass mask or polygons, not both")
            object.__setattr__(self, "polygons", parse_polygons(self.polygons))
        if self.box is not None:
            box = _numbers(self.box, 4, "box")
            if not (box[0] < box[2] and box[1] < box[3]):
                raise VisualPromptError(f"box {self.box} is empty: it needs x0 < x1 and y0 < y1")
            object.__setattr__(self, "box", box)
        if self.point is not None:
            object.__setattr__(self, "point", _numbers(self.point, 2, "point"))
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2:
                raise VisualPromptError(f"mask must be a 2-D [H, W] array, got shape {mask.shape}")
            if not mask.any():
                raise VisualPromptError("mask is empty: no pixel is set")
            object.__setattr__(self, "mask", mask.astype(bool))

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The marker colour as an `(r, g, b)` tuple."""
        return COLORS[self.color] if isinstance(self.color, str) else self.color


def parse_polygons(polygons: Any) -> tuple[tuple[float, ...], ...]:
    """COCO polygons (one flat `[x, y, x, y, ...]` list or a list of them) -> a tuple of
    tuples of floats.

    Raises:
        VisualPromptError: not numbers, an odd count, fewer than 3 points or a non-finite value.
    """
    if isinstance(polygons, (list, tuple)) and polygons and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygons
    ):
        polygons = [polygons]
    if not isinstance(polygons, (list, tuple)) or not polygons:
        raise VisualPromptError(f"polygons must be a list of flat [x, y, x, y, ...] lists, got {polygons!r}")
    out = []
    for polygon in polygons:
        if not isinstance(polygon, (list, tuple)) or len(polygon) % 2 or len(polygon) < 6:
            raise VisualPromptError(
                f"a polygon must be a flat [x, y, x, y, ...] list of 3 points or more, got {polygon!r}")
        out.append(_numbers(polygon, len(polygon), "a polygon"))
    return tuple(out)


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) and lo <= value <= hi


def _parse_color(color: Any) -> Color:
    if isinstance(color, str):
        name = color.strip().lower()
        if name not in COLORS:
            raise VisualPromptError(
                f"unknown colour {color!r} (known: {', '.join(COLORS)}, or an (r, g, b) tuple)"
            )
        return name
    try:
        rgb = tuple(int(c) for c in color)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) or any(
        isinstance(c, float) and not float(c).is_integer() for c in color
    ):
        raise VisualPromptError(f"colour must be a name or an (r, g, b) tuple of 0-255 ints, got {color!r}")
    return rgb


def _numbers(values: Any, n: int, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise VisualPromptError(f"{name} must be {n} numbers, got {values!r}") from None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise VisualPromptError(f"{name} must be {n} finite numbers, got {values!r}")
    return out

"""The marker renderers: each of the eight markers drawn on a transparent RGBA layer, sized and
placed as the table in `visual_prompts` says."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import PIL.Image
import PIL.ImageDraw

from vipllava_jax.processing.marker_spec import (
    ANCHOR,
    CONSTANT_ALPHA,
    Box,
    VisualPrompt,
    VisualPromptError,
)


def render_layer(image_size: tuple[int, int], vp: VisualPrompt) -> PIL.Image.Image:
    """The transparent RGBA layer holding `vp`'s marker for an image of `(width, height)`."""
    w, h = image_size
    region = _Region.resolve(vp, w, h)
    rng = np.random.default_rng(vp.seed)
    rand = vp.style == "random"
    s = max(w, h) / ANCHOR

    def width(lo: float, hi: float, constant: float) -> int:
        if rand:
            drawn = max(int(rng.integers(int(lo * s), int(hi * s) + 1)), 1)  # drawn even when overridden
        else:
            drawn = max(int(constant * s), 1)
        return vp.width if vp.width is not None else drawn

    if rand:
        alpha = int(rng.integers(48, 129) if vp.marker == "mask" else rng.integers(96, 256))
    else:
        alpha = CONSTANT_ALPHA
    if vp.alpha is not None:
        alpha = vp.alpha
    fill = (*vp.rgb, alpha)
    layer = PIL.Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = PIL.ImageDraw.Draw(layer)
    x0, y0, x1, y1 = region.box
    bw, bh = x1 - x0, y1 - y0

    if vp.marker == "rectangle":
        draw.rectangle([(x0, y0), (x1, y1)], outline=fill, width=width(2, 8, 3))
    elif vp.marker == "ellipse":
        lw = width(2, 8, 3)
        ratio = rng.uniform(1.0, 1.5) if rand else math.sqrt(2)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rx, ry = bw * ratio / 2, bh * ratio / 2
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=fill, width=lw)
    elif vp.marker == "triangle":
        lw = width(2, 8, 3)
        pts = _random_triangle(region, rng) if rand else region.fixed_triangle()
        draw.line([*pts, pts[0]], fill=fill, width=lw, joint="curve")
    elif vp.marker == "point":
        if rand:
            radius = max(int(rng.integers(int(5 * s), int(20 * s) + 1)), 1)
            aspect = 1.0 if rng.random() < 0.5 else rng.uniform(0.5, 2.0)
        else:
            radius, aspect = max(int(8 * s), 1), 1.0  # the original's evaluation radius
        cx, cy = region.point_centre(rng, rand)
        rx, ry = radius * aspect, radius / aspect
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=fill, fill=fill)
    elif vp.marker == "scribble":
        lw = width(2, 12, 5)
        if rand or region.mask_given:
            ctrl = [region.sample(rng) for _ in range(4)]
        else:
            ctrl = [(x0 + fx * bw, y0 + fy * bh)
                    for fx, fy in ((0.2, 0.3), (0.9, 0.1), (0.1, 0.9), (0.8, 0.7))]
        draw.line(_bezier(ctrl, max(int(200 * s), 20)), fill=fill, width=lw, joint="curve")
    elif vp.marker == "mask_contour":
        lw = width(1, 2, 1)
        _paint(layer, _dilate(_outline(region.mask), lw), fill)
    elif vp.marker == "mask":
        _paint(layer, region.mask, fill)
    elif vp.marker == "arrow":
        _draw_arrow(draw, region, fill, rng, rand, s, w, h, vp.width)
    return layer


def polygon_mask(polygons, w: int, h: int) -> np.ndarray:
    """[H, W] bool: the union of COCO polygons (flat `[x, y, ...]` tuples) filled by PIL.

    Raises:
        VisualPromptError: a vertex lies outside the image (1 px of slack) or no pixel is
            covered.
    """
    canvas = PIL.Image.new("1", (w, h), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    for polygon in polygons:
        xs, ys = polygon[0::2], polygon[1::2]
        if min(xs) < -1 or min(ys) < -1 or max(xs) > w + 1 or max(ys) > h + 1:
            raise VisualPromptError(f"a polygon reaches outside the {w}x{h} image: {list(polygon)}")
        draw.polygon(list(zip(xs, ys)), fill=1, outline=1)
    mask = np.array(canvas, bool)
    if not mask.any():
        raise VisualPromptError(f"the polygons cover no pixel of the {w}x{h} image")
    return mask


@dataclasses.dataclass
class _Region:
    """A prompt's region resolved against one image: a box, a mask and, maybe, a point."""

    box: Box
    mask_given: bool
    point: tuple[float, float] | None
    _mask: np.ndarray | None
    size: tuple[int, int]

    @classmethod
    def resolve(cls, vp: VisualPrompt, w: int, h: int) -> _Region:
        if vp.mask is not None and vp.mask.shape != (h, w):
            raise VisualPromptError(
                f"mask shape {vp.mask.shape} is not the image's (height, width) ({h}, {w})"
            )
        if vp.box is not None:
            x0, y0, x1, y1 = vp.box
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise VisualPromptError(
                    f"box {vp.box} is not inside the {w}x{h} image (0 <= x0 < x1 <= {w}, "
                    f"0 <= y0 < y1 <= {h})"
                )
        if vp.point is not None:
            px, py = vp.point
            if not (0 <= px < w and 0 <= py < h):
                raise VisualPromptError(f"point {vp.point} is not inside the {w}x{h} image")
        mask = vp.mask if vp.polygons is None else polygon_mask(vp.polygons, w, h)
        if vp.box is not None:
            box = vp.box
        elif mask is not None:
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        else:  # a point alone: a small box around it for the box markers
            half = max(16 * max(w, h) / ANCHOR, 2)
            px, py = vp.point
            box = (max(px - half, 0.0), max(py - half, 0.0), min(px + half, w), min(py + half, h))
        return cls(box, mask is not None, vp.point, mask, (w, h))

    @property
    def mask(self) -> np.ndarray:
        """[H, W] bool: the given mask, or the box's pixels."""
        if self._mask is None:
            w, h = self.size
            x0, y0, x1, y1 = self.box
            m = np.zeros((h, w), bool)
            r0, c0 = min(int(round(y0)), h - 1), min(int(round(x0)), w - 1)
            m[r0 : max(int(round(y1)), r0 + 1), c0 : max(int(round(x1)), c0 + 1)] = True
            self._mask = m
        return self._mask

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def contains(self, x: float, y: float) -> bool:
        if not self.mask_given:
            x0, y0, x1, y1 = self.box
            return x0 <= x <= x1 and y0 <= y <= y1
        w, h = self.size
        return 0 <= x < w and 0 <= y < h and bool(self.mask[int(y), int(x)])

    def sample(self, rng: np.random.Generator) -> tuple[float, float]:
        """A uniformly random point inside the region."""
        if not self.mask_given:
            x0, y0, x1, y1 = self.box
            return float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
        ys, xs = np.nonzero(self.mask)
        i = int(rng.integers(len(xs)))
        return float(xs[i] + rng.uniform(0.0, 1.0)), float(ys[i] + rng.uniform(0.0, 1.0))

    def nearest_inside(self, x: float, y: float) -> tuple[float, float]:
        """`(x, y)` if it is inside the region, else the centre of the nearest mask pixel."""
        if self.contains(x, y):
            return x, y
        ys, xs = np.nonzero(self.mask)
        i = int(np.argmin((xs + 0.5 - x) ** 2 + (ys + 0.5 - y) ** 2))
        return float(xs[i] + 0.5), float(ys[i] + 0.5)

    def point_centre(self, rng: np.random.Generator, rand: bool) -> tuple[float, float]:
        """Where the point marker goes: the given point, else (like the original) a normal
        sample around the box centre with variance (w/8, h/8) that lands in the region."""
        if self.point is not None:
            return self.point
        cx, cy = self.centre
        if rand:
            x0, y0, x1, y1 = self.box
            sx, sy = math.sqrt((x1 - x0) / 8), math.sqrt((y1 - y0) / 8)
            for _ in range(10):
                x, y = float(rng.normal(cx, sx)), float(rng.normal(cy, sy))
                if self.contains(x, y):
                    return x, y
        return self.nearest_inside(cx, cy)

    def fixed_triangle(self) -> list[tuple[float, float]]:
        x0, y0, x1, y1 = self.box
        pts = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
        return [self.nearest_inside(x, y) for x, y in pts] if self.mask_given else pts


def _random_triangle(region: _Region, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Three points in the region whose largest angle is under 150 degrees (the original's
    rule); after 100 failed tries, the constant style's triangle."""
    for _ in range(100):
        pts = [region.sample(rng) for _ in range(3)]
        if _max_angle(pts) < 150:
            return pts
    return region.fixed_triangle()


def _max_angle(pts: list[tuple[float, float]]) -> float:
    p = np.asarray(pts, np.float64)  # [3, 2]
    worst = 0.0
    for i in range(3):
        a, b = p[(i + 1) % 3] - p[i], p[(i + 2) % 3] - p[i]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na < 1e-9 or nb < 1e-9:
            return 180.0
        worst = max(worst, math.degrees(math.acos(np.clip(a @ b / (na * nb), -1.0, 1.0))))
    return worst


def _bezier(ctrl: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    """`n` points along the cubic Bezier curve with control points `ctrl`."""
    p = np.asarray(ctrl, np.float64)  # [4, 2]
    t = np.linspace(0.0, 1.0, n)[:, None]  # [n, 1]
    pts = ((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2]
           + t**3 * p[3])  # [n, 2]
    return [tuple(q) for q in pts.tolist()]


def _draw_arrow(draw, region, fill, rng, rand, s, w, h, line_width: int | None = None) -> None:
    """An arrow whose tip is on the region: the head sits at the tip, the shaft runs away from
    the region to the tail (the original draws it the same way)."""
    x0, y0, x1, y1 = region.box
    max_len = max(50 * s, 1.0)
    if rand:
        lw = max(int(rng.integers(int(1 * s), int(6 * s) + 1)), 1)
        lo = min(max(0.8 * min(x1 - x0, y1 - y0), 12 * s), max_len)
        length = float(rng.uniform(lo, max_len))
        head = max(float(rng.uniform(0.2, 0.5)) * length, 6 * s)
        if region.point is not None:
            tip = region.point
        else:
            cx, cy = region.centre
            tip = region.nearest_inside(cx + rng.uniform(-0.25, 0.25) * (x1 - x0),
                                        cy + rng.uniform(-0.25, 0.25) * (y1 - y0))
        angles = list(rng.uniform(0, 2 * math.pi, 16))
    else:
        lw, length = max(int(3 * s), 1), max_len
        head = max(0.35 * length, 6 * s)
        tip = region.point if region.point is not None else region.nearest_inside(*region.centre)
        angles = [-math.pi / 4, -3 * math.pi / 4, math.pi / 4, 3 * math.pi / 4]
    head = min(head, 0.6 * length)
    lw = line_width if line_width is not None else lw
    tx, ty = tip

    def tail(a):
        return tx + length * math.cos(a), ty + length * math.sin(a)

    angle = next((a for a in angles if 0 <= tail(a)[0] < w and 0 <= tail(a)[1] < h), angles[0])
    # the shaft stops where the head's length ends, as the original's (length - head)
    shaft_end = tx + (length - head) * math.cos(angle), ty + (length - head) * math.sin(angle)
    if rand and rng.random() < 0.5:  # a wobble, as a hand would draw it
        mx = (tx + shaft_end[0]) / 2 + rng.uniform(-5, 5) * s
        my = (ty + shaft_end[1]) / 2 + rng.uniform(-5, 5) * s
        draw.line([(tx, ty), (mx, my), shaft_end], fill=fill, width=lw, joint="curve")
    else:
        draw.line([(tx, ty), shaft_end], fill=fill, width=lw)
    wings = [(tx + head * math.cos(angle + d), ty + head * math.sin(angle + d))
             for d in (math.pi / 3, -math.pi / 3)]  # the original's +-60 degree wings
    if rand and rng.random() < 0.5:
        draw.line([wings[0], (tx, ty), wings[1]], fill=fill, width=lw, joint="curve")
    else:
        draw.polygon([wings[0], (tx, ty), wings[1]], fill=fill)


def _outline(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool: mask pixels with a 4-neighbour outside the mask (or the image)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilation by a (2r+1) square, as the original's outline shifted by -r..r in x and y."""
    out = mask
    for axis in (0, 1):
        p = np.pad(out, [(r, r) if a == axis else (0, 0) for a in (0, 1)])
        n = out.shape[axis]
        out = np.zeros_like(out)
        for d in range(2 * r + 1):
            out |= p[d : d + n] if axis == 0 else p[:, d : d + n]
    return out


def _paint(layer: PIL.Image.Image, where: np.ndarray, fill: tuple[int, int, int, int]) -> None:
    """Sets the layer's pixels under `where` to `fill` (in place)."""
    a = np.array(layer)  # [H, W, 4]
    a[where] = fill
    layer.paste(PIL.Image.fromarray(a, "RGBA"))

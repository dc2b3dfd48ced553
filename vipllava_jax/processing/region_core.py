"""The pieces every region-record dataset shares: the rules per dataset, the regions drawn
(where, which marker, which colour, the phrase naming it), parsing boxes and COCO polygons,
and sampling a marker and colour per region."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.marker_spec import (
    COLORS,
    MARKERS,
    VisualPrompt,
    VisualPromptError,
    parse_polygons,
)
from vipllava_jax.processing.visual_prompts import draw_visual_prompts

# The original's `words_shape`: the words before and after "the {colour}".
SHAPE_WORDS: dict[str, tuple[str, str]] = {
    "rectangle": ("within", "rectangle"),
    "ellipse": ("within", "ellipse"),
    "triangle": ("with", "triangle"),
    "point": ("at", "point"),
    "scribble": ("with", "scribble"),
    "mask_contour": ("with", "mask contour"),
    "mask": ("with", "mask"),
    "arrow": ("pointed to by", "arrow"),
}
PLACEHOLDER = re.compile(r"<bbox(\d*)>")
MULTIPLE_CHOICE_TAIL = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class DatasetRule:
    """How one dataset's regions are drawn: the shapes sampled from and the marker style."""

    shapes: tuple[str, ...]
    style: str = "random"
    keep_polygons: bool = True


DATASETS: dict[str, DatasetRule] = {
    "refcocog": DatasetRule(MARKERS),
    "vcr": DatasetRule(tuple(m for m in MARKERS if m != "point")),
    "vg_rel": DatasetRule(("rectangle", "ellipse"), keep_polygons=False),
    "flickr30k": DatasetRule(("rectangle", "ellipse", "arrow"), keep_polygons=False),
    "v7w": DatasetRule(("rectangle",), "constant", keep_polygons=False),
    "pointQA_twice": DatasetRule(("rectangle",), "constant", keep_polygons=False),
}
DEFAULT_DATASET = "refcocog"


class RegionError(VipLlavaError):
    """A region record that cannot be drawn: a box outside the image, a malformed polygon, a
    placeholder without its region, or the fields a dataset's question needs missing."""


@dataclasses.dataclass(frozen=True)
class Region:
    """One drawn region: where, how, and the phrase that names it."""

    box: tuple[float, float, float, float]
    polygons: tuple[tuple[float, ...], ...] | None
    marker: str
    color: str | tuple[int, int, int]
    color_name: str | None

    @property
    def phrase(self) -> str:
        """E.g. "within the red rectangle"; "within the rectangle" for a random RGB colour."""
        before, after = SHAPE_WORDS[self.marker]
        colour = f" {self.color_name}" if self.color_name else ""
        return f"{before} the{colour} {after}"



def draw_regions(image, regions: Sequence[Region], rule: DatasetRule, rng: np.random.Generator) -> PIL.Image.Image:
    prompts = []
    for r in regions:
        try:
            prompts.append(VisualPrompt(marker=r.marker, box=r.box, polygons=r.polygons, color=r.color,
                                        style=rule.style, seed=int(rng.integers(2**31))))
        except VisualPromptError as e:
            raise RegionError(str(e)) from None
    try:
        return draw_visual_prompts(image, prompts)
    except VisualPromptError as e:
        raise RegionError(str(e)) from None


def parse_boxes(raw: Any, w: int, h: int) -> list[tuple[float, float, float, float]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RegionError(f"'bboxes' must be a list of [x0, y0, x1, y1] boxes, got {raw!r}")
    boxes = []
    for box in raw:
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise RegionError(f"a box must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 < x1 and y0 < y1):
            raise RegionError(f"box {list(box)} is empty: it needs x0 < x1 and y0 < y1")
        if x0 < -1 or y0 < -1 or x1 > w + 1 or y1 > h + 1:
            raise RegionError(f"box {list(box)} is outside the {w}x{h} image")
        # up to one pixel over the edge is rounding: clip it
        boxes.append((max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))))
    return boxes


def parse_segmentations(raw: Any, n: int) -> list[tuple[tuple[float, ...], ...] | None]:
    if raw is None:
        return [None] * n
    if not isinstance(raw, list) or len(raw) != n:
        raise RegionError(f"'segmentations' must list one entry (polygons or null) per box ({n}), got {raw!r}")
    try:
        return [None if p is None else parse_polygons(p) for p in raw]
    except VisualPromptError as e:
        raise RegionError(str(e)) from None


def sample_regions(boxes, polygons, rule: DatasetRule, rng: np.random.Generator) -> list[Region]:
    """A shape per region from the rule, then a colour: named or (half the time) random RGB,
    distinct named colours for regions that share a shape."""
    shapes = [rule.shapes[int(rng.integers(len(rule.shapes)))] for _ in boxes]
    names = list(COLORS)
    used: dict[str, set[str]] = {}
    regions = []
    for box, polygon, shape in zip(boxes, polygons, shapes):
        taken = used.setdefault(shape, set())
        if shapes.count(shape) > 1:
            free = [c for c in names if c not in taken]
            name = free[int(rng.integers(len(free)))] if free else None
        else:
            name = names[int(rng.integers(len(names)))] if rng.random() < 0.5 else None
        if name is None:
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
        else:
            color = name
            taken.add(name)
        regions.append(Region(box, polygon, shape, color, name))
    return regions

"""The marker renderer: each marker lands on its region, in its colour, blended with the right
alpha; random styles stay in the training ranges and are deterministic per seed; bad input is
refused with a clear message; the crop check agrees with where the marker is drawn."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.visual_prompts import (
    COLORS,
    MARKERS,
    VisualPrompt,
    VisualPromptError,
    crop_cuts_marker,
    draw_visual_prompt,
    draw_visual_prompts,
)

W, H = 400, 300
S = max(W, H) / 336  # the renderer's size scale
BOX = (120, 80, 260, 200)
GREY = 128
BLUE = COLORS["blue"]

# How far outside BOX each marker may reach (pixels), from the training ranges at scale S.
REACH = {
    "rectangle": 1,
    "ellipse": 0.25 * (BOX[2] - BOX[0]) + 2,  # up to 1.5 x the box
    "triangle": 8 * S / 2 + 2,
    "point": 2 * 20 * S + 2,  # radius 20 s at aspect 2
    "scribble": 12 * S / 2 + 2,
    "mask_contour": 2 * S + 1,
    "mask": 0,
    "arrow": 50 * S + 6 * S + 2,
}


def grey_image():
    return np.full((H, W, 3), GREY, np.uint8)


def changed(before, after):
    """[H, W] bool: pixels the marker changed."""
    return (np.asarray(before).astype(int) != np.asarray(after).astype(int)).any(-1)


def blend(color, alpha, background):
    """What alpha-compositing `color` at `alpha` onto an opaque background gives."""
    c, b = np.asarray(color, float), np.asarray(background, float)
    return (c * alpha + b * (255 - alpha)) / 255


def within(mask, box, reach):
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = box
    return (xs.min() >= x0 - reach and ys.min() >= y0 - reach
            and xs.max() <= x1 + reach and ys.max() <= y1 + reach)


@pytest.mark.parametrize("style", ["constant", "random"])
@pytest.mark.parametrize("marker", MARKERS)
def test_marker_lies_on_its_region_in_its_colour(marker, style):
    image = grey_image()
    for seed in range(3):
        out = np.asarray(draw_visual_prompt(image, VisualPrompt(
            marker=marker, box=BOX, color="blue", style=style, seed=seed)))
        diff = changed(image, out)
        assert diff.sum() > 20, (marker, seed)
        assert within(diff, BOX, REACH[marker]), (marker, seed)
        px = out[diff].astype(int)  # [N, 3]
        # Blue over grey: blue goes up, red and green go down, for every changed pixel.
        assert (px[:, 2] > GREY).all() and (px[:, 0] < GREY).all() and (px[:, 1] < GREY).all()
        if marker in ("point", "arrow"):  # the point's centre and the arrow's tip are on the region
            x0, y0, x1, y1 = BOX
            assert diff[y0:y1, x0:x1].any()
        if marker == "mask":
            np.testing.assert_array_equal(np.nonzero(diff.any(0))[0][[0, -1]], [BOX[0], BOX[2] - 1])
            np.testing.assert_array_equal(np.nonzero(diff.any(1))[0][[0, -1]], [BOX[1], BOX[3] - 1])
            assert diff[BOX[1]:BOX[3], BOX[0]:BOX[2]].all()


@pytest.mark.parametrize("marker", MARKERS)
def test_constant_style_blends_at_alpha_128(marker):
    image = grey_image()
    out = np.asarray(draw_visual_prompt(image, VisualPrompt(marker=marker, box=BOX, color="orange")))
    diff = changed(image, out)
    want = blend(COLORS["orange"], 128, (GREY,) * 3)
    np.testing.assert_allclose(out[diff], np.broadcast_to(want, out[diff].shape), atol=1)


def test_constant_outline_markers_hug_the_box():
    """Constant style: the rectangle is exactly the box's 3 s wide outline, the ellipse goes
    through the box's corners, the point sits on the box centre."""
    image = grey_image()
    rect = changed(image, draw_visual_prompt(image, VisualPrompt(marker="rectangle", box=BOX)))
    x0, y0, x1, y1 = BOX
    lw = int(3 * S)
    assert rect[y0 + 20, x0 : x0 + lw].all() and not rect[y0 + 20, x0 + lw]
    assert not rect[y0 + lw + 1 : y1 - lw - 1, x0 + lw + 1 : x1 - lw - 1].any()
    ell = changed(image, draw_visual_prompt(image, VisualPrompt(marker="ellipse", box=BOX)))
    cy = (y0 + y1) / 2
    assert not ell[int(cy) - 5 : int(cy) + 5, x0 : x1].any()  # an outline, not a fill
    ys, xs = np.nonzero(ell)
    assert abs(xs.min() - (x0 + x1) / 2 + (x1 - x0) * 2**0.5 / 2) <= 2
    pt = changed(image, draw_visual_prompt(image, VisualPrompt(marker="point", box=BOX)))
    ys, xs = np.nonzero(pt)
    assert abs(xs.mean() - (x0 + x1) / 2) < 1 and abs(ys.mean() - (y0 + y1) / 2) < 1
    assert abs((xs.max() - xs.min()) / 2 - int(8 * S)) <= 1


@pytest.mark.parametrize("side", [336, 672, 1000])
def test_constant_point_is_the_originals_8s_disc_at_the_box_centre(side):
    """The original's evaluation point: radius max(int(8 s), 1), aspect 1, at the box centre."""
    image = np.full((side, side, 3), GREY, np.uint8)
    box = (0.2 * side, 0.3 * side, 0.6 * side, 0.5 * side)
    d = changed(image, draw_visual_prompt(image, VisualPrompt(marker="point", box=box)))
    radius = int(8 * side / 336)
    ys, xs = np.nonzero(d)
    assert abs(d.sum() / (np.pi * radius**2) - 1) < 0.15
    assert abs(xs.mean() + 0.5 - (box[0] + box[2]) / 2) < 1
    assert abs(ys.mean() + 0.5 - (box[1] + box[3]) / 2) < 1


def test_arrow_geometry_is_the_originals():
    """Constant arrow, length 50 s and head 0.35 x length: the shaft reaches length - head from
    the tip (not the full length), and the head's wings open +-60 degrees from the shaft."""
    side = 672
    s = side / 336
    image = np.full((side, side, 3), GREY, np.uint8)
    box = (300, 300, 340, 340)
    d = changed(image, draw_visual_prompt(image, VisualPrompt(marker="arrow", box=box)))
    ys, xs = np.nonzero(d)
    tx, ty = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    length, head, lw = 50 * s, 0.35 * 50 * s, int(3 * s)
    dist = np.hypot(xs + 0.5 - tx, ys + 0.5 - ty)
    assert length - head - 2 <= dist.max() <= length - head + lw
    # The shaft's direction: the mean direction of the far pixels.
    far = dist > 0.8 * (length - head)
    shaft = np.arctan2((ys[far] + 0.5 - ty).mean(), (xs[far] + 0.5 - tx).mean())
    # Inside the filled head, close to the tip, pixels fill the +-60 degree wedge.
    near = (dist > 0.25 * head) & (dist < 0.45 * head)
    off = np.degrees(np.abs(np.angle(np.exp(1j * (np.arctan2(ys[near] + 0.5 - ty, xs[near] + 0.5 - tx) - shaft)))))
    assert 54 <= off.max() <= 66


def test_arrow_tip_at_region_and_tail_away():
    image = grey_image()
    cx, cy = (BOX[0] + BOX[2]) / 2, (BOX[1] + BOX[3]) / 2
    for style in ("constant", "random"):
        for seed in range(4):
            d = changed(image, draw_visual_prompt(image, VisualPrompt(
                marker="arrow", box=BOX, style=style, seed=seed)))
            ys, xs = np.nonzero(d)
            dist = np.hypot(xs - cx, ys - cy)
            # The tip: within +-25% of the box size around the centre (the random jitter).
            assert dist.min() <= 0.25 * np.hypot(BOX[2] - BOX[0], BOX[3] - BOX[1]) + 2
            # The tail: at least 12 s away, at most the arrow's 50 s length (+ width).
            assert 12 * S - 2 <= dist.max() <= 50 * S + 0.25 * 200 + 6 * S


def test_arrow_and_point_on_a_given_point():
    image = grey_image()
    p = (300.0, 60.0)
    for marker in ("arrow", "point"):
        for style in ("constant", "random"):
            d = changed(image, draw_visual_prompt(image, VisualPrompt(
                marker=marker, point=p, style=style, seed=1)))
            assert d[int(p[1]), int(p[0])], (marker, style)
    pt = changed(image, draw_visual_prompt(image, VisualPrompt(marker="point", point=p)))
    ys, xs = np.nonzero(pt)
    assert abs(xs.mean() - p[0]) < 1 and abs(ys.mean() - p[1]) < 1
    # A point alone gives the box markers a small box around it.
    rect = changed(image, draw_visual_prompt(image, VisualPrompt(marker="rectangle", point=p)))
    assert within(rect, (p[0] - 16 * S, p[1] - 16 * S, p[0] + 16 * S, p[1] + 16 * S), 1)
    assert not rect[int(p[1]), int(p[0])]


@pytest.mark.parametrize("name", list(COLORS))
def test_every_colour_name(name):
    black = np.zeros((H, W, 3), np.uint8)
    out = np.asarray(draw_visual_prompt(black, VisualPrompt(marker="mask", box=BOX, color=name)))
    np.testing.assert_allclose(out[100, 150], blend(COLORS[name], 128, (0, 0, 0)), atol=1)
    assert out[0, 0].tolist() == [0, 0, 0]


def test_rgb_tuple_colour():
    out = np.asarray(draw_visual_prompt(grey_image(), VisualPrompt(
        marker="mask", box=BOX, color=(10, 200, 30))))
    np.testing.assert_allclose(out[100, 150], blend((10, 200, 30), 128, (GREY,) * 3), atol=1)


def test_random_alpha_and_width_in_training_ranges():
    black = np.zeros((H, W, 3), np.uint8)
    alphas, widths, mask_alphas = set(), set(), set()
    for seed in range(30):
        out = np.asarray(draw_visual_prompt(black, VisualPrompt(
            marker="rectangle", box=BOX, style="random", seed=seed)))
        alphas.add(int(out[150, BOX[0], 0]))  # red over black: R equals alpha
        widths.add(int((out[150, :, 0] > 0).sum() // 2))
        out = np.asarray(draw_visual_prompt(black, VisualPrompt(
            marker="mask", box=BOX, style="random", seed=seed)))
        mask_alphas.add(int(out[150, 150, 0]))
    assert min(alphas) >= 96 and max(alphas) <= 255 and len(alphas) > 10
    assert min(mask_alphas) >= 48 and max(mask_alphas) <= 128 and len(mask_alphas) > 10
    assert min(widths) >= int(2 * S) and max(widths) <= int(8 * S) and len(widths) > 3


def test_widths_scale_with_image_size():
    for side in (336, 672):
        image = np.zeros((side, side, 3), np.uint8)
        d = changed(image, draw_visual_prompt(image, VisualPrompt(
            marker="rectangle", box=(50, 50, 200, 200))))
        assert d[100].sum() == 2 * 3 * side // 336


@pytest.mark.parametrize("marker", MARKERS)
def test_random_style_is_deterministic_per_seed(marker):
    image = grey_image()
    draw = lambda seed: np.asarray(draw_visual_prompt(image, VisualPrompt(  # noqa: E731
        marker=marker, box=BOX, style="random", seed=seed)))
    np.testing.assert_array_equal(draw(7), draw(7))
    assert len({draw(seed).tobytes() for seed in range(4)}) > 1


def test_constant_style_on_a_box_ignores_the_seed():
    image = grey_image()
    for marker in MARKERS:
        a, b = (np.asarray(draw_visual_prompt(image, VisualPrompt(marker=marker, box=BOX, seed=s)))
                for s in (0, 1))
        np.testing.assert_array_equal(a, b)


def test_mask_region():
    image = grey_image()
    mask = np.zeros((H, W), bool)
    mask[100:180, 140:200] = True
    mask[150:190, 200:240] = True  # an L shape
    bbox = (140, 100, 240, 190)
    # Box markers use the mask's bounding box.
    for marker in ("rectangle", "ellipse"):
        a = draw_visual_prompt(image, VisualPrompt(marker=marker, mask=mask))
        b = draw_visual_prompt(image, VisualPrompt(marker=marker, box=bbox))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Filled mask: exactly the mask; contour: around its outline, never deep inside.
    d = changed(image, draw_visual_prompt(image, VisualPrompt(marker="mask", mask=mask)))
    np.testing.assert_array_equal(d, mask)
    d = changed(image, draw_visual_prompt(image, VisualPrompt(marker="mask_contour", mask=mask)))
    assert d[100, 140:200].all() and not d[120:170, 150:190].any() and not d[95:147, 205:240].any()
    # Markers placed inside the region put their points inside the mask.
    for seed in range(5):
        d = changed(image, draw_visual_prompt(image, VisualPrompt(
            marker="point", mask=mask, style="random", seed=seed)))
        ys, xs = np.nonzero(d)
        assert mask[int(round(ys.mean())), int(round(xs.mean()))]
        d = changed(image, draw_visual_prompt(image, VisualPrompt(
            marker="scribble", mask=mask, style="random", seed=seed)))
        assert within(d, bbox, 12 * S / 2 + 2)
    # A box serves the mask markers as a rectangular mask.
    a = draw_visual_prompt(image, VisualPrompt(marker="mask_contour", box=bbox))
    m = np.zeros((H, W), bool)
    m[100:190, 140:240] = True
    b = draw_visual_prompt(image, VisualPrompt(marker="mask_contour", mask=m))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_input_untouched_and_output_rgb_pil():
    arr = grey_image()
    pil = PIL.Image.fromarray(arr)
    for image in (arr, pil):
        out = draw_visual_prompt(image, VisualPrompt(marker="mask", box=BOX))
        assert isinstance(out, PIL.Image.Image) and out.mode == "RGB" and out.size == (W, H)
    assert (arr == GREY).all() and (np.asarray(pil) == GREY).all()


def test_several_markers_composite_in_order():
    image = grey_image()
    vps = [VisualPrompt(marker="mask", box=(0, 0, 100, 100), color="red"),
           VisualPrompt(marker="mask", box=(50, 50, 150, 150), color="blue")]
    out = np.asarray(draw_visual_prompts(image, vps))
    over = blend(COLORS["blue"], 128, blend(COLORS["red"], 128, (GREY,) * 3).round())
    np.testing.assert_allclose(out[75, 75], over, atol=1)
    np.testing.assert_allclose(out[25, 25], blend(COLORS["red"], 128, (GREY,) * 3), atol=1)
    np.testing.assert_allclose(out[125, 125], blend(COLORS["blue"], 128, (GREY,) * 3), atol=1)


# An L shape as two COCO polygons (flat x, y lists), and the mask they cover.
L_POLYGONS = [[140, 100, 200, 100, 200, 180, 140, 180], [200, 150, 240, 150, 240, 190, 200, 190]]


def l_mask():
    mask = np.zeros((H, W), bool)
    mask[100:181, 140:201] = True
    mask[150:191, 200:241] = True
    return mask


def test_coco_polygons_are_the_region():
    image = grey_image()
    mask = l_mask()
    # Filled mask: the polygons' pixels (PIL fills edges inclusive); contour: their outline.
    d = changed(image, draw_visual_prompt(image, VisualPrompt(marker="mask", polygons=L_POLYGONS)))
    np.testing.assert_array_equal(d, mask)
    d = changed(image, draw_visual_prompt(image, VisualPrompt(marker="mask_contour", polygons=L_POLYGONS)))
    assert d[100, 140:200].all() and not d[120:170, 150:190].any() and not d[95:147, 205:240].any()
    # Box markers: the polygons' bounding box.
    bbox = (140, 100, 241, 191)
    for marker in ("rectangle", "ellipse", "arrow"):
        a = draw_visual_prompt(image, VisualPrompt(marker=marker, polygons=L_POLYGONS))
        b = draw_visual_prompt(image, VisualPrompt(marker=marker, box=bbox))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Shape markers sample inside the polygons: the point's centre, the scribble's and the
    # triangle's control points (their strokes stay within half a width of the region).
    for seed in range(5):
        for style in ("random", "constant"):
            d = changed(image, draw_visual_prompt(image, VisualPrompt(
                marker="point", polygons=L_POLYGONS, style=style, seed=seed)))
            ys, xs = np.nonzero(d)
            assert mask[int(round(ys.mean())), int(round(xs.mean()))]
        for marker, reach in (("scribble", 12 * S / 2 + 2), ("triangle", 8 * S / 2 + 2)):
            d = changed(image, draw_visual_prompt(image, VisualPrompt(
                marker=marker, polygons=L_POLYGONS, style="random", seed=seed)))
            assert within(d, bbox, reach)
    # One flat polygon is one region too.
    d = changed(image, draw_visual_prompt(image, VisualPrompt(marker="mask", polygons=L_POLYGONS[0])))
    np.testing.assert_array_equal(d, mask & (np.arange(W) <= 200)[None] & (np.arange(H) <= 180)[:, None])


@pytest.mark.parametrize("polygons, match", [
    ([[10, 10, 50, 10, 50]], "flat"),
    ([[10, 10, 50, 10]], "3 points"),
    ([[10, 10, 50, 10, "a", 40]], "numbers"),
    ([[10, 10, 50, 10, float("nan"), 40]], "finite"),
    ([], "list of flat"),
    ("10 10 50 10 30 40", "list of flat"),
])
def test_bad_polygons(polygons, match):
    with pytest.raises(VisualPromptError, match=match) as e:
        VisualPrompt(marker="mask", polygons=polygons)
    assert "\n" not in str(e.value)


def test_polygons_must_fit_the_image_and_not_come_with_a_mask():
    with pytest.raises(VisualPromptError, match="reaches outside the 400x300 image"):
        draw_visual_prompt(grey_image(), VisualPrompt(marker="mask", polygons=[[10, 10, 500, 10, 30, 40]]))
    with pytest.raises(VisualPromptError, match="not both"):
        VisualPrompt(marker="mask", polygons=L_POLYGONS, mask=l_mask())


def test_marker_names_and_aliases():
    assert MARKERS == ("rectangle", "ellipse", "triangle", "point", "scribble", "mask_contour",
                       "mask", "arrow")
    assert VisualPrompt(marker="mask contour", box=BOX).marker == "mask_contour"
    assert VisualPrompt(marker="Rectangle", box=BOX, color="RED").color == "red"


@pytest.mark.parametrize("kwargs, match", [
    (dict(marker="star", box=BOX), "unknown marker 'star'"),
    (dict(marker="rectangle"), "needs a region"),
    (dict(marker="rectangle", box=(10, 10, 10, 50)), "empty"),
    (dict(marker="rectangle", box=(50, 10, 20, 50)), "empty"),
    (dict(marker="rectangle", box=(1, 2, 3)), "4"),
    (dict(marker="rectangle", box=BOX, color="pink"), "unknown colour 'pink'"),
    (dict(marker="rectangle", box=BOX, color=(0, 0, 256)), "colour"),
    (dict(marker="rectangle", box=BOX, style="fancy"), "style"),
    (dict(marker="mask", mask=np.zeros((H, W), bool)), "mask is empty"),
])
def test_bad_prompts(kwargs, match):
    with pytest.raises(VisualPromptError, match=match):
        VisualPrompt(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(box=(350, 100, 420, 200)), "not inside the 400x300 image"),
    (dict(box=(-5, 100, 50, 200)), "not inside"),
    (dict(point=(400, 10)), "not inside"),
    (dict(mask=np.ones((W, H), bool)), r"mask shape \(400, 300\) is not the image's"),
])
def test_region_must_fit_the_image(kwargs, match):
    with pytest.raises(VisualPromptError, match=match) as e:
        draw_visual_prompt(grey_image(), VisualPrompt(marker="rectangle", **kwargs))
    assert isinstance(e.value, VipLlavaError) and "\n" not in str(e.value)


def test_crop_cuts_marker():
    wide = (600, 200)  # shortest edge -> 336: the crop keeps the middle third of the width
    assert crop_cuts_marker(wide, VisualPrompt(marker="rectangle", box=(10, 50, 120, 150)))
    assert not crop_cuts_marker(wide, VisualPrompt(marker="rectangle", box=(250, 50, 350, 150)))
    assert crop_cuts_marker(wide, VisualPrompt(marker="point", point=(202, 100)))
    assert not crop_cuts_marker((300, 300), VisualPrompt(marker="rectangle", box=(0, 0, 300, 300)))
    tall = (200, 600)
    assert crop_cuts_marker(tall, VisualPrompt(marker="mask", box=(50, 500, 150, 590)))
    # An exact (height, width) resize with a same-size crop cuts nothing.
    assert not crop_cuts_marker(wide, VisualPrompt(marker="mask", box=(0, 0, 50, 50)),
                                size=(336, 336))

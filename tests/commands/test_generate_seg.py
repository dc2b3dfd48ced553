"""vipllava-generate's --seg (COCO polygons), --alpha and --width: the marked image it saves."""

import numpy as np
import PIL.Image
import pytest

from vipllava_jax.commands.generate import main
from vipllava_jax.processing.marker_spec import VisualPrompt, VisualPromptError

GRAY = (128, 128, 128)
# two triangles of one region, as COCO polygons (flat x, y lists)
LEFT = [10, 10, 50, 10, 10, 60]
RIGHT = [70, 20, 110, 70, 70, 70]


def _inside(x: float, y: float, polygon, tol: float = 1.5) -> bool:
    """Whether (x, y) is inside a convex polygon, give or take `tol` pixels (edge rasterisation)."""
    pts = np.asarray(polygon, float).reshape(-1, 2)
    signs = []
    for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
        cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
        signs.append(cross / np.hypot(bx - ax, by - ay))  # signed distance to the edge's line
    signs = np.asarray(signs)
    return bool((signs >= -tol).all() or (signs <= tol).all())


def _marked(tmp_path, capsys, flags):
    image = tmp_path / "gray.png"
    PIL.Image.new("RGB", (120, 90), GRAY).save(image)
    saved = tmp_path / "marked.png"
    code = main(["--image", str(image), "--question", "What is it?", "--max-new-tokens", "1",
                 "--save-marked", str(saved), *flags])
    assert code == 0, capsys.readouterr().err
    changed = (np.asarray(PIL.Image.open(saved).convert("RGB")) != GRAY).any(-1)
    return np.asarray(PIL.Image.open(saved).convert("RGB")), changed


def test_seg_mask_pixels_fall_inside_the_polygons(tmp_path, capsys):
    pixels, changed = _marked(tmp_path, capsys, ["--marker", "mask", "--seg", ",".join(map(str, LEFT)),
                                                 "--seg", ",".join(map(str, RIGHT)), "--alpha", "255"])
    ys, xs = np.nonzero(changed)
    assert len(xs) > 500
    for x, y in zip(xs, ys):  # pixel centres
        assert _inside(x + 0.5, y + 0.5, LEFT) or _inside(x + 0.5, y + 0.5, RIGHT), (x, y)
    assert changed[20, 20] and changed[60, 80]  # both parts are drawn
    assert (pixels[changed] == (255, 0, 0)).all()  # alpha 255: the pure marker colour


def test_seg_rectangle_takes_the_polygon_bounds_and_the_width(tmp_path, capsys):
    _, changed = _marked(tmp_path, capsys, ["--marker", "rectangle", "--seg", ",".join(map(str, LEFT)),
                                            "--width", "5", "--color", "blue"])
    ys, xs = np.nonzero(changed)
    assert (xs.min(), ys.min()) == (10, 10)
    assert 48 <= xs.max() <= 51 and 58 <= ys.max() <= 61
    assert changed[10:15, 30].all() and not changed[15:20, 30].any()  # the top edge is 5 px thick


def test_alpha_sets_the_blend(tmp_path, capsys):
    pixels, changed = _marked(tmp_path, capsys, ["--marker", "mask", "--seg", ",".join(map(str, LEFT)),
                                                  "--alpha", "64"])
    r, g, _ = pixels[20, 20].astype(int)  # red over gray at 64/255
    assert abs(r - (128 + (255 - 128) * 64 / 255)) <= 1 and abs(g - 128 * (1 - 64 / 255)) <= 1


@pytest.mark.parametrize("flags, message", [
    (["--marker", "mask", "--seg", "1,2,3,4"], "--seg takes a polygon"),
    (["--marker", "mask", "--seg", "1,2,3,4,5,x"], "--seg takes a polygon"),
    (["--marker", "mask", "--seg", "1,2,3,4,5,6", "--box", "1,2,3,4"], "exactly one of"),
    (["--seg", "1,2,3,4,5,6"], "--seg needs --marker"),
    (["--alpha", "9"], "--alpha needs --marker"),
    (["--marker", "mask", "--seg", "1,2,30,4,5,60", "--alpha", "256"], "--alpha takes an integer 0-255"),
    (["--marker", "rectangle", "--box", "1,2,30,40", "--width", "0"], "--width takes a whole number"),
])
def test_bad_seg_alpha_width_are_one_line_errors(tmp_path, capsys, flags, message):
    image = tmp_path / "gray.png"
    PIL.Image.new("RGB", (120, 90), GRAY).save(image)
    assert main(["--image", str(image), "--question", "hi", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_visual_prompt_checks_alpha_and_width():
    assert VisualPrompt(marker="mask", box=(1, 2, 3, 4), alpha=0, width=2).alpha == 0
    for bad in ({"alpha": 256}, {"alpha": 1.5}, {"alpha": True}, {"width": 0}, {"width": 2.0}):
        with pytest.raises(VisualPromptError, match="alpha must|width must"):
            VisualPrompt(marker="rectangle", box=(1, 2, 3, 4), **bad)

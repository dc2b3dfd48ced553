"""load_image and the resize: EXIF orientation, 16-bit warning, image bombs and extreme aspect
ratios."""

import numpy as np
import PIL.Image
import pytest

from tests.helpers.images import phone_jpeg, upright_image
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.images import CLIPImagePreprocessor, load_image
from vipllava_jax.processing.visual_prompts import VisualPrompt, draw_visual_prompt


def test_exif_rotated_jpeg_loads_upright(tmp_path):
    path = phone_jpeg(tmp_path / "phone.jpg")
    with PIL.Image.open(path) as f:
        assert f.size == (40, 60)  # as stored
    for src in (path, str(path), PIL.Image.open(path)):
        image = load_image(src)
        assert image.size == (60, 40)
        diff = np.abs(np.asarray(image, np.int16) - np.asarray(upright_image(), np.int16))
        assert diff.mean() < 4  # JPEG noise only
    # what transformers' own loader gives
    from transformers.image_utils import load_image as hf_load_image

    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(hf_load_image(str(path))))


def test_box_in_upright_coordinates_marks_the_right_pixels(tmp_path):
    path = phone_jpeg(tmp_path / "phone.jpg")
    vp = VisualPrompt(marker="rectangle", box=(35, 5, 55, 30), color="red", style="constant")
    marked = np.asarray(draw_visual_prompt(path, vp), np.int16)
    plain = np.asarray(load_image(path), np.int16)
    assert marked.shape == (40, 60, 3)
    changed = np.abs(marked - plain).sum(-1) > 60
    ys, xs = np.nonzero(changed)
    # the rectangle's outline lies around the box (line width aside) in the upright image
    assert 30 <= xs.min() <= 37 and 53 <= xs.max() <= 60 and ys.min() <= 7 and 28 <= ys.max() <= 35
    r, g, b = marked[5, 45]  # the top edge, over the white half: red
    assert r > 200 and r - g > 60 and r - b > 60


def test_16_bit_png_warns(tmp_path):
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(path)
    with pytest.warns(UserWarning, match="16/32-bit"):
        image = load_image(path)
    assert image.mode == "RGB"


def test_decompression_bomb_is_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    PIL.Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 2x the limit: an error in PIL
    with pytest.raises(VipLlavaError, match="bomb.png") as e:
        load_image(path)
    assert "\n" not in str(e.value)


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path):
    path = tmp_path / "strip.png"
    PIL.Image.new("RGB", (1, 10000), "white").save(path)
    pre = CLIPImagePreprocessor.for_size(336)
    with pytest.raises(VipLlavaError, match="1x10000 px is more than 64 times longer"):
        pre(str(path))
    # pad_to_square first makes it square: accepted
    assert CLIPImagePreprocessor.for_size(16, pad_to_square=True)(str(path)).shape == (1, 3, 16, 16)

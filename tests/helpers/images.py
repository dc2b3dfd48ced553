"""Image fixtures: a phone JPEG stored sideways with its EXIF orientation."""

import numpy as np
import PIL.Image


def upright_image() -> PIL.Image.Image:
    """60 x 40 px: left half black, right half white (orientation is visible)."""
    x = np.full((40, 60, 3), 255, np.uint8)
    x[:, :30] = 0
    return PIL.Image.fromarray(x)


def phone_jpeg(path):
    """The upright image as a phone stores it: pixels turned 90 degrees counter-clockwise and
    EXIF Orientation=6 (a viewer turns it back clockwise)."""
    stored = upright_image().transpose(PIL.Image.Transpose.ROTATE_90)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path

"""Images in: loading (paths, arrays, PIL), pad-to-square, and CLIP's preprocessing as
transformers' PIL backend computes it."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from vipllava_jax import storage
from vipllava_jax.errors import ConfigError, VipLlavaError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[PIL.Image.Image, np.ndarray, str, Path, bytes]

# An image resized to a shortest edge of `size` may be at most this many times `size` long
# (1 x 10000 px would otherwise become 336 x 3.4M px before the center crop).
MAX_ASPECT_RATIO = 64


@dataclasses.dataclass(frozen=True)
class CLIPImagePreprocessor:
    """CLIP image preprocessing, step for step as transformers' PIL backend.

    Attributes:
        size: an int resizes the shortest edge to it (keeping the aspect ratio, the long edge
            rounded down); a `(height, width)` pair resizes to exactly that.
        crop_size: `(height, width)` of the center crop (zero-padded if the image is smaller).
        pad_to_square: pad the image to a square filled with the mean colour before resizing,
            as the original ViP-LLaVA code does (`expand2square`), so a center crop cannot cut
            off a marker drawn near an edge. transformers' processor does not do this.
    """

    size: int | tuple[int, int] = 336
    crop_size: tuple[int, int] = (336, 336)
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    pad_to_square: bool = False

    @classmethod
    def for_size(cls, image_size: int, **kw) -> CLIPImagePreprocessor:
        """CLIP preprocessing for a vision tower that takes `image_size` square images."""
        return cls(size=image_size, crop_size=(image_size, image_size), **kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **kw) -> CLIPImagePreprocessor:
        """Reads a transformers image processor config (`preprocessor_config.json`, or the
        `image_processor` entry of `processor_config.json`). Missing fields take
        `CLIPImageProcessor`'s defaults."""
        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, dict):
            if set(size) == {"shortest_edge"}:
                size = size["shortest_edge"]
            elif set(size) == {"height", "width"}:
                size = (size["height"], size["width"])
            else:
                raise ConfigError(f"unsupported image processor size {size}")
        crop = d.get("crop_size", {"height": 224, "width": 224})
        crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        return cls(
            size=size,
            crop_size=crop,
            image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(d.get("image_std", CLIP_STD)),
            rescale_factor=d.get("rescale_factor", 1 / 255),
            resample=int(d.get("resample", PIL.Image.Resampling.BICUBIC)),
            do_resize=d.get("do_resize", True),
            do_center_crop=d.get("do_center_crop", True),
            do_rescale=d.get("do_rescale", True),
            do_normalize=d.get("do_normalize", True),
            **kw,
        )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """`(height, width)` of every output image, or None when it depends on the input."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and not isinstance(self.size, int):
            return tuple(self.size)
        return None

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Preprocesses images into `pixel_values` [num_images, 3, H, W] float32.

        Args:
            images: one image or a list: PIL images, HWC (or HW) uint8 arrays, or file paths.
        """
        images = [images] if is_single_image(images) else list(images)
        if not images:
            raise VipLlavaError("no images were given")
        arrays = [self.preprocess(load_image(im)) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise VipLlavaError(f"preprocessed images differ in shape: {sorted(shapes)}")
        return np.stack(arrays)

    def preprocess(self, image: PIL.Image.Image) -> np.ndarray:
        """One RGB PIL image -> [3, H, W] float32."""
        if self.pad_to_square:
            image = expand_to_square(image, tuple(int(m * 255) for m in self.image_mean))
        if self.do_resize:
            h, w = self._resized_hw(image.height, image.width)
            image = image.resize((w, h), resample=PIL.Image.Resampling(self.resample))
        x = np.asarray(image)  # [H, W, 3] uint8
        if self.do_center_crop:
            x = center_crop(x, self.crop_size)
        # transformers rescales in float64 and casts to float32, then normalizes in float32.
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean, std = (np.asarray(v, np.float32) for v in (self.image_mean, self.image_std))
            x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def _resized_hw(self, height: int, width: int) -> tuple[int, int]:
        if not isinstance(self.size, int):
            return tuple(self.size)
        short, long = (width, height) if width <= height else (height, width)
        if long > MAX_ASPECT_RATIO * short:
            raise VipLlavaError(
                f"image of {width}x{height} px is more than {MAX_ASPECT_RATIO} times longer than "
                "wide; crop it (or pad it to a square) first"
            )
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)


def load_image(image: ImageInput) -> PIL.Image.Image:
    """A PIL image, HWC/HW uint8 array, file path (local or `gs://`), encoded file bytes or
    binary file object -> an RGB PIL image. A `gs://` object is read whole (`storage.read_bytes`,
    retried on transient errors).

    Transparency is composited onto white, as transformers 5's `convert_to_rgb` does. A file's
    or PIL image's EXIF orientation is applied (`ImageOps.exif_transpose`, as transformers'
    `load_image`), so coordinates (boxes, points) are those of the upright image every viewer
    shows. A 16-bit image is converted as transformers converts it (values above 255
    saturate), with a warning.

    Raises:
        VipLlavaError: not an image type, or a file larger than PIL's decompression-bomb limit.
        OSError: an unreadable or undecodable file (FileNotFoundError: a missing one).
    """
    name = image if isinstance(image, (str, Path)) else "image bytes"
    if isinstance(image, (str, os.PathLike)) and storage.is_remote(image):
        image = storage.read_bytes(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = io.BytesIO(image)
    if isinstance(image, (str, Path)) or hasattr(image, "read"):
        try:
            with PIL.Image.open(image) as f:
                image = f.copy() if f.getexif().get(_ORIENTATION, 1) == 1 else PIL.ImageOps.exif_transpose(f)
        except PIL.Image.DecompressionBombError as e:
            raise VipLlavaError(f"{name}: {e}") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[-1] not in (1, 3, 4)
        ):
            raise VipLlavaError(
                f"expected an HWC uint8 image array with 1, 3 or 4 channels, got {image.dtype} "
                f"of shape {image.shape}"
            )
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        image = PIL.Image.fromarray(image)
    elif not isinstance(image, PIL.Image.Image):
        raise VipLlavaError(
            f"expected a PIL image, numpy array, path or bytes, got {type(image).__name__}"
        )
    elif image.getexif().get(_ORIENTATION, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        warnings.warn(
            f"a {image.mode} (16/32-bit) image is converted to 8-bit RGB: values above 255 saturate",
            stacklevel=2,
        )
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


_ORIENTATION = 0x0112  # the EXIF tag


def expand_to_square(image: PIL.Image.Image, fill: tuple[int, ...]) -> PIL.Image.Image:
    """Pads `image` to a square of its longer side, centred, filled with `fill` (ViP-LLaVA's
    `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = PIL.Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Center-crops an [H, W, C] array to `size`, zero-padding first where it is smaller
    (transformers' `center_crop`)."""
    h, w = x.shape[:2]
    ch, cw = size
    ph, pw = math.ceil(max(ch - h, 0) / 2), math.ceil(max(cw - w, 0) / 2)
    if ph or pw:
        padded = np.zeros((max(h, ch), max(w, cw), *x.shape[2:]), x.dtype)
        padded[ph : ph + h, pw : pw + w] = x
        x = padded
    top, left = (h - ch) // 2 + ph, (w - cw) // 2 + pw
    return x[top : top + ch, left : left + cw]


def is_single_image(images: Any) -> bool:
    """One image (PIL, array or path), not a list of them."""
    return isinstance(images, (PIL.Image.Image, np.ndarray, str, Path, bytes))


def quiet_transformers() -> None:
    """Silences what is expected when transformers is used for tokenizers only: its advice that
    PyTorch was not found (only when torch is absent) and tqdm's notebook-widget warning
    (`IProgress not found`, a console bar is shown instead). Other warnings stay."""
    import importlib.util
    import os

    if "transformers" not in sys.modules and importlib.util.find_spec("torch") is None:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message="IProgress not found")

"""Image preprocessing for VisionEncoderDecoder checkpoints (captioning data, demos).

transformers' own image processor for the folder, PIL backend (so the pixels do not depend on
whether torchvision is installed), or ViT's defaults at the encoder's size when the folder has
no `preprocessor_config.json` (tiny test models): resize to a square (bilinear), rescale by
1/255, normalize with mean = std = 0.5.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image

from vipllava_jax import hub, storage
from vipllava_jax.errors import ConfigError
from vipllava_jax.processing.images import quiet_transformers


def _pil_class(name: str):
    quiet_transformers()
    import transformers

    base = name.removesuffix("Fast")
    cls = getattr(transformers, base + "Pil", None) or getattr(transformers, base, None)
    if cls is None:
        raise ConfigError(f"unknown image processor {name!r} in preprocessor_config.json")
    return cls


def image_preprocessor(path: str | Path, image_size: int | tuple[int, int]) -> Callable[[PIL.Image.Image], np.ndarray]:
    """RGB PIL image -> `[3, H, W]` float32, as the checkpoint at `path` (a folder or a hub
    id) expects."""
    path = storage.local_mirror(hub.resolve(path))  # transformers reads local files
    file = path / "preprocessor_config.json"
    if file.is_file():
        d = json.loads(file.read_text())
        # older folders (donut-base, trocr-*) name only a feature extractor: transformers'
        # AutoImageProcessor maps it to the image processor of the same family
        legacy = (d.get("feature_extractor_type") or "").replace("FeatureExtractor", "ImageProcessor")
        name = d.get("image_processor_type") or legacy or "ViTImageProcessor"
        processor = _pil_class(name).from_pretrained(path)
    else:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        processor = _pil_class("ViTImageProcessor")(size={"height": height, "width": width})

    return functools.partial(_preprocess, processor)  # a partial pickles (loader worker processes)


def _preprocess(processor, image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0], np.float32)

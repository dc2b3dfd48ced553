"""Caption preprocessing equals transformers' own image processors (PIL backend) for Donut's
resize / thumbnail / align-long-axis / pad to a non-square size and TrOCR's square resize, on
images of odd sizes, and a non-square Donut-shaped model takes those pixels."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers.ved import NON_SQUARE, START, make_hf_ved
from vipllava_jax.models.ved import VisionEncoderDecoderModel
from vipllava_jax.processing.captions import image_preprocessor

HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_normalize": True, "do_resize": True,
        "resample": 2}
CONFIGS = {
    # today's spelling, long-axis alignment on: a tall image is rotated to the wide target
    "donut": {**HALF, "image_processor_type": "DonutImageProcessor", "processor_class": "DonutProcessor",
              "do_align_long_axis": True, "do_thumbnail": True, "do_pad": True, "size": {"height": 32, "width": 48}},
    # naver-clova-ix/donut-base's own file (a feature extractor name, size as [width, height])
    "donut_legacy": {**HALF, "feature_extractor_type": "DonutFeatureExtractor", "processor_class": "DonutProcessor",
                     "do_align_long_axis": False, "do_thumbnail": True, "do_pad": True, "size": [48, 32]},
    "trocr": {**HALF, "image_processor_type": "ViTImageProcessor", "processor_class": "TrOCRProcessor",
              "size": {"height": 32, "width": 32}},
    "trocr_legacy": {**HALF, "feature_extractor_type": "ViTFeatureExtractor", "size": 32},  # microsoft/trocr-*'s
}
EXPECTED = {"donut": "DonutImageProcessorPil", "donut_legacy": "DonutImageProcessorPil",
            "trocr": "ViTImageProcessorPil", "trocr_legacy": "ViTImageProcessorPil"}
SIZES = [(37, 91), (120, 45), (33, 33), (7, 300)]  # (height, width): wide, tall, square-ish, a strip


def odd_images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pixels_equal_transformers_image_processor(tmp_path, name):
    import transformers

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CONFIGS[name]))
    reference = getattr(transformers, EXPECTED[name]).from_pretrained(tmp_path)
    ours = image_preprocessor(tmp_path, (32, 48))  # the folder's size wins over the model's
    for image in odd_images():
        want = reference(images=image, return_tensors="np")["pixel_values"][0]
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == want.shape, (image.size, got.shape, want.shape)
        np.testing.assert_array_equal(got, want.astype(np.float32))


def test_non_square_donut_model_takes_donut_pixels(tmp_path):
    hf = make_hf_ved(*NON_SQUARE["donut_mbart_wide"])  # [height, width] = [32, 48]
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CONFIGS["donut"]))
    model = VisionEncoderDecoderModel.from_pretrained(tmp_path)
    assert model.config.encoder.image_hw == (32, 48)
    prep = image_preprocessor(tmp_path, model.config.encoder.image_hw)
    pixels = np.stack([prep(image) for image in odd_images()])
    assert pixels.shape == (len(SIZES), 3, 32, 48)
    ids = np.full((len(SIZES), 3), START)
    logits = np.asarray(model(pixels, ids).logits)
    assert logits.shape == (len(SIZES), 3, hf.config.decoder.vocab_size)
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(pixels), decoder_input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4)

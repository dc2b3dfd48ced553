"""An exported HF folder works with transformers' AutoProcessor as well as its model: the
processor files are copied when the source had them and written from the config when not."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from tests.helpers import IMAGE_TOKEN, make_word_tokenizer
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.convert import hf_to_orbax, orbax_to_hf
from vipllava_jax.processing.captions import image_preprocessor


def test_autoprocessor_and_model_on_a_vipllava_export(tiny_hf, tmp_path):
    from transformers import AutoProcessor
    from transformers import VipLlavaForConditionalGeneration as HF

    _, src = tiny_hf
    hf_dir = tmp_path / "hf_src"
    hf_dir.mkdir()
    for f in src.iterdir():
        (hf_dir / f.name).write_bytes(f.read_bytes())
    make_word_tokenizer(hf_dir, ["what is in the red box ?", "a cat"])  # no processor files
    hf_to_orbax(hf_dir, tmp_path / "orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "export")
    assert (tmp_path / "export" / "preprocessor_config.json").is_file()

    processor = AutoProcessor.from_pretrained(tmp_path / "export")
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8))
    inputs = processor(text="<image> what is in the red box ?", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 4  # 28 px / 14 px patches
    reference = HF.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        want = reference(**inputs).logits.numpy()
    ours = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "orbax")
    got = ours(inputs["input_ids"].numpy(), inputs["pixel_values"].numpy(), inputs["attention_mask"].numpy()).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_image_processor_of_a_ved_export_preprocesses_as_ours(hf_veds, tmp_path):
    from transformers import AutoImageProcessor

    _, src = hf_veds("vit_gpt2")
    hf_to_orbax(src, tmp_path / "orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "export")
    theirs = AutoImageProcessor.from_pretrained(tmp_path / "export")
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), np.uint8))
    size = theirs.size["height"]
    ours = image_preprocessor(tmp_path / "orbax", size)(image)
    np.testing.assert_allclose(np.asarray(theirs(images=image, return_tensors="np")["pixel_values"][0]), ours,
                               atol=1e-5)

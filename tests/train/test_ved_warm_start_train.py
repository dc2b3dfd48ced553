"""A warm-started captioner (pretrained encoder + pretrained decoder, new cross-attention) gets
its start / pad ids, is saved, fine-tunes through vipllava-train and exports to a folder
transformers' VisionEncoderDecoderModel loads whole."""

from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import make_word_tokenizer
from tests.helpers.ved import caption_labels, images, save_warm_start_pair
from vipllava_jax.convert import orbax_to_hf
from vipllava_jax.errors import ConfigError
from vipllava_jax.models.ved import VisionEncoderDecoderConfig, VisionEncoderDecoderModel
from vipllava_jax.models.ved.warm_start import read_config
from vipllava_jax.train import RunConfig, load_trained_model, train

CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]


def test_token_ids_go_into_the_config_and_are_checked(tmp_path):
    enc, dec = save_warm_start_pair(tmp_path, "vit_model", "gpt2_lm")
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        read_config(enc, "encoder"), read_config(dec, "decoder"), decoder_start_token_id=1, pad_token_id=0)
    assert (config.decoder_start_token_id, config.pad_token_id) == (1, 0)
    assert config.hf_dict["decoder_start_token_id"] == 1  # saved with the model
    later = config.replace(eos_token_id=2)
    assert (later.eos_token_id, later.decoder_start_token_id) == (2, 1)
    with pytest.raises(ConfigError, match="unknown token id 'start_id'"):
        config.replace(start_id=1)
    with pytest.raises(ConfigError, match="pad_token_id must be a non-negative integer or None"):
        config.replace(pad_token_id=-1)


def test_warm_started_captioner_fine_tunes_and_exports(tmp_path):
    from transformers import VisionEncoderDecoderModel as HF

    enc, dec = save_warm_start_pair(tmp_path, "vit_model", "gpt2_lm")  # ViT 32 wide, GPT-2 48 wide: a new projection too
    model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(enc, dec, seed=1,
                                                                      decoder_start_token_id=1, pad_token_id=0)
    assert (model.config.decoder_start_token_id, model.config.pad_token_id) == (1, 0)
    model.save_pretrained(tmp_path / "model")
    make_word_tokenizer(tmp_path / "model", CAPTIONS)

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i in range(8):
            pixels = np.clip(np.array(COLOURS[i % 4]) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": CAPTIONS[i % 4]}) + "\n")
    cfg = RunConfig.from_dict(dict(
        model=str(tmp_path / "model"), data=str(tmp_path / "captions.jsonl"),
        image_folder=str(tmp_path / "images"), output_dir=str(tmp_path / "run"), mesh="data=-1",
        batch_size=8, max_length=6, dtype="float32", num_workers=0, steps=4, save_every=4,
        train=dict(stage="all", learning_rate=1e-2, warmup_steps=1),
    ))
    losses = [m["loss"] for m in train(cfg, progress=False)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses

    orbax_to_hf(tmp_path / "run", tmp_path / "hf")
    ref, info = HF.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (ref.config.decoder_start_token_id, ref.config.pad_token_id) == (1, 0)
    pixels, labels = images(), caption_labels()
    with torch.no_grad():
        want = ref.eval()(pixel_values=torch.tensor(pixels), labels=torch.tensor(labels))
    got = load_trained_model(tmp_path / "run")(pixels, labels=labels)
    np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(float(got.loss), want.loss.item(), atol=1e-4)

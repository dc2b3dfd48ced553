"""vipllava-train fine-tunes a VisionEncoderDecoder captioner on image-caption pairs through
the same sharded step, loop and checkpoints as VipLlava, and the result goes back to
transformers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import make_word_tokenizer, traced_and_estimated_flops
from tests.helpers.ved import caption_labels, images, make_hf_ved
from vipllava_jax.convert import hf_to_orbax, orbax_to_hf
from vipllava_jax.models.ved import VisionEncoderDecoderModel
from vipllava_jax.processing.captions import image_preprocessor
from vipllava_jax.train import RunConfig, TrainConfig, init_train_state, load_trained_model, mesh_from_spec, train
from vipllava_jax.train.data import CaptionDataLoader

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
CAPTIONS = {name: f"a {name} square" for name in COLOURS}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A converted ViT + GPT-2 (32 -> 48 wide: enc_to_dec_proj) with a word tokenizer, and 8
    caption records (each colour twice) with 32 px images."""
    root = tmp_path_factory.mktemp("ved_train")
    hf = make_hf_ved("vit", "gpt2", 48, True)
    hf.save_pretrained(root / "hf")
    make_word_tokenizer(root / "hf", list(CAPTIONS.values()))
    hf_to_orbax(root / "hf", root / "model")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(8):
            name = list(COLOURS)[i % 4]
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(root / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": CAPTIONS[name]}) + "\n")
    return hf, root


def test_loss_terms_match_transformers_loss(workspace):
    hf, root = workspace
    model = VisionEncoderDecoderModel.from_pretrained(root / "model")
    pixels, labels = images(), caption_labels()
    nll, count = model.loss_terms({"pixel_values": jnp.asarray(pixels), "labels": jnp.asarray(labels)})
    assert count == np.sum(labels != -100)
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(pixels), labels=torch.tensor(labels)).loss.item()
    np.testing.assert_allclose(float(nll / count), want, rtol=1e-5)


@pytest.mark.parametrize("workers", [(0, "threads"), (2, "processes")], ids=["inline", "processes"])
def test_caption_loader_makes_eos_terminated_labels(workspace, tmp_path, workers):
    from transformers import AutoTokenizer

    _, root = workspace
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([
        json.dumps({"image": "0.png", "caption": "a red square"}),
        json.dumps({"image": "1.png", "text": "a green square a green square"}),  # cut to 4
        json.dumps({"image": "missing.png", "caption": "a blue square"}),
        json.dumps({"image": "2.png"}),
        "{not json",
    ]) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    loader = CaptionDataLoader(data, root / "images", tokenizer, image_preprocessor(root / "model", 32),
                               eos_token_id=2, batch_size=2, max_length=4, shuffle=False, num_epochs=1,
                               num_workers=workers[0], worker_type=workers[1])
    (batch,) = list(loader)
    ids = tokenizer("a red square", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(batch["labels"][0], ids + [2])
    assert batch["labels"][1].tolist() == tokenizer("a green square a", add_special_tokens=False)["input_ids"]
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].dtype == np.float32
    assert loader.stats["truncated"] == 1
    assert (loader.stats["skipped_bad_image"], loader.stats["skipped_malformed"], loader.stats["skipped_bad_json"]) == (1, 1, 1)


@pytest.mark.parametrize("stage", ["decoder", "all"])
def test_model_flops_estimate_counts_the_matmuls_of_a_step(workspace, stage):
    """As for VipLlava (test_train_step): the estimate against the traced step's matmuls, here
    with a tied head, cross-attention keys and values on the encoder's tokens, a projection
    straight off the frozen encoder (no input gradient) and, in stage "all", a trained encoder."""
    _, root = workspace
    model = VisionEncoderDecoderModel.from_pretrained(root / "model")
    batch = {"pixel_values": images(), "labels": caption_labels()}
    traced, estimated = traced_and_estimated_flops(model, stage, batch, model.config.decoder)
    assert traced == pytest.approx(estimated, rel=1e-12)


def test_stage_names_are_checked_against_the_model(workspace):
    _, root = workspace
    model = VisionEncoderDecoderModel.from_pretrained(root / "model")
    with pytest.raises(ValueError, match="VisionEncoderDecoderModel has no stage 'projector'"):
        init_train_state(model, TrainConfig(stage="projector"), mesh_from_spec("data=1", jax.devices()[:1]))


def test_captioner_trains_sharded_and_exports_to_transformers(workspace, tmp_path):
    from transformers import VisionEncoderDecoderModel as HF

    _, root = workspace
    mesh = "data=2,fsdp=4" if jax.device_count() == 8 else "data=-1"
    cfg = RunConfig.from_dict(dict(
        model=str(root / "model"), data=str(root / "captions.jsonl"), image_folder=str(root / "images"),
        output_dir=str(tmp_path / "run"), mesh=mesh, batch_size=8, max_length=6, dtype="float32",
        num_workers=2, steps=30, save_every=30,
        train=dict(stage="all", learning_rate=1e-2, warmup_steps=2, remat="full"),
    ))
    history = train(cfg, progress=False)
    assert history[-1]["loss"] < 0.2 * history[0]["loss"], [m["loss"] for m in history]

    orbax_to_hf(tmp_path / "run", tmp_path / "hf")
    ref, info = HF.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = load_trained_model(tmp_path / "run")
    pixels, labels = images(), caption_labels()
    with torch.no_grad():
        want = ref.eval()(pixel_values=torch.tensor(pixels), labels=torch.tensor(labels)).logits.numpy()
    np.testing.assert_allclose(np.asarray(trained(pixels, labels=labels).logits), want, atol=1e-4)


def test_beit_trocr_captioner_fine_tunes_and_exports(tmp_path, workspace):
    """TrOCR-base's pair (BEiT encoder, TrOCR decoder with an untied output_projection) through
    the same train loop, on the workspace's images and tokenizer; the export loads in transformers."""
    from transformers import VisionEncoderDecoderModel as HF

    from tests.helpers.ved import SHAPES

    _, root = workspace
    hf = make_hf_ved(*SHAPES["beit_trocr"])
    hf.save_pretrained(tmp_path / "hf")
    make_word_tokenizer(tmp_path / "hf", list(CAPTIONS.values()))
    hf_to_orbax(tmp_path / "hf", tmp_path / "model")
    cfg = RunConfig.from_dict(dict(
        model=str(tmp_path / "model"), data=str(root / "captions.jsonl"), image_folder=str(root / "images"),
        output_dir=str(tmp_path / "run"), mesh="data=-1", batch_size=8, max_length=6, dtype="float32",
        num_workers=0, steps=20, save_every=20,
        train=dict(stage="all", learning_rate=1e-2, warmup_steps=2),
    ))
    history = train(cfg, progress=False)
    assert history[-1]["loss"] < 0.3 * history[0]["loss"], [m["loss"] for m in history]

    orbax_to_hf(tmp_path / "run", tmp_path / "out")
    ref, info = HF.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels, labels = images(), caption_labels()
    with torch.no_grad():
        want = ref.eval()(pixel_values=torch.tensor(pixels), labels=torch.tensor(labels)).logits.numpy()
    trained = load_trained_model(tmp_path / "run")
    np.testing.assert_allclose(np.asarray(trained(pixels, labels=labels).logits), want, atol=1e-4)

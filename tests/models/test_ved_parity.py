"""VisionEncoderDecoder: logits and loss against transformers' PyTorch model (fp32, 1e-4).

Every reference is computed here by transformers on tiny random models that transformers builds
and saves itself (`VisionEncoderDecoderModel(config).save_pretrained`). The builders are in
`tests.helpers.ved`, shared by the other `test_ved_*` files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.ved import ATOL, PAD, SHAPES, START, VOCAB, caption_labels, images, torch_out
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.models.ved import VisionEncoderDecoderModel, shift_tokens_right

# -- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_and_loss_match_transformers(hf_veds, name):
    hf, path = hf_veds(name)
    px, labels = images(), caption_labels()
    ref = torch_out(hf, pixel_values=px, labels=labels)
    out = VisionEncoderDecoderModel.from_pretrained(path)(px, labels=labels)
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy()).max() <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL


def test_decoder_inputs_and_attention_mask(hf_veds):
    """Explicit decoder_input_ids with a hole in the mask: the same logits on the real tokens."""
    hf, path = hf_veds("vit_gpt2")
    px = images()
    ids = np.random.default_rng(3).integers(3, VOCAB, (2, 6))
    mask = np.ones((2, 6), np.int64)
    mask[1, 2] = 0  # later tokens of row 1 must not see token 2
    ref = torch_out(hf, pixel_values=px, decoder_input_ids=ids, decoder_attention_mask=mask).logits.numpy()
    ours = np.asarray(VisionEncoderDecoderModel.from_pretrained(path)(px, ids, mask).logits)
    keep = mask.astype(bool)
    assert np.abs(ours - ref)[keep].max() <= ATOL


def test_sharded_restore_on_a_mesh(hf_veds):
    """Parameters restored straight onto a data x fsdp x tensor mesh by the logical axis rules."""
    from vipllava_jax.nn.sharding import make_mesh

    hf, path = hf_veds("vit_bert_proj")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = VisionEncoderDecoderModel.from_pretrained(path, mesh=mesh)
    kernel = model.decoder.bert.encoder.layer[0].intermediate.dense.kernel[...]
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor")  # ("embed", "mlp")
    px, labels = images(), caption_labels()
    ref = torch_out(hf, pixel_values=px, labels=labels)
    assert np.abs(np.asarray(model(px, labels=labels).logits) - ref.logits.numpy()).max() <= ATOL


def test_shift_tokens_right_matches_transformers():
    from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import (
        shift_tokens_right as hf_shift,
    )

    labels = caption_labels()
    ref = hf_shift(torch.tensor(labels), PAD, START).numpy()
    np.testing.assert_array_equal(np.asarray(shift_tokens_right(labels, PAD, START)), ref)


def test_bad_inputs_fail_with_one_line_errors(hf_veds):
    _, path = hf_veds("vit_gpt2")
    model = VisionEncoderDecoderModel.from_pretrained(path)
    with pytest.raises(VipLlavaError, match="pixel_values must be"):
        model(np.zeros((2, 3, 16, 16), np.float32), labels=caption_labels())
    with pytest.raises(VipLlavaError, match="decoder_input_ids or labels"):
        model(images())
    with pytest.raises(VipLlavaError, match="exceed"):
        model(images(), labels=np.ones((2, 65), np.int64))


@pytest.mark.parametrize("name", ["vit_roberta", "vit_trocr_sinusoidal"])
def test_positions_counted_from_the_pad_id(hf_veds, name):
    """RoBERTa's and TrOCR's sinusoidal positions skip pad tokens: pad ids inside the decoder
    input move the later tokens' positions, as in transformers."""
    hf, path = hf_veds(name)
    px = images()
    ids = np.random.default_rng(4).integers(3, VOCAB, (2, 6))
    ids[0, 2] = ids[1, 4:] = PAD
    ref = torch_out(hf, pixel_values=px, decoder_input_ids=ids).logits.numpy()
    ours = np.asarray(VisionEncoderDecoderModel.from_pretrained(path)(px, ids).logits)
    assert np.abs(ours - ref).max() <= ATOL


def test_unsupported_decoders_fail_with_one_line_errors():
    from vipllava_jax.errors import ConfigError
    from vipllava_jax.models.ved import VisionEncoderDecoderConfig

    base = {"model_type": "vision-encoder-decoder", "encoder": {"model_type": "vit", "hidden_size": 32}}
    cases = [
        ({"model_type": "distilbert", "is_decoder": True}, "transformers has no causal-LM DistilBERT"),
        ({"model_type": "trocr", "d_model": 48, "cross_attention_hidden_size": 16}, "differs from the encoder's"),
        ({"model_type": "bart", "d_model": 48, "cross_attention_hidden_size": 32}, "unsupported cross_attention"),
        ({"model_type": "t5"}, "unsupported decoder model_type 't5'"),
    ]
    for decoder, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            VisionEncoderDecoderConfig.from_hf_dict({**base, "decoder": decoder})
        assert "\n" not in str(e.value)


def test_swin_stage_smaller_than_its_window_is_a_one_line_error():
    from vipllava_jax.errors import ConfigError
    from vipllava_jax.models.ved import VisionEncoderDecoderConfig

    encoder = {"model_type": "swin", "image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [2, 2, 2],
               "num_heads": [2, 2, 2], "window_size": 4}  # grids 8, 4, 2: the last is below the window
    decoder = {"model_type": "trocr", "d_model": 64}
    with pytest.raises(ConfigError, match="stage 2's 2x2 grid is smaller than window_size 4"):
        VisionEncoderDecoderConfig.from_hf_dict(
            {"model_type": "vision-encoder-decoder", "encoder": encoder, "decoder": decoder})


@pytest.mark.parametrize("name", ["vit_gpt2_wide", "beit_trocr_wide", "swin_mbart_wide", "donut_mbart_wide"])
def test_non_square_images(tmp_path, name):
    """`image_size: [height, width]` (Donut's are wide): the patch grid, position tables, BEiT's
    bias windows and Swin's stage grids follow both sides; square pixels are refused."""
    from tests.helpers.ved import NON_SQUARE, make_hf_ved, wide_images

    hf = make_hf_ved(*NON_SQUARE[name])
    hf.save_pretrained(tmp_path)
    model = VisionEncoderDecoderModel.from_pretrained(tmp_path)
    px, labels = wide_images(), caption_labels()
    ref = torch_out(hf, pixel_values=px, labels=labels)
    out = model(px, labels=labels)
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy()).max() <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL
    with pytest.raises(VipLlavaError, match=r"pixel_values must be \[batch, 3, 32, 48\]"):
        model(images(), labels=labels)
    if name.endswith("mbart_wide"):
        kw = dict(max_new_tokens=8, pad_token_id=PAD, decoder_start_token_id=START, num_beams=3)
        with torch.no_grad():
            want = hf.generate(torch.tensor(px), do_sample=False, **kw).numpy()
        np.testing.assert_array_equal(model.generate(px, **kw), want)


def test_beit_absolute_positions_on_non_square_images_is_a_one_line_error():
    from vipllava_jax.errors import ConfigError
    from vipllava_jax.models.ved import VisionEncoderDecoderConfig

    encoder = {"model_type": "beit", "image_size": [32, 48], "use_absolute_position_embeddings": True}
    with pytest.raises(ConfigError, match="absolute position embeddings with a non-square image_size"):
        VisionEncoderDecoderConfig.from_hf_dict({"model_type": "vision-encoder-decoder", "encoder": encoder,
                                                 "decoder": {"model_type": "trocr", "d_model": 768}})

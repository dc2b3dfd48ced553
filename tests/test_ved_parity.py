"""VisionEncoderDecoder: logits and loss against transformers' PyTorch model (fp32, 1e-4).

Every reference is computed here by transformers on tiny random models that transformers builds
and saves itself (`VisionEncoderDecoderModel(config).save_pretrained`). The builders below are
shared by the other `test_ved_*` files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.models.ved import VisionEncoderDecoderModel, shift_tokens_right

VOCAB = 61
START, PAD = 1, 0
ATOL = 1e-4

# name -> (encoder type, decoder type, decoder hidden size, tie_word_embeddings)
SHAPES = {
    "vit_gpt2": ("vit", "gpt2", 32, True),
    "vit_bert": ("vit", "bert", 32, True),
    "deit_gpt2_proj": ("deit", "gpt2", 48, False),  # enc_to_dec_proj: 32 -> 48, untied head
    "vit_bert_proj": ("vit", "bert", 48, False),
}


def ved_config(encoder="vit", decoder="gpt2", dec_hidden=32, tied=True):
    from transformers import BertConfig, DeiTConfig, GPT2Config, VisionEncoderDecoderConfig, ViTConfig

    enc_cls = {"vit": ViTConfig, "deit": DeiTConfig}[encoder]
    enc = enc_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    common = dict(vocab_size=VOCAB, is_decoder=True, add_cross_attention=True, tie_word_embeddings=tied,
                  bos_token_id=START, eos_token_id=2, pad_token_id=PAD)
    if decoder == "gpt2":
        dec = GPT2Config(n_embd=dec_hidden, n_layer=2, n_head=4, n_positions=64, **common)
    else:
        dec = BertConfig(hidden_size=dec_hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, **common)
    return VisionEncoderDecoderConfig(encoder=enc.to_dict(), decoder=dec.to_dict(),
                                      decoder_start_token_id=START, pad_token_id=PAD)


def make_hf_ved(*shape, seed=0):
    """A transformers VisionEncoderDecoderModel with every parameter perturbed (so norms and
    biases matter too), in eval mode."""
    from transformers import VisionEncoderDecoderModel as HF

    torch.manual_seed(seed)
    model = HF(ved_config(*shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="session")
def hf_veds(tmp_path_factory):
    """name -> (transformers model, folder written by its save_pretrained), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            model = make_hf_ved(*SHAPES[name])
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return get


def images(batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def caption_labels(batch=2, seq=7, seed=0) -> np.ndarray:
    """Random token labels, the second row ending in -100 (a shorter caption)."""
    labels = np.random.default_rng(seed).integers(3, VOCAB, (batch, seq))
    labels[1, seq - 2:] = -100
    return labels


def torch_out(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()})


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

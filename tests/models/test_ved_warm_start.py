"""VED warm start (`from_encoder_decoder_pretrained`) against transformers' own, on tiny random
encoder and decoder checkpoints that transformers saves: the same weights read, the same new
ones named, and, once transformers' new weights are set to ours, the same logits and loss."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.helpers.ved import ATOL, VOCAB, caption_labels, images, torch_out
from vipllava_jax.checkpoint import model_params
from vipllava_jax.models.ved import VisionEncoderDecoderModel, shift_tokens_right
from vipllava_jax.models.ved.mapping import VED_MAPPING


def save_tiny(tmp_path, encoder: str, decoder: str):
    """An encoder and a decoder checkpoint (every weight perturbed), as transformers saves them."""
    import transformers as tf

    torch.manual_seed(0)
    enc_kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    enc = {"vit_model": lambda: tf.ViTModel(tf.ViTConfig(**enc_kw)),
           "vit_classifier": lambda: tf.ViTForImageClassification(tf.ViTConfig(**enc_kw, num_labels=3))}[encoder]()
    dec_kw = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dec = {
        "gpt2_lm": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, **dec_kw)),
        "bert_model": lambda: tf.BertModel(tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=64, **dec_kw)),
    }[decoder]()
    for model, name in ((enc, "enc"), (dec, "dec")):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(tmp_path / name)
    return tmp_path / "enc", tmp_path / "dec"


@pytest.mark.parametrize("pair", [("vit_model", "gpt2_lm"), ("vit_classifier", "bert_model")],
                         ids=["bare-vit+gpt2-lm-projected", "vit-classifier+bare-bert"])
def test_warm_start_matches_transformers(tmp_path, caplog, pair):
    from transformers import VisionEncoderDecoderModel as HF

    enc, dec = save_tiny(tmp_path, *pair)
    with caplog.at_level(logging.WARNING, logger="vipllava_jax.models.ved.warm_start"):
        ours = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(enc, dec, seed=1)
    (line,) = [r.getMessage() for r in caplog.records if "newly initialised" in r.getMessage()]
    # what transformers' from_encoder_decoder_pretrained does (in transformers 5.25 it fails on a
    # GPT2Config without is_decoder): the decoder loaded with cross-attention added
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    dec_config = AutoConfig.from_pretrained(dec)
    dec_config.is_decoder = dec_config.add_cross_attention = True
    hf = HF(encoder=AutoModel.from_pretrained(enc),
            decoder=AutoModelForCausalLM.from_pretrained(dec, config=dec_config)).eval()

    # transformers' fresh weights set to ours: every other weight must already agree
    params = model_params(ours)
    state = hf.state_dict()
    named = set(line.split(": ", 1)[1].split(", "))
    for path, value in params.items():
        key, leaf = VED_MAPPING.hf_key_for(path, value.ndim)
        if key in named:
            with torch.no_grad():
                state[key].copy_(torch.tensor(np.asarray(leaf.to_hf(np.asarray(value)))))
    assert any(".crossattention." in k for k in named)
    assert ("enc_to_dec_proj.weight" in named) == (pair[1] == "gpt2_lm")
    # a classifier checkpoint has no pooler: ViTModel's is new (and never used by VED)
    assert not any(k.startswith("encoder.") and ".pooler." not in k for k in named)

    px, labels = images(), caption_labels()
    ids = np.asarray(shift_tokens_right(labels, 0, 1))  # a warm-started config has no start / pad ids yet
    ref = torch_out(hf, pixel_values=px, decoder_input_ids=ids, labels=labels)
    out = ours(px, ids, labels=labels)
    assert np.abs(np.asarray(out.logits) - ref.logits.numpy()).max() <= ATOL
    assert abs(float(out.loss) - float(ref.loss)) <= ATOL

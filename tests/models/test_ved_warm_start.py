"""VED warm start (`from_encoder_decoder_pretrained`) against transformers' own, on tiny random
encoder and decoder checkpoints that transformers saves: the same weights read, the same new
ones named, and, once transformers' new weights are set to ours, the same logits and loss."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.helpers.ved import ATOL, caption_labels, images, save_warm_start_pair, torch_out
from vipllava_jax.checkpoint import model_params
from vipllava_jax.models.ved import VisionEncoderDecoderModel, shift_tokens_right
from vipllava_jax.models.ved.mapping import VED_MAPPING


@pytest.mark.parametrize("pair", [("vit_model", "gpt2_lm"), ("vit_classifier", "bert_model")],
                         ids=["bare-vit+gpt2-lm-projected", "vit-classifier+bare-bert"])
def test_warm_start_matches_transformers(tmp_path, caplog, pair):
    from transformers import VisionEncoderDecoderModel as HF

    enc, dec = save_warm_start_pair(tmp_path, *pair)
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

"""VED generate: greedy and beam-search tokens equal transformers' `generate`.

The EOS id of each test is picked from transformers' own output (the token its greedy captions
use most), so that captions really finish early and the finished-beam bookkeeping is exercised.
Settings that only change arrays (length_penalty, early_stopping, EOS id) share one compiled
program, which keeps this file fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import jaxpr_eqns
from tests.helpers.ved import PAD, START, VOCAB, images
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.models.ved import VisionEncoderDecoderModel

MAX_NEW = 10


def hf_generate(hf, px, **kw) -> np.ndarray:
    with torch.no_grad():
        return hf.generate(torch.tensor(px), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD,
                           decoder_start_token_id=START, **kw).numpy()


def frequent_token(hf, px) -> int:
    """The token transformers' greedy captions use most (EOS never hit: an id out of vocab)."""
    captions = hf_generate(hf, px, eos_token_id=VOCAB + 5)[:, 1:]
    return int(np.bincount(captions.reshape(-1), minlength=VOCAB).argmax())


@pytest.fixture(scope="module")
def gpt2(hf_veds):
    hf, path = hf_veds("vit_gpt2")
    px = images(batch=3, seed=1)
    return hf, VisionEncoderDecoderModel.from_pretrained(path), px, frequent_token(hf, px)


def check(hf, ours, px, **kw):
    ref = hf_generate(hf, px, **kw)
    got = ours.generate(px, max_new_tokens=MAX_NEW, pad_token_id=PAD, decoder_start_token_id=START, **kw)
    np.testing.assert_array_equal(got, ref)
    return ref


def test_greedy_gpt2(gpt2):
    hf, ours, px, eos = gpt2
    ref = check(hf, ours, px, eos_token_id=eos)
    assert (ref[:, 1:] == eos).any(), "EOS should end some caption early"
    check(hf, ours, px, eos_token_id=[eos, 3])  # several EOS ids, same program


def test_greedy_no_repeat_ngram(gpt2):
    hf, ours, px, eos = gpt2
    check(hf, ours, px, eos_token_id=eos, no_repeat_ngram_size=2)


@pytest.mark.parametrize("kw", [
    dict(length_penalty=1.0, early_stopping=False),
    dict(length_penalty=0.5, early_stopping=True),
    dict(length_penalty=2.0, early_stopping="never"),
    dict(length_penalty=-1.0, early_stopping=False),
], ids=["default", "lp0.5-early", "lp2-never", "lp-1"])
def test_beam_search_gpt2(gpt2, kw):
    hf, ours, px, eos = gpt2
    check(hf, ours, px, num_beams=3, eos_token_id=eos, **kw)


def test_beam_search_no_repeat_ngram(gpt2):
    hf, ours, px, eos = gpt2
    check(hf, ours, px, num_beams=3, eos_token_id=eos, no_repeat_ngram_size=2, length_penalty=0.7)


def test_bert_decoder_greedy_and_beams(hf_veds):
    hf, path = hf_veds("vit_bert_proj")
    ours = VisionEncoderDecoderModel.from_pretrained(path)
    px = images(batch=2, seed=2)
    eos = frequent_token(hf, px)
    check(hf, ours, px, eos_token_id=eos)
    check(hf, ours, px, num_beams=4, eos_token_id=eos, early_stopping=True)


def test_sampling_is_seeded_and_top_k_1_is_greedy(gpt2):
    _, ours, px, eos = gpt2
    kw = dict(max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, decoder_start_token_id=START)
    a = ours.generate(px, do_sample=True, seed=3, **kw)
    np.testing.assert_array_equal(a, ours.generate(px, do_sample=True, seed=3, **kw))
    greedy = ours.generate(px, **kw)
    np.testing.assert_array_equal(ours.generate(px, do_sample=True, top_k=1, seed=4, **kw), greedy)


def test_bad_generate_arguments(gpt2):
    _, ours, px, _ = gpt2
    with pytest.raises(VipLlavaError, match="max_new_tokens"):
        ours.generate(px, max_new_tokens=64)
    with pytest.raises(VipLlavaError, match="beam sampling"):
        ours.generate(px, num_beams=2, do_sample=True)
    with pytest.raises(VipLlavaError, match="decoder_start_token_id"):
        ours.generate(px, decoder_start_token_id=VOCAB)
    with pytest.raises(VipLlavaError, match="early_stopping"):
        ours.generate(px, num_beams=2, early_stopping="sometimes")


@pytest.mark.parametrize("beams", [1, 3])
def test_decode_loop_runs_the_forward_pass_outside_any_conditional(gpt2, beams):
    """As VipLlava's decode loop (tests/models/test_generate.py): a cond holding the self-attention
    cache made XLA copy it at every step; only the greedy/sampled pick may branch."""
    import jax

    from vipllava_jax.models.ved import generate as vg
    from vipllava_jax.models.vipllava.generate import SamplingParams

    _, ours, px, _ = gpt2
    if beams == 1:
        sampling = SamplingParams.create(pad_id=PAD)

        def run():
            return vg.greedy_or_sample(ours, px, MAX_NEW, 0, START, sampling, jax.random.key(0))
    else:
        params = vg.BeamParams(denom=jax.numpy.ones(MAX_NEW + 1), early_true=jax.numpy.bool_(False),
                               use_max_len=jax.numpy.bool_(False))  # arrays, as the jitted call gets

        def run():
            return vg.beam_search(ours, px, MAX_NEW, beams, 1, 0, START, PAD, np.full(8, -1, np.int32), params)
    closed = jax.make_jaxpr(run)()
    (loop,) = [e for e in jaxpr_eqns(closed.jaxpr) if e.primitive.name == "while"]
    cache_shapes = {v.aval.shape for v in loop.invars  # the self-attention cache, [rows*N, S, H]
                    if v.aval.ndim == 3 and np.issubdtype(v.aval.dtype, np.floating)}
    assert cache_shapes
    body = list(jaxpr_eqns(loop.params["body_jaxpr"].jaxpr, skip=("cond",)))
    conds = [e for e in body if e.primitive.name == "cond"]
    assert len(conds) == (1 if beams == 1 else 0)
    for eqn in conds:
        assert not cache_shapes & {v.aval.shape for v in eqn.invars}, "the cache is an operand of a cond"
    assert any(e.primitive.name == "dot_general" for e in body)


# One pair per decoder (and per encoder the others do not already pair with): TrOCR on BEiT,
# sinusoidal TrOCR, BART, mBART on Swin, RoBERTa.
@pytest.mark.parametrize("name", ["beit_trocr", "vit_trocr_sinusoidal", "vit_bart_proj", "swin_mbart", "vit_roberta"])
def test_other_decoders_greedy_and_beams(hf_veds, name):
    """TrOCR (learned and sinusoidal positions), BART, mBART and RoBERTa decoders, TrOCR on a
    BEiT encoder (TrOCR-base's pair) and mBART on Swin (Donut's). BART's and
    mBART's configs set forced_eos_token_id (2): captions that reach the length limit end in it."""
    hf, path = hf_veds(name)
    ours = VisionEncoderDecoderModel.from_pretrained(path)
    px = images(batch=3, seed=1)
    eos = frequent_token(hf, px)
    check(hf, ours, px, eos_token_id=eos)
    check(hf, ours, px, num_beams=3, eos_token_id=eos, no_repeat_ngram_size=2, length_penalty=0.5,
          early_stopping=True)
    if "bart" in name:
        ref = check(hf, ours, px, eos_token_id=VOCAB + 5)  # no EOS: every caption runs to the limit
        assert (ref[:, -1] == 2).all()


def test_forced_bos_and_eos(hf_veds):
    """forced_bos_token_id fixes the first generated token, forced_eos_token_id the last one."""
    hf, path = hf_veds("deit_trocr")
    ours = VisionEncoderDecoderModel.from_pretrained(path)
    px = images(batch=2, seed=2)
    for kw in (dict(), dict(num_beams=3)):
        ref = check(hf, ours, px, eos_token_id=VOCAB + 5, forced_bos_token_id=7, forced_eos_token_id=[5, 9], **kw)
        assert (ref[:, 1] == 7).all() and np.isin(ref[:, -1], [5, 9]).all()

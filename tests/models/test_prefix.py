"""A caller-held KV cache (`use_cache` / `past_key_values`) decoding one token per call, and a
prompt prefix (image + system prompt) cached once for several questions: the tokens equal
`generate`'s, which equal transformers' (tests/models/test_generate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import IMAGE_TOKEN, make_hf_model, make_inputs
from vipllava_jax import VipLlavaError, VipLlavaForConditionalGeneration
from vipllava_jax.models.vipllava.prefix import Cache, cache_prefix, generate_from_prefix


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_model()
    path = tmp_path_factory.mktemp("prefix")
    hf.save_pretrained(path)
    return hf, VipLlavaForConditionalGeneration.from_pretrained(path)


def prompts(config, **kw):
    inputs = make_inputs(config, **kw)
    inputs.pop("labels")
    return inputs


def test_step_by_step_decoding_equals_generate(pair):
    hf, model = pair
    inputs = prompts(hf.config, batch=2, seq=14, left_pad=(0, 3))
    n = 10
    want = model.generate(**inputs, max_new_tokens=n, eos_token_id=[])[:, -n:]
    out = model(**inputs, use_cache=True, cache_length=14 + n)
    assert isinstance(out.past_key_values, Cache) and out.past_key_values.capacity == 14 + n
    tokens = [np.asarray(out.logits[:, -1]).argmax(-1)]
    mask = inputs["attention_mask"]
    for step in range(n - 1):
        mask = np.concatenate([mask, np.ones((2, 1), mask.dtype)], axis=1)
        # transformers' convention: the mask covers the past and the new token
        out = model(tokens[-1][:, None], attention_mask=mask, past_key_values=out.past_key_values)
        assert int(out.past_key_values.length) == 14 + step + 1
        tokens.append(np.asarray(out.logits[:, -1]).argmax(-1))
    np.testing.assert_array_equal(np.stack(tokens, 1), want)


def test_cached_chunks_equal_one_forward_and_transformers_logits(pair):
    """A prompt fed in two chunks gives transformers' logits of the whole prompt."""
    hf, model = pair
    inputs = prompts(hf.config, batch=2, seq=14, left_pad=(0, 0))
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    first = model(inputs["input_ids"][:, :9], inputs["pixel_values"], use_cache=True, cache_length=16)
    second = model(inputs["input_ids"][:, 9:], past_key_values=first.past_key_values)
    logits = np.concatenate([np.asarray(first.logits), np.asarray(second.logits)], axis=1)
    assert np.abs(logits - ref).max() <= 1e-4


def test_cache_errors_are_one_line(pair):
    hf, model = pair
    inputs = prompts(hf.config, batch=2, seq=14, left_pad=(0, 3))
    cache = model(**inputs, use_cache=True, cache_length=15).past_key_values
    cases = [
        (dict(input_ids=np.ones((2, 2), np.int32), past_key_values=cache), "cannot take 2 more"),
        (dict(input_ids=np.ones((1, 1), np.int32), past_key_values=cache), "holds 2 rows, the inputs 1"),
        (dict(input_ids=np.ones((2, 1), np.int32), past_key_values=cache,
              attention_mask=np.ones((2, 3))), "attention_mask has shape"),
        (dict(input_ids=np.ones((2, 1), np.int32), past_key_values=(1, 2)), "past_key_values must be"),
    ]
    for kw, message in cases:
        with pytest.raises(VipLlavaError, match=message) as err:
            model(**kw)
        assert "\n" not in str(err.value)


def split_prompt(config, seed=0, prefix_len=8, questions=(3, 6, 1, 5)):
    """A prefix (text, image tokens, text) and questions of different lengths after it."""
    inputs = prompts(config, batch=1, seq=prefix_len, left_pad=(0,), seed=seed)
    rng = np.random.default_rng(seed + 1)
    qs = [list(rng.integers(3, IMAGE_TOKEN, q)) for q in questions]
    return inputs["input_ids"], inputs["pixel_values"], qs


@pytest.mark.parametrize("questions", [(3, 6, 1, 5), (4,)])
def test_prefix_cached_once_equals_generate(pair, questions):
    hf, model = pair
    prefix_ids, pixels, qs = split_prompt(hf.config, questions=questions)
    n = 8
    prefix = cache_prefix(model, prefix_ids, pixels)
    batched = generate_from_prefix(model, prefix, qs, max_new_tokens=n, eos_token_id=[])
    assert batched.shape == (len(qs), n)
    for i, q in enumerate(qs):
        full = np.concatenate([prefix_ids, np.asarray(q)[None]], axis=1)
        want = model.generate(full, pixels, max_new_tokens=n, eos_token_id=[])[:, -n:]
        np.testing.assert_array_equal(batched[i:i + 1], want, err_msg=f"question {i}")
        # one after another against the same prefix (it is not consumed)
        alone = generate_from_prefix(model, prefix, [q], max_new_tokens=n, eos_token_id=[])
        np.testing.assert_array_equal(alone, want, err_msg=f"question {i} alone")


def test_prefix_stops_rows_at_eos_and_rejects_bad_questions(pair):
    hf, model = pair
    prefix_ids, pixels, qs = split_prompt(hf.config)
    prefix = cache_prefix(model, prefix_ids, pixels)
    free = generate_from_prefix(model, prefix, qs, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 2])
    stopped = generate_from_prefix(model, prefix, qs, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    first = np.argmax(free[0] == eos)
    np.testing.assert_array_equal(stopped[0, :first + 1], free[0, :first + 1])
    assert (stopped[0, first + 1:] == 0).all()
    for bad, message in [([[IMAGE_TOKEN, 5]], "hold image tokens"), (np.ones(3), "must be \\[N, seq\\]")]:
        with pytest.raises(VipLlavaError, match=message):
            generate_from_prefix(model, prefix, bad, max_new_tokens=2)
    with pytest.raises(VipLlavaError, match="context"):
        generate_from_prefix(model, prefix, qs, max_new_tokens=500)

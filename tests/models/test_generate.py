"""generate() against transformers' PyTorch generate, on tiny random checkpoints."""

import jax
import numpy as np
import pytest
import torch

from tests.helpers import IMAGE_TOKEN, jaxpr_eqns, make_hf_model, make_inputs
from vipllava_jax import VipLlavaError, VipLlavaForConditionalGeneration
from vipllava_jax.models.vipllava import generate as gen


def load_pair(tmp_path, **shape):
    hf = make_hf_model(**shape)
    hf.save_pretrained(tmp_path)
    return hf, VipLlavaForConditionalGeneration.from_pretrained(tmp_path)


def hf_generate(hf, inputs, **kw):
    with torch.no_grad():
        out = hf.generate(
            **{k: torch.tensor(v) for k, v in inputs.items() if k != "labels"}, do_sample=False, **kw
        )
    return out.numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_pair(tmp_path_factory.mktemp("llama"))


def prompts(config, **kw):
    inputs = make_inputs(config, **kw)
    inputs.pop("labels")
    return inputs


@pytest.mark.parametrize("left_pad", [(0, 3), (5, 0, 2), (0, 4, 1, 6, 2)])  # 5 rows: CPU plain-dot decode
def test_greedy_matches_transformers_left_padded_batch(llama, left_pad):
    hf, model = llama
    inputs = prompts(hf.config, batch=len(left_pad), seq=15, left_pad=left_pad)
    ref = hf_generate(hf, inputs, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    ours = model.generate(**inputs, max_new_tokens=12, pad_token_id=0, eos_token_id=[])
    np.testing.assert_array_equal(ours, ref)


def test_greedy_matches_transformers_multi_turn_two_images(llama):
    hf, model = llama
    # a multi-turn prompt: text, image, answer, second image, question (two images per row)
    inputs = prompts(hf.config, batch=2, seq=24, images_per_row=2, left_pad=(0, 4))
    ref = hf_generate(hf, inputs, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    ours = model.generate(**inputs, max_new_tokens=8, pad_token_id=0, eos_token_id=[])
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("shape", [dict(text_model="mistral", sliding_window=6), dict(tied=True, num_kv_heads=4)])
def test_greedy_matches_transformers_other_backbones(tmp_path, shape):
    hf, model = load_pair(tmp_path, **shape)
    inputs = prompts(hf.config, batch=2, seq=16, left_pad=(2, 0))
    ref = hf_generate(hf, inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    ours = model.generate(**inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=[])
    np.testing.assert_array_equal(ours, ref)


def test_eos_stops_rows_and_pads_after(llama):
    hf, model = llama
    inputs = prompts(hf.config, batch=2, seq=15, left_pad=(0, 3))
    free = model.generate(**inputs, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 15 + 2])  # row 0's third new token becomes EOS
    ref = hf_generate(hf, inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=eos)
    ours = model.generate(**inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=eos)
    n = ref.shape[1]  # transformers stops early when every row is done
    np.testing.assert_array_equal(ours[:, :n], ref)
    assert (ours[:, n:] == 0).all()
    first = list(ours[0, 15:]).index(eos)
    assert (ours[0, 15 + first + 1:] == 0).all()
    # several EOS ids: stop on any of them
    second = int(free[1, 15 + 1])
    multi = model.generate(**inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=[eos, second])
    assert (multi[1, 15 + 2:] == 0).all()


def test_cached_logits_equal_uncached_forward(llama):
    """Prefill + cached decode steps give the logits of a full forward over the same tokens."""
    import jax
    from flax import nnx

    hf, model = llama
    inputs = prompts(hf.config, batch=2, seq=15, left_pad=(0, 3))
    ids, pix, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    sampling = gen.SamplingParams.create()  # greedy, no EOS: every row runs to the end
    graphdef, params = nnx.split(model)
    state = gen.prefill_jit(graphdef, params, ids, pix, mask, 8, jax.random.key(0), sampling)
    forced = np.random.default_rng(1).integers(3, IMAGE_TOKEN, (2, 4))  # teacher-forced tokens
    for steps in range(4):
        seq = np.concatenate([ids, forced[:, :steps]], axis=1)
        full_mask = np.concatenate([mask, np.ones((2, steps), mask.dtype)], axis=1)
        positions = np.maximum(np.cumsum(full_mask, -1) - 1, 0)
        ref = np.asarray(model(seq, pix, full_mask, position_ids=positions).logits[:, -1])
        np.testing.assert_allclose(np.asarray(state.logits), ref, atol=1e-4)
        assert int(state.step) == steps + 1
        # overwrite the token just picked: the next decode step feeds the forced one
        state = state.replace(tokens=state.tokens.at[:, steps].set(forced[:, steps]))
        state = gen.decode_jit(graphdef, params, state, sampling, np.int32(steps + 2))


def test_decode_loop_runs_the_forward_pass_outside_any_conditional(llama):
    """A decode step whose forward pass sat in a `lax.cond`, with the KV cache as an operand,
    made XLA copy every layer's cache twice per step (the optimized HLO of the 7B decode loop
    for an H200: 128 copies of 6.3 MB per token). The loop body may branch (greedy or
    sampled pick) on small operands only."""
    from flax import nnx

    hf, model = llama
    inputs = prompts(hf.config, batch=2, seq=15)
    sampling = gen.SamplingParams.create()  # greedy, no EOS: every row runs to the end
    graphdef, params = nnx.split(model)
    state = gen.prefill_jit(graphdef, params, inputs["input_ids"], inputs["pixel_values"],
                         inputs["attention_mask"], 8, jax.random.key(0), sampling)
    closed = jax.make_jaxpr(gen.decode_fn, static_argnums=0)(graphdef, params, state, sampling, np.int32(8))
    (loop,) = [e for e in jaxpr_eqns(closed.jaxpr) if e.primitive.name == "while"]
    body = list(jaxpr_eqns(loop.params["body_jaxpr"].jaxpr, skip=("cond",)))  # not inside branches
    conds = [e for e in body if e.primitive.name == "cond"]
    assert len(conds) == 1, "the greedy/sampled pick is expected to be the one branch"
    operands = [v.aval.shape for v in conds[0].invars]
    assert state.cache[0][0].shape not in operands, f"the KV cache is an operand of a cond: {operands}"
    # the forward pass is in the body itself: 7 projections per layer, then attention's 2 dots
    n_layers = hf.config.text_config.num_hidden_layers
    assert sum(e.primitive.name == "dot_general" for e in body) >= 9 * n_layers


def test_sampling_is_reproducible_per_seed(llama):
    hf, model = llama
    inputs = prompts(hf.config, batch=2, seq=15)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, eos_token_id=[])
    a = model.generate(**inputs, seed=1, **kw)
    assert np.array_equal(a, model.generate(**inputs, seed=1, **kw))
    assert any(not np.array_equal(a, model.generate(**inputs, seed=s, **kw)) for s in (2, 3, 4))
    # top_k=1 is greedy whatever the temperature
    greedy = model.generate(**inputs, max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(model.generate(**inputs, seed=5, top_k=1, **kw), greedy)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.3), (20, 0.5)])
def test_filters_keep_the_same_support_as_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32) * 3
    ours = np.asarray(gen.filter_logits(logits, np.float32(0.7), np.int32(top_k), np.float32(top_p)))
    ref = torch.tensor(logits) / 0.7
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    np.testing.assert_array_equal(np.isfinite(ours), torch.isfinite(ref).numpy())


def test_sampled_tokens_stay_in_the_top_k_support(llama):
    hf, model = llama
    inputs = prompts(hf.config, batch=2, seq=15)
    first = np.asarray(model(**inputs).logits[:, -1])  # prefill logits of the next token
    allowed = np.argsort(first, -1)[:, -3:]
    for seed in range(12):
        out = model.generate(**inputs, max_new_tokens=1, do_sample=True, temperature=5.0,
                             top_k=3, seed=seed, eos_token_id=[])
        for row in range(2):
            assert out[row, -1] in allowed[row]


def test_cpu_decode_of_larger_batches_skips_ynn_fusions(llama):
    """Batches of >= 4 rows decode with the program compiled without YNNPACK matmul fusions
    (its tokens are checked against transformers by the 5-row case above)."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU-only choice")
    hf, model = llama
    before = gen.decode_plain_dots._cache_size()
    model.generate(**prompts(hf.config, batch=4, seq=15, left_pad=(0, 1)), max_new_tokens=3, eos_token_id=[])
    assert gen.plain_dots_supported() and gen.decode_plain_dots._cache_size() >= max(before, 1)


def test_prompt_buckets_reuse_the_compiled_program(llama):
    hf, model = llama
    model.generate(**prompts(hf.config, batch=2, seq=13), max_new_tokens=4, eos_token_id=[])
    size = gen.prefill_jit._cache_size()
    model.generate(**prompts(hf.config, batch=2, seq=15), max_new_tokens=4, eos_token_id=[5])
    assert gen.prefill_jit._cache_size() == size  # 13 and 15 share the bucket of 16


def test_streaming_yields_the_same_tokens(llama):
    hf, model = llama
    inputs = prompts(hf.config, batch=2, seq=15, left_pad=(0, 3))
    full = model.generate(**inputs, max_new_tokens=7, eos_token_id=[])
    pieces = list(model.generate_stream(**inputs, max_new_tokens=7, eos_token_id=[]))
    assert len(pieces) == 7
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), full[:, 15:])
    seen = []
    via_callback = model.generate(**inputs, max_new_tokens=7, eos_token_id=[], streamer=seen.append)
    np.testing.assert_array_equal(via_callback, full)
    assert sum(p.shape[1] for p in seen) == 7


def test_bad_input_is_caught_before_compiling(llama):
    hf, model = llama
    inputs = prompts(hf.config, batch=2, seq=15)
    extra = inputs["input_ids"].copy()
    extra[0, -1] = IMAGE_TOKEN
    with pytest.raises(VipLlavaError, match="image tokens and image features"):
        model.generate(extra, inputs["pixel_values"], inputs["attention_mask"])
    with pytest.raises(VipLlavaError, match="image tokens and image features"):
        model.generate(inputs["input_ids"], inputs["pixel_values"][:1], inputs["attention_mask"])
    with pytest.raises(VipLlavaError, match="exceeds the model's context"):
        model.generate(**inputs, max_new_tokens=1000)
    with pytest.raises(VipLlavaError, match="attention_mask has shape"):
        model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"][:1])


def test_generate_on_a_mesh_matches_single_device(tmp_path):
    import jax

    from vipllava_jax import make_mesh
    from vipllava_jax.convert import hf_to_orbax

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    hf_to_orbax(tmp_path / "hf", tmp_path / "orbax")
    single = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "orbax")
    sharded = VipLlavaForConditionalGeneration.from_pretrained(
        tmp_path / "orbax", mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    inputs = prompts(hf.config, batch=4, seq=15, left_pad=(0, 3))
    np.testing.assert_array_equal(
        sharded.generate(**inputs, max_new_tokens=6, eos_token_id=[]),
        single.generate(**inputs, max_new_tokens=6, eos_token_id=[]),
    )


def full_word_tokenizer(path):
    """A word-level tokenizer naming every id of the tiny vocabulary (w5 ... w127), so that
    transformers' stop-string tables cover every token the random model can pick; "abcdef" is
    the prefix its table builder reads tokens after."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import VOCAB

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "abcdef": 4, "<image>": IMAGE_TOKEN}
    vocab.update({f"w{i}": i for i in range(5, VOCAB) if i != IMAGE_TOKEN})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


@pytest.mark.parametrize("kind", ["one token", "overhang", "two tokens"])
def test_stop_strings_match_transformers(llama, tmp_path, kind):
    """stop_strings + tokenizer= stop each row where transformers' generate stops it: a stop
    string that is one token (an extra EOS inside the compiled loop), one that is the start of
    a token's text, and one spread over two tokens (checked on the host)."""
    hf, model = llama
    tokenizer = full_word_tokenizer(tmp_path)
    inputs = prompts(hf.config, batch=2, seq=15, left_pad=(0, 3))
    free = model.generate(**inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=[])[:, 15:]
    words = [tokenizer.convert_ids_to_tokens(int(t)) for t in free[0]]
    assert None not in words
    stop = {"one token": words[3], "overhang": words[3][:2], "two tokens": f"{words[2]} {words[3]}"}[kind]
    # with an EOS id transformers pads the rows its stop strings end, as generate always does
    ref = hf_generate(hf, inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=2,
                      stop_strings=[stop], tokenizer=tokenizer)
    ours = model.generate(**inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=2,
                          stop_strings=[stop], tokenizer=tokenizer)
    n = ref.shape[1]  # transformers stops early when every row is done
    assert (ref[0, 15 + 4:] == 0).all(), (stop, free, ref[:, 15:])  # row 0 stopped by its 4th new token
    np.testing.assert_array_equal(ours[:, :n], ref)
    assert (ours[:, n:] == 0).all()
    pieces = list(model.generate_stream(**inputs, max_new_tokens=10, pad_token_id=0, eos_token_id=2,
                                        stop_strings=stop, tokenizer=tokenizer, chunk=3))
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), ours[:, 15:15 + sum(p.shape[1] for p in pieces)])


def test_stop_strings_need_a_tokenizer_and_text(llama):
    hf, model = llama
    inputs = prompts(hf.config, batch=1, seq=15, left_pad=(0,))
    with pytest.raises(VipLlavaError, match="tokenizer="):
        model.generate(**inputs, stop_strings=["###"])
    with pytest.raises(VipLlavaError, match="non-empty strings"):
        model.generate(**inputs, stop_strings=[""], tokenizer=object())


@pytest.mark.parametrize("kw, match", [
    (dict(do_sample=True, temperature=float("inf")), "temperature"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_sampling_knobs_are_one_line_errors(llama, kw, match):
    hf, model = llama
    inputs = prompts(hf.config, batch=1, seq=15, left_pad=(0,))
    with pytest.raises(VipLlavaError, match=match):
        model.generate(**inputs, **kw)

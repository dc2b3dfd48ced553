"""Captioning: greedy, sampled or beam-search decoding, one compiled program per shape.

    pixel_values [B, C, H, W] --encoder, once--> CrossKV (each layer's cross-attention k/v)
    start token [B*K, 1] --decoder--> self-attention KV cache [B*K*N, 1 + max_new, H], logits
    --lax.while_loop--> pick the next token(s), write them, run the decoder on them alone
      against the cache; stop when every row is done (or, for beams, cannot improve)

K is the number of beams (1 for greedy and sampling). Rows are beam-major per image (image 0's
K beams, then image 1's ...); the cross-attention k/v stay `[B, ...]`, shared by an image's
beams, so reordering beams only gathers the self-attention cache.

Beam search follows transformers' (v5) vectorised beam search step by step, including its
float32 arithmetic, so the tokens are equal: the top 2K continuations of sum-logprob, the K best
unfinished ones continue, finished ones (EOS, or the length limit) enter a K-slot list scored by
sum-logprob / length ** length_penalty, and the early-stop heuristic of `early_stopping`
(True / False / "never") decides when to stop. Knobs that change per call are arrays (the
sampling params, the length-penalty denominators, the EOS ids), so they never recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.nn.layers import KVCache
from vipllava_jax.nn.sampling import SamplingParams, eos_array, pick

NEG = -1.0e9  # transformers' "never pick this" score offset


@struct.dataclass
class BeamParams:
    """Beam-search knobs as arrays (changing them never recompiles)."""

    denom: jax.Array  # f32 [max_new + 1]: length ** length_penalty, as float32(Python float)
    early_true: jax.Array  # bool []: early_stopping is True
    use_max_len: jax.Array  # bool []: early_stopping == "never" and length_penalty > 0


@struct.dataclass
class GreedyState:
    step: jax.Array  # i32 [], tokens generated so far
    tokens: jax.Array  # i32 [B, 1 + max_new]: the start token, then the generated ones
    done: jax.Array  # bool [B]
    logits: jax.Array  # f32 [B, V], for the next token
    cache: KVCache


@struct.dataclass
class BeamState:
    step: jax.Array  # i32 [], tokens generated so far (the current length is 1 + step)
    running: jax.Array  # i32 [B, K, L], the K live hypotheses (L = 1 + max_new)
    running_scores: jax.Array  # f32 [B, K], their sum-logprobs
    sequences: jax.Array  # i32 [B, K, L], the K best finished hypotheses
    scores: jax.Array  # f32 [B, K], their length-penalised scores (-1e9: empty slot)
    finished: jax.Array  # bool [B, K], slot holds a finished hypothesis
    lengths: jax.Array  # i32 [B, K], generated tokens of each finished hypothesis
    improvable: jax.Array  # bool [B, 1], the early-stop heuristic says keep going
    go_on: jax.Array  # bool [], transformers' "has unfinished sequences"
    logits: jax.Array  # f32 [B*K, V], for the next token of each live hypothesis
    cache: KVCache


# -- logits processing -------------------------------------------------------------------------

def ban_repeated_ngrams(scores: jax.Array, seqs: jax.Array, cur_len, n: int) -> jax.Array:
    """transformers' NoRepeatNGramLogitsProcessor: -inf for every token that would repeat an
    n-gram already in `seqs[:, :cur_len]` (`scores [R, V]`, `seqs [R, L]`).

    Static shapes: every window start i is tested; a window counts when it lies inside the
    current sequence (i + n <= cur_len) and its first n-1 tokens equal the last n-1 tokens.
    """
    rows, length = seqs.shape
    windows = length - n + 1
    if n < 1 or windows < 1:
        return scores
    grams = jnp.stack([seqs[:, j:j + windows] for j in range(n)], axis=-1)  # [R, W, n]
    tail = jax.lax.dynamic_slice_in_dim(seqs, jnp.maximum(cur_len - (n - 1), 0), n - 1, axis=1)  # [R, n-1]
    inside = jnp.arange(windows) + n <= cur_len  # [W]
    match = jnp.all(grams[:, :, :-1] == tail[:, None, :], axis=-1) & inside[None]  # [R, W]
    banned = jnp.zeros(scores.shape, bool).at[jnp.arange(rows)[:, None], grams[:, :, -1]].max(match)
    return jnp.where(banned, -jnp.inf, scores)


@struct.dataclass
class Forced:
    """transformers' ForcedBOS/ForcedEOS logits processors: the first generated token is `bos`
    and the one at the length limit is one of `eos` (-1: none), as arrays (no recompiles)."""

    bos: jax.Array  # i32 []
    eos: jax.Array  # i32 [E], padded with -1


def force_tokens(scores: jax.Array, cur_len, length: int, forced: Forced) -> jax.Array:
    """At `cur_len` 1 every score but BOS's is -inf, at `length - 1` every score but the EOS ids'
    (the allowed ones become 0, as transformers sets them)."""
    vocab = jnp.arange(scores.shape[-1])
    bos_only = jnp.where(vocab == forced.bos, 0.0, -jnp.inf).astype(scores.dtype)
    eos_only = jnp.where(jnp.any(vocab[:, None] == forced.eos[None], axis=-1), 0.0, -jnp.inf).astype(scores.dtype)
    scores = jnp.where((cur_len == 1) & (forced.bos >= 0), bos_only[None], scores)
    return jnp.where((cur_len == length - 1) & jnp.any(forced.eos >= 0), eos_only[None], scores)


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


# -- the two decoders --------------------------------------------------------------------------

def _start(model, pixel_values, rows: int, length: int, start_id):
    """Encoder once, then the start token of every row at cache slot 0."""
    cross_kv = model.cross_kv(pixel_values)  # per layer, [B, S_enc, N, H] x 2
    dec = model.decoder
    first = jnp.full((rows, 1), start_id, jnp.int32)
    hidden, cache = dec(first, cross_kv, cache=dec.init_cache(rows, length), index=0)
    return cross_kv, dec.logits(hidden)[:, 0].astype(jnp.float32), cache


def _step_forward(model, cross_kv, tokens: jax.Array, cache: KVCache, slot):
    """Logits `[R, V]` for the token after `tokens [R]`, written at cache slot `slot`."""
    hidden, cache = model.decoder(tokens[:, None], cross_kv, cache=cache, index=slot)
    return model.decoder.logits(hidden)[:, 0].astype(jnp.float32), cache


def greedy_or_sample(model, pixel_values, max_new: int, ngram: int, start_id, sampling: SamplingParams,
                     rng, forced: Forced | None = None) -> GreedyState:
    b = pixel_values.shape[0]
    length = 1 + max_new
    cross_kv, logits, cache = _start(model, pixel_values, b, length, start_id)
    tokens = jnp.full((b, length), sampling.pad_id, jnp.int32).at[:, 0].set(start_id)

    def advance(s: GreedyState) -> GreedyState:
        """The next token from `s.logits`, written after the `1 + s.step` tokens so far."""
        cur_len = 1 + s.step
        scores = ban_repeated_ngrams(s.logits, s.tokens, cur_len, ngram)
        if forced is not None:
            scores = force_tokens(scores, cur_len, length, forced)
        token, done = pick(scores, rng, s.step, sampling, s.done)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, cur_len))
        return s.replace(step=s.step + 1, tokens=tokens, done=done)

    def body(s: GreedyState) -> GreedyState:
        # One forward pass per step, for the last token (at index s.step), outside any cond:
        # a cond holding the cache made XLA copy it every step (see vipllava_jax.models.vipllava.generate).
        last = jax.lax.dynamic_index_in_dim(s.tokens, s.step, axis=1, keepdims=False)
        logits, cache = _step_forward(model, cross_kv, last, s.cache, s.step)
        return advance(s.replace(logits=logits, cache=cache))

    state = advance(GreedyState(step=jnp.int32(0), tokens=tokens, done=jnp.zeros((b,), bool), logits=logits,
                             cache=cache))
    return jax.lax.while_loop(lambda s: (s.step < max_new) & ~jnp.all(s.done), body, state)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x `[B, M, ...]` at `index [B, K]` along axis 1 -> `[B, K, ...]` (transformers' _gather_beams)."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(model, pixel_values, max_new: int, num_beams: int, n_eos: int, ngram: int, start_id,
                fill_id, eos_ids, params: BeamParams, forced: Forced | None = None) -> BeamState:
    b, k = pixel_values.shape[0], num_beams
    length = 1 + max_new
    keep = max(2, 1 + n_eos) * k  # candidates per step: enough that K of them did not finish
    top_k_mask = jnp.arange(keep) < k  # only the K best candidates may finish
    cross_kv, logits, cache = _start(model, pixel_values, b * k, length, start_id)
    running = jnp.full((b, k, length), fill_id, jnp.int32).at[:, :, 0].set(start_id)
    state = BeamState(
        step=jnp.int32(0), running=running,
        running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),  # all beams start equal
        sequences=running, scores=jnp.full((b, k), NEG, jnp.float32), finished=jnp.zeros((b, k), bool),
        lengths=jnp.zeros((b, k), jnp.int32), improvable=jnp.ones((b, 1), bool), go_on=jnp.bool_(True),
        logits=logits, cache=cache,
    )

    def select(s: BeamState) -> BeamState:
        """Beam bookkeeping for the next token from `s.logits`; the cache follows the parents."""
        cur_len = 1 + s.step
        vocab = s.logits.shape[-1]
        log_probs = jax.nn.log_softmax(s.logits, axis=-1)  # [B*K, V]
        log_probs = ban_repeated_ngrams(log_probs, s.running.reshape(b * k, length), cur_len, ngram)
        if forced is not None:
            log_probs = force_tokens(log_probs, cur_len, length, forced)
        log_probs = log_probs.reshape(b, k, vocab) + s.running_scores[:, :, None]
        # 1. the top `keep` continuations over all beams
        top_lp, top_idx = jax.lax.top_k(log_probs.reshape(b, k * vocab), keep)  # [B, keep]
        src_beam, token = top_idx // vocab, top_idx % vocab
        at_cur = jnp.arange(length) == cur_len  # [L]
        cand = jnp.where(at_cur, token[:, :, None], _gather(s.running, src_beam))  # [B, keep, L]
        hits = (cur_len + 1 >= length) | _is_eos(token, eos_ids)  # [B, keep]
        # 2. the K best that did not finish keep running
        run_lp = top_lp + hits.astype(jnp.float32) * NEG
        _, nxt = jax.lax.top_k(run_lp, k)
        running, running_scores = _gather(cand, nxt), _gather(run_lp, nxt)
        parent = _gather(src_beam, nxt)  # [B, K], the beam each continues
        # 3. finished candidates compete for the K finished slots
        just = hits & top_k_mask[None]
        fin = top_lp / params.denom[cur_len]
        fin += (jnp.all(s.finished, axis=-1, keepdims=True) & params.early_true).astype(jnp.float32) * NEG
        fin += (~s.improvable).astype(jnp.float32) * NEG
        fin += (~just).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([s.scores, fin], axis=1)
        _, best = jax.lax.top_k(merged_scores, k)
        sequences = _gather(jnp.concatenate([s.sequences, cand], axis=1), best)
        scores = _gather(merged_scores, best)
        finished = _gather(jnp.concatenate([s.finished, just], axis=1), best)
        lengths = _gather(jnp.concatenate([s.lengths, jnp.full((b, keep), cur_len, jnp.int32)], axis=1), best)
        # 4. the early-stop heuristic, at the new length (cur_len + 1, prompt of 1)
        hyp_len = jnp.where(params.use_max_len, max_new, cur_len)
        best_possible = running_scores[:, :1] / params.denom[hyp_len]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable = s.improvable & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        go_on = jnp.any(improvable) & ~(jnp.all(finished) & params.early_true) & ~jnp.all(hits)
        # 5. reorder the cache to the parents (the loop body then feeds the new tokens)
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)  # [B*K]
        cache = jax.tree.map(lambda c: c.reshape(b * k, -1, *c.shape[1:])[rows].reshape(c.shape), s.cache)
        return BeamState(step=s.step + 1, running=running, running_scores=running_scores, sequences=sequences,
                         scores=scores, finished=finished, lengths=lengths, improvable=improvable, go_on=go_on,
                         logits=s.logits, cache=cache)

    def body(s: BeamState) -> BeamState:
        # one forward pass per step, for the tokens just chosen (at index s.step), as greedy's
        last = jax.lax.dynamic_index_in_dim(s.running, s.step, axis=2, keepdims=False).reshape(-1)
        logits, cache = _step_forward(model, cross_kv, last, s.cache, s.step)
        return select(s.replace(logits=logits, cache=cache))

    return jax.lax.while_loop(lambda s: s.go_on & (s.step < max_new), body, select(state))


# -- compiled entry points ---------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _greedy(graphdef, state, pixel_values, max_new, ngram, start_id, sampling, rng, forced):
    s = greedy_or_sample(nnx.merge(graphdef, state), pixel_values, max_new, ngram, start_id, sampling, rng, forced)
    return s.tokens, s.step


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _beams(graphdef, state, pixel_values, max_new, num_beams, n_eos, ngram, start_id, fill_id, eos_ids, params,
           forced):
    s = beam_search(nnx.merge(graphdef, state), pixel_values, max_new, num_beams, n_eos, ngram, start_id,
                    fill_id, eos_ids, params, forced)
    return s.sequences[:, 0], s.lengths[:, 0]


# -- the user-facing call ----------------------------------------------------------------------

def _first(*values):
    return next((v for v in values if v is not None), None)


def generate(model, pixel_values, *, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
             num_beams=1, length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=0, eos_token_id=None,
             pad_token_id=None, decoder_start_token_id=None, forced_bos_token_id=None, forced_eos_token_id=None,
             seed=0) -> np.ndarray:
    """Token ids `[B, 1 + n]`: the decoder start token, then n <= max_new_tokens new tokens.

    As transformers' `generate` (num_return_sequences=1): n is the length of the longest
    caption in the batch; shorter greedy captions are padded with `pad_token_id`, shorter beam
    captions with pad (or, when pad is 0 or unset, the first EOS id), as transformers does.

    Args:
      pixel_values: float `[B, C, H, W]`.
      num_beams: 1 = greedy (or sampling with `do_sample`); > 1 = beam search.
      length_penalty: beam scores are sum-logprob / length ** length_penalty.
      early_stopping: True (stop when K captions finished), False (stop when the best running
        beam cannot beat the worst finished one, at its current length) or "never".
      no_repeat_ngram_size: > 0 bans repeating any n-gram of that size.
      eos_token_id, pad_token_id, decoder_start_token_id: default to the config's (top level,
        then the decoder's; the start token falls back to the decoder's BOS).
      forced_bos_token_id, forced_eos_token_id: the first generated token / the token at the
        length limit (BART's and mBART's configs set forced_eos_token_id); default to the
        config's, as transformers' generation config reads them.
    """
    cfg = model.config
    model.check_inputs(pixel_values, np.zeros((np.shape(pixel_values)[0], 1), np.int32), None, None)
    if max_new_tokens < 1 or 1 + max_new_tokens > cfg.decoder.max_tokens:
        raise VipLlavaError(f"max_new_tokens must be in [1, {cfg.decoder.max_tokens - 1}], got {max_new_tokens}")
    start = _first(decoder_start_token_id, cfg.decoder_start_token_id, cfg.decoder.bos_token_id)
    if start is None or not 0 <= start < cfg.decoder.vocab_size:
        raise VipLlavaError(f"decoder_start_token_id must be a token id in [0, {cfg.decoder.vocab_size}), got {start}")
    eos = eos_array(_first(eos_token_id, cfg.eos_token_id, cfg.decoder.eos_token_id))
    real_eos = [int(e) for e in eos if e >= 0]
    pad = _first(pad_token_id, cfg.pad_token_id, cfg.decoder.pad_token_id, real_eos[0] if real_eos else None, 0)
    if num_beams < 1:
        raise VipLlavaError(f"num_beams must be >= 1, got {num_beams}")
    if do_sample and num_beams > 1:
        raise VipLlavaError("beam sampling (do_sample with num_beams > 1) is not supported")
    if do_sample and not temperature > 0:
        raise VipLlavaError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise VipLlavaError(f"top_p must be in (0, 1], got {top_p}")
    if early_stopping not in (True, False, "never"):
        raise VipLlavaError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    forced_bos = _first(forced_bos_token_id, cfg.forced_bos_token_id, cfg.decoder.forced_bos_token_id)
    forced = Forced(bos=np.int32(-1 if forced_bos is None else forced_bos), eos=eos_array(
        _first(forced_eos_token_id, cfg.forced_eos_token_id, cfg.decoder.forced_eos_token_id)))
    pixels = jnp.asarray(pixel_values, jnp.float32)
    graphdef, state = nnx.split(model)
    ngram = int(no_repeat_ngram_size or 0)
    if num_beams == 1:
        sampling = SamplingParams.create(do_sample=do_sample, temperature=temperature, top_k=top_k,
                                         top_p=top_p, eos_token_id=real_eos, pad_id=pad)
        tokens, steps = _greedy(graphdef, state, pixels, max_new_tokens, ngram, np.int32(start), sampling,
                                jax.random.key(seed), forced)
        return np.asarray(tokens)[:, : 1 + int(steps)]
    # Python's float power, rounded to float32 as torch rounds the divisor: equal scores.
    denom = np.array([float(n) ** length_penalty if n else 1.0 for n in range(max_new_tokens + 1)], np.float32)
    params = BeamParams(denom=denom, early_true=np.bool_(early_stopping is True),
                        use_max_len=np.bool_(early_stopping == "never" and length_penalty > 0))
    fill = (pad if pad else real_eos[0]) if real_eos else -1
    sequences, lengths = _beams(graphdef, state, pixels, max_new_tokens, num_beams, len(real_eos), ngram,
                                np.int32(start), np.int32(fill), eos, params, forced)
    return np.asarray(sequences)[:, : 1 + int(np.max(lengths))]

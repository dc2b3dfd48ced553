"""Generation: prefill once, then a `lax.while_loop` of cached decode steps (two compiled
programs: the prefill, and the whole decode loop).

    prompt [B, T] (left-padded to a bucket) + images
      --prefill--> KV cache [B*K, T + max_new, H] per layer, logits, the first new token
      --while not all done and step < max_new--> run the decoder on the last token alone
        against the cache (slot T + step - 1), pick the next token (greedy or sampled), write it

Each loop step runs exactly one forward pass, unconditionally: a `lax.cond` that takes the KV
cache as an operand makes XLA copy the cache (docs/performance.md, "The decode loop's history";
`benchmarks/gpu_hlo.py` shows a step's kernels). Everything that changes per call
(sampling knobs, EOS ids, seed) is an array, so calls with the same shapes reuse the compiled
programs. Prompt lengths are rounded up to a bucket for the same reason. The state of a
generation is one dataclass (`DecodeState`), so streaming can run the same decode loop a few
steps at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.models.vipllava.inputs import check_inputs
from vipllava_jax.nn.layers import KVCache
from vipllava_jax.nn.sampling import SamplingParams, eos_array, filter_logits, pick, pick_tokens  # noqa: F401
from vipllava_jax.nn.sharding import logical_to_spec


@struct.dataclass
class DecodeState:
    step: jax.Array  # i32 [], tokens generated so far (>= 1 after the prefill)
    tokens: jax.Array  # i32 [B, N], the new tokens (pad after EOS)
    done: jax.Array  # bool [B]
    logits: jax.Array  # f32 [B, V], the logits that picked the last token, tokens[:, step - 1]
    positions: jax.Array  # i32 [B], RoPE position of the last token (not yet in the cache)
    kv_mask: jax.Array  # bool [B, S], cache slots holding real tokens
    cache: KVCache
    rng: jax.Array  # PRNG key; new token k is drawn with fold_in(rng, k)


def bucket_length(n: int) -> int:
    """Prompt lengths share compiled programs: powers of two up to 256, then multiples of 64
    (an image prompt is >= 577 tokens: coarser buckets would waste prefill compute)."""
    if n <= 256:
        return max(16, 1 << math.ceil(math.log2(max(n, 1))))
    return 64 * math.ceil(n / 64)


# -- the two phases ----------------------------------------------------------------------------
def prefill(model, input_ids, pixel_values, attention_mask, max_new_tokens: int, rng,
            sampling: SamplingParams) -> DecodeState:
    """Runs the vision tower once per image and the decoder once over the whole prompt, and
    picks the first new token."""
    b, t = input_ids.shape
    lm = model.language_model
    embeds = model.embed(input_ids, pixel_values)  # [B, T, D]
    mask = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)  # as transformers' generate
    kv_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), bool)], axis=1)  # [B, S]
    cache = lm.init_cache(b, t + max_new_tokens)
    hidden, cache = lm.extend(embeds, positions, kv_mask, cache, jnp.int32(0))
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0].astype(jnp.float32)  # [B, V]
    token, done = pick(logits, rng, 0, sampling, jnp.zeros((b,), bool))
    tokens = jnp.full((b, max_new_tokens), sampling.pad_id, jnp.int32).at[:, 0].set(token)
    return DecodeState(
        step=jnp.int32(1), tokens=tokens, done=done, logits=logits,
        positions=positions[:, -1] + 1, kv_mask=kv_mask, cache=cache, rng=rng,
    )


def decode(model, state: DecodeState, params: SamplingParams, stop_at) -> DecodeState:
    """Generates until every row is done or `state.step == stop_at`."""
    prompt_len = state.kv_mask.shape[1] - state.tokens.shape[1]

    def cond(s: DecodeState):
        return (s.step < stop_at) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        b = s.tokens.shape[0]
        last = jax.lax.dynamic_slice(s.tokens, (0, s.step - 1), (b, 1))  # [B, 1]
        slot = prompt_len + s.step - 1  # where the last token goes in the cache
        kv_mask = jax.lax.dynamic_update_slice(s.kv_mask, jnp.ones((b, 1), bool), (0, slot))
        embeds = model.language_model.embed_tokens(last)  # [B, 1, D]
        hidden, cache = model.language_model.extend(embeds, s.positions[:, None], kv_mask, s.cache, slot)
        logits = model.logits_from_hidden(hidden)[:, 0].astype(jnp.float32)
        token, done = pick(logits, s.rng, s.step, params, s.done)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        return s.replace(step=s.step + 1, tokens=tokens, done=done, logits=logits,
                         positions=s.positions + 1, kv_mask=kv_mask, cache=cache)

    return jax.lax.while_loop(cond, body, state)


# -- compiled entry points (split once, plain jax.jit) -----------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 5))
def prefill_jit(graphdef, params_state, input_ids, pixel_values, attention_mask, max_new_tokens, rng,
             sampling):
    return prefill(nnx.merge(graphdef, params_state), input_ids, pixel_values, attention_mask,
                   max_new_tokens, rng, sampling)


def decode_fn(graphdef, params_state, state, sampling, stop_at):
    return decode(nnx.merge(graphdef, params_state), state, sampling, stop_at)


decode_jit = jax.jit(decode_fn, static_argnums=0, donate_argnums=2)

# XLA:CPU hands matmuls to YNNPACK by default. In the decode loop every matmul has one row per
# sequence; from a few rows up, XLA's own dot emitter runs them faster (docs/performance.md),
# so on CPU the decode program for batches of at least `PLAIN_DOTS_FROM` rows is compiled
# without YNN fusions. Elsewhere, or if this XLA does not know the option, the default runs.
PLAIN_DOTS_FROM = 4
_PLAIN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
decode_plain_dots = jax.jit(decode_fn, static_argnums=0, donate_argnums=2, compiler_options=_PLAIN_DOTS)


@functools.cache
def plain_dots_supported() -> bool:
    """Whether this XLA:CPU knows the option: one tiny compile, once per process."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=_PLAIN_DOTS).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:  # an XLA without the option refuses to compile
        return False
    return True


def decode_call(graphdef, params_state, state: DecodeState, sampling, stop_at) -> DecodeState:
    """The decode loop (`decode_jit`), compiled for the platform and batch (see above)."""
    rows = state.done.shape[0]
    if jax.default_backend() == "cpu" and rows >= PLAIN_DOTS_FROM and plain_dots_supported():
        return decode_plain_dots(graphdef, params_state, state, sampling, stop_at)
    return decode_jit(graphdef, params_state, state, sampling, stop_at)


def run_generate(graphdef, params_state, input_ids, pixel_values, attention_mask, max_new_tokens,
                 sampling, rng) -> jax.Array:
    """Prefill, then decode to the end: the new tokens `[B, max_new_tokens]` (device arrays
    in, no input checks or bucketing; `generate` does those)."""
    state = prefill_jit(graphdef, params_state, input_ids, pixel_values, attention_mask, max_new_tokens,
                     rng, sampling)
    return decode_call(graphdef, params_state, state, sampling, np.int32(max_new_tokens)).tokens


# -- stop strings (transformers' `stop_strings=`, checked on the host) -------------------------

class StopStrings:
    """transformers' `StopStringCriteria`, checked on the host between decode chunks: a row
    stops at the first new token that completes one of `strings` (the string ends inside that
    token; tokens read as the text they decode to), or at an EOS id. Tokens after the stop
    become `pad_id`, as transformers pads finished rows. The stop token itself stays.

    `device_eos_ids()` are the tokens that hold a whole stop string: those stop rows inside
    the compiled loop already (a one-token separator costs nothing extra); the host check
    finds the stop strings spread over several tokens.
    """

    _PREFIX = "abcdef"  # transformers' trick: decode after a fixed prefix to keep leading spaces

    def __init__(self, strings, tokenizer, eos_ids, pad_id: int, batch: int):
        if isinstance(strings, str):
            strings = [strings]
        strings = list(strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise VipLlavaError(f"stop_strings must be non-empty strings, got {strings!r}")
        if tokenizer is None:
            raise VipLlavaError("stop_strings needs tokenizer= (to read the generated tokens as text)")
        self.strings, self.tokenizer, self.pad_id = strings, tokenizer, pad_id
        self.eos = {int(i) for i in np.atleast_1d(np.asarray(eos_ids, np.int64)) if i >= 0}
        self.text = [""] * batch
        self.stopped = np.zeros(batch, bool)
        base = tokenizer(self._PREFIX, add_special_tokens=False)["input_ids"]
        self._base = tokenizer.convert_ids_to_tokens(base)
        self._texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            token = self.tokenizer.convert_ids_to_tokens(int(token_id))
            full = self.tokenizer.convert_tokens_to_string(self._base + [token]) if token else ""
            i = full.find(self._PREFIX)
            text = full[i + len(self._PREFIX):] if i >= 0 else ""
            self._texts[token_id] = text
        return text

    def device_eos_ids(self) -> list[int]:
        """The vocabulary's tokens whose text holds a whole stop string (candidates found on
        the raw token strings, each confirmed on its decoded text)."""
        cores = [s.strip() for s in self.strings]
        if not all(cores):
            return []
        vocab = self.tokenizer.get_vocab()
        return sorted(i for tok, i in vocab.items()
                      if any(c in tok for c in cores)
                      and any(s in self.token_text(i) for s in self.strings))

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """New tokens `[B, n]` -> the same with `pad_id` after each row's stop."""
        tokens = np.array(tokens)
        for b in range(tokens.shape[0]):
            for k in range(tokens.shape[1]):
                if self.stopped[b]:
                    tokens[b, k:] = self.pad_id
                    break
                t = int(tokens[b, k])
                if t in self.eos:
                    self.stopped[b] = True
                    continue
                before = len(self.text[b])
                self.text[b] += self.token_text(t)
                text = self.text[b]  # a stop string counts when it ends inside the new token
                if any(s in text[max(0, before - len(s) + 1):] for s in self.strings):
                    self.stopped[b] = True
        return tokens


# -- the user-facing calls ---------------------------------------------------------------------

def _prepare(model, input_ids, pixel_values, attention_mask, max_new_tokens, do_sample,
             temperature, top_k, top_p, eos_token_id, pad_token_id, seed, stop_strings=None,
             tokenizer=None):
    """Checks everything before compiling; pads the prompt on the left to its bucket."""
    ids = np.asarray(input_ids)
    check_inputs(model.config, ids, pixel_values, attention_mask, None)
    if max_new_tokens < 1:
        raise VipLlavaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b, t = ids.shape
    mask = np.ones((b, t), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    limit = model.config.text_config.max_position_embeddings
    longest = int(mask.sum(-1).max())
    if longest + max_new_tokens > limit:
        raise VipLlavaError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"context of {limit} tokens"
        )
    if do_sample and not 0 < temperature < math.inf:
        raise VipLlavaError(f"temperature must be a finite number > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 0:
        raise VipLlavaError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise VipLlavaError(f"top_p must be in (0, 1], got {top_p}")
    bucket = bucket_length(t)
    pad = bucket - t
    ids_b = np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_token_id).astype(np.int32)
    mask_b = np.pad(mask, ((0, 0), (pad, 0)))
    eos = model.config.text_config.eos_token_id if eos_token_id is None else eos_token_id
    stopper = None
    if stop_strings is not None:
        stopper = StopStrings(stop_strings, tokenizer, [] if eos is None else eos, pad_token_id, b)
        extra = [i for i in stopper.device_eos_ids() if i not in stopper.eos]
        eos = sorted(stopper.eos) + extra
    sampling = SamplingParams.create(do_sample=do_sample, temperature=temperature, top_k=top_k,
                                     top_p=top_p, eos_token_id=eos, pad_id=pad_token_id)
    pixels = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    batch_sharding = _batch_sharding(model, b)
    ids_b, mask_b = (jax.device_put(x, batch_sharding) for x in (ids_b, mask_b))
    return ids, ids_b, pixels, mask_b, sampling, jax.random.key(seed), stopper


def _batch_sharding(model, batch: int):
    """Inputs follow the parameters: on a mesh, split the batch over its data axes."""
    leaf = model.language_model.embed_tokens.embedding.get_value()
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    spec = logical_to_spec(("batch", None), (batch, 1), mesh)
    return jax.sharding.NamedSharding(mesh, spec)


def generate(model, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens=64,
             do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
             pad_token_id=0, seed=0, streamer: Callable[[np.ndarray], None] | None = None,
             stop_strings=None, tokenizer=None):
    """See `VipLlavaForConditionalGeneration.generate`."""
    prompt, *args, stopper = _prepare(
        model, input_ids, pixel_values, attention_mask, max_new_tokens, do_sample, temperature,
        top_k, top_p, eos_token_id, pad_token_id, seed, stop_strings, tokenizer)
    if streamer is None and stopper is None:
        graphdef, state = nnx.split(model)
        tokens = np.asarray(run_generate(graphdef, state, *args[:3], max_new_tokens, *args[3:]))
    else:
        # stop strings are checked between chunks of the same compiled decode loop
        chunk = 1 if streamer is not None else STOP_CHECK_EVERY
        chunks = []
        for piece in _stream(model, *args, max_new_tokens, chunk=chunk, stopper=stopper):
            if streamer is not None:
                streamer(piece)  # as soon as it is produced
            chunks.append(piece)
        tokens = np.full((prompt.shape[0], max_new_tokens), pad_token_id, np.int32)
        done = np.concatenate(chunks, axis=1) if chunks else tokens[:, :0]
        tokens[:, : done.shape[1]] = done
    return np.concatenate([prompt, tokens], axis=1)


def generate_stream(model, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens=64,
                    do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
                    pad_token_id=0, seed=0, chunk: int = 1, stop_strings=None,
                    tokenizer=None) -> Iterator[np.ndarray]:
    """Yields the new tokens `[B, n]` as they are produced, `chunk` decode steps at a time."""
    _, *args, stopper = _prepare(
        model, input_ids, pixel_values, attention_mask, max_new_tokens, do_sample, temperature,
        top_k, top_p, eos_token_id, pad_token_id, seed, stop_strings, tokenizer)
    yield from _stream(model, *args, max_new_tokens, chunk=chunk, stopper=stopper)


STOP_CHECK_EVERY = 8  # decode steps between host checks of stop strings (generate, no streamer)


def _stream(model, ids_b, pixels, mask_b, sampling, rng, max_new_tokens, chunk: int = 1,
            stopper: StopStrings | None = None) -> Iterator[np.ndarray]:
    """Prefill, then the same decode loop `chunk` steps per call (the state is donated)."""
    graphdef, params = nnx.split(model)
    state = prefill_jit(graphdef, params, ids_b, pixels, mask_b, max_new_tokens, rng, sampling)
    emitted = 0
    while emitted < max_new_tokens:
        stop = np.int32(min(emitted + chunk, max_new_tokens))
        state = decode_call(graphdef, params, state, sampling, stop)
        step = int(state.step)
        if step == emitted:  # every row is done
            return
        new = np.asarray(state.tokens[:, emitted:step])
        if stopper is not None:
            new = stopper.feed(new)
            if stopper.stopped.any():  # rows stopped by a string stop on the device too
                state = state.replace(done=jnp.asarray(np.asarray(state.done) | stopper.stopped))
        yield new
        emitted = step

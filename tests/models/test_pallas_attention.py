"""The Pallas path of training's attention (`TrainConfig.attention="pallas"`, TPUs): JAX's Pallas
splash-attention kernel given right-padded batches as segment ids and a causal, sliding-window
or full block mask.

The kernel itself runs here, on the CPU, in Pallas' interpret mode (its `interpret=True`, which
evaluates the kernel body as ordinary JAX ops; the fixture `interpreted` turns it on), against
the dense-mask attention, on one device and on an 8-device mesh, and the model on it against
transformers' logits, loss and gradients. Pallas' TPU interpret mode
(`pltpu.force_tpu_interpret_mode`) cannot run this kernel under `vmap` in jax 0.10 (a grid
of 4 axes against 3 dimension semantics), so it is not used. Whether Mosaic compiles the
kernel for a TPU is checked by benchmarks/tpu_hlo.py (a deviceless TPU compile).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from tests.helpers.attention import assert_model_on_kernel_matches_transformers
from vipllava_jax.nn.layers import KeyLengths, attention, decoder_mask
from vipllava_jax.nn.sharding import make_mesh


@pytest.fixture
def interpreted(monkeypatch):
    """Builds every splash kernel with interpret=True; returns the list of the kernels built,
    as (type of the first head's mask, per-row q shape, per-row k shape) of each call."""
    built = []
    make = splash.make_splash_mha

    def make_interpreted(mask, **kw):
        row = make(mask, interpret=True, **kw)

        def call(q, k, v, segment_ids):
            built.append((type(mask.masks[0]).__name__, q.shape, k.shape))
            return row(q, k, v, segment_ids=segment_ids)
        return call

    monkeypatch.setattr(splash, "make_splash_mha", make_interpreted)
    return built


def qkv(b, t, n, kv, h):
    return [jax.random.normal(jax.random.key(i), (b, t, heads, h)) for i, heads in enumerate((n, kv, kv))]


def dense_and_kernel_masks(lengths, b, t, causal, window):
    """(real tokens `[B, T]`, the dense `[B, 1, T, S]` mask, its `KeyLengths` for the kernel) of
    a right-padded batch; lengths None: the vision tower's form (every key real, not causal)."""
    if lengths is None:
        return np.ones((b, t), bool), None, KeyLengths(None, implementation="pallas")
    real = np.arange(t)[None] < np.asarray(lengths)[:, None]
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    dense = decoder_mask(jnp.asarray(real, jnp.int32), slots, slots, window)
    return real, dense, KeyLengths(jnp.asarray(lengths, jnp.int32), causal=causal, sliding_window=window,
                                   implementation="pallas")


def assert_kernel_matches_dense(q, k, v, lengths, causal=True, window=None, mesh=None):
    """Forward and q/k/v gradients of the kernel path equal the dense-mask `attention` on every
    query that is a real token; returns the largest differences (out, grads)."""
    b, t = q.shape[:2]
    real, dense, kernel_mask = dense_and_kernel_masks(lengths, b, t, causal, window)

    def loss(mask):
        return lambda q, k, v: jnp.sum(jnp.where(real[:, :, None, None], attention(q, k, v, mask, 0.3), 0) ** 2)

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out = jax.jit(lambda q, k, v: attention(q, k, v, kernel_mask, 0.3))(q, k, v)
        grads = jax.jit(jax.grad(loss(kernel_mask), argnums=(0, 1, 2)))(q, k, v)
    want = attention(q, k, v, dense, 0.3)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=1e-5)
    wants = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for got, wanted in zip(grads, wants):
        np.testing.assert_allclose(np.asarray(got), np.asarray(wanted), atol=1e-4)
    return (float(np.abs(np.asarray(out) - np.asarray(want))[real].max()),
            max(float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(grads, wants)))


@pytest.mark.parametrize("t, lengths, causal, window, mask_type", [
    (20, [20, 13, 1, 7], True, None, "CausalMask"),
    (130, [130, 129, 100, 2], True, None, "CausalMask"),  # two 128-blocks
    (20, None, False, None, "FullMask"),  # the vision tower
    (20, [20, 13, 1, 7], True, 3, "LocalMask"),  # Mistral's sliding window
    (130, [130, 129, 100, 2], True, 50, "LocalMask"),  # a window that skips whole blocks
])
def test_kernel_matches_dense_attention(interpreted, t, lengths, causal, window, mask_type):
    b = 2 if lengths is None else len(lengths)
    q, k, v = qkv(b, t, 4, 2, 8)  # GQA: 4 query heads on 2 KV heads, given to the kernel as they are
    assert_kernel_matches_dense(q, k, v, lengths, causal, window)
    blocks = -(-t // 128) * 128
    assert set(interpreted) == {(mask_type, (4, blocks, 8), (2, blocks, 8))}, interpreted


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("kv, k_shard", [(2, (1, 128, 8)), (1, (2, 128, 8))])
def test_on_a_mesh_each_shard_gets_its_rows_and_heads(interpreted, kv, k_shard):
    # rows over data x fsdp (4 -> 1 each), heads over tensor (4 -> 2); one KV head per shard,
    # or, where the tensor axis does not divide the KV heads (1), KV repeated per query head
    q, k, v = qkv(4, 20, 4, kv, 8)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert_kernel_matches_dense(q, k, v, [20, 13, 1, 7], mesh=mesh)
    assert set(interpreted) == {("CausalMask", (2, 128, 8), k_shard)}, interpreted
    interpreted.clear()
    assert_kernel_matches_dense(q, k, v, [20, 13, 1, 7], window=3, mesh=mesh)
    assert {m for m, *_ in interpreted} == {"LocalMask"}


@pytest.mark.parametrize("text_model", ["llama", "mistral"])
def test_model_on_the_kernel_matches_transformers(tmp_path, interpreted, text_model):
    print(assert_model_on_kernel_matches_transformers(tmp_path, text_model, "pallas"))
    decoder_mask_type = "LocalMask" if text_model == "mistral" else "CausalMask"
    assert {m for m, *_ in interpreted} == {decoder_mask_type, "FullMask"}

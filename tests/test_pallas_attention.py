"""The Pallas path of training's attention (`TrainConfig.attention="pallas"`, TPUs): JAX's Pallas
flash-attention kernel given right-padded batches as segment ids.

The kernel itself runs here in TPU interpret mode (tests/pallas_interpret.py, in a process of
its own with a deadline): against the dense-mask attention, and the model on it against
transformers' loss and gradients. The code around the kernel on a mesh (the shard_map over
rows and heads, the padding to whole blocks) is checked in this process on 8 CPU devices with
the kernel swapped for its own pure-JAX reference, `mha_reference_no_custom_vjp`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

from vipllava_jax.layers import KeyLengths, attention
from vipllava_jax.llama import decoder_mask
from vipllava_jax.sharding import make_mesh

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_kernel_in_interpret_mode_matches_dense_attention_and_transformers(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "pallas_interpret.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(proc.stdout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_on_a_mesh_the_kernel_gets_row_and_head_shards_and_the_dense_results(monkeypatch):
    calls = []  # the (per-shard) q shape and segment ids shape of each kernel trace

    def reference(q, k, v, ab=None, segment_ids=None, *, causal=False, sm_scale=1.0):
        calls.append((q.shape, segment_ids.q.shape, segment_ids.kv.shape))
        return pallas_flash.mha_reference_no_custom_vjp(q, k, v, ab, segment_ids, causal=causal,
                                                        sm_scale=sm_scale)

    monkeypatch.setattr(pallas_flash, "flash_attention", reference)
    b, t, n, kv, h = 4, 20, 4, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, heads, h))
               for i, heads in enumerate((n, kv, kv)))
    lengths = np.array([20, 13, 1, 7])
    real = np.arange(t)[None] < lengths[:, None]
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    dense_mask = decoder_mask(jnp.asarray(real, jnp.int32), slots, slots, None)

    def loss(mask):
        return lambda q, k, v: jnp.sum(jnp.where(real[:, :, None, None], attention(q, k, v, mask, 0.3), 0) ** 2)

    kernel_mask = KeyLengths(jnp.asarray(lengths, jnp.int32), causal=True, implementation="pallas")
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        out = jax.jit(lambda q, k, v: attention(q, k, v, kernel_mask, 0.3))(q, k, v)
        grads = jax.jit(jax.grad(loss(kernel_mask), argnums=(0, 1, 2)))(q, k, v)
    # rows over data x fsdp (4 -> 1 each), heads over tensor (4 -> 2), 20 tokens -> one block
    assert set(calls) == {((1, 2, 128, h), (1, 128), (1, 128))}, calls
    want = attention(q, k, v, dense_mask, 0.3)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=1e-5)
    for got, wanted in zip(grads, jax.grad(loss(dense_mask), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(wanted), atol=1e-4)

    # a sliding window shorter than the keys (Mistral): the kernel has none, XLA's call runs
    calls.clear()
    window = KeyLengths(jnp.asarray(lengths, jnp.int32), causal=True, sliding_window=3,
                        implementation="pallas")
    windowed = attention(q, k, v, window, 0.3)
    assert calls == []
    want = attention(q, k, v, decoder_mask(jnp.asarray(real, jnp.int32), slots, slots, 3), 0.3)
    np.testing.assert_allclose(np.asarray(windowed)[real], np.asarray(want)[real], atol=1e-5)

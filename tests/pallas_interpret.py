"""The checks of test_pallas_attention.py that run JAX's Pallas TPU flash-attention kernel itself,
in TPU interpret mode on the CPU. Run as a script, in a process of its own: the interpreter
runs the kernel through host callbacks, and on 8 fake CPU devices its backward pass has been
seen to hang (so everything here is on one device), so the test gives the process a deadline.
Exits 0 after printing the figures, or raises.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import assert_grads_match, make_hf_model, make_inputs, torch_loss_and_grads  # noqa: E402
from test_fused_attention import right_padded  # noqa: E402

from vipllava_jax import VipLlavaForConditionalGeneration  # noqa: E402
from vipllava_jax.checkpoint import flatten  # noqa: E402
from vipllava_jax.layers import KeyLengths, attention, use_attention_kernel  # noqa: E402
from vipllava_jax.llama import decoder_mask  # noqa: E402
from vipllava_jax.training import (  # noqa: E402
    TrainConfig, init_train_state, loss_and_grads, mesh_from_spec,
)


def kernel_matches_dense_attention(t: int, lengths: list[int], causal: bool) -> None:
    """Forward and q/k/v gradients of the kernel path against the dense-mask `attention`
    (GQA: 4 query heads on 2 KV heads), on every query that is a real token."""
    b, n, kv, h = len(lengths), 4, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, heads, h))
               for i, heads in enumerate((n, kv, kv)))
    real = np.arange(t)[None] < np.asarray(lengths)[:, None]  # right padding
    if causal:
        slots = jnp.broadcast_to(jnp.arange(t), (b, t))
        dense_mask = decoder_mask(jnp.asarray(real, jnp.int32), slots, slots, None)
        kernel_mask = KeyLengths(jnp.asarray(lengths, jnp.int32), causal=True, implementation="pallas")
    else:  # the vision tower's form: every key real, not causal
        assert all(n == t for n in lengths)
        dense_mask, kernel_mask = None, KeyLengths(None, implementation="pallas")

    def loss(mask):
        return lambda q, k, v: jnp.sum(jnp.where(real[:, :, None, None], attention(q, k, v, mask, 0.3), 0) ** 2)

    out = jax.jit(lambda q, k, v: attention(q, k, v, kernel_mask, 0.3))(q, k, v)
    want = attention(q, k, v, dense_mask, 0.3)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=1e-5)
    grads = jax.jit(jax.grad(loss(kernel_mask), argnums=(0, 1, 2)))(q, k, v)
    wants = jax.grad(loss(dense_mask), argnums=(0, 1, 2))(q, k, v)
    errors = [float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(grads, wants)]
    assert max(errors) < 1e-4, errors
    print(f"kernel t={t} lengths={lengths} causal={causal}: max |d out| "
          f"{np.abs(np.asarray(out) - np.asarray(want))[real].max():.1e}, max |d grad q/k/v| "
          + " / ".join(f"{e:.1e}" for e in errors), flush=True)


def model_matches_transformers(tmp: Path) -> None:
    """The model with both attention stacks on the kernel: transformers' loss and gradients
    for a right-padded batch (the loaders' form)."""
    hf = make_hf_model(vision_layers=2, feature_layers=(-1, 0))
    hf.save_pretrained(tmp)
    inputs = right_padded(make_inputs(hf.config, batch=4, seq=20, left_pad=(0, 3, 1, 5)))
    out, torch_grads = torch_loss_and_grads(hf, inputs)

    model = VipLlavaForConditionalGeneration.from_pretrained(tmp)
    assert len(use_attention_kernel(model, "pallas")) == 2  # the decoder and the vision tower
    mesh = mesh_from_spec("data=1", devices=jax.devices()[:1])
    graphdef, state, _ = init_train_state(model, TrainConfig(), mesh)  # the graphdef keeps "pallas"
    batch = {k: jnp.asarray(v) for k, v in inputs.items()}
    fn = jax.jit(lambda p, f, b: loss_and_grads(graphdef, p, f, b))  # attention=None: as it is
    loss, grads, _ = fn(state.params, state.frozen, batch)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    worst = assert_grads_match(flatten(grads), torch_grads)
    print(f"model: loss {float(loss):.6f} vs transformers {out.loss.item():.6f}; worst grad "
          f"error / max |grad| {worst:.1e} over {len(flatten(grads))} tensors", flush=True)


def main(tmp: str) -> None:
    with pltpu.force_tpu_interpret_mode():
        kernel_matches_dense_attention(20, [20, 13, 1, 7], causal=True)
        kernel_matches_dense_attention(130, [130, 129, 100, 2], causal=True)  # two 128-blocks
        kernel_matches_dense_attention(20, [20, 20], causal=False)
        model_matches_transformers(Path(tmp))
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])

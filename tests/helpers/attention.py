"""Helpers of the fused-attention tests (the xla kernel on CPU, Pallas in interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import assert_grads_match, make_hf_model, make_inputs, torch_loss_and_grads
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.checkpoint import flatten
from vipllava_jax.train import TrainConfig, init_train_state, loss_and_grads, mesh_from_spec


def right_padded(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of a left-padded batch with their padding moved to the end."""
    out = {k: v.copy() for k, v in inputs.items()}
    for b, pad in enumerate((inputs["attention_mask"] == 0).sum(axis=1)):
        for name in ("input_ids", "attention_mask", "labels"):
            out[name][b] = np.roll(inputs[name][b], -pad)
    return out


def assert_model_on_kernel_matches_transformers(tmp_path, text_model: str, kernel: str) -> str:
    """A tiny llama or mistral (sliding window 6) VipLlava on attention kernel `kernel` gives
    transformers' logits, and its train-step loss and gradients, on a right-padded batch.
    Returns a line with the loss and the worst gradient error."""
    kw = dict(text_model="mistral", sliding_window=6) if text_model == "mistral" else {}
    hf = make_hf_model(vision_layers=2, feature_layers=(-1, 0), **kw)
    hf.save_pretrained(tmp_path)
    inputs = right_padded(make_inputs(hf.config, batch=4, seq=20, left_pad=(0, 3, 1, 5)))
    out, torch_grads = torch_loss_and_grads(hf, inputs)

    model = VipLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert set(model.attention_dtypes()) == {"language_model", "vision_tower"}
    kernels = dict.fromkeys(model.attention_dtypes(), kernel)  # the decoder and the vision tower
    batch = {k: jnp.asarray(v) for k, v in inputs.items()}
    logits = jax.jit(lambda b: model.forward(b["input_ids"], b["pixel_values"], b["attention_mask"],
                                             attention=kernels).logits)(batch)
    real = inputs["attention_mask"] == 1
    np.testing.assert_allclose(np.asarray(logits)[real], out.logits.detach().numpy()[real], atol=1e-4)

    mesh = mesh_from_spec("data=1", devices=jax.devices()[:1])
    graphdef, state, _ = init_train_state(model, TrainConfig(), mesh)
    fn = jax.jit(lambda p, f, b: loss_and_grads(graphdef, p, f, b, attention=kernels))
    loss, grads, _ = fn(state.params, state.frozen, batch)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    worst = assert_grads_match(flatten(grads), torch_grads)
    return (f"{text_model} on {kernel}: loss {float(loss):.6f} vs transformers {out.loss.item():.6f}; "
            f"worst grad error / max |grad| {worst:.1e} over {len(flatten(grads))} tensors")

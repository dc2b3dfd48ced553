"""The fused-attention path of training (`TrainConfig.attention`): a right-padded batch given to
the kernel as key lengths (`layers.KeyLengths`) attends to exactly the keys of the dense mask,
and the model on that path gives transformers' logits, loss and gradients.

cuDNN's kernel itself needs a GPU; here the same `jax.nn.dot_product_attention` call runs with
implementation="xla" (kernel "xla"), which checks everything this project passes to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import make_inputs, tiny_config
from tests.helpers.attention import assert_model_on_kernel_matches_transformers, right_padded
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.nn.layers import KeyLengths, attention, decoder_mask
from vipllava_jax.train import (
    TrainConfig,
    init_train_state,
    make_train_step,
    mesh_from_spec,
    shard_batch,
)
from vipllava_jax.train.step import attention_kernels


@pytest.mark.parametrize("window", [None, 3])
def test_key_lengths_admit_the_keys_of_the_dense_mask(window):
    b, t, n, kv, h = 3, 7, 4, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, heads, h))
               for i, heads in enumerate((n, kv, kv)))
    lengths = np.array([7, 4, 1])
    real = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)  # right padding
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = decoder_mask(jnp.asarray(real), slots, slots, window)
    dense = attention(q, k, v, mask, 0.3)
    fused = attention(q, k, v, KeyLengths(jnp.asarray(lengths, jnp.int32), causal=True,
                                          sliding_window=window, implementation="xla"), 0.3)
    # every query that sees a key, padding rows included (with a window, a padding query can
    # see none: the dense path gives zeros there, the kernel anything; no real token reads it)
    sees = np.asarray(mask).any(axis=-1)[:, 0]  # [B, T]
    assert sees.size - sees.sum() == (0 if window is None else 5)
    np.testing.assert_allclose(np.asarray(fused)[sees], np.asarray(dense)[sees], atol=1e-6)
    # the vision tower's form: no padding, not causal
    np.testing.assert_allclose(attention(q, k, v, KeyLengths(None, implementation="xla"), 0.3),
                               attention(q, k, v, None, 0.3), atol=1e-6)


@pytest.mark.parametrize("text_model", ["llama", "mistral"])
def test_fused_path_matches_transformers_logits_loss_and_grads(tmp_path, text_model, monkeypatch):
    calls = []  # (is_causal, key lengths given) of each attention call traced
    dot_product_attention = jax.nn.dot_product_attention

    def spy(*args, **kw):
        calls.append((kw.get("is_causal"), kw.get("key_value_seq_lengths") is not None))
        return dot_product_attention(*args, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    print(assert_model_on_kernel_matches_transformers(tmp_path, text_model, "xla"))
    assert set(calls) == {(True, True), (False, False)}  # decoder, vision tower: fused forms


def test_auto_picks_cudnn_on_nvidia_gpus_for_half_precision_parts_and_pallas_on_tpus():
    config = VipLlavaConfig.from_hf_dict(tiny_config(vision_layers=1, feature_layers=(-1,)).to_dict())

    def fresh(dtype):
        return VipLlavaForConditionalGeneration.abstract(config, dtype=dtype)

    def kernels(choice, platform, model):  # (vision tower, decoder)
        got = attention_kernels(model, choice, platform)
        assert set(got) == {"vision_tower", "language_model"}
        return [got["vision_tower"], got["language_model"]]

    bf16, fp32 = fresh("bfloat16"), fresh("float32")
    for attention_choice, platform, model, want in [
        ("auto", "cuda", bf16, ["cudnn", "cudnn"]),
        ("cudnn", "cuda", bf16, ["cudnn", "cudnn"]),
        ("xla", "cuda", bf16, [None, None]),
        ("auto", "cpu", bf16, [None, None]),
        ("auto", "rocm", bf16, [None, None]),
        ("auto", "cuda", fp32, [None, None]),  # cuDNN's kernel takes bf16/fp16 only
        ("auto", "tpu", bf16, ["pallas", "pallas"]),
        ("auto", "tpu", fp32, ["pallas", "pallas"]),  # the Pallas kernel takes any dtype
        ("pallas", "tpu", fp32, ["pallas", "pallas"]),
        ("xla", "tpu", bf16, [None, None]),
    ]:
        assert kernels(attention_choice, platform, model) == want, (attention_choice, platform)
    # per part: a float32 tower beside a bf16 decoder stays on dense masks under "auto"
    mixed = {"vision_tower": "float32", "language_model": "bfloat16"}
    assert attention_kernels(mixed, "auto", "cuda") == {"vision_tower": None, "language_model": "cudnn"}
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs"):
        attention_kernels(bf16, "cudnn", "cpu")
    with pytest.raises(ValueError, match="attention='pallas' runs on TPUs; this mesh is on 'cuda'"):
        attention_kernels(bf16, "pallas", "cuda")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention_kernels(fp32, "cudnn", "cuda")
    with pytest.raises(ValueError, match="bfloat16 or float16; this model computes in float32"):
        attention_kernels(mixed, "cudnn", "cuda")
    with pytest.raises(ValueError, match="no fused attention path"):
        attention_kernels({}, "pallas", "tpu")
    with pytest.raises(ValueError, match=r"has no fused attention path in \['decoder'\]"):
        bf16.forward(jnp.zeros((1, 2), jnp.int32), attention={"decoder": "cudnn"})
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        bf16.forward(jnp.zeros((1, 2), jnp.int32), attention={"language_model": "flash"})
    with pytest.raises(ValueError, match="attention must be one of"):
        TrainConfig(attention="flash")


@pytest.mark.parametrize("kernel, hardware", [("cudnn", "NVIDIA GPUs"), ("pallas", "TPUs")])
def test_a_kernel_for_other_hardware_fails_on_a_cpu_mesh_before_compiling(tiny_hf, kernel, hardware):
    hf, path = tiny_hf
    model = VipLlavaForConditionalGeneration.from_pretrained(path)
    config = TrainConfig(attention=kernel)
    mesh = mesh_from_spec("data=1", devices=jax.devices()[:1])
    graphdef, state, shardings = init_train_state(model, config, mesh)
    step = make_train_step(graphdef, config, mesh, shardings)
    inputs = right_padded(make_inputs(hf.config))
    batch = shard_batch({k: v.astype(np.float32 if k == "pixel_values" else np.int32)
                         for k, v in inputs.items()}, mesh)
    with pytest.raises(ValueError, match=f"attention='{kernel}' runs on {hardware}; this mesh is on 'cpu'"):
        step(state, batch)

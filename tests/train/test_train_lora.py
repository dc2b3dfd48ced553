"""LoRA adapters: forward, loss and gradients equal transformers' model with the same adapters
(as a torch parametrization W + (alpha/r) (A B)^T), stage "lora" trains only adapters and the
projector, and merging folds the adapters into weights that transformers loads."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch.nn.utils import parametrize

from tests.helpers import make_hf_model, make_inputs
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.checkpoint import flatten
from vipllava_jax.convert import orbax_to_hf
from vipllava_jax.models.vipllava.mapping import canonical_key, hf_key_for
from vipllava_jax.train import TrainConfig, init_train_state, loss_and_grads, make_train_step
from vipllava_jax.train.lora import LoRALinear, add_lora, merge_lora
from vipllava_jax.train.mesh import mesh_from_spec, shard_batch
from vipllava_jax.train.step import trainable_filter

RANK, ALPHA = 4, 8.0
CONFIG = TrainConfig(learning_rate=1e-3, eps=1e-6, stage="lora", lora_rank=RANK, lora_alpha=ALPHA,
                     lora_targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = make_hf_model(vision_layers=2, feature_layers=(-1, 0))
    path = tmp_path_factory.mktemp("lora_hf")
    hf.save_pretrained(path)
    return hf, path, make_inputs(hf.config, batch=4, left_pad=(0, 3))


def lora_model(path, seed=0):
    """Our model with adapters whose B is random too, so that every adapter changes the output."""
    model = VipLlavaForConditionalGeneration.from_pretrained(path)
    add_lora(model, rank=RANK, alpha=ALPHA, targets=CONFIG.lora_targets)
    rng = np.random.default_rng(seed)
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, LoRALinear):
            layer.lora_b.set_value(jnp.asarray(rng.normal(0, 0.05, layer.lora_b.shape), jnp.float32))
    return model


class _LoRA(torch.nn.Module):
    """W [out, in] -> W + scale * (A B)^T with our A [in, r] and B [r, out] as torch leaves."""

    def __init__(self, a, b, scale):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(np.asarray(a)))
        self.b = torch.nn.Parameter(torch.tensor(np.asarray(b)))
        self.scale = scale

    def forward(self, w):
        return w + self.scale * (self.a @ self.b).T


def torch_with_adapters(hf, model) -> dict[str, _LoRA]:
    """Registers our adapters on `hf`'s matching Linear layers; our kernel path -> adapter."""
    modules = {canonical_key(name + ".weight"): m for name, m in hf.named_modules()
               if isinstance(m, torch.nn.Linear)}
    adapters = {}
    for path, layer in nnx.iter_graph(model):
        if isinstance(layer, LoRALinear):
            name = ".".join(map(str, path)) + ".kernel"
            key, _ = hf_key_for(name, 2)
            adapters[name] = _LoRA(layer.lora_a[...], layer.lora_b[...], layer.scale)
            parametrize.register_parametrization(modules[key], "weight", adapters[name])
    return adapters


def test_adapters_start_at_zero_and_leave_the_model_unchanged(tiny):
    _, path, inputs = tiny
    base = VipLlavaForConditionalGeneration.from_pretrained(path)
    adapted = add_lora(VipLlavaForConditionalGeneration.from_pretrained(path), rank=RANK, alpha=ALPHA)
    layer = adapted.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_a.shape == (layer.kernel.shape[0], RANK)
    np.testing.assert_array_equal(layer.lora_b[...], 0)
    kw = {k: v for k, v in inputs.items() if k != "labels"}
    np.testing.assert_array_equal(np.asarray(adapted(**kw).logits), np.asarray(base(**kw).logits))


def test_loss_and_adapter_grads_match_transformers(tiny):
    hf, path, inputs = tiny
    model = lora_model(path)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model, "lora"), ...)
    params, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    flat = flatten(params)
    assert {k.split(".")[0] for k in flat} == {"multi_modal_projector", "language_model"}
    assert all(k.startswith("multi_modal_projector.") or k.endswith((".lora_a", ".lora_b")) for k in flat)

    ref = copy.deepcopy(hf)
    adapters = torch_with_adapters(ref, model)
    assert len(adapters) == 3 * ref.config.text_config.num_hidden_layers
    out = ref(**{k: torch.tensor(v) for k, v in inputs.items()})
    out.loss.backward()

    loss, grads, _ = jax.jit(lambda p, f, b: loss_and_grads(graphdef, p, f, b))(
        params, frozen, {k: jnp.asarray(v) for k, v in inputs.items()})
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    grads = flatten(grads)
    for name, adapter in adapters.items():
        for factor, torch_param in (("lora_a", adapter.a), ("lora_b", adapter.b)):
            got = np.asarray(grads[name.removesuffix("kernel") + factor])
            want = torch_param.grad.numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=name)


def test_lora_stage_trains_adapters_only_and_merges_for_export(tiny, tmp_path):
    from transformers import VipLlavaForConditionalGeneration as HFVipLlava

    hf, path, inputs = tiny
    mesh = mesh_from_spec("data=1", jax.devices()[:1])
    model = VipLlavaForConditionalGeneration.from_pretrained(path)
    before = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    before = {k: np.asarray(v) for k, v in before.items()}
    graphdef, state, shardings = init_train_state(model, CONFIG, mesh)
    mu = flatten(optax.tree_utils.tree_get(state.opt_state, "mu"))
    assert all(k.startswith("multi_modal_projector.") or k.endswith((".lora_a", ".lora_b")) for k in mu)
    n_adapter = sum(v.size for k, v in flatten(state.params).items() if "lora" in k)
    assert n_adapter == sum(RANK * (v.shape[0] + v.shape[1]) for k, v in before.items()
                            if k.startswith("language_model.")
                            and k.endswith(("q_proj.kernel", "v_proj.kernel", "down_proj.kernel")))

    step = make_train_step(graphdef, CONFIG, mesh, shardings)
    for _ in range(2):  # the first step only moves A... B from 0; the second moves both
        state, metrics = step(state, shard_batch(inputs, mesh))
    assert np.isfinite(float(metrics["loss"]))
    for name, value in flatten(state.frozen).items():
        np.testing.assert_array_equal(np.asarray(value), before[name], err_msg=f"{name} is frozen")

    trained = nnx.merge(graphdef, state.params, state.frozen)
    kw = {k: v for k, v in inputs.items() if k != "labels"}
    unmerged = np.asarray(trained(**kw).logits)
    merged_model = merge_lora(trained)
    assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_graph(merged_model))
    merged = flatten(nnx.to_pure_dict(nnx.state(merged_model, nnx.Param)))
    assert set(merged) == set(before)  # the base model's names, nothing else
    assert not np.array_equal(np.asarray(merged["language_model.layers.0.mlp.down_proj.kernel"]),
                              before["language_model.layers.0.mlp.down_proj.kernel"])

    merged_model.save_pretrained(tmp_path / "merged")
    orbax_to_hf(tmp_path / "merged", tmp_path / "hf")
    ref = HFVipLlava.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = ref(**{k: torch.tensor(v) for k, v in kw.items()}).logits.numpy()
    np.testing.assert_allclose(unmerged, want, atol=1e-4)


def test_lora_config_is_checked():
    with pytest.raises(ValueError, match="LoRA targets"):
        TrainConfig(stage="lora", lora_targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig(stage="lora", lora_rank=0)

"""The training step: gradients equal transformers', and the step gives the same result on one
device, on sharded meshes, with micro-batch accumulation and with remat (a policy the model
applies to each decoder layer); stages freeze what they should; bf16 compute keeps float32
master weights.

Compiling a step is what these tests spend their time on, so they share one reference step
(one device, stage "full", float32) and each other configuration is compared with it.
Adam's first update is ~lr * sign(grad); `eps=1e-6` keeps it smooth in the gradient, so that
float summation order (sharding, accumulation) moves the updated params by far less than 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from tests.helpers import (
    assert_grads_match,
    make_hf_model,
    make_inputs,
    tiny_config,
    torch_loss_and_grads,
    traced_and_estimated_flops,
)
from vipllava_jax import VipLlavaForConditionalGeneration
from vipllava_jax.checkpoint import flatten
from vipllava_jax.models.ved import VisionEncoderDecoderModel
from vipllava_jax.models.ved.config import VisionEncoderDecoderConfig
from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.nn.sharding import logical_to_spec
from vipllava_jax.train import (
    REMAT_POLICIES,
    TrainConfig,
    init_train_state,
    learning_rate_schedule,
    loss_and_grads,
    make_optimizer,
    make_train_step,
    mesh_from_spec,
    parse_mesh_spec,
    shard_batch,
)
from vipllava_jax.train.step import micro_batches

BATCH = 8
CONFIG = TrainConfig(learning_rate=1e-3, eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
PARAM_ATOL = 1e-5
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, its folder, a batch of 8 left-padded rows with one image each)."""
    hf = make_hf_model(vision_layers=2, feature_layers=(-1, 0))
    path = tmp_path_factory.mktemp("train_hf")
    hf.save_pretrained(path)
    return hf, path, make_inputs(hf.config, batch=BATCH, left_pad=(0, 3, 1, 5))


def one_device_mesh():
    return mesh_from_spec("data=1", devices=jax.devices()[:1])


def run_step(path, inputs, config, mesh, **load_kw):
    """One train step on a freshly loaded model: (params before, state after, metrics)."""
    model = VipLlavaForConditionalGeneration.from_pretrained(path, **load_kw)
    before = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    graphdef, state, shardings = init_train_state(model, config, mesh)
    step = make_train_step(graphdef, config, mesh, shardings)
    state, metrics = step(state, shard_batch(inputs, mesh))
    return before, state, {k: float(v) for k, v in metrics.items()}


def all_params(state) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in {**flatten(state.params), **flatten(state.frozen)}.items()}


@pytest.fixture(scope="module")
def reference(tiny):
    _, path, inputs = tiny
    before, state, metrics = run_step(path, inputs, CONFIG, one_device_mesh())
    return before, all_params(state), metrics


def assert_same_step(ours, reference):
    _, params, metrics = ours
    _, ref_params, ref_metrics = reference
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    assert metrics["tokens"] == ref_metrics["tokens"]
    for name, ref in ref_params.items():
        np.testing.assert_allclose(params[name], ref, rtol=0, atol=PARAM_ATOL, err_msg=name)


# -- mesh ----------------------------------------------------------------------------------------

def test_parse_mesh_spec():
    assert parse_mesh_spec("data=2,fsdp=4,tensor=1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec(" fsdp = -1 , tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert parse_mesh_spec("data=1", 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    for spec, match in [
        ("data=2,fsdp=2", "multiply to 4, but there are 8"),
        ("data=2,model=4", "unknown axis 'model'"),
        ("data=-1,fsdp=-1", "only one axis may be -1"),
        ("data=3,fsdp=-1", "do not divide"),
        ("data=two", "not an integer"),
        ("data=0,fsdp=8", "must be >= 1"),
        ("data=2,data=4", "given twice"),
        ("data", "axis=size"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_mesh_spec(spec, 8)


@needs_8
def test_mesh_from_spec_axes_and_batch_sharding():
    mesh = mesh_from_spec("data=2,fsdp=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    batch = shard_batch({"input_ids": np.zeros((8, 5), np.int32)}, mesh)["input_ids"]
    assert batch.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert len({str(s.index) for s in batch.addressable_shards}) == 8
    with pytest.raises(ValueError, match="12 rows, not a multiple of the 8 devices"):
        shard_batch({"labels": np.zeros((12, 5), np.int32)}, mesh)


def test_learning_rate_schedule_and_config_checks():
    sched = learning_rate_schedule(TrainConfig(learning_rate=1.0, warmup_steps=10, total_steps=110))
    np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)],
                               [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="stage"):
        TrainConfig(stage="vision")
    with pytest.raises(ValueError, match="remat"):
        TrainConfig(remat="some")


def test_lr_multipliers_scale_their_submodules_updates(tiny):
    """Each named submodule's AdamW update (weight decay included) times its factor; the
    others as without multipliers. Names the stage does not train are refused."""
    params = {name: {"kernel": jnp.full((2, 3), 1.0), "bias": jnp.full((3,), -2.0)}
              for name in ("vision_tower", "multi_modal_projector", "language_model")}
    grads = jax.tree.map(lambda p: 0.1 * p + 0.3, params)
    base = TrainConfig(learning_rate=0.1, weight_decay=0.5)
    factors = {"vision_tower": 0.25, "language_model": 0}
    config = TrainConfig(**{**base.__dict__, "lr_multipliers": factors})
    assert config.lr_multipliers == (("language_model", 0.0), ("vision_tower", 0.25))
    plain, scaled = (make_optimizer(c) for c in (base, config))
    want, _ = plain.update(grads, plain.init(params), params)
    got, _ = scaled.update(grads, scaled.init(params), params)
    for name, factor in {**factors, "multi_modal_projector": 1.0}.items():
        for leaf in ("kernel", "bias"):
            assert np.abs(want[name][leaf]).min() > 0
            np.testing.assert_allclose(got[name][leaf], factor * want[name][leaf], rtol=1e-6)

    with pytest.raises(ValueError, match="lr_multipliers"):
        TrainConfig(lr_multipliers={"vision_tower": -1.0})
    _, path, _ = tiny
    model = VipLlavaForConditionalGeneration.from_pretrained(path)
    frozen_tower = TrainConfig(stage="full", lr_multipliers={"vision_tower": 0.1})
    with pytest.raises(ValueError, match=r"\['vision_tower'\], which stage 'full' does not train"):
        init_train_state(model, frozen_tower, one_device_mesh())


def test_micro_batches_are_strided_and_images_follow_their_rows():
    rows = np.arange(8)[:, None] * np.ones((1, 3), int)
    batch = {"input_ids": rows, "labels": rows, "pixel_values": np.arange(16)}
    micro = micro_batches(batch, 4)  # two images per row: row r has images 2r, 2r+1
    np.testing.assert_array_equal(micro["input_ids"][:, :, 0], [[0, 4], [1, 5], [2, 6], [3, 7]])
    np.testing.assert_array_equal(micro["labels"], micro["input_ids"])
    np.testing.assert_array_equal(micro["pixel_values"][1], [2, 3, 10, 11])


# -- numerics against transformers ---------------------------------------------------------------

def test_loss_and_grads_match_transformers(tiny):
    hf, path, inputs = tiny
    out, torch_grads = torch_loss_and_grads(hf, inputs)

    model = VipLlavaForConditionalGeneration.from_pretrained(path)
    graphdef, state, _ = init_train_state(model, CONFIG, one_device_mesh())
    fn = jax.jit(lambda p, f, b: loss_and_grads(graphdef, p, f, b))
    loss, grads, tokens = fn(state.params, state.frozen, {k: jnp.asarray(v) for k, v in inputs.items()})

    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    assert tokens == np.sum(inputs["labels"][:, 1:] != -100)
    grads = flatten(grads)
    assert {k.split(".")[0] for k in grads} == {"multi_modal_projector", "language_model", "lm_head"}
    assert_grads_match(grads, torch_grads, [
        "multi_modal_projector.linear_1.kernel",
        "language_model.layers.0.self_attn.q_proj.kernel",
        "language_model.embed_tokens.embedding",
        "lm_head.kernel",
        *grads,  # and every other trainable parameter
    ])


def checkpointed_layers(jaxpr) -> list:
    """The policy of each `jax.checkpoint` call in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat2"):
            found.append(eqn.params["policy"])
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if hasattr(sub, "eqns"):
                found += checkpointed_layers(sub)
    return found


def tiny_ved_config(decoder: str) -> VisionEncoderDecoderConfig:
    """A 2-layer ViT encoder and a 3-layer GPT-2 or BERT decoder."""
    from transformers import BertConfig, GPT2Config, ViTConfig
    from transformers import VisionEncoderDecoderConfig as HFConfig

    enc = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8)
    common = dict(vocab_size=61, is_decoder=True, add_cross_attention=True, pad_token_id=0, bos_token_id=1)
    if decoder == "gpt2":
        dec = GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common)
    else:
        dec = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=64, **common)
    hf = HFConfig(encoder=enc.to_dict(), decoder=dec.to_dict(), decoder_start_token_id=1, pad_token_id=0)
    return VisionEncoderDecoderConfig.from_hf_dict(hf.to_dict())


@pytest.mark.parametrize("family", ["vipllava", "ved-gpt2", "ved-bert"])
def test_remat_wraps_each_decoder_layer_only_when_a_policy_is_given(family):
    # decoders of 2 (VipLlava) or 3 (VED) layers beside image encoders of 3 or 2: the count
    # says which stack is rematerialised
    if family == "vipllava":
        hf_config = tiny_config(vision_layers=3, feature_layers=(-1, 0))
        model = VipLlavaForConditionalGeneration.abstract(VipLlavaConfig.from_hf_dict(hf_config.to_dict()))
        layers = model.config.text_config.num_hidden_layers
        batch = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32 if v.dtype.kind == "i" else jnp.float32)
                 for k, v in make_inputs(hf_config).items()}
    else:
        config = tiny_ved_config(family.removeprefix("ved-"))
        model = VisionEncoderDecoderModel.abstract(config)
        layers = config.decoder.num_hidden_layers
        size = config.encoder.image_size
        batch = {"pixel_values": jax.ShapeDtypeStruct((2, 3, size, size), jnp.float32),
                 "labels": jax.ShapeDtypeStruct((2, 7), jnp.int32)}
    graphdef, state = nnx.split(model)

    def policies(remat):
        loss = lambda s, b: nnx.merge(graphdef, s).loss_terms(b, remat=REMAT_POLICIES[remat])[0]
        return checkpointed_layers(jax.make_jaxpr(loss)(state, batch).jaxpr)

    assert policies("none") == []
    for remat in ("full", "dots"):
        assert policies(remat) == [REMAT_POLICIES[remat]] * layers, remat


# -- the step ------------------------------------------------------------------------------------

def test_step_on_one_device(tiny, reference):
    hf, _, inputs = tiny
    before, params, metrics = reference
    with torch.no_grad():
        want = float(hf(**{k: torch.tensor(v) for k, v in inputs.items()}).loss)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["learning_rate"], CONFIG.learning_rate, rtol=1e-6)
    assert metrics["tokens"] == np.sum(inputs["labels"][:, 1:] != -100)
    for name, value in params.items():
        assert value.dtype == np.float32
        if name.startswith("vision_tower."):
            np.testing.assert_array_equal(value, before[name], err_msg=f"{name} is frozen")
    assert not np.array_equal(params["language_model.layers.1.mlp.down_proj.kernel"],
                              before["language_model.layers.1.mlp.down_proj.kernel"])


@needs_8
@pytest.mark.parametrize(
    "spec, remat",
    # remat changes no value, so each mesh also checks one remat policy against "none"
    [("fsdp=4,tensor=2", "dots"), ("data=8", "full")],
)
def test_sharded_step_matches_one_device(tiny, reference, spec, remat):
    _, path, inputs = tiny
    mesh = mesh_from_spec(spec)
    config = TrainConfig(**{**CONFIG.__dict__, "remat": remat})
    before, state, metrics = run_step(path, inputs, config, mesh)
    assert_same_step((before, all_params(state), metrics), reference)

    q = state.params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]  # [embed, heads]
    embed = state.params["language_model"]["embed_tokens"]["embedding"]  # [vocab, embed]
    for array, names in ((q, ("embed", "heads")), (embed, ("vocab", "embed"))):
        assert array.sharding.spec == logical_to_spec(names, array.shape, mesh)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert mu["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].sharding == q.sharding
    if spec.startswith("fsdp"):
        assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        assert len({str(s.index) for s in q.addressable_shards}) == 8


def test_grad_accumulation_equals_one_big_batch(tiny, reference):
    _, path, inputs = tiny
    config = TrainConfig(**{**CONFIG.__dict__, "grad_accum": 4})
    before, state, metrics = run_step(path, inputs, config, one_device_mesh())
    assert_same_step((before, all_params(state), metrics), reference)


def test_projector_stage_in_bf16_compute_with_fp32_master_weights(tiny, reference):
    """Stage 1 as run in practice: bfloat16 compute, float32 parameters, projector only."""
    _, path, inputs = tiny
    config = TrainConfig(**{**CONFIG.__dict__, "stage": "projector"})
    before, state, metrics = run_step(
        path, inputs, config, one_device_mesh(), dtype="bfloat16", param_dtype="float32"
    )
    assert np.isfinite(metrics["loss"])
    np.testing.assert_allclose(metrics["loss"], reference[2]["loss"], rtol=2e-2)
    assert set(state.params) == {"multi_modal_projector"}
    assert set(optax.tree_utils.tree_get(state.opt_state, "mu")) == {"multi_modal_projector"}
    for name, value in all_params(state).items():
        assert value.dtype == np.float32, name
        if name.startswith("multi_modal_projector."):
            assert not np.array_equal(value, before[name]), f"{name} was not trained"
        else:
            np.testing.assert_array_equal(value, before[name], err_msg=f"{name} is frozen")


@pytest.mark.parametrize("stage", ["full", "lora", "projector", "all"])
def test_model_flops_estimate_counts_the_matmuls_of_a_step(tiny, stage):
    """`train_flops_per_token` (the MFU numerator) against the matmuls that the traced step
    runs: trained weights forward and backward, frozen decoder weights without their weight
    gradient, the frozen tower forward only, on the image tokens; attention. XLA's dense
    attention computes the whole causal square, the estimate half of it."""
    _, path, inputs = tiny
    model = VipLlavaForConditionalGeneration.from_pretrained(path)
    text = model.config.text_config
    traced, estimated = traced_and_estimated_flops(model, stage, inputs, text)
    assert traced == pytest.approx(estimated, rel=1e-12)


@needs_8
def test_activations_are_pinned_to_the_batch_axes(tiny):
    """Each decoder and vision layer's output is constrained to rows over the data axes (the
    `batch` rule), hidden dimension whole: XLA may not drift into a replicated batch."""
    _, path, inputs = tiny
    mesh = mesh_from_spec("fsdp=4,tensor=2")
    model = VipLlavaForConditionalGeneration.from_pretrained(path)
    layers = len(model.language_model.layers)
    graphdef, state, shardings = init_train_state(model, CONFIG, mesh)
    text = make_train_step(graphdef, CONFIG, mesh, shardings).lower(state, shard_batch(inputs, mesh)).as_text()
    residual = [line for line in text.splitlines()
                if "sharding_constraint" in line and '[{"data", "fsdp"}, {}, {}]' in line]
    assert len(residual) >= 2 * layers, text[:2000]  # forward and its transpose in the backward

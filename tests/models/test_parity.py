"""Numerical parity with transformers' PyTorch VipLlava, which every test runs itself.

Float32 contract: max |logits difference| <= 1e-4 on non-padding positions and the loss within
1e-5 relative. Covered: the three parts on their own (CLIP hidden states, projector, decoder),
the whole model over the shapes that change the code path (MHA, GQA, Mistral sliding window,
the default five feature layers, a single int feature layer, tied head, two images per row),
every on-disk layout transformers has written, bfloat16 / float16 checkpoints (and bfloat16 compute), and
input errors.

Forward passes run under `nnx.jit`: one compile per config keeps the file fast (eager
op-by-op dispatch costs ~20 s for the first forward of each shape on CPU).
"""

from __future__ import annotations

import json
from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.helpers import IMAGE_TOKEN, make_hf_model, make_inputs, save_hf_model, torch_forward
from vipllava_jax import VipLlavaError, VipLlavaForConditionalGeneration

ATOL = 1e-4
LOSS_RTOL = 1e-5


# -- helpers -------------------------------------------------------------------------------------

@nnx.jit
def _forward(model, inputs):
    return model(**inputs)


@partial(nnx.jit, static_argnums=2)
def _parts(model, pixel_values, layers, embeds, attention_mask, position_ids):
    """Our three parts in one compile: CLIP hidden states, projected features, decoder output."""
    return (
        model.vision_tower(pixel_values, layers),
        model.get_image_features(pixel_values),
        model.language_model(embeds, attention_mask, position_ids),
    )


def jax_forward(model, inputs):
    out = _forward(model, {k: jnp.asarray(v) for k, v in inputs.items()})
    loss = None if out.loss is None else float(out.loss)
    return np.asarray(out.logits.astype(jnp.float32)), loss


def load(folder, **kw):
    return VipLlavaForConditionalGeneration.from_pretrained(folder, **kw)


def assert_close(ours, ref, keep=None, atol=ATOL, what="logits"):
    """max |ours - ref| <= atol over the rows selected by `keep` (bool [B, T]), all if None."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    diff = np.abs(ours - ref)
    if keep is not None:
        diff = diff[np.asarray(keep, bool)]
    assert diff.size and np.isfinite(diff).all(), f"{what}: nothing compared or non-finite values"
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3e} > {atol:.0e}"


def assert_loss_close(ours, ref):
    assert ours is not None and ref is not None
    assert abs(ours - ref) <= LOSS_RTOL * abs(ref), f"loss {ours!r} vs reference {ref!r}"


def assert_parity(model, hf, inputs):
    """Whole-model logits (non-padding positions) and loss against transformers."""
    ref_logits, ref_loss = torch_forward(hf, inputs)
    logits, loss = jax_forward(model, inputs)
    assert_close(logits, ref_logits, keep=inputs["attention_mask"])
    assert_loss_close(loss, ref_loss)
    return logits, ref_logits


# Every whole-model forward uses this batch shape, so models of one config share a compile.
BATCH = dict(batch=3, seq=20, left_pad=(0, 3, 6))


# -- 1. the parts on their own -------------------------------------------------------------------

N_VISION = 5  # the default tiny tower
# 0 (embeddings after pre_layrnorm), middle, last, negatives, -(n+1) == 0; unsorted on purpose.
VISION_LAYERS = (0, 1, 3, N_VISION, -1, -2, -5, -(N_VISION + 1))


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    """The default tiny model (5 CLIP layers, features (-2, -5, 1, 0)), transformers' and ours."""
    hf, folder = tiny_hf
    return hf, load(folder)


@pytest.fixture(scope="module")
def parts(tiny):
    """Our parts' outputs on random pixels and random left-padded embeddings."""
    hf, model = tiny
    assert hf.config.vision_config.num_hidden_layers == N_VISION
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
    b, t, d = 3, 12, hf.config.text_config.hidden_size
    embeds = rng.standard_normal((b, t, d)).astype(np.float32)
    mask = np.ones((b, t), np.int64)
    mask[1, :4] = 0
    mask[2, :7] = 0
    positions = np.broadcast_to(np.arange(t), (b, t))  # transformers' default position ids
    states, features, hidden = _parts(
        model, jnp.asarray(pixels), VISION_LAYERS, jnp.asarray(embeds), jnp.asarray(mask),
        jnp.asarray(positions),
    )
    return dict(hf=hf, pixels=pixels, embeds=embeds, mask=mask, states=states,
                features=features, hidden=hidden)


def test_vision_hidden_states(parts):
    hf = parts["hf"]
    with torch.no_grad():
        ref = hf.model.vision_tower(torch.tensor(parts["pixels"]), output_hidden_states=True).hidden_states
    assert len(ref) == N_VISION + 1
    assert len(parts["states"]) == len(VISION_LAYERS)
    for i, state in zip(VISION_LAYERS, parts["states"]):
        assert_close(state, ref[i].numpy(), what=f"vision hidden state {i}")
    # Hidden states really differ between layers (so the indexing above is actually tested).
    assert np.abs(ref[1].numpy() - ref[2].numpy()).max() > 1e-2


def test_projector_image_features(parts):
    hf = parts["hf"]
    with torch.no_grad():
        out = hf.model.get_image_features(pixel_values=torch.tensor(parts["pixels"]))
    # transformers 5.x returns a BaseModelOutputWithPooling whose pooler_output holds the
    # projected features [num_images, patches, text hidden].
    ref = out.pooler_output.numpy()
    assert ref.shape == (3, 4, hf.config.text_config.hidden_size)
    assert_close(parts["features"], ref, what="image features")


def test_decoder_hidden_states_left_padded(parts):
    hf, mask = parts["hf"], parts["mask"]
    with torch.no_grad():
        ref = hf.model.language_model(
            inputs_embeds=torch.tensor(parts["embeds"]), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    assert_close(parts["hidden"], ref, keep=mask, what="decoder hidden states")


def test_activations_and_norm_eps(tiny):
    """The known numerical traps, on inputs where they show: with this tiny model's small
    activations, tanh-GELU or a wrong norm eps move the logits by ~1e-4 or less, so check
    each activation on a grid and each norm on tiny-variance inputs (where eps dominates)."""
    hf, model = tiny
    grid = np.linspace(-6, 6, 2001, dtype=np.float32)[None]
    acts = {
        "projector gelu (exact)": (model.multi_modal_projector.act, hf.model.multi_modal_projector.act),
        "clip quick_gelu": (model.vision_tower.encoder.layers[0].mlp.act,
                            hf.model.vision_tower.encoder.layers[0].mlp.activation_fn),
        "decoder silu": (model.language_model.layers[0].mlp.act, hf.model.language_model.layers[0].mlp.act_fn),
    }
    for what, (ours, theirs) in acts.items():
        with torch.no_grad():
            ref = theirs(torch.tensor(grid)).numpy()
        assert_close(ours(jnp.asarray(grid)), ref, atol=1e-6, what=what)

    rng = np.random.default_rng(7)
    norms = {
        "projector_layernorm": (model.multi_modal_projector.projector_layernorm,
                                hf.model.multi_modal_projector.projector_layernorm),
        "clip pre_layrnorm": (model.vision_tower.pre_layrnorm, hf.model.vision_tower.pre_layrnorm),
        "clip layer_norm2": (model.vision_tower.encoder.layers[1].layer_norm2,
                             hf.model.vision_tower.encoder.layers[1].layer_norm2),
        "decoder rmsnorm": (model.language_model.norm, hf.model.language_model.norm),
        "decoder input_layernorm": (model.language_model.layers[1].input_layernorm,
                                    hf.model.language_model.layers[1].input_layernorm),
    }
    for what, (ours, theirs) in norms.items():
        dim = theirs.weight.shape[0]
        x = (1e-3 * rng.standard_normal((2, 3, dim))).astype(np.float32)  # variance 1e-6 < eps
        with torch.no_grad():
            ref = theirs(torch.tensor(x)).numpy()
        assert_close(ours(jnp.asarray(x)), ref, atol=1e-5, what=what)


# -- 2. whole model, logits and loss, over the shapes that change the code path -----------------

SHAPES = {
    "mha": (dict(num_heads=4, num_kv_heads=4), {}),
    "gqa": (dict(num_heads=4, num_kv_heads=2), {}),
    "mistral_sliding_window": (dict(text_model="mistral", sliding_window=5), {}),
    "default_five_feature_layers": (dict(vision_layers=12, feature_layers=[-2, -5, -8, -11, 6]), {}),
    "single_int_feature_layer": (dict(feature_layers=-2), {}),
    "tied_head": (dict(tied=True), {}),
    "two_images_per_row": ({}, dict(images_per_row=2)),
}


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def shaped(request, tmp_path_factory):
    """(transformers model, our model loaded from its folder, inputs), built once per shape."""
    model_kw, input_kw = SHAPES[request.param]
    hf = make_hf_model(seed=3, **model_kw)
    folder = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    inputs = make_inputs(hf.config, **BATCH, **input_kw)
    return request.param, hf, load(folder), inputs


def test_whole_model_logits_and_loss(shaped):
    name, hf, model, inputs = shaped
    # Our config, read back from config.json, selects the same layers as transformers'.
    assert model.config.feature_layer_indices == tuple(np.atleast_1d(hf.config.vision_feature_layer))
    labels = inputs["labels"]
    assert (labels == -100).any() and (labels != -100).any()
    assert (inputs["attention_mask"] == 0).any()
    logits, ref = assert_parity(model, hf, inputs)
    assert logits.shape == (3, 20, hf.config.text_config.vocab_size)

    if name == "tied_head":  # the head really is the embedding table, on both sides
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
        assert model.lm_head is None
    if name == "two_images_per_row":
        assert inputs["pixel_values"].shape[0] == 2 * inputs["input_ids"].shape[0]
    if name == "mistral_sliding_window":
        # The window must actually cut keys: the same weights without a window differ.
        no_window = make_hf_model(seed=3, text_model="mistral", sliding_window=None)
        no_window.load_state_dict(hf.state_dict())
        unwindowed, _ = torch_forward(no_window, inputs)
        keep = inputs["attention_mask"].astype(bool)
        assert np.abs(unwindowed - ref)[keep].max() > 1e-2


# -- 3. every on-disk layout --------------------------------------------------------------------

LAYOUTS = {  # name: (save_hf_model keywords, tied head)
    "v5": (dict(layout="v5"), False),
    "v4_37_old_config": (dict(layout="v4_37", old_config=True), False),
    "v4_52": (dict(layout="v4_52"), False),
    "safetensors_3_shards": (dict(shards=3), False),
    "pytorch_model_bin": (dict(fmt="bin"), False),
    "pytorch_model_bin_3_shards": (dict(fmt="bin", shards=3), False),
    # A tied checkpoint omits the head, whose key differs between the layouts (v5: the
    # tied_head shape above).
    "v4_37_tied": (dict(layout="v4_37", old_config=True), True),
    "v4_52_tied": (dict(layout="v4_52"), True),
}


@pytest.fixture(scope="module")
def layout_models():
    """An untied and a tied model, with inputs (configs as the gqa and tied_head shapes)."""
    out = {}
    for tied in (False, True):
        hf = make_hf_model(seed=4, tied=tied)
        out[tied] = (hf, make_inputs(hf.config, **BATCH, seed=4))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_layout(layout_models, tmp_path, layout):
    kw, tied = LAYOUTS[layout]
    hf, inputs = layout_models[tied]
    folder = save_hf_model(hf, tmp_path / layout, **kw)

    # The folder really is in the layout under test.
    ext = "bin" if kw.get("fmt") == "bin" else "safetensors"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    assert len(list(folder.glob(f"*.{ext}"))) == kw.get("shards", 1)
    assert not list(folder.glob("*.bin" if ext == "safetensors" else "*.safetensors"))
    assert (folder / f"{stem}.{ext}.index.json").is_file() == (kw.get("shards", 1) > 1)
    if kw.get("old_config"):
        cfg = json.loads((folder / "config.json").read_text())
        assert "vision_feature_layers" in cfg and "vision_feature_layer" not in cfg
        assert "torch_dtype" in cfg and "rope_theta" in cfg["text_config"]

    model = load(folder)
    if tied:
        assert model.lm_head is None
    assert_parity(model, hf, inputs)


# -- 4. half-precision checkpoints ---------------------------------------------------------------

@pytest.fixture(scope="module")
def half_checkpoints(tmp_path_factory):
    """dtype name -> (folder saved in that dtype, transformers' float32 load of it, inputs,
    its logits, its loss); built on first use."""
    from transformers import VipLlavaForConditionalGeneration as HFModel

    original = make_hf_model(seed=5)
    inputs = make_inputs(original.config, **BATCH, seed=5)
    keep = inputs["attention_mask"].astype(bool)
    orig_logits, _ = torch_forward(original, inputs)
    cache = {}

    def get(dtype):
        if dtype not in cache:
            folder = save_hf_model(original, tmp_path_factory.mktemp(dtype), dtype=getattr(torch, dtype))
            hf, info = HFModel.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
            hf.eval()
            ref_logits, ref_loss = torch_forward(hf, inputs)
            # The rounding moves the logits by more than the tolerance, so the comparison below
            # does check that our loader reads the stored half values (and nothing else).
            assert np.abs(orig_logits - ref_logits)[keep].max() > 2 * ATOL
            cache[dtype] = (folder, hf, inputs, ref_logits, ref_loss)
        return cache[dtype]

    return get


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_checkpoint_loaded_as_float32(half_checkpoints, stored):
    """Our float32 load of a half checkpoint == transformers' float32 load of the same folder."""
    folder, hf, inputs, _, _ = half_checkpoints(stored)
    model = load(folder, dtype="float32")
    assert model.language_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    assert_parity(model, hf, inputs)


def test_bf16_compute_close_to_float32(half_checkpoints):
    """dtype="bfloat16" runs in bfloat16 and stays close to the float32 reference."""
    folder, _, inputs, ref_logits, ref_loss = half_checkpoints("bfloat16")
    model = load(folder, dtype="bfloat16")
    assert model.language_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    out = _forward(model, {k: jnp.asarray(v) for k, v in inputs.items()})
    assert out.logits.dtype == jnp.bfloat16  # the forward really ran in bfloat16
    logits = np.asarray(out.logits.astype(jnp.float32))
    keep = inputs["attention_mask"].astype(bool)
    ours, ref = logits[keep], ref_logits[keep]
    assert np.isfinite(ours).all()
    # bfloat16 keeps ~3 significant digits: about 0.5% relative error through this tiny model.
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 0.02, f"relative L2 error {rel:.3e}"
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()
    # Same prediction wherever the float32 top-2 margin is clearly above bfloat16 noise.
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.02
    assert clear.sum() >= keep.sum() // 2
    assert (ours.argmax(-1) == ref.argmax(-1))[clear].all()
    assert abs(float(out.loss) - ref_loss) < 1e-2 * abs(ref_loss)


# -- 5. input errors ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def error_case(tiny):
    hf, model = tiny
    return hf, model, make_inputs(hf.config, batch=2, seq=16, left_pad=(0, 3))


def _with(inputs, **changes):
    return {**inputs, **changes}


def test_extra_image_token_raises(error_case):
    hf, model, inputs = error_case
    ids = inputs["input_ids"].copy()
    ids[0, -1] = IMAGE_TOKEN  # one more placeholder than the two images give features
    bad = _with(inputs, input_ids=ids)
    with pytest.raises(VipLlavaError, match="(?i)image tokens"):
        model(**bad)
    with pytest.raises(ValueError):  # transformers rejects it too
        torch_forward(hf, bad)


def test_missing_image_token_raises(error_case):
    _, model, inputs = error_case
    ids = inputs["input_ids"].copy()
    ids[1, np.flatnonzero(ids[1] == IMAGE_TOKEN)[0]] = 5
    with pytest.raises(VipLlavaError, match="(?i)image tokens"):
        model(**_with(inputs, input_ids=ids))


def test_image_count_mismatch_raises(error_case):
    _, model, inputs = error_case
    pixels = inputs["pixel_values"]
    with pytest.raises(VipLlavaError, match="(?i)image tokens"):
        model(**_with(inputs, pixel_values=np.concatenate([pixels, pixels[:1]])))
    with pytest.raises(VipLlavaError, match="(?i)image tokens"):
        model(**_with(inputs, pixel_values=pixels[:1]))
    with pytest.raises(VipLlavaError, match="(?i)image tokens"):
        model(**_with(inputs, pixel_values=None))


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 14, 14), (2, 28, 28, 3), (3, 28, 28), (2, 1, 28, 28), (2, 3, 28, 42)],
    ids=["small", "channels_last", "3d", "one_channel", "not_square"],
)
def test_wrong_pixel_values_shape_raises(error_case, shape):
    _, model, inputs = error_case
    pixels = np.zeros(shape, np.float32)
    with pytest.raises(VipLlavaError, match="pixel_values"):
        model(**_with(inputs, pixel_values=pixels))


def test_count_mismatch_under_a_trace_is_loud_not_silent(tiny_hf):
    """Inside a caller's jit the host check cannot run; the result must be NaN, not a guess."""
    import jax

    hf, path = tiny_hf
    model = VipLlavaForConditionalGeneration.from_pretrained(path)
    inputs = make_inputs(hf.config)
    inputs["input_ids"][0, -1] = IMAGE_TOKEN  # one image token more than the images give
    out = jax.jit(lambda x: model.forward(**x))({k: jnp.asarray(v) for k, v in inputs.items()})
    assert np.isnan(float(out.loss))

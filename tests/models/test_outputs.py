"""Forward outputs beyond the logits, against transformers' VipLlava (eager attention), float32:
hidden states, attention weights, the projector's output, `inputs_embeds`, a per-call
`vision_feature_layer`; and the default forward's compiled program left as it was.

Padding positions (left padding) are compared nowhere: their queries see no key, which
transformers and we fill differently, and no real token reads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.helpers import IMAGE_TOKEN, make_hf_model, make_inputs
from vipllava_jax import VipLlavaError, VipLlavaForConditionalGeneration, VipLlavaOutput
from vipllava_jax.models.vipllava import modeling
from vipllava_jax.nn.losses import causal_lm_loss

ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_model()
    hf.set_attn_implementation("eager")
    path = tmp_path_factory.mktemp("outputs")
    hf.save_pretrained(path)
    return hf, VipLlavaForConditionalGeneration.from_pretrained(path)


@pytest.fixture(scope="module")
def inputs(pair):
    hf, _ = pair
    out = make_inputs(hf.config, batch=2, seq=12, left_pad=(0, 3))
    out.pop("labels")
    return out


def torch_outputs(hf, inputs, **kw):
    with torch.no_grad():
        return hf(**{k: torch.tensor(v) for k, v in inputs.items()}, **kw)


def close(ours, ref, what, keep=None):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref.float().numpy() if torch.is_tensor(ref) else ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    diff = np.abs(ours - ref) if keep is None else np.abs(ours - ref)[keep]
    assert diff.size and diff.max() <= ATOL, f"{what}: max |diff| {diff.max():.2e}"


def test_hidden_states_attentions_and_image_features_match_transformers(pair, inputs):
    hf, model = pair
    ref = torch_outputs(hf, inputs, output_hidden_states=True, output_attentions=True)
    out = model(**inputs, output_hidden_states=True, output_attentions=True,
                output_image_hidden_states=True)
    keep = inputs["attention_mask"].astype(bool)  # [B, T] real tokens
    close(out.logits, ref.logits, "logits", keep)
    assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.text_config.num_hidden_layers + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        close(ours, theirs, f"hidden_states[{i}]", keep)
    assert len(out.attentions) == len(ref.attentions) == hf.config.text_config.num_hidden_layers
    for i, (ours, theirs) in enumerate(zip(out.attentions, ref.attentions, strict=True)):
        close(ours, theirs, f"attentions[{i}]", keep[:, None, :].repeat(ours.shape[1], 1))  # [B, N, T] queries
        sums = np.asarray(ours).sum(-1)[keep[:, None, :].repeat(ours.shape[1], 1)]
        np.testing.assert_allclose(sums, 1, atol=1e-5)  # post-softmax
    close(out.image_hidden_states, ref.image_outputs.pooler_output, "image_hidden_states")


def test_one_output_alone_and_the_loss(pair, inputs):
    hf, model = pair
    labels = np.where(inputs["attention_mask"] == 0, -100, inputs["input_ids"])
    labels = np.where(labels == IMAGE_TOKEN, -100, labels)
    # a row's first token is predicted from a padding query (eager attention: uniform weights)
    labels[np.arange(len(labels)), np.argmax(inputs["attention_mask"], axis=1)] = -100
    ref = torch_outputs(hf, {**inputs, "labels": labels}, output_hidden_states=True)
    out = model(**inputs, labels=labels, output_hidden_states=True)
    assert out.attentions is None and out.image_hidden_states is None and out.past_key_values is None
    close(out.hidden_states[-1], ref.hidden_states[-1], "last hidden state", inputs["attention_mask"].astype(bool))
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5 * abs(float(ref.loss))


def test_inputs_embeds_match_input_ids_and_transformers(pair, inputs):
    hf, model = pair
    ids = inputs["input_ids"]
    embeds = np.asarray(model.language_model.embed_tokens(jnp.asarray(ids)))  # image rows: the token's own
    with_embeds = {k: v for k, v in inputs.items() if k != "input_ids"}
    ref = torch_outputs(hf, {**with_embeds, "inputs_embeds": embeds})
    out = model(**with_embeds, inputs_embeds=embeds)
    keep = inputs["attention_mask"].astype(bool)
    close(out.logits, ref.logits, "logits from inputs_embeds", keep)
    close(out.logits, model(**inputs).logits, "logits: inputs_embeds vs input_ids", keep)
    # text only, and an edited embedding changes the output
    text = {"inputs_embeds": embeds[:, -3:], "attention_mask": inputs["attention_mask"][:, -3:]}
    ref = torch_outputs(hf, text)
    close(model(**text).logits, ref.logits, "text-only inputs_embeds")


def test_vision_feature_layer_per_call_matches_transformers(pair, inputs):
    hf, model = pair
    layers = [1, -1, 3, 0]  # as many as the projector takes (4), other than the config's
    assert tuple(layers) != model.config.feature_layer_indices
    ref = torch_outputs(hf, inputs, vision_feature_layer=layers)
    out = model(**inputs, vision_feature_layer=layers, output_image_hidden_states=True)
    keep = inputs["attention_mask"].astype(bool)
    close(out.logits, ref.logits, "logits", keep)
    close(out.image_hidden_states, ref.image_outputs.pooler_output, "image_hidden_states")
    default = model(**inputs).logits
    assert np.abs(np.asarray(out.logits) - np.asarray(default))[keep].max() > 1e-3  # the layers matter
    close(model(**inputs, vision_feature_layers=tuple(layers)).logits, out.logits, "older keyword")


def test_bad_options_are_one_line_errors(pair, inputs):
    _, model = pair
    cases = [
        (dict(vision_feature_layer=[1, 2]), "vision_feature_layer must be 4"),
        (dict(vision_feature_layer=[1, 2, 3, 99]), "vision_feature_layer must be 4"),
        (dict(inputs_embeds=np.zeros((2, 12, 48), np.float32)), "exactly one of input_ids and inputs_embeds"),
        (dict(use_cache=True, output_attentions=True), "without a cache"),
        (dict(use_cache=True, cache_length=4), "cache_length 4"),
    ]
    for kw, message in cases:
        with pytest.raises(VipLlavaError, match=message) as err:
            model(**inputs, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(VipLlavaError, match="inputs_embeds must be"):
        model(inputs_embeds=np.zeros((2, 12, 5), np.float32))
    with pytest.raises(VipLlavaError, match="image tokens and image features do not match"):
        model(inputs_embeds=np.zeros((2, 12, 48), np.float32), pixel_values=inputs["pixel_values"])


# -- the default program ---------------------------------------------------------------------------

def _old_forward(graphdef, state, input_ids, pixel_values, attention_mask, position_ids, labels):
    """The forward as it was before the options: embed, decoder, head, loss."""
    model = nnx.merge(graphdef, state)
    embeds = model.embed(input_ids, pixel_values)
    hidden = model.language_model(embeds, attention_mask, position_ids)
    logits = model.logits_from_hidden(hidden)
    return VipLlavaOutput(logits=logits, loss=None if labels is None else causal_lm_loss(logits, labels))


def test_default_forward_is_the_same_program(pair, inputs):
    _, model = pair
    graphdef, state = nnx.split(model)
    b, t = inputs["input_ids"].shape
    args = [jnp.asarray(inputs[k]) for k in ("input_ids", "pixel_values", "attention_mask")]
    args += [jnp.broadcast_to(jnp.arange(t), (b, t)), None]
    default = modeling.jitted_forward.lower(graphdef, state, *args).as_text()
    reference = jax.jit(_old_forward, static_argnums=0).lower(graphdef, state, *args).as_text()
    strip = lambda text: text.replace("jit__old_forward", "F").replace("jit_jitted_forward", "F")
    assert strip(default) == strip(reference)
    # one result (the logits) and no extra outputs when no option is set
    lowered = modeling.jitted_forward.lower(graphdef, state, *args)
    assert len(jax.tree.leaves(lowered.out_info)) == 1
    # flags left at their defaults keep the default program
    before = modeling.jitted_outputs._cache_size()
    model(**inputs, output_hidden_states=False, output_attentions=False, use_cache=False)
    assert modeling.jitted_outputs._cache_size() == before


def test_one_program_per_flag_set(pair, inputs):
    _, model = pair
    start = modeling.jitted_outputs._cache_size()
    for _ in range(2):
        model(**inputs, output_attentions=True)
        model(**inputs, output_hidden_states=True)
    assert modeling.jitted_outputs._cache_size() - start <= 2
    out = model(**inputs, output_attentions=True)
    assert out.hidden_states is None and len(out.attentions) == 2


# -- the attention overlay -------------------------------------------------------------------------

def test_answer_attention_over_the_patch_grid_matches_transformers(pair):
    from vipllava_jax.analysis import answer_attention, model_view, overlay

    hf, model = pair
    inputs = make_inputs(hf.config, batch=1, seq=10, left_pad=(0,))
    prompt, pixels = inputs["input_ids"], inputs["pixel_values"]
    answer = model.generate(prompt, pixels, max_new_tokens=4, eos_token_id=[])[:, prompt.shape[1]:]
    grid = answer_attention(model, prompt, pixels, answer, layers=[1], heads=[0, 2])
    side = hf.config.vision_config.image_size // hf.config.vision_config.patch_size
    assert grid.shape == (side, side)
    ids = np.concatenate([prompt, answer], axis=1)
    ref = torch_outputs(hf, {"input_ids": ids, "pixel_values": pixels}, output_attentions=True)
    cols = np.flatnonzero(ids[0] == IMAGE_TOKEN)
    queries = np.arange(prompt.shape[1] - 1, ids.shape[1] - 1)
    want = ref.attentions[1][0, [0, 2]].numpy()[:, queries][..., cols].mean(axis=(0, 1))
    close(grid.reshape(-1), want, "answer attention on the patches")
    view = model_view(pixels[0])
    assert view.shape == (28, 28, 3) and view.dtype == np.uint8
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = overlay(view, grid, title="answer")
    assert len(ax.images) == 2

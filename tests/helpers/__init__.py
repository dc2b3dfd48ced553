"""Test helpers: tiny random VipLlava checkpoints, built and saved by transformers itself (no
hub access), and jaxpr FLOP counting. VisionEncoderDecoder builders are in `tests.helpers.ved`,
the training run's config in `tests.helpers.train`; fixtures are in the conftest.py files.

`make_hf_checkpoint(path, **shape)` saves a transformers VipLlava model with save_pretrained
and then, if asked, rewrites it into the other on-disk layouts found in the wild
(transformers 4.37-4.51 and 4.52-4.57 key prefixes, old config field names,
sharded safetensors, pytorch_model.bin).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vipllava_jax.models.vipllava.mapping import canonical_key, hf_key_for

IMAGE_TOKEN = 100
VOCAB = 128


def tiny_config(
    *,
    text_model="llama",
    num_heads=4,
    num_kv_heads=2,
    feature_layers=(-2, -5, 1, 0),
    tied=False,
    image_size=28,
    vision_layers=5,
    sliding_window=None,
):
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, VipLlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
        num_attention_heads=4, image_size=image_size, patch_size=14, projection_dim=16,
    )
    text_kw = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, vocab_size=VOCAB, max_position_embeddings=256,
        tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    if text_model == "mistral":
        text = MistralConfig(sliding_window=sliding_window, **text_kw)
    else:
        text = LlamaConfig(**text_kw)
    return VipLlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layers,
        tie_word_embeddings=tied,
    )


def make_hf_model(seed=0, **kw):
    from transformers import VipLlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = VipLlavaForConditionalGeneration(tiny_config(**kw)).eval()
    # Random init leaves norms at ones/zeros; perturb every parameter so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


# Key prefix rewrites from transformers 5.x's save_pretrained layout to the older ones.
_OLD_LAYOUTS = {
    "v4_37": (("vision_tower.", "vision_tower.vision_model."),),
    "v4_52": (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ),
}


def _rename(key: str, layout: str) -> str:
    for new, old in _OLD_LAYOUTS.get(layout, ()):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def save_hf_model(model, path, *, layout="v5", shards=1, fmt="safetensors", dtype=torch.float32,
                  old_config=False) -> Path:
    """Saves `model` in one of the layouts transformers has written; returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    model.save_pretrained(path)  # config.json (and the 5.x layout, replaced below)
    for f in list(path.glob("model*.safetensors*")) + list(path.glob("pytorch_model*")):
        f.unlink()
    state = {}
    for k, v in model.state_dict().items():
        if model.config.tie_word_embeddings and k == "lm_head.weight":
            continue
        k5 = {"lm_head.weight": "language_model.lm_head.weight"}.get(k, k)
        k5 = k5.replace("model.language_model.", "language_model.model.", 1) if k5.startswith("model.language_model.") else k5
        k5 = k5.removeprefix("model.") if k5.startswith(("model.vision_tower.", "model.multi_modal_projector.")) else k5
        state[_rename(k5, layout)] = v.detach().to(dtype).contiguous().clone()
    keys = sorted(state)
    groups = [keys[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in group}
        if fmt == "safetensors":
            save_file(part, path / name, metadata={"format": "pt"})
        else:
            torch.save(part, path / name)
        weight_map.update(dict.fromkeys(group, name))
    if shards > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    if old_config:
        _write_old_config(path, dtype)
    return path


def _write_old_config(path: Path, dtype) -> None:
    """Rewrites config.json in the 4.37 dialect: vision_feature_layers, torch_dtype, rope_theta."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_feature_layers"] = cfg.pop("vision_feature_layer")
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    text = cfg["text_config"]
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    (path / "config.json").write_text(json.dumps(cfg))


def make_inputs(config, *, batch=2, seq=16, images_per_row=1, left_pad=(0, 3), seed=0):
    """input_ids with a run of image tokens per image, left padding, pixel values, labels."""
    rng = np.random.default_rng(seed)
    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    ids = rng.integers(3, IMAGE_TOKEN, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    for b in range(batch):
        pad = left_pad[b % len(left_pad)]
        mask[b, :pad] = 0
        ids[b, :pad] = 0
        start = pad + 1
        for _ in range(images_per_row):
            ids[b, start:start + n_img] = IMAGE_TOKEN
            start += n_img + 1
    pixels = rng.standard_normal((batch * images_per_row, 3, vc.image_size, vc.image_size)).astype(np.float32)
    labels = np.where((ids == IMAGE_TOKEN) | (mask == 0), -100, ids)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)


def torch_forward(model, inputs):
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in inputs.items()})
    return out.logits.float().numpy(), float(out.loss) if out.loss is not None else None


def torch_loss_and_grads(model, inputs):
    """transformers' output for `inputs` (labels included) after `loss.backward()`, and the
    gradient of each parameter that got one, by canonical key."""
    model.zero_grad()
    out = model(**{k: torch.tensor(v) for k, v in inputs.items()})
    out.loss.backward()
    return out, {canonical_key(n): p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(grads, torch_grads, names=None) -> float:
    """Each of `names` (default: every one) of the flat JAX `grads` equals its transformers
    gradient from `torch_loss_and_grads` (rtol 1e-4, atol 1e-6 x the tensor's max |grad|).
    Returns the worst max |difference| / max |grad| over them."""
    worst = 0.0
    for name in grads if names is None else names:
        key, leaf = hf_key_for(name, grads[name].ndim)
        want = leaf.to_jax(torch_grads[key].numpy())
        got = np.asarray(grads[name])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=name)
        worst = max(worst, float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30)))
    return worst


def make_word_tokenizer(path, corpus):
    """A word-level tokenizer over `corpus` (Llama-like: `<s>` prepended), with `<image>` at
    IMAGE_TOKEN so that it fits the tiny models; saved with save_pretrained to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trained = Tokenizer(models.WordLevel(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Whitespace()
    trained.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    vocab = trained.get_vocab()
    assert max(vocab.values()) < IMAGE_TOKEN, "corpus too large for the tiny vocabulary"
    tok = Tokenizer(models.WordLevel({**vocab, "<image>": IMAGE_TOKEN}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.save_pretrained(path)
    return fast


def jaxpr_eqns(jaxpr, skip=()):
    """Every equation of a jaxpr, recursing into the jaxprs in its equations' params, except
    those of the primitives named in `skip`."""
    import jax.extend

    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name in skip:
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from jaxpr_eqns(sub, skip)


def matmul_flops(jaxpr) -> int:
    """2 x the multiply-adds of every dot_general and convolution in a jaxpr."""
    import math

    total = 0
    for eqn in jaxpr_eqns(jaxpr):
        out = math.prod(eqn.outvars[0].aval.shape)
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * out * math.prod(lhs[d] for d in contracting)
        elif eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            total += 2 * out * math.prod(kernel) // kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
    return total


def traced_and_estimated_flops(model, stage, batch, text_config) -> tuple[int, float]:
    """(matmul FLOPs of the traced `loss_and_grads` of `batch` in `stage`, what
    `train_flops_per_token` says of it). The trace uses XLA's dense attention, which computes
    the whole causal square of the decoder's self-attention: the estimate's other half is
    added to it."""
    import jax
    import jax.numpy as jnp

    from vipllava_jax.train import TrainConfig, init_train_state, loss_and_grads, mesh_from_spec
    from vipllava_jax.train.flops import train_flops_per_token

    mesh = mesh_from_spec("data=1", jax.devices()[:1])
    graphdef, state, _ = init_train_state(model, TrainConfig(stage=stage), mesh)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    jaxpr = jax.make_jaxpr(lambda p, f, b: loss_and_grads(graphdef, p, f, b))(state.params, state.frozen, batch)
    b, t = batch["labels"].shape
    dense_extra = b * 6 * text_config.num_hidden_layers * t**2 * text_config.hidden_size
    return matmul_flops(jaxpr.jaxpr), b * t * train_flops_per_token(state, model.config, seq_len=t) + dense_extra

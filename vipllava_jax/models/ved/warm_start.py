"""Warm start: a VisionEncoderDecoder model from a pretrained encoder and a pretrained decoder,
as transformers' `VisionEncoderDecoderModel.from_encoder_decoder_pretrained`.

The decoder's config gets `is_decoder` and `add_cross_attention`; the model is built at random
(weights N(0, 0.02), biases 0, norms 1/0, as transformers' `_init_weights`), then every
parameter found in the two checkpoints is read from them. A checkpoint may hold the bare model
(`ViTModel`: `embeddings.*`, `GPT2Model`: `h.*`) or a model with a head (`vit.embeddings.*`,
`transformer.h.*`, `bert.*` + `cls.*`, BART's `model.decoder.*`); what VED has no use for
(classifiers, poolers of another layout, BART's encoder) is skipped. What neither checkpoint
holds (the cross-attention, `enc_to_dec_proj`, a missing head) stays random and is named in one
log line, as transformers names its newly initialised weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from vipllava_jax import hub
from vipllava_jax.checkpoint import flat_state
from vipllava_jax.checkpoint.hf import open_hf_weights
from vipllava_jax.errors import CheckpointError, ConfigError
from vipllava_jax.models.ved.config import VisionEncoderDecoderConfig
from vipllava_jax.models.ved.mapping import VED_MAPPING

logger = logging.getLogger(__name__)

# Where a key of ours may be stored under another name: BART keeps the decoder's embeddings as `model.shared`.
ALIASES = {"model.decoder.embed_tokens.weight": ("model.shared.weight",)}


def read_config(path: Path, side: str) -> dict:
    try:
        d = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json in the {side} folder {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path / 'config.json'}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path / 'config.json'} must be a JSON object")
    return d


def source_key(key: str, table) -> str | None:
    """The stored key that holds our `key` (the path under `encoder.` / `decoder.`), if any."""
    if key in table:
        return key
    for alias in ALIASES.get(key, ()):
        if alias in table:
            return alias
    with_head = [k for k in table if k.endswith("." + key)]  # e.g. vit.embeddings.* for embeddings.*
    if len(with_head) == 1:
        return with_head[0]
    bare = key.split(".", 1)[1] if "." in key else None  # e.g. h.0.* (GPT2Model) for transformer.h.0.*
    return bare if bare in table else None


def from_encoder_decoder_pretrained(model_cls, encoder_path, decoder_path, *, dtype="float32", seed: int = 0,
                                    revision: str | None = None, **token_ids):
    """`model_cls` (VisionEncoderDecoderModel) from two HF folders or hub ids; `token_ids`
    (`decoder_start_token_id`, `pad_token_id`, ...) go into the new config, which otherwise has
    none (training and generate need the first two)."""
    enc_path, dec_path = (hub.resolve(p, revision=revision) for p in (encoder_path, decoder_path))
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        read_config(enc_path, "encoder"), read_config(dec_path, "decoder"), **token_ids)
    model = model_cls.from_config(config, dtype=dtype, seed=seed)
    state = nnx.state(model, nnx.Param)
    params = flat_state(state)
    new = []
    for side, folder in (("encoder.", enc_path), ("decoder.", dec_path)):
        table = open_hf_weights(folder)
        for path, (_, variable) in params.items():
            if not path.startswith(side):
                continue
            value = variable.get_value()
            hf_key, leaf = VED_MAPPING.hf_key_for(path, value.ndim)
            stored = source_key(hf_key[len(side):], table)
            if stored is None:
                new.append(hf_key)
                continue
            shape, read = table[stored]
            array = leaf.to_jax(read())
            if tuple(array.shape) != tuple(value.shape):
                raise CheckpointError(f"shape mismatch for {stored} in {folder}: checkpoint has {tuple(shape)}, "
                                      f"the {side[:-1]} expects {tuple(leaf.to_hf(value).shape)}")
            variable.set_value(jnp.asarray(array, value.dtype))
    new += [VED_MAPPING.hf_key_for(p, v.get_value().ndim)[0] for p, (_, v) in params.items()
            if p.startswith("enc_to_dec_proj.")]
    nnx.update(model, state)
    if new:
        logger.warning("newly initialised (in neither checkpoint): %d weights: %s", len(new), ", ".join(new))
    return model

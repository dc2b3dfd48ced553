"""VED checkpoints: transformers' VisionEncoderDecoder folders <-> Orbax folders.

The machinery is VipLlava's (`vipllava_jax.checkpoint`: streamed safetensors reading and
writing, one-line errors naming a missing / unexpected / mis-shaped weight, atomic output,
Orbax save and restore); this file adds VED's name table and config handling.

Our parameter paths are transformers' keys (the layout `save_pretrained` writes), so the table
only renames leaves (`kernel` <-> `weight`, `scale` <-> `weight`, `embedding` <-> `weight`) and
transposes: nn.Linear `[out, in]` and the patch conv `[out, in, kh, kw]` are transposed, GPT-2's
Conv1D is already `[in, out]` and is not.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipllava_jax.checkpoint import (
    MARKER, _copy_side_files, atomic_output, flat_state, is_orbax_folder, load_into, normalize_dtype,
    write_hf_folder, write_orbax_folder,
)
from vipllava_jax.checkpoint.hf import read_hf_params
from vipllava_jax.checkpoint.mapping import LEAVES, KeyMapping, Leaf
from vipllava_jax.errors import CheckpointError
from vipllava_jax.ved.config import VisionEncoderDecoderConfig


def _identity(w: np.ndarray) -> np.ndarray:
    return w


# (our leaf name, ndim) -> Leaf: VipLlava's leaves plus ViT's stored-as-is tokens `[1, 1, D]`
# and position table `[1, S, D]`.
VED_LEAVES: dict[tuple[str, int], Leaf] = {
    **LEAVES,
    ("cls_token", 3): Leaf("cls_token", _identity, _identity),
    ("distillation_token", 3): Leaf("distillation_token", _identity, _identity),
    ("position_embeddings", 3): Leaf("position_embeddings", _identity, _identity),
}
CONV1D = Leaf("weight", _identity, _identity)  # GPT-2's Conv1D weight is [in, out] already
PREFIXES = ("encoder.", "enc_to_dec_proj.", "decoder.")

# Buffers older writers saved: GPT-2's causal-mask `attn.bias` / `attn.masked_bias`, BERT's
# position / token-type id ranges.
IGNORED = re.compile(r"(\.(attn|crossattention)\.(bias|masked_bias)|embeddings\.(position_ids|token_type_ids))$")
TIED = ("decoder.lm_head.weight", "decoder.cls.predictions.decoder.weight", "decoder.cls.predictions.decoder.bias")


def hf_key_for(path: str, ndim: int) -> tuple[str, Leaf]:
    """Our path (e.g. `decoder.transformer.h.0.attn.c_attn.kernel`) -> HF key, Leaf."""
    module, _, leaf_name = path.rpartition(".")
    if not path.startswith(PREFIXES):
        raise CheckpointError(f"no HF mapping for parameter {path}")
    is_conv1d = leaf_name == "kernel" and ndim == 2 and path.startswith("decoder.transformer.")
    leaf = CONV1D if is_conv1d else VED_LEAVES.get((leaf_name, ndim))
    if leaf is None:
        raise CheckpointError(f"no HF mapping for parameter {path} ({ndim}-d)")
    return f"{module}.{leaf.hf_name}", leaf


VED_MAPPING = KeyMapping(hf_key_for=hf_key_for, canonical_key=_identity, ignored=IGNORED, tied_keys=TIED)


def _abstract_params(config: VisionEncoderDecoderConfig, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    from vipllava_jax.ved.modeling import VisionEncoderDecoderModel

    _, state = nnx.split(VisionEncoderDecoderModel.abstract(config, param_dtype=dtype))
    return {k: jax.ShapeDtypeStruct(v.get_value().shape, dtype) for k, (_, v) in flat_state(state).items()}


def load_ved(cls, path, *, dtype="float32", param_dtype=None, mesh=None, rules=None):
    """See `VisionEncoderDecoderModel.from_pretrained`."""
    path = Path(path)
    config = VisionEncoderDecoderConfig.from_pretrained(path)
    param_dtype = jnp.dtype(param_dtype or dtype)
    abstract = cls.abstract(config, dtype=dtype, param_dtype=param_dtype)
    return load_into(abstract, path, param_dtype=param_dtype, mesh=mesh, rules=rules,
                     tied_head=config.decoder.tie_word_embeddings, mapping=VED_MAPPING)


def ved_hf_to_orbax(src, dst, *, dtype=None, overwrite=False, progress=False) -> Path:
    """An HF vision-encoder-decoder folder -> an Orbax folder (`vipllava-convert hf-to-orbax`)."""
    src, dst = Path(src), Path(dst)
    config = VisionEncoderDecoderConfig.from_pretrained(src)
    dtype = normalize_dtype(dtype or config.dtype)
    expected = _abstract_params(config, dtype)
    with atomic_output(dst, overwrite=overwrite) as tmp:
        params = read_hf_params(
            src, expected, tied_head=config.decoder.tie_word_embeddings, progress=progress,
            convert=lambda _, a: jnp.asarray(np.asarray(a, dtype)), mapping=VED_MAPPING,
        )
        write_orbax_folder(tmp, params, config, dtype)
        del params
        _copy_side_files(src, tmp)
    return dst


def ved_orbax_to_hf(src, dst, *, overwrite=False, max_shard_bytes=5 * 2**30, progress=False) -> Path:
    """An Orbax VED folder -> safetensors + config.json that transformers'
    VisionEncoderDecoderModel loads (`vipllava-convert orbax-to-hf`)."""
    from vipllava_jax.ved.modeling import VisionEncoderDecoderModel

    src, dst = Path(src), Path(dst)
    if not is_orbax_folder(src):
        raise CheckpointError(f"{src} is not a vipllava-jax Orbax folder (no {MARKER})")
    config = VisionEncoderDecoderConfig.from_pretrained(src)
    model = VisionEncoderDecoderModel.from_pretrained(src, dtype=config.dtype)
    return write_hf_folder(model, src, dst, mapping=VED_MAPPING, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes, progress=progress)

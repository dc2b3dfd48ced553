"""The one name-mapping table between transformers' VipLlava weights and ours.

Both directions use it: a parameter path of ours maps to one canonical HF key and a transform
pair (to_jax, to_hf) that are each other's inverse. Canonical keys are those transformers 5.x
writes; the other layouts found in the wild are rewritten to canonical by `LAYOUT_ALIASES`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from vipllava_jax.errors import CheckpointError

# (canonical HF prefix, our prefix)
PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
)

# Prefixes of older layouts -> canonical (first match wins).
#   transformers 4.37-4.51: language_model.model.*, vision_tower.vision_model.*, language_model.lm_head
#   transformers 4.52-4.57: model.language_model.*, model.vision_tower.vision_model.*, lm_head
LAYOUT_ALIASES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
)

# Buffers some writers saved alongside the weights; recomputed here, so skipped.
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def _identity(w: np.ndarray) -> np.ndarray:
    return w


@dataclasses.dataclass(frozen=True)
class Leaf:
    """How one of our leaf parameters is stored in HF: its name and the transform pair."""

    hf_name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


# (our leaf name, ndim) -> Leaf
LEAVES: dict[tuple[str, int], Leaf] = {
    # nn.Linear weight [out, in] <-> kernel [in, out]
    ("kernel", 2): Leaf("weight", np.transpose, np.transpose),
    # nn.Conv2d weight [out, in, kh, kw] <-> nnx.Conv kernel [kh, kw, in, out]
    ("kernel", 4): Leaf("weight", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
    ("scale", 1): Leaf("weight", _identity, _identity),  # LayerNorm / RMSNorm
    ("bias", 1): Leaf("bias", _identity, _identity),
    ("embedding", 2): Leaf("weight", _identity, _identity),  # nn.Embedding
    ("class_embedding", 1): Leaf("class_embedding", _identity, _identity),
}


def canonical_key(key: str) -> str:
    """An HF key of any known layout, rewritten to transformers 5.x's layout."""
    for old, new in LAYOUT_ALIASES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def hf_key_for(path: str, ndim: int) -> tuple[str, Leaf]:
    """Our parameter path (e.g. `language_model.layers.0.mlp.up_proj.kernel`) -> HF key, Leaf."""
    leaf_name = path.rpartition(".")[2]
    leaf = LEAVES.get((leaf_name, ndim))
    if leaf is None:
        raise CheckpointError(f"no HF mapping for parameter {path} ({ndim}-d)")
    for hf_prefix, our_prefix in PREFIXES:
        if path.startswith(our_prefix):
            hf_module = (hf_prefix + path[len(our_prefix):]).rpartition(".")[0]
            return f"{hf_module}.{leaf.hf_name}", leaf
    raise CheckpointError(f"no HF mapping for parameter {path}")


def hf_shape(leaf: Leaf, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape HF stores for a parameter of ours of `shape` (no memory touched)."""
    return tuple(leaf.to_hf(np.broadcast_to(np.zeros((), np.int8), shape)).shape)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One model family's name table, as the HF reader and writer use it.

    hf_key_for: our parameter path, ndim -> canonical HF key, Leaf.
    canonical_key: a stored HF key of any known layout -> its canonical key.
    ignored: stored keys (canonical) that are buffers, skipped on read.
    tied_keys: canonical keys of a head tied to the embeddings, skipped on read when tied.
    """

    hf_key_for: Callable[[str, int], tuple[str, Leaf]]
    canonical_key: Callable[[str], str]
    ignored: re.Pattern
    tied_keys: tuple[str, ...]


VIPLLAVA = KeyMapping(hf_key_for, canonical_key, IGNORED_KEYS, ("language_model.lm_head.weight",))

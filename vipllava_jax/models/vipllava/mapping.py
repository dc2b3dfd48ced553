"""VipLlava's name table: transformers' VipLlava weights <-> our parameter paths.

Canonical keys are those transformers 5.x writes; the other layouts found in the wild are
rewritten to canonical by `LAYOUT_ALIASES`.
"""

from __future__ import annotations

import re

from vipllava_jax.checkpoint.mapping import LEAVES, KeyMapping, Leaf
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


VIPLLAVA = KeyMapping(hf_key_for, canonical_key, IGNORED_KEYS, ("language_model.lm_head.weight",))

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


# CLIP's normalisation, as transformers' CLIPImageProcessor has it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def processor_files(config) -> dict[str, dict]:
    """The processor files transformers' AutoProcessor reads for a VipLlava folder (a
    LlavaProcessor over CLIPImageProcessor), for an export whose source had none: CLIP
    preprocessing at the tower's image size, and one `<image>` token per patch (the CLS
    feature is dropped: "default" strategy, one additional token)."""
    size = config.vision_config.image_size
    return {
        "preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
        },
        "processor_config.json": {
            "processor_class": "LlavaProcessor", "patch_size": config.vision_config.patch_size,
            "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
            "image_token": "<image>",
        },
    }

"""The original ViP-LLaVA repository's checkpoint layout (`LlavaLlamaForCausalLM`, model_type
"llava_llama"), as its authors released it and fine-tuned forks keep writing it.

What differs from transformers' VipLlava (the facts of transformers'
convert_vipllava_weights_to_hf.py):

    config.json   the Llama fields at the top level; `mm_vision_tower` "clip_4layers_336"
                  (CLIP ViT-L/14-336, features of layers -2, -5, -8, -11, 6), `mm_hidden_size`
                  (5 x the tower's width), `mm_projector_type` "mlp2x_gelu",
                  `image_aspect_ratio` "pad"
    weights       model.embed_tokens / model.layers.N / model.norm / lm_head,
                  model.mm_projector.clip_layernorm, model.mm_projector.final_linear.{0,2},
                  model.vision_tower.vision_tower.vision_model.*
    vocabulary    V0 = 32000 tokens and a tokenizer without `<image>`: conversion adds `<image>`
                  (id V0) and `<pad>` (V0 + 1) and grows the embedding and the head to the next
                  multiple of 64 (32064). The new rows are drawn, as transformers' script draws
                  them, from a normal with the old embedding rows' mean and 1e-5 x their
                  covariance (both the embedding's and the head's new rows), here with numpy
                  seeded by `GROWTH_SEED`; they are never the answer to a text-only prompt's
                  original-vocabulary logits.

The vision tower's shape is read off its weights (its head count as width / 64, as every CLIP
ViT has); a checkpoint without the tower is refused with what to do instead.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from vipllava_jax import storage
from vipllava_jax.checkpoint.hf import open_hf_weights
from vipllava_jax.checkpoint.mapping import KeyMapping
from vipllava_jax.errors import CheckpointError, ConfigError
from vipllava_jax.models.vipllava.config import CLIPVisionConfig, TextConfig, VipLlavaConfig
from vipllava_jax.models.vipllava.mapping import IGNORED_KEYS, canonical_key, hf_key_for

MODEL_TYPE = "llava_llama"
GROWTH_SEED = 0
PAD_TO = 64  # transformers' script resizes the vocabulary to a multiple of 64
# Vision towers the original names, and the CLIP layers whose features the projector reads.
FEATURE_LAYERS = {"clip_4layers_336": (-2, -5, -8, -11, 6)}
TOWER = "model.vision_tower.vision_tower.vision_model."

# transformers' script's ordered substring replacements, to transformers 4.37's layout (which
# VipLlava's own table reads as an older layout).
_RENAMES = (
    ("model.vision_tower.", ""),
    ("model.mm_projector", "multi_modal_projector"),
    ("model", "model.model"),
    ("vision_model.model", "vision_model"),
    ("lm_head", "language_model.lm_head"),
    ("model.model", "language_model.model"),
    ("multi_modal_projector.0", "multi_modal_projector.linear_1"),
    ("multi_modal_projector.2", "multi_modal_projector.linear_2"),
    ("final_linear.0", "linear_1"),
    ("final_linear.2", "linear_2"),
    ("multi_modal_projector.clip_layernorm", "multi_modal_projector.projector_layernorm"),
)
_GROWN = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


def original_key(key: str) -> str:
    """A stored key of the original layout -> VipLlava's canonical HF key."""
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return canonical_key(key)


def grown_vocab(vocab: int) -> int:
    """The vocabulary after adding `<image>` and `<pad>`, padded to a multiple of PAD_TO."""
    return math.ceil((vocab + 2) / PAD_TO) * PAD_TO


def _resizable(key: str, stored: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    return key in _GROWN and len(stored) == 2 and stored[1] == wanted[1] and stored[0] < wanted[0]


def _grow(key: str, array: np.ndarray, wanted: tuple[int, ...], read) -> np.ndarray:
    """`array` [V0, D] with rows V0..V-1 drawn from the old embedding rows' normal."""
    embed = np.asarray(read(_GROWN[0]), np.float64)  # both grow from the embedding's statistics
    mean = embed.mean(axis=0)
    centred = embed - mean
    cov = 1e-5 * (centred.T @ centred) / embed.shape[0]
    rng = np.random.default_rng([GROWTH_SEED, _GROWN.index(key)])
    rows = rng.multivariate_normal(mean, cov, size=wanted[0] - array.shape[0], method="eigh")
    return np.concatenate([np.asarray(array), rows.astype(array.dtype)], axis=0)


ORIGINAL = KeyMapping(hf_key_for, original_key, IGNORED_KEYS, ("language_model.lm_head.weight",),
                      resize=_grow, resizable=_resizable)


def is_original(path: str | Path) -> bool:
    """A folder whose config.json is in the original layout."""
    try:
        return json.loads((storage.path(path) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def _tower_config(folder: Path) -> CLIPVisionConfig:
    """The CLIP tower's shape, from its stored weights."""
    shapes = {key[len(TOWER):]: tuple(shape) for key, (shape, _) in open_hf_weights(folder).items()
              if key.startswith(TOWER)}
    if not shapes:
        raise CheckpointError(
            f"{folder} holds no vision tower ({TOWER}*): the original released its models with "
            "the tower inside; for a stage-1 projector alone, convert the base model it was "
            "trained on and load the projector onto it")
    try:
        width = shapes["embeddings.class_embedding"][0]
        patch = shapes["embeddings.patch_embedding.weight"][-1]
        positions = shapes["embeddings.position_embedding.weight"][0]
        layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
        intermediate = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{folder}: the vision tower's weights are incomplete ({e})") from None
    side = math.isqrt(positions - 1)
    return CLIPVisionConfig(hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=max(1, width // 64), image_size=side * patch, patch_size=patch)


def config_from_original(folder: str | Path, d: dict[str, Any] | None = None) -> VipLlavaConfig:
    """The VipLlavaConfig of an original-layout folder (vocabulary already grown)."""
    folder = storage.path(folder)
    if d is None:
        d = json.loads((folder / "config.json").read_text())
    tower = d.get("mm_vision_tower", "clip_4layers_336")
    if tower not in FEATURE_LAYERS:
        raise ConfigError(f"mm_vision_tower {tower!r} is not one ViP-LLaVA released (known: {sorted(FEATURE_LAYERS)})")
    if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConfigError(f"mm_projector_type {d['mm_projector_type']!r} is not ViP-LLaVA's 'mlp2x_gelu'")
    vision = _tower_config(folder)
    layers = FEATURE_LAYERS[tower]
    if d.get("mm_hidden_size", len(layers) * vision.hidden_size) != len(layers) * vision.hidden_size:
        raise ConfigError(f"mm_hidden_size {d['mm_hidden_size']} is not {len(layers)} x the tower's "
                          f"width {vision.hidden_size}")
    vocab = int(d.get("vocab_size", 32000))
    text_fields = {k: v for k, v in d.items() if not k.startswith("mm_") and k not in (
        "model_type", "architectures", "vision_config", "text_config")}
    text = TextConfig.from_hf_dict({**text_fields, "model_type": "llama", "vocab_size": grown_vocab(vocab)})
    return VipLlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab,
                          vision_feature_layer=layers,
                          dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"))


def add_image_tokens(src: Path, dst: Path, vocab: int) -> None:
    """The tokenizer of `src` with `<image>` (id `vocab`) and `<pad>` (id `vocab` + 1) added,
    written to `dst` (as transformers' script does)."""
    from transformers import AddedToken, AutoTokenizer  # (slow to import: only when converting)

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}: no tokenizer transformers can read ({type(e).__name__})") from None
    if len(tokenizer) != vocab:
        raise CheckpointError(f"{src}: the tokenizer has {len(tokenizer)} tokens, config.json says {vocab}")
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False))
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) != [vocab, vocab + 1]:
        raise CheckpointError(f"{src}: the tokenizer already has <image> or <pad> at other ids")
    tokenizer.save_pretrained(dst)


class OriginalVipLlavaConfig:
    """The registry's config class of the original layout: `from_pretrained(folder)` gives the
    VipLlavaConfig the folder converts to."""

    @staticmethod
    def from_pretrained(path: str | Path) -> VipLlavaConfig:
        return config_from_original(path)


def write_side_files(src: Path, dst: Path, config: VipLlavaConfig) -> None:
    """The converted folder's tokenizer: the original's, with `<image>` and `<pad>` added."""
    add_image_tokens(src, dst, config.image_token_index)

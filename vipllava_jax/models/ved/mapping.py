"""VisionEncoderDecoder's name table: transformers' keys <-> our parameter paths.

Our parameter paths are transformers' keys (the layout `save_pretrained` writes), so the table
only renames leaves (`kernel` <-> `weight`, `scale` <-> `weight`, `embedding` <-> `weight`) and
transposes: nn.Linear `[out, in]` and the patch conv `[out, in, kh, kw]` are transposed, GPT-2's
Conv1D is already `[in, out]` and is not.
"""

from __future__ import annotations

import re

from vipllava_jax.checkpoint.mapping import LEAVES, KeyMapping, Leaf, identity
from vipllava_jax.errors import CheckpointError

# (our leaf name, ndim) -> Leaf: VipLlava's leaves plus ViT's stored-as-is tokens `[1, 1, D]`
# and position table `[1, S, D]`.
VED_LEAVES: dict[tuple[str, int], Leaf] = {
    **LEAVES,
    ("cls_token", 3): Leaf("cls_token", identity, identity),
    ("distillation_token", 3): Leaf("distillation_token", identity, identity),
    ("position_embeddings", 3): Leaf("position_embeddings", identity, identity),
    ("mask_token", 3): Leaf("mask_token", identity, identity),  # BEiT
    ("lambda_1", 1): Leaf("lambda_1", identity, identity),  # BEiT's layer scale
    ("lambda_2", 1): Leaf("lambda_2", identity, identity),
    ("relative_position_bias_table", 2): Leaf("relative_position_bias_table", identity, identity),
}
CONV1D = Leaf("weight", identity, identity)  # GPT-2's Conv1D weight is [in, out] already
PREFIXES = ("encoder.", "enc_to_dec_proj.", "decoder.")

# Buffers older writers saved: GPT-2's causal-mask `attn.bias` / `attn.masked_bias`, BERT's
# position / token-type id ranges, BEiT's relative position index.
IGNORED = re.compile(r"(\.(attn|crossattention)\.(bias|masked_bias)|embeddings\.(position_ids|token_type_ids)"
                     r"|\.relative_position_index)$")
TIED = ("decoder.lm_head.weight", "decoder.cls.predictions.decoder.weight", "decoder.cls.predictions.decoder.bias",
        "decoder.output_projection.weight", "decoder.lm_head.decoder.weight", "decoder.lm_head.decoder.bias")


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


VED_MAPPING = KeyMapping(hf_key_for=hf_key_for, canonical_key=identity, ignored=IGNORED, tied_keys=TIED)


def processor_files(config) -> dict[str, dict]:
    """The image processor file transformers reads for a VED folder whose source had none:
    ViT's preprocessing at the encoder's height x width (mean = std = 0.5), the same
    defaults `processing.captions` uses for such a folder."""
    height, width = config.encoder.image_hw
    return {
        "preprocessor_config.json": {
            "image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": height, "width": width}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    }

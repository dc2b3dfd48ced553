"""Full-size VipLlava 7B / 13B: our abstract model against transformers' on the meta device.

Neither side allocates a parameter: ours is built under `jax.eval_shape`
(`VipLlavaForConditionalGeneration.abstract`), transformers' under `torch.device("meta")`.
The configs are those of llava-hf/vip-llava-{7b,13b}-hf, written out by hand.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from vipllava_jax.checkpoint.mapping import hf_shape
from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.models.vipllava.mapping import canonical_key, hf_key_for
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration


def vip_llava_config(size: str) -> dict:
    """config.json of llava-hf/vip-llava-{7b,13b}-hf, written out from transformers' defaults."""
    hidden, layers, heads, inter = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824)}[size]
    return {
        "model_type": "vipllava",
        "architectures": ["VipLlavaForConditionalGeneration"],
        "image_token_index": 32000,
        "projector_layernorm_eps": 1e-5,
        "vision_feature_layers": [-2, -5, -8, -11, 6],
        "torch_dtype": "float16",
        "vision_config": {  # CLIP ViT-L/14 at 336 px
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
            "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        "text_config": {  # Vicuna (Llama)
            "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "intermediate_size": inter, "vocab_size": 32064, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "pad_token_id": 0, "tie_word_embeddings": False,
        },
    }


@pytest.mark.parametrize("size, billions", [("7b", 7.08), ("13b", 13.37)])
def test_full_size_parameters(size, billions):
    """Ours (jax.eval_shape) and transformers' (meta device) hold the same tensors."""
    import transformers

    d = vip_llava_config(size)
    with torch.device("meta"):
        hf = transformers.VipLlavaForConditionalGeneration(transformers.VipLlavaConfig.from_dict(d))
    hf_shapes = {canonical_key(k): tuple(p.shape) for k, p in hf.named_parameters()}

    state = nnx.state(VipLlavaForConditionalGeneration.abstract(VipLlavaConfig.from_hf_dict(d)), nnx.Param)
    ours = {}
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        key, leaf = hf_key_for(name, len(var.value.shape))
        ours[key] = hf_shape(leaf, var.value.shape)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))

    assert ours == hf_shapes
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_ours == n_hf
    assert round(n_ours / 1e9, 2) == billions

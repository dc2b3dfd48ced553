"""VipLlava: a CLIP vision tower, the multi-layer projector and a Llama (or Mistral) decoder.

Files, in data-flow order: config.py (config.json), clip.py (vision tower), llama.py
(decoder), modeling.py (projector, merge, the model), inputs.py (host-side input checks),
generate.py (prefill + decode loop), mapping.py (HF name table).
"""

from vipllava_jax.models.vipllava.config import CLIPVisionConfig, TextConfig, VipLlavaConfig
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration, VipLlavaOutput

__all__ = ["CLIPVisionConfig", "TextConfig", "VipLlavaConfig", "VipLlavaForConditionalGeneration", "VipLlavaOutput"]

"""vipllava-jax: VipLlava in JAX/Flax NNX, logit-for-logit equal to transformers' PyTorch model."""

from vipllava_jax.config import CLIPVisionConfig, TextConfig, VipLlavaConfig
from vipllava_jax.errors import CheckpointError, ConfigError, VipLlavaError
from vipllava_jax.modeling import VipLlavaForConditionalGeneration, VipLlavaOutput
from vipllava_jax.processor import VipLlavaProcessor
from vipllava_jax.prompts import build_prompt
from vipllava_jax.sharding import LOGICAL_AXIS_RULES, make_mesh
from vipllava_jax.visual_prompts import MARKERS, VisualPrompt, VisualPromptError, draw_visual_prompt, draw_visual_prompts  # noqa: F401

__all__ = [
    "CLIPVisionConfig",
    "CheckpointError",
    "ConfigError",
    "LOGICAL_AXIS_RULES",
    "TextConfig",
    "VipLlavaConfig",
    "VipLlavaError",
    "VipLlavaForConditionalGeneration",
    "VipLlavaOutput",
    "VipLlavaProcessor",
    "build_prompt",
    "make_mesh",
]

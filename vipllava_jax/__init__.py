"""vipllava-jax: VipLlava in JAX/Flax NNX, logit-for-logit equal to transformers' PyTorch model.

The package, bottom to top (each layer imports only from the layers below it; the contracts in
pyproject.toml are checked by the tests):

    errors          the exception types
    nn/             shared layers: norms, RoPE, attention kernels, KV cache, losses, sampling, sharding
    checkpoint/     weights in and out: safetensors, Orbax, the mapping-table machinery
    models/         one folder per model family: config, modules, HF mapping table, generate
    registry        model_type -> the family's classes, table, data kind and FLOP facts
    processing/     images, the processor, prompt templates, visual prompts (markers)
    train/          the training subsystem (from the repository's train/ folder)
    convert/        the conversion subsystem (from the repository's convert/ folder)
    evaluation/, commands/   vipllava-eval, vipllava-generate, vipllava-demo
"""

from vipllava_jax.errors import CheckpointError, ConfigError, VipLlavaError
from vipllava_jax.models.ved import VisionEncoderDecoderConfig, VisionEncoderDecoderModel
from vipllava_jax.models.vipllava.config import CLIPVisionConfig, TextConfig, VipLlavaConfig
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration, VipLlavaOutput
from vipllava_jax.nn.sharding import LOGICAL_AXIS_RULES, make_mesh
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import build_prompt
from vipllava_jax.processing.visual_prompts import (
    MARKERS,
    VisualPrompt,
    VisualPromptError,
    draw_visual_prompt,
    draw_visual_prompts,
)

__all__ = [
    "CLIPVisionConfig",
    "CheckpointError",
    "ConfigError",
    "LOGICAL_AXIS_RULES",
    "MARKERS",
    "TextConfig",
    "VipLlavaConfig",
    "VipLlavaError",
    "VipLlavaForConditionalGeneration",
    "VipLlavaOutput",
    "VipLlavaProcessor",
    "VisionEncoderDecoderConfig",
    "VisionEncoderDecoderModel",
    "VisualPrompt",
    "VisualPromptError",
    "build_prompt",
    "draw_visual_prompt",
    "draw_visual_prompts",
    "make_mesh",
]

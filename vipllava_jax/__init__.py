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

import importlib
from typing import TYPE_CHECKING

from vipllava_jax.errors import CheckpointError, ConfigError, VipLlavaError

# The public names, by the module that defines them: imported on first use (PEP 562), so that
# `import vipllava_jax.<anything>` (a command's --help, say) does not import jax.
_LAZY = {
    "VisionEncoderDecoderConfig": "vipllava_jax.models.ved",
    "VisionEncoderDecoderModel": "vipllava_jax.models.ved",
    "CLIPVisionConfig": "vipllava_jax.models.vipllava.config",
    "TextConfig": "vipllava_jax.models.vipllava.config",
    "VipLlavaConfig": "vipllava_jax.models.vipllava.config",
    "VipLlavaForConditionalGeneration": "vipllava_jax.models.vipllava.modeling",
    "VipLlavaOutput": "vipllava_jax.models.vipllava.modeling",
    "LOGICAL_AXIS_RULES": "vipllava_jax.nn.sharding",
    "make_mesh": "vipllava_jax.nn.sharding",
    "VipLlavaProcessor": "vipllava_jax.processing.processor",
    "build_prompt": "vipllava_jax.processing.prompts",
    "MARKERS": "vipllava_jax.processing.visual_prompts",
    "VisualPrompt": "vipllava_jax.processing.visual_prompts",
    "VisualPromptError": "vipllava_jax.processing.visual_prompts",
    "draw_visual_prompt": "vipllava_jax.processing.visual_prompts",
    "draw_visual_prompts": "vipllava_jax.processing.visual_prompts",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'vipllava_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
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

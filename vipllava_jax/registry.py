"""The model-family registry: the one place that maps a checkpoint's `model_type` to its code.

Conversion, training, evaluation and export never branch on a family themselves; they look
the family up here and use what its entry names. Adding a family is a folder under
`vipllava_jax/models/` (config, modules, mapping table) and one `Family` entry in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
from flax import nnx

from vipllava_jax import storage
from vipllava_jax.checkpoint.mapping import KeyMapping
from vipllava_jax.errors import ConfigError
from vipllava_jax.models.ved import mapping as ved_mapping
from vipllava_jax.models.ved.config import VisionEncoderDecoderConfig
from vipllava_jax.models.ved.mapping import VED_MAPPING
from vipllava_jax.models.ved.modeling import VisionEncoderDecoderModel
from vipllava_jax.models.vipllava import mapping as vipllava_mapping
from vipllava_jax.models.vipllava import original
from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.models.vipllava.mapping import VIPLLAVA
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration


@runtime_checkable
class TrainableModel(Protocol):
    """What the train step needs of a model (both families' model classes provide it).

    train_stages: stage name -> the top-level submodules that stage trains.
    loss_terms(batch, attention=..., remat=...): (summed token NLL, counted tokens) of a batch;
      `attention` maps a submodule name of `attention_dtypes()` to its attention kernel
      (`nn.layers.ATTENTION_KERNELS`; None, or a part not named: dense masks), `remat` is a
      `jax.checkpoint` policy applied to each decoder layer (None: keep activations). Both
      are plain arguments, fixed when the step is traced.
    attention_dtypes(): submodule name -> compute dtype, for the parts that can run a fused
      attention kernel (empty if none can); the train step picks each part's kernel from
      its dtype and the platform.
    """

    train_stages: Mapping[str, tuple[str, ...]]
    config: Any

    def loss_terms(self, batch: dict[str, jax.Array], *, attention: Mapping[str, str | None] | None = None,
                   remat: Callable[..., bool] | None = None) -> tuple[jax.Array, jax.Array]: ...

    def attention_dtypes(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class ImageSide:
    """For the FLOP count: the parts of a model that see a row's image instead of its text.

    parts: top-level part -> the tokens it runs on per row (the tower first).
    patches: patches per image (what the patch embedding runs on).
    vision: the tower's config (`num_hidden_layers`, `hidden_size`).
    reads_tower: the part whose weights read the tower's output directly, if any.
    cross_tokens: encoder tokens a decoder's cross-attention reads (0: no cross-attention).
    """

    parts: dict[str, int]
    patches: int
    vision: Any
    reads_tower: str | None
    cross_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything the rest of the package needs to know about one model family.

    model_type: config.json's `model_type`.
    config_class / model_class: `from_pretrained(path)` for each; the model class provides
      `abstract(config, ...)` and `TrainableModel`.
    mapping: the HF name table (`checkpoint.mapping.KeyMapping`).
    data: the training records its loader reads: "conversations" (LLaVA-format chats with
      images) or "captions" (image-caption pairs).
    tied_head(config): whether the output head shares the word embeddings.
    text_config(config): the config of the text decoder.
    image_side(config): the `ImageSide` of the FLOP count.
    side_files(src, dst, config): what a conversion writes besides the weights and config.json
      after the source's tokenizer/processor files are copied (None: nothing more).
    processor_files(config): name -> JSON of the processor files transformers' AutoProcessor
      reads, written into an export whose source lacks them.
    """

    model_type: str
    config_class: type
    model_class: type
    mapping: KeyMapping
    data: str
    tied_head: Callable[[Any], bool]
    text_config: Callable[[Any], Any]
    image_side: Callable[[Any], ImageSide]
    side_files: Callable[[Path, Path, Any], None] | None = None
    processor_files: Callable[[Any], dict[str, dict]] = lambda config: {}


def _vipllava_image_side(config: VipLlavaConfig) -> ImageSide:
    vision = config.vision_config
    n = vision.num_patches  # the tower runs on CLS + patches, the projector on the patches
    return ImageSide({"vision_tower": n + 1, "multi_modal_projector": n}, n, vision, None)


def _ved_image_side(config: VisionEncoderDecoderConfig) -> ImageSide:
    enc = config.encoder
    patches = math.prod(enc.patch_grid)  # height x width patches (Donut's pages are wide)
    return ImageSide({"encoder": enc.seq_len, "enc_to_dec_proj": enc.seq_len}, patches, enc,
                     "enc_to_dec_proj", cross_tokens=enc.seq_len)


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            model_type="vipllava", config_class=VipLlavaConfig,
            model_class=VipLlavaForConditionalGeneration, mapping=VIPLLAVA, data="conversations",
            tied_head=lambda c: c.text_config.tie_word_embeddings, text_config=lambda c: c.text_config,
            image_side=_vipllava_image_side, processor_files=vipllava_mapping.processor_files,
        ),
        Family(
            model_type="vision-encoder-decoder", config_class=VisionEncoderDecoderConfig,
            model_class=VisionEncoderDecoderModel, mapping=VED_MAPPING, data="captions",
            tied_head=lambda c: c.decoder.tie_word_embeddings, text_config=lambda c: c.decoder,
            image_side=_ved_image_side, processor_files=ved_mapping.processor_files,
        ),
        Family(  # the original ViP-LLaVA repository's layout: converts to VipLlava
            model_type=original.MODEL_TYPE, config_class=original.OriginalVipLlavaConfig,
            model_class=VipLlavaForConditionalGeneration, mapping=original.ORIGINAL, data="conversations",
            tied_head=lambda c: c.text_config.tie_word_embeddings, text_config=lambda c: c.text_config,
            image_side=_vipllava_image_side, side_files=original.write_side_files,
            processor_files=vipllava_mapping.processor_files,
        ),
    )
}

# Every stage name some family defines (each model class says what its stages train).
STAGES: frozenset[str] = frozenset(s for f in FAMILIES.values() for s in f.model_class.train_stages)


def read_model_type(path: str | Path) -> str | None:
    """The `model_type` of a folder's config.json (None when unreadable: the caller reports it)."""
    try:
        return json.loads((storage.path(path) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def family_for(model_type: str | None) -> Family:
    """The family of a `model_type`; VipLlava's for a folder that names none (its config
    class then says what is wrong with the folder)."""
    if model_type is None:
        return FAMILIES["vipllava"]
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ConfigError(
            f"config.json has model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def family_of(path: str | Path) -> Family:
    """The family of a model folder (Orbax or HF), from its config.json."""
    return family_for(read_model_type(path))


def family_of_config(config: Any) -> Family:
    """The family whose config class `config` is."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise ConfigError(f"no model family has config class {type(config).__name__}")


def family_of_model(model: nnx.Module) -> Family:
    """The family whose model class `model` is."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    raise ConfigError(f"no model family has model class {type(model).__name__}")

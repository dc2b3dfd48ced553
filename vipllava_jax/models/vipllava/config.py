"""Frozen configs for VipLlava, read from (and written to) HF `config.json` files.

transformers has written VipLlava configs in several dialects between 4.37 and 5.x:
`vision_feature_layers` (old) vs `vision_feature_layer` (new), `torch_dtype` vs `dtype`,
`rope_theta` at the top of the text config vs `rope_parameters`, and sub-configs that only
list the fields differing from the class defaults. The defaults below are therefore the
defaults of transformers' own config classes, so a sparse old config reads the same here as
in transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vipllava_jax import storage
from vipllava_jax.checkpoint.config_checks import check_numbers, check_object
from vipllava_jax.errors import ConfigError

# Defaults of transformers' CLIPVisionConfig, LlamaConfig and MistralConfig.
_CLIP_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=512,
)
# VipLlavaConfig builds its default vision tower with these overrides (CLIP ViT-L/14-336).
_VIPLLAVA_VISION_OVERRIDES = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768,
)
_TEXT_DEFAULTS = {
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, sliding_window=None,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
        max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, sliding_window=4096,
    ),
}
_SUPPORTED_ROPE_TYPES = ("default", "linear")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The CLIP vision tower (VipLlava uses ViT-L/14 at 336 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused by VipLlava; kept so the config round-trips

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> CLIPVisionConfig:
        model_type = d.get("model_type", "clip_vision_model")
        if model_type == "clip" and "vision_config" in d:  # a full CLIP config: use its tower
            return cls.from_hf_dict(d["vision_config"])
        if model_type != "clip_vision_model":
            raise ConfigError(
                f"unsupported vision_config model_type {model_type!r} (expected 'clip_vision_model')"
            )
        values = {**_CLIP_VISION_DEFAULTS, **d}
        check_numbers(values, "vision_config.", counts=(
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_channels", "image_size", "patch_size", "projection_dim"), positive=("layer_norm_eps",))
        if values["hidden_size"] % values["num_attention_heads"]:
            raise ConfigError(
                f"vision_config.hidden_size {values['hidden_size']} is not a multiple of "
                f"num_attention_heads {values['num_attention_heads']}")
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A Llama (Vicuna) or Mistral decoder."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0  # only for rope_type "linear"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> TextConfig:
        model_type = d.get("model_type", "llama")
        if model_type not in _TEXT_DEFAULTS:
            raise ConfigError(
                f"unsupported text_config model_type {model_type!r} (expected one of "
                f"{sorted(_TEXT_DEFAULTS)})"
            )
        v = {**_TEXT_DEFAULTS[model_type], **{k: x for k, x in d.items() if x is not None}}
        if model_type == "mistral":  # Mistral's sliding_window may be an explicit null
            v["sliding_window"] = d.get("sliding_window", _TEXT_DEFAULTS["mistral"]["sliding_window"])
        check_numbers(v, "text_config.", counts=(
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings"),
            optional_counts=("num_key_value_heads", "head_dim", "sliding_window"),
            positive=("rms_norm_eps", "rope_theta"))
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_type {rope_type!r} (supported: {list(_SUPPORTED_ROPE_TYPES)})"
            )
        heads = v["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=v["vocab_size"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=v["num_key_value_heads"] or heads,
            head_dim=v["head_dim"] or v["hidden_size"] // heads,
            hidden_act=v["hidden_act"],
            max_position_embeddings=v["max_position_embeddings"],
            rms_norm_eps=v["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", v["rope_theta"])),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            attention_bias=v["attention_bias"],
            mlp_bias=v["mlp_bias"],
            tie_word_embeddings=v["tie_word_embeddings"],
            sliding_window=v["sliding_window"],
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 2),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        rope = {"rope_theta": d.pop("rope_theta"), "rope_type": d.pop("rope_type")}
        factor = d.pop("rope_factor")
        if rope["rope_type"] == "linear":
            rope["factor"] = factor
        d["rope_parameters"] = rope
        if self.model_type == "llama":
            d.pop("sliding_window")
        return d


@dataclasses.dataclass(frozen=True)
class VipLlavaConfig:
    """The whole model: vision tower, projector, decoder and the image-token bookkeeping."""

    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    text_config: TextConfig = dataclasses.field(default_factory=TextConfig)
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    projector_layernorm_eps: float = 1e-5
    # A tuple of layer indices (concatenated) or a single int, as in transformers.
    vision_feature_layer: int | tuple[int, ...] = (-2, -5, -8, -11, 6)
    dtype: str = "float32"  # the dtype the checkpoint was saved in

    def __post_init__(self):
        layers = self.feature_layer_indices
        n = self.vision_config.num_hidden_layers
        for i in layers:
            if not -(n + 1) <= i <= n:
                raise ConfigError(
                    f"vision_feature_layer {i} is out of range for a vision tower of {n} layers"
                )

    @property
    def feature_layer_indices(self) -> tuple[int, ...]:
        """The selected hidden-state indices (as given, possibly negative)."""
        if isinstance(self.vision_feature_layer, int):
            return (self.vision_feature_layer,)
        return tuple(self.vision_feature_layer)

    @property
    def num_image_tokens(self) -> int:
        """Image features per image (= `<image>` tokens the processor expands to)."""
        return self.vision_config.num_patches

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VipLlavaConfig:
        check_object(d, "config.json")
        model_type = d.get("model_type")
        if model_type != "vipllava":
            raise ConfigError(f"config.json has model_type {model_type!r}, expected 'vipllava'")
        check_object(d, "config.json")
        # An explicit null is a broken file, not a sparse one: it would silently give Llama-7B.
        if "text_config" in d:
            check_object(d["text_config"], "config.json's text_config")
        vision = d.get("vision_config")
        if vision is not None:
            check_object(vision, "config.json's vision_config")
        vision = CLIPVisionConfig.from_hf_dict(
            {**_VIPLLAVA_VISION_OVERRIDES, **vision} if vision else _VIPLLAVA_VISION_OVERRIDES
        )
        text = TextConfig.from_hf_dict(d.get("text_config") or {})
        if "tie_word_embeddings" in d and "tie_word_embeddings" not in (d.get("text_config") or {}):
            text = dataclasses.replace(text, tie_word_embeddings=bool(d["tie_word_embeddings"]))
        layers = d.get("vision_feature_layer", d.get("vision_feature_layers", (-2, -5, -8, -11, 6)))
        if not isinstance(layers, int):
            layers = tuple(int(i) for i in layers)
        return cls(
            vision_config=vision,
            text_config=text,
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_layernorm_eps=d.get("projector_layernorm_eps", 1e-5),
            vision_feature_layer=layers,
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json in transformers 5.x's dialect (which 4.5x also reads)."""
        layers = self.vision_feature_layer
        return {
            "architectures": ["VipLlavaForConditionalGeneration"],
            "model_type": "vipllava",
            "vision_config": self.vision_config.to_hf_dict(),
            "text_config": self.text_config.to_hf_dict(),
            "image_token_index": self.image_token_index,
            "projector_hidden_act": self.projector_hidden_act,
            "projector_layernorm_eps": self.projector_layernorm_eps,
            "vision_feature_layer": layers if isinstance(layers, int) else list(layers),
            "image_seq_length": self.num_image_tokens,
            "tie_word_embeddings": self.text_config.tie_word_embeddings,
            "dtype": self.dtype,
        }

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VipLlavaConfig:
        """Reads `path/config.json` (or `path` itself when it is a JSON file)."""
        path = storage.path(path)
        file = path if path.suffix == ".json" else path / "config.json"
        if not file.is_file():
            raise ConfigError(f"no config.json in {path}")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        check_object(d, str(file))
        return cls.from_hf_dict(d)

    def save_pretrained(self, path: str | Path, *, dtype: str | None = None) -> None:
        """Writes config.json (its `dtype` replaced by `dtype` when given)."""
        config = self if dtype is None else dataclasses.replace(self, dtype=dtype)
        (storage.path(path) / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")

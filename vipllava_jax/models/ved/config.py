"""Configs of a VisionEncoderDecoder model, read from transformers' `config.json`.

A VED `config.json` (model_type `vision-encoder-decoder`) nests the encoder's and the
decoder's own configs. Supported here: encoder `vit`, `deit`, `beit`, `swin` or `donut-swin` (square or
`[height, width]` images, square patches); decoder `gpt2`, `bert`,
`roberta`, `trocr`, `bart` or `mbart` (with `is_decoder` and `add_cross_attention`, as VED
sets them). The sub-configs may
list only the fields that differ from the class defaults, so the defaults below are those of
transformers' config classes. The HF dict itself is kept (`hf_dict`) and written back
unchanged, apart from `dtype`, so a converted model reloads in transformers as it was.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vipllava_jax import storage
from vipllava_jax.checkpoint.config_checks import check_numbers, check_object
from vipllava_jax.errors import ConfigError

MODEL_TYPE = "vision-encoder-decoder"

# Defaults of transformers' ViTConfig (DeiTConfig has the same ones).
_VIT_DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
    qkv_bias=True, pooler_output_size=None, pooler_act="tanh",
)
# BEiT's own switches (transformers' BeitConfig defaults).
_BEIT_DEFAULTS = dict(
    use_mask_token=False, use_absolute_position_embeddings=False, use_relative_position_bias=False,
    use_shared_relative_position_bias=False, layer_scale_init_value=0.1, use_mean_pooling=True,
)
_GPT2_DEFAULTS = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=True, bos_token_id=50256,
    eos_token_id=50256, pad_token_id=None,
)
_BERT_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
    layer_norm_eps=1e-12, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
    pad_token_id=0,
)
_ROBERTA_DEFAULTS = {**_BERT_DEFAULTS, "vocab_size": 50265, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
# TrOCR's and BART/mBART's decoders (TrOCRConfig / BartConfig / MBartConfig defaults).
_SEQ2SEQ_DEFAULTS = dict(
    vocab_size=50265, d_model=1024, decoder_layers=12, decoder_attention_heads=16, decoder_ffn_dim=4096,
    activation_function="gelu", max_position_embeddings=1024, scale_embedding=False, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=2, pad_token_id=1, forced_bos_token_id=None, forced_eos_token_id=None,
)
_TROCR_DEFAULTS = {**_SEQ2SEQ_DEFAULTS, "max_position_embeddings": 512, "use_learned_position_embeddings": True,
                   "layernorm_embedding": True, "cross_attention_hidden_size": None}
SWIN_TYPES = ("swin", "donut-swin")  # Donut's is Swin without the final layernorm
DECODER_TYPES = ("gpt2", "bert", "roberta", "trocr", "bart", "mbart")


def _image_size(value) -> tuple[int, int | None]:
    """`image_size` as an int or a `[height, width]` pair -> (height, width or None when square)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"encoder.image_size must be an int or [height, width], got {value!r}")
        check_numbers({"image_size": value[0], "image_width": value[1]}, "encoder.",
                       counts=("image_size", "image_width"))
        return value[0], (None if value[1] == value[0] else value[1])
    check_numbers({"image_size": value}, "encoder.", counts=("image_size",))
    return value, None


def _square(value, name: str) -> int:
    """ViT configs allow `image_size` / `patch_size` as an int or a square pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"unsupported non-square encoder {name} {value!r}")
        value = value[0]
    check_numbers({name: value}, "encoder.", counts=(name,))
    return value


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A ViT encoder; `deit` adds a distillation token after the CLS token; `beit` has the
    `use_*` switches and `layer_scale_init_value` of transformers' BeitConfig."""

    model_type: str = "vit"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224  # the height (and the width, when image_width is None)
    image_width: int | None = None
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int = 768  # the pooler is stored, never applied (VED reads the last hidden state)
    use_mask_token: bool = False
    use_absolute_position_embeddings: bool = True
    use_relative_position_bias: bool = False
    use_shared_relative_position_bias: bool = False
    layer_scale_init_value: float = 0.0
    use_mean_pooling: bool = False
    # Swin: stage i has depths[i] blocks of width embed_dim * 2**i and num_heads[i] heads
    embed_dim: int = 96
    depths: tuple[int, ...] = ()
    num_heads: tuple[int, ...] = ()
    window_size: int = 7
    mlp_ratio: float = 4.0
    use_absolute_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_special_tokens(self) -> int:
        return 2 if self.model_type == "deit" else 1

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.image_size, self.image_width or self.image_size

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches down and across, as transformers sizes its position table (rounding down)."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def seq_len(self) -> int:
        if self.model_type in SWIN_TYPES:  # the last stage's grid, halved (rounding up) per merge
            gh, gw = (-(-x // self.patch_size) for x in self.image_hw)
            for _ in self.depths[1:]:
                gh, gw = (gh + 1) // 2, (gw + 1) // 2
            return gh * gw
        gh, gw = self.patch_grid
        return gh * gw + self.num_special_tokens

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ViTConfig:
        model_type = d.get("model_type")
        if model_type in SWIN_TYPES:
            return cls._from_swin(d, model_type)
        if model_type not in ("vit", "deit", "beit"):
            raise ConfigError(
                f"unsupported encoder model_type {model_type!r} (supported: 'vit', 'deit', 'beit', 'swin', 'donut-swin')")
        beit = model_type == "beit"
        v = {**_VIT_DEFAULTS, **(_BEIT_DEFAULTS if beit else {}), **d}
        if beit and v["use_absolute_position_embeddings"] and _image_size(v["image_size"])[1] is not None:
            # transformers' BEiT interpolates its position table whenever height != width, and fails
            raise ConfigError("unsupported beit encoder: absolute position embeddings with a non-square image_size")
        if beit and not isinstance(v["layer_scale_init_value"], (int, float)):
            raise ConfigError(f"encoder.layer_scale_init_value must be a number, got {v['layer_scale_init_value']!r}")
        check_numbers(v, "encoder.", counts=("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "num_channels"),
                       optional_counts=("pooler_output_size",), positive=("layer_norm_eps",))
        return cls(
            model_type=model_type, hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            hidden_act=v["hidden_act"], layer_norm_eps=v["layer_norm_eps"],
            image_size=_image_size(v["image_size"])[0], image_width=_image_size(v["image_size"])[1],
            patch_size=_square(v["patch_size"], "patch_size"),
            num_channels=v["num_channels"], qkv_bias=v["qkv_bias"],
            pooler_output_size=v["pooler_output_size"] or v["hidden_size"],
            **({} if not beit else dict(
                use_mask_token=bool(v["use_mask_token"]),
                use_absolute_position_embeddings=bool(v["use_absolute_position_embeddings"]),
                use_relative_position_bias=bool(v["use_relative_position_bias"]),
                use_shared_relative_position_bias=bool(v["use_shared_relative_position_bias"]),
                layer_scale_init_value=float(v["layer_scale_init_value"]),
                use_mean_pooling=bool(v["use_mean_pooling"]))),
        )

    @classmethod
    def _from_swin(cls, d: dict[str, Any], model_type: str) -> ViTConfig:
        v = {**dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2],
                    num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True, hidden_act="gelu",
                    use_absolute_embeddings=False, layer_norm_eps=1e-5), **d}
        check_numbers(v, "encoder.", counts=("embed_dim", "window_size", "num_channels"),
                       positive=("layer_norm_eps", "mlp_ratio"))
        depths, heads = v["depths"], v["num_heads"]
        if (not isinstance(depths, list) or not isinstance(heads, list) or not depths or len(depths) != len(heads)
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in depths + heads)):
            raise ConfigError(f"encoder.depths and num_heads must be equal-length lists of positive integers, "
                              f"got {depths!r} and {heads!r}")
        (image, width), patch, ws = _image_size(v["image_size"]), _square(v["patch_size"], "patch_size"), v["window_size"]
        gh, gw = -(-image // patch), -(-(width or image) // patch)
        for i in range(len(depths)):
            if min(gh, gw) < ws:
                # transformers shrinks the window to the grid but keeps the window's bias table
                raise ConfigError(f"unsupported swin encoder: stage {i}'s {gh}x{gw} grid is smaller than "
                                  f"window_size {ws}")
            gh, gw = (gh + 1) // 2, (gw + 1) // 2
        hidden = v["embed_dim"] * 2 ** (len(depths) - 1)
        return cls(
            model_type=model_type, hidden_size=hidden, num_hidden_layers=sum(depths), num_attention_heads=heads[-1],
            intermediate_size=int(v["mlp_ratio"] * hidden), hidden_act=v["hidden_act"],
            layer_norm_eps=v["layer_norm_eps"], image_size=image, image_width=width, patch_size=patch,
            num_channels=v["num_channels"],
            qkv_bias=v["qkv_bias"], pooler_output_size=hidden, embed_dim=v["embed_dim"], depths=tuple(depths),
            num_heads=tuple(heads), window_size=ws, mlp_ratio=float(v["mlp_ratio"]),
            use_absolute_embeddings=bool(v["use_absolute_embeddings"]),
        )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A decoder with cross-attention, under one set of field names.

    `intermediate_size` is GPT-2's `n_inner` (4 x hidden when null); `scale_attn_weights` and
    `scale_attn_by_inverse_layer_idx` are GPT-2 only, `type_vocab_size` BERT's and RoBERTa's.
    TrOCR / BART / mBART (`d_model`, `decoder_*` fields): `scale_embedding` (embeddings times
    sqrt(d)), `layernorm_embedding`, `learned_positions` (TrOCR may use sinusoidal ones),
    `pre_norm` and a final `layer_norm` (mBART), `cross_attention_hidden_size` (TrOCR's
    cross-attention reads the encoder's width directly), forced BOS/EOS for generate.
    """

    model_type: str = "gpt2"
    vocab_size: int = 50257
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    type_vocab_size: int = 2
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    scale_embedding: bool = False
    layernorm_embedding: bool = False
    learned_positions: bool = True
    pre_norm: bool = False
    cross_attention_hidden_size: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """The longest decoder input the position table covers: RoBERTa's positions (and TrOCR's
        sinusoidal ones) start after the pad id."""
        if self.model_type == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        model_type = d.get("model_type")
        if model_type == "distilbert":
            raise ConfigError("unsupported decoder model_type 'distilbert': transformers has no causal-LM "
                              "DistilBERT with cross-attention to be a VisionEncoderDecoder decoder")
        if model_type not in DECODER_TYPES:
            raise ConfigError(f"unsupported decoder model_type {model_type!r} "
                              f"(supported: {', '.join(repr(t) for t in DECODER_TYPES)})")
        if model_type in ("trocr", "bart", "mbart"):
            # their causal-LM classes set is_decoder themselves and always build cross-attention
            return cls._from_seq2seq(d, model_type)
        if not (d.get("is_decoder") and d.get("add_cross_attention")):
            raise ConfigError(
                f"the {model_type} decoder must have is_decoder and add_cross_attention set "
                "(as VisionEncoderDecoderModel sets them)"
            )
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"unsupported position_embedding_type {d['position_embedding_type']!r}")
        if model_type == "gpt2":
            v = {**_GPT2_DEFAULTS, **d}
            check_numbers(v, "decoder.", counts=("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
                           optional_counts=("n_inner",), positive=("layer_norm_epsilon",))
            return cls(
                model_type="gpt2", vocab_size=v["vocab_size"], hidden_size=v["n_embd"],
                num_hidden_layers=v["n_layer"], num_attention_heads=v["n_head"],
                intermediate_size=v["n_inner"] or 4 * v["n_embd"], hidden_act=v["activation_function"],
                max_position_embeddings=v["n_positions"], layer_norm_eps=v["layer_norm_epsilon"],
                tie_word_embeddings=v["tie_word_embeddings"], scale_attn_weights=v["scale_attn_weights"],
                scale_attn_by_inverse_layer_idx=v["scale_attn_by_inverse_layer_idx"],
                bos_token_id=v["bos_token_id"], eos_token_id=v["eos_token_id"], pad_token_id=v["pad_token_id"],
            )
        v = {**(_ROBERTA_DEFAULTS if model_type == "roberta" else _BERT_DEFAULTS), **d}
        if model_type == "roberta" and v["pad_token_id"] is None:
            raise ConfigError("a roberta decoder needs pad_token_id (its positions count from it)")
        check_numbers(v, "decoder.", counts=(
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size"), positive=("layer_norm_eps",))
        return cls(
            model_type=model_type, vocab_size=v["vocab_size"], hidden_size=v["hidden_size"],
            num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
            intermediate_size=v["intermediate_size"], hidden_act=v["hidden_act"],
            max_position_embeddings=v["max_position_embeddings"], layer_norm_eps=v["layer_norm_eps"],
            tie_word_embeddings=v["tie_word_embeddings"], type_vocab_size=v["type_vocab_size"],
            bos_token_id=v["bos_token_id"], eos_token_id=v["eos_token_id"], pad_token_id=v["pad_token_id"],
        )

    @classmethod
    def _from_seq2seq(cls, d: dict[str, Any], model_type: str) -> DecoderConfig:
        """TrOCR's, BART's and mBART's decoders (fairseq layout: learned positions offset by 2)."""
        v = {**(_TROCR_DEFAULTS if model_type == "trocr" else _SEQ2SEQ_DEFAULTS), **d}
        check_numbers(v, "decoder.", counts=("vocab_size", "d_model", "decoder_layers", "decoder_attention_heads",
                                              "decoder_ffn_dim", "max_position_embeddings"),
                       optional_counts=("cross_attention_hidden_size",))
        trocr = model_type == "trocr"
        learned = bool(v["use_learned_position_embeddings"]) if trocr else True
        if not learned and v["pad_token_id"] is None:
            raise ConfigError("a trocr decoder with sinusoidal positions needs pad_token_id")
        return cls(
            model_type=model_type, vocab_size=v["vocab_size"], hidden_size=v["d_model"],
            num_hidden_layers=v["decoder_layers"], num_attention_heads=v["decoder_attention_heads"],
            intermediate_size=v["decoder_ffn_dim"], hidden_act=v["activation_function"],
            max_position_embeddings=v["max_position_embeddings"], layer_norm_eps=1e-5,  # nn.LayerNorm's default
            tie_word_embeddings=v["tie_word_embeddings"], bos_token_id=v["bos_token_id"],
            eos_token_id=v["eos_token_id"], pad_token_id=v["pad_token_id"],
            scale_embedding=bool(v["scale_embedding"]),
            layernorm_embedding=bool(v["layernorm_embedding"]) if trocr else True,
            learned_positions=learned, pre_norm=model_type == "mbart",
            cross_attention_hidden_size=v["cross_attention_hidden_size"] if trocr else None,
            forced_bos_token_id=v["forced_bos_token_id"], forced_eos_token_id=v["forced_eos_token_id"],
        )


# The top-level special token ids a warm-started config may be given.
TOKEN_ID_KEYS = ("decoder_start_token_id", "pad_token_id", "eos_token_id", "forced_bos_token_id", "forced_eos_token_id")


def _check_token_ids(token_ids: dict[str, Any]) -> None:
    for key, value in token_ids.items():
        if key not in TOKEN_ID_KEYS:
            raise ConfigError(f"unknown token id {key!r}; expected one of {', '.join(TOKEN_ID_KEYS)}")
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        if not ok and not (isinstance(value, list) and key in ("eos_token_id", "forced_eos_token_id")
                           and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
            raise ConfigError(f"{key} must be a non-negative integer or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VisionEncoderDecoderConfig:
    encoder: ViTConfig
    decoder: DecoderConfig
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    dtype: str = "float32"
    hf_dict: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def needs_projection(self) -> bool:
        """transformers adds `enc_to_dec_proj` when the two hidden sizes differ, unless the
        decoder's cross-attention reads the encoder's width itself (TrOCR's
        `cross_attention_hidden_size`)."""
        return (self.encoder.hidden_size != self.decoder.hidden_size
                and self.decoder.cross_attention_hidden_size is None)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VisionEncoderDecoderConfig:
        check_object(d, "config.json")
        if d.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
        if "encoder" not in d or "decoder" not in d:
            raise ConfigError("a vision-encoder-decoder config needs 'encoder' and 'decoder' sub-configs")
        encoder = ViTConfig.from_hf_dict(check_object(d["encoder"], "config.json's encoder"))
        decoder = DecoderConfig.from_hf_dict(check_object(d["decoder"], "config.json's decoder"))
        cross = d["decoder"].get("cross_attention_hidden_size")
        if cross is not None and encoder.hidden_size != decoder.hidden_size and decoder.model_type != "trocr":
            # only TrOCR builds its cross-attention for another width than the decoder's own
            raise ConfigError(f"unsupported cross_attention_hidden_size {cross} with a {decoder.model_type} decoder")
        if decoder.cross_attention_hidden_size not in (None, encoder.hidden_size):
            raise ConfigError(f"the decoder's cross_attention_hidden_size {decoder.cross_attention_hidden_size} "
                              f"differs from the encoder's hidden_size {encoder.hidden_size}")
        return cls(
            encoder=encoder, decoder=decoder, decoder_start_token_id=d.get("decoder_start_token_id"),
            pad_token_id=d.get("pad_token_id"), eos_token_id=d.get("eos_token_id"),
            forced_bos_token_id=d.get("forced_bos_token_id"), forced_eos_token_id=d.get("forced_eos_token_id"),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"), hf_dict=d,
        )

    @classmethod
    def from_encoder_decoder_configs(cls, encoder: dict[str, Any], decoder: dict[str, Any],
                                     **token_ids: int | list[int] | None) -> VisionEncoderDecoderConfig:
        """transformers' `from_encoder_decoder_configs`: the two HF config dicts joined, the
        decoder's made `is_decoder` with `add_cross_attention` (as transformers sets them);
        `token_ids` (e.g. `decoder_start_token_id`, `pad_token_id`) go into the joined config,
        as transformers' keyword arguments do."""
        _check_token_ids(token_ids)
        decoder = {**check_object(decoder, "the decoder config"), "is_decoder": True, "add_cross_attention": True}
        return cls.from_hf_dict({"model_type": MODEL_TYPE, "encoder": check_object(encoder, "the encoder config"),
                                 "decoder": decoder, "is_encoder_decoder": True, **token_ids})

    def replace(self, **token_ids: int | list[int] | None) -> VisionEncoderDecoderConfig:
        """This config with other special token ids (what transformers users set as
        `model.config.decoder_start_token_id = ...` after a warm start); the saved config.json
        carries them too."""
        _check_token_ids(token_ids)
        return type(self).from_hf_dict({**self.hf_dict, **token_ids})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VisionEncoderDecoderConfig:
        file = storage.path(path) / "config.json"
        try:
            d = json.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json in {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf_dict(d)

    def save_pretrained(self, path: str | Path, *, dtype: str | None = None) -> None:
        """Writes the HF config back (transformers 5 spelling: `dtype`)."""
        d = {k: v for k, v in self.hf_dict.items() if k != "torch_dtype"}
        d["dtype"] = dtype or self.dtype
        (storage.path(path) / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

"""VisionEncoderDecoderModel: an image encoder, an optional projection, a text decoder.

    pixel_values [B, C, H, W] --ViT/DeiT/BEiT/Swin--> [B, S, D_enc] --enc_to_dec_proj (when the widths
        differ)--> [B, S, D_dec] --each decoder layer's cross-attention k/v--> CrossKV
    decoder_input_ids [B, T] (or labels shifted right) --GPT-2 / BERT / RoBERTa / TrOCR / BART /
        mBART decoder, attending the image through CrossKV--> logits [B, T, V]; labels -> mean cross-entropy

The semantics are transformers' `VisionEncoderDecoderModel`: with only `labels`, the decoder
input is `shift_tokens_right(labels, pad_token_id, decoder_start_token_id)` and the loss
compares position t's logits with labels[t] (no further shift), -100 ignored.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vipllava_jax import hub
from vipllava_jax.checkpoint import load_into, save_model
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.models.ved.attention import CrossKV
from vipllava_jax.models.ved.bart import BartForCausalLM
from vipllava_jax.models.ved.beit import BeitModel
from vipllava_jax.models.ved.bert import BertLMHeadModel
from vipllava_jax.models.ved.config import VisionEncoderDecoderConfig
from vipllava_jax.models.ved.encoder import ViTModel
from vipllava_jax.models.ved.generate import generate
from vipllava_jax.models.ved.gpt2 import GPT2LMHeadModel
from vipllava_jax.models.ved.mapping import VED_MAPPING
from vipllava_jax.models.ved.roberta import RobertaForCausalLM
from vipllava_jax.models.ved.swin import SwinModel
from vipllava_jax.nn.layers import DType, check_attention, linear
from vipllava_jax.nn.losses import IGNORE_INDEX, token_nll

ENCODERS = {"beit": BeitModel, "swin": SwinModel, "donut-swin": SwinModel}  # ViT otherwise (vit, deit)
DECODERS = {"gpt2": GPT2LMHeadModel, "bert": BertLMHeadModel, "roberta": RobertaForCausalLM,
            "trocr": BartForCausalLM, "bart": BartForCausalLM, "mbart": BartForCausalLM}


@struct.dataclass
class VedOutput:
    logits: jax.Array  # [B, T, V]
    loss: jax.Array | None = None  # scalar, when labels were given


def shift_tokens_right(labels: jax.Array, pad_token_id: int, decoder_start_token_id: int) -> jax.Array:
    """`[start, labels[:, :-1]]` with -100 replaced by the pad id (transformers' function)."""
    labels = jnp.asarray(labels)
    shifted = jnp.concatenate(
        [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1
    )
    return jnp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)


def seq2seq_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits `[B, T, V]` against labels `[B, T]` (same positions, -100
    not counted), in float32, as transformers' CrossEntropyLoss over the flattened batch."""
    nll_sum, count = token_nll(logits, labels, shift=False)
    return nll_sum / count


class VisionEncoderDecoderModel(nnx.Module):
    """transformers' parameter names (`encoder.*`, `enc_to_dec_proj`, `decoder.*`) and call."""

    # What each training stage trains (`vipllava_jax.train.step`): the decoder side, or everything.
    train_stages = {
        "decoder": ("enc_to_dec_proj", "decoder"),
        "all": ("encoder", "enc_to_dec_proj", "decoder"),
    }

    def __init__(self, config: VisionEncoderDecoderConfig, *, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = ENCODERS.get(config.encoder.model_type, ViTModel)(config.encoder, **kw)
        self.enc_to_dec_proj = linear(
            config.encoder.hidden_size, config.decoder.hidden_size, ("vision_features", "embed"), bias=True, **kw
        ) if config.needs_projection else None
        self.decoder = DECODERS[config.decoder.model_type](config.decoder, **kw)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: VisionEncoderDecoderConfig, *, dtype: DType = "float32",
                    param_dtype: DType | None = None, seed: int = 0) -> VisionEncoderDecoderModel:
        """A randomly initialised model (tests, benchmarks, training from scratch)."""

        def init():
            return nnx.split(cls(config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(seed)))[1]

        graphdef, _ = nnx.split(cls.abstract(config, dtype=dtype, param_dtype=param_dtype))
        with nnx.use_eager_sharding(False):
            return nnx.merge(graphdef, jax.jit(init)())

    @classmethod
    def from_encoder_decoder_pretrained(cls, encoder_path: str | Path, decoder_path: str | Path, *,
                                        dtype: DType = "float32", seed: int = 0,
                                        revision: str | None = None, **token_ids) -> VisionEncoderDecoderModel:
        """Warm start from a pretrained encoder and decoder (HF folders or hub ids): the new
        cross-attention (and projection) weights are random and named in a log line; `token_ids`
        (decoder_start_token_id, pad_token_id, ...) go into the joined config; see
        `vipllava_jax.models.ved.warm_start`."""
        from vipllava_jax.models.ved.warm_start import from_encoder_decoder_pretrained

        return from_encoder_decoder_pretrained(cls, encoder_path, decoder_path, dtype=dtype, seed=seed,
                                               revision=revision, **token_ids)

    @classmethod
    def abstract(cls, config: VisionEncoderDecoderConfig, *, dtype: DType = "float32",
                 param_dtype: DType | None = None) -> VisionEncoderDecoderModel:
        """The model with `jax.ShapeDtypeStruct` leaves: no memory, no compute."""
        with nnx.use_eager_sharding(False):
            return nnx.eval_shape(
                lambda: cls(config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0))
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: DType = "float32", param_dtype: DType | None = None,
                        mesh: jax.sharding.Mesh | None = None, rules=None,
                        revision: str | None = None) -> VisionEncoderDecoderModel:
        """Loads an Orbax folder written by `vipllava-convert hf-to-orbax`, an HF VED folder
        (local or gs://), or a hub id (at `revision`; `vipllava_jax.hub`).

        With `mesh`, each parameter is restored straight onto it, sharded by the logical axis
        rules (`vipllava_jax.nn.sharding.LOGICAL_AXIS_RULES` unless `rules` is given).
        """
        path = hub.resolve(path, revision=revision)
        config = VisionEncoderDecoderConfig.from_pretrained(path)
        param_dtype = jnp.dtype(param_dtype or dtype)
        return load_into(cls.abstract(config, dtype=dtype, param_dtype=param_dtype), path,
                         param_dtype=param_dtype, mapping=VED_MAPPING, mesh=mesh, rules=rules,
                         tied_head=config.decoder.tie_word_embeddings)

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Writes the Orbax folder that `from_pretrained` reads."""
        save_model(self, path, overwrite=overwrite)

    # -- forward --------------------------------------------------------------------------------

    def encode(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values `[B, C, H, W]` -> the encoder output in the decoder's width `[B, S, D_dec]`."""
        hidden = self.encoder(pixel_values)
        return hidden if self.enc_to_dec_proj is None else self.enc_to_dec_proj(hidden)

    def cross_kv(self, pixel_values: jax.Array) -> CrossKV:
        """Every decoder layer's cross-attention keys and values for these images."""
        return self.decoder.cross_kv(self.encode(pixel_values))

    def __call__(self, pixel_values, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None) -> VedOutput:
        """Logits (and the loss when `labels` are given), as transformers' forward.

        Inputs are checked first (one-line errors, nothing compiled). On concrete arrays the
        forward runs as one compiled program (cached per shape); under a trace it is inlined.

        Args:
          pixel_values: float `[B, C, H, W]`.
          decoder_input_ids: int `[B, T]`; default: `labels` shifted right.
          decoder_attention_mask: `[B, T]`, 1 for tokens the decoder may attend; default all.
          labels: int `[B, T]`, -100 where not counted.
        """
        self.check_inputs(pixel_values, decoder_input_ids, decoder_attention_mask, labels)
        args = (pixel_values, decoder_input_ids, decoder_attention_mask, labels)
        if any(isinstance(a, jax.core.Tracer) for a in args):
            return self.forward(*args)
        graphdef, state = nnx.split(self)
        return _jitted_forward(graphdef, state, *(None if a is None else jnp.asarray(a) for a in args))

    def forward(self, pixel_values, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, *, attention: Mapping[str, str | None] | None = None,
                remat: Callable[..., bool] | None = None) -> VedOutput:
        """The traceable forward pass behind `__call__` (no input checks).

        attention: part -> attention kernel, as VipLlava's; no part of this model has a fused
          path (`attention_dtypes` is empty), so it may only be None or empty.
        remat: a `jax.checkpoint` policy for each decoder layer (None: keep every activation).
        """
        check_attention(attention, self.attention_dtypes(), type(self).__name__)
        if decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(
                labels, self.config.pad_token_id, self.config.decoder_start_token_id
            )
        hidden, _ = self.decoder(decoder_input_ids, self.cross_kv(pixel_values), decoder_attention_mask,
                                 remat=remat)
        logits = self.decoder.logits(hidden)
        return VedOutput(logits=logits, loss=None if labels is None else seq2seq_loss(logits, labels))

    def attention_dtypes(self) -> dict[str, jnp.dtype]:
        """The parts with a fused attention path and their compute dtypes: none."""
        return {}

    def loss_terms(
        self, batch: dict[str, jax.Array], *, attention: Mapping[str, str | None] | None = None,
        remat: Callable[..., bool] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """For the train step: (summed NLL, counted tokens) of `labels` [B, T] given
        `pixel_values`, the decoder reading the labels shifted right (as `forward`, which
        takes `attention` and `remat`)."""
        logits = self.forward(batch["pixel_values"], batch.get("decoder_input_ids"),
                              batch.get("decoder_attention_mask"), batch["labels"],
                              attention=attention, remat=remat).logits
        return token_nll(logits, batch["labels"], shift=False)

    def check_inputs(self, pixel_values, decoder_input_ids, decoder_attention_mask, labels) -> None:
        cfg = self.config
        enc = cfg.encoder
        want = (enc.num_channels, *enc.image_hw)
        if len(np.shape(pixel_values)) != 4 or np.shape(pixel_values)[1:] != want:
            raise VipLlavaError(
                f"pixel_values must be [batch, {want[0]}, {want[1]}, {want[2]}], got shape {np.shape(pixel_values)}"
            )
        ids = decoder_input_ids if decoder_input_ids is not None else labels
        if ids is None:
            raise VipLlavaError("give decoder_input_ids or labels")
        if decoder_input_ids is None and (cfg.pad_token_id is None or cfg.decoder_start_token_id is None):
            raise VipLlavaError(
                "labels without decoder_input_ids need pad_token_id and decoder_start_token_id in the config"
            )
        shape = np.shape(ids)
        if len(shape) != 2 or shape[0] != np.shape(pixel_values)[0]:
            raise VipLlavaError(f"decoder inputs must be [batch, seq] with batch = images, got shape {shape}")
        if shape[1] > cfg.decoder.max_tokens:
            raise VipLlavaError(f"{shape[1]} decoder tokens exceed the decoder's {cfg.decoder.max_tokens} positions")
        for name, x in (("decoder_attention_mask", decoder_attention_mask), ("labels", labels)):
            if x is not None and np.shape(x) != shape:
                raise VipLlavaError(f"{name} has shape {np.shape(x)}, decoder inputs have {shape}")
        if decoder_input_ids is not None and not isinstance(decoder_input_ids, jax.core.Tracer):
            # an embedding lookup out of range gives NaN (or wraps, for negative ids)
            ids = np.asarray(decoder_input_ids)
            bad = (ids < 0) | (ids >= cfg.decoder.vocab_size)
            if bad.any():
                raise VipLlavaError(
                    f"decoder_input_ids holds token id {int(ids[bad].flat[0])} ({int(bad.sum())} out of "
                    f"range): ids must be in [0, {cfg.decoder.vocab_size}) for this model's vocabulary")

    # -- generation -----------------------------------------------------------------------------

    def generate(self, pixel_values, *, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool | str = False,
                 no_repeat_ngram_size: int = 0, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, decoder_start_token_id: int | None = None,
                 forced_bos_token_id: int | None = None, forced_eos_token_id: int | list[int] | None = None,
                 seed: int = 0) -> np.ndarray:
        """Captions `[B, 1 + n]` (the start token, then up to `max_new_tokens` tokens), one compiled
        program per shape; see `vipllava_jax.models.ved.generate.generate`."""
        return generate(
            self, pixel_values, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
            length_penalty=length_penalty, early_stopping=early_stopping,
            no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, decoder_start_token_id=decoder_start_token_id,
            forced_bos_token_id=forced_bos_token_id, forced_eos_token_id=forced_eos_token_id, seed=seed,
        )


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef, state, *args) -> VedOutput:
    return nnx.merge(graphdef, state).forward(*args)

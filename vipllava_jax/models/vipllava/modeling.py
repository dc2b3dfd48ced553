"""VipLlava: CLIP features from several layers -> projector -> merged into the decoder's input.

Data flow for one forward pass:

    pixel_values [B_img, 3, H, W] --CLIP--> hidden states at vision_feature_layer, CLS dropped
        --concat--> [B_img, N, L*Dv] --projector--> image features [B_img, N, D]
    input_ids [B, T] --embed_tokens--> [B, T, D]; the i-th image-token position gets the i-th
        image feature (row-major over the batch, as transformers' masked_scatter)
    --decoder--> [B, T, D] --lm_head--> logits [B, T, V]
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
from vipllava_jax.models.vipllava import original
from vipllava_jax.models.vipllava.clip import CLIPVisionModel
from vipllava_jax.models.vipllava.config import VipLlavaConfig
from vipllava_jax.models.vipllava.generate import generate, generate_stream
from vipllava_jax.models.vipllava.inputs import check_feature_layers, check_inputs
from vipllava_jax.models.vipllava.llama import LlamaModel, LlamaOutput
from vipllava_jax.models.vipllava.mapping import VIPLLAVA
from vipllava_jax.models.vipllava.prefix import Cache, check_room, extend_cache, new_cache
from vipllava_jax.models.vipllava.projector import VipLlavaMultiModalProjector, merge_image_features
from vipllava_jax.nn.layers import DType, check_attention, linear
from vipllava_jax.nn.losses import causal_lm_loss, token_nll


@struct.dataclass
class VipLlavaOutput:
    """transformers' VipLlavaCausalLMOutputWithPast; each optional field only when asked for."""

    logits: jax.Array  # [B, T, V]
    loss: jax.Array | None = None  # scalar, when labels were given
    # output_hidden_states: L+1 x [B, T, D], the embeddings then each decoder layer (last normed)
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None  # output_attentions: L x [B, N, T, T]
    image_hidden_states: jax.Array | None = None  # output_image_hidden_states: [B_img, N, D]
    past_key_values: Cache | None = None  # use_cache / past_key_values: the extended cache


class VipLlavaForConditionalGeneration(nnx.Module):
    """The whole model, with transformers' parameter names and call signature."""

    # What each training stage trains (`vipllava_jax.train.step`). The vision tower is frozen
    # except in "all" (a model trained from scratch has no pretrained CLIP to keep); stage
    # "lora" also trains the LoRA adapters the train state adds to the decoder
    # (`vipllava_jax.train.lora`).
    train_stages = {
        "projector": ("multi_modal_projector",),
        "full": ("multi_modal_projector", "language_model", "lm_head"),
        "lora": ("multi_modal_projector",),
        "all": ("vision_tower", "multi_modal_projector", "language_model", "lm_head"),
    }

    def __init__(
        self,
        config: VipLlavaConfig,
        *,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = CLIPVisionModel(config.vision_config, **kw)
        self.multi_modal_projector = VipLlavaMultiModalProjector(config, **kw)
        self.language_model = LlamaModel(config.text_config, **kw)
        tc = config.text_config
        self.lm_head = (
            None if tc.tie_word_embeddings
            else linear(tc.hidden_size, tc.vocab_size, ("embed", "vocab"), bias=False, **kw)
        )

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: VipLlavaConfig, *, dtype: DType = "float32", param_dtype: DType | None = None,
        seed: int = 0,
    ) -> VipLlavaForConditionalGeneration:
        """A randomly initialised model (for tests and benchmarks)."""

        def init():
            model = cls(config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(seed))
            return nnx.split(model)[1]

        # One compiled initialiser: eagerly, every parameter's initialiser compiles on its own.
        graphdef, _ = nnx.split(cls.abstract(config, dtype=dtype, param_dtype=param_dtype))
        with nnx.use_eager_sharding(False):
            return nnx.merge(graphdef, jax.jit(init)())

    @classmethod
    def abstract(
        cls, config: VipLlavaConfig, *, dtype: DType = "float32", param_dtype: DType | None = None
    ) -> VipLlavaForConditionalGeneration:
        """The model with `jax.ShapeDtypeStruct` leaves: no memory, no compute."""
        with nnx.use_eager_sharding(False):
            return nnx.eval_shape(
                lambda: cls(config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0))
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: DType = "float32",
        param_dtype: DType | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules=None,
        revision: str | None = None,
    ) -> VipLlavaForConditionalGeneration:
        """Loads a converted Orbax folder (or an HF VipLlava folder) as a ready model.

        Args:
          path: a folder written by `vipllava-convert hf-to-orbax`, an HF checkpoint folder
            (local or gs://), or a hub id such as "llava-hf/vip-llava-7b-hf" (at `revision`;
            `vipllava_jax.hub`).
          dtype: compute dtype; parameters are stored in `param_dtype` (default: `dtype`).
          mesh: restore each parameter straight onto this mesh, sharded by the logical axis
            rules (`vipllava_jax.nn.sharding.LOGICAL_AXIS_RULES` unless `rules` is given).
        """
        path = hub.resolve(path, revision=revision)
        if original.is_original(path):  # the original repository's layout, read as it converts
            config, mapping = original.config_from_original(path), original.ORIGINAL
        else:
            config, mapping = VipLlavaConfig.from_pretrained(path), VIPLLAVA
        param_dtype = jnp.dtype(param_dtype or dtype)
        return load_into(cls.abstract(config, dtype=dtype, param_dtype=param_dtype), path,
                         param_dtype=param_dtype, mapping=mapping, mesh=mesh, rules=rules,
                         tied_head=config.text_config.tie_word_embeddings)

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Writes the Orbax folder that `from_pretrained` reads."""
        save_model(self, path, overwrite=overwrite)

    # -- forward ----------------------------------------------------------------------------

    def get_image_features(self, pixel_values: jax.Array, *, kernel: str | None = None,
                           vision_feature_layer: tuple[int, ...] | None = None) -> jax.Array:
        """pixel_values `[B_img, 3, H, W]` -> projected features `[B_img, N, D]` (`kernel`: the
        vision tower's attention kernel, None for dense attention; `vision_feature_layer`: the
        CLIP hidden states to project, default the config's, as many as the projector takes)."""
        layers = self.config.feature_layer_indices if vision_feature_layer is None else vision_feature_layer
        states = self.vision_tower(pixel_values, layers, kernel=kernel)
        features = jnp.concatenate([s[:, 1:] for s in states], axis=-1)  # drop CLS
        return self.multi_modal_projector(features)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None, *,
              vision_kernel: str | None = None) -> jax.Array:
        """Token embeddings `[B, T, D]` with the image features merged in (`vision_kernel`: the
        vision tower's attention kernel)."""
        image_token = self.config.image_token_index
        is_image = input_ids == image_token
        # The image token id may lie outside the embedding table; its rows are replaced anyway.
        embeds = self.language_model.embed_tokens(jnp.where(is_image, 0, input_ids))  # [B, T, D]
        if pixel_values is not None:
            features = self.get_image_features(pixel_values, kernel=vision_kernel)
            embeds = merge_image_features(input_ids, embeds, features, image_token)
        return embeds

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            table = self.language_model.embed_tokens.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", hidden, table)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        **options,
    ) -> VipLlavaOutput:
        """Logits (and the loss when `labels` are given), as transformers' forward.

        Inputs are validated first (clear errors, nothing compiled). Called on concrete
        arrays, the forward runs as one compiled program (cached per input shape); called
        under a trace (inside the caller's `jax.jit`), it is traced inline.

        Args:
          input_ids: int `[B, T]` with one `image_token_index` per image feature.
          pixel_values: float `[B_img, 3, H, W]` (HF processor layout) or None.
          attention_mask: `[B, T]`, 1 for tokens and 0 for (left) padding; default all ones.
          position_ids: `[B, T]`; default `0..T-1` as transformers' forward.
          labels: int `[B, T]`; shifted inside, -100 ignored.

        Keyword options, as transformers' forward (any of them set compiles one program per
        set of flags; none set runs the default program, unchanged):
          inputs_embeds: float `[B, T, D]` instead of `input_ids` (image positions hold the
            image token's embedding, as `embed` leaves them before the merge).
          vision_feature_layer (or `vision_feature_layers`): int or ints, the CLIP hidden
            states projected for this call (as many as the config's).
          output_hidden_states, output_attentions: the decoder's hidden states (embeddings,
            then each layer) and post-softmax attention weights, as transformers' eager
            attention returns them.
          output_image_hidden_states: the projector's output (transformers returns it always;
            here it is asked for, so that the default program keeps its outputs).
          use_cache, past_key_values, cache_length: return the KV cache (`prefix.Cache`, of
            `cache_length` slots, default prompt + 128) in `past_key_values`; pass it back with
            the next tokens to continue (their `attention_mask` covers the new tokens, or the
            past and new ones as transformers'). Cached calls count RoPE positions over real
            tokens (`generate`'s convention) unless `position_ids` are given.
        """
        options = {k: v for k, v in options.items() if v is not None and v is not False}
        if options:  # left at their defaults, the options keep the default program
            return self._call_with_options(input_ids, pixel_values, attention_mask, position_ids,
                                           labels, **options)
        check_inputs(self.config, input_ids, pixel_values, attention_mask, labels)
        args = (input_ids, pixel_values, attention_mask, position_ids, labels)
        if any(isinstance(a, jax.core.Tracer) for a in args):
            return self.forward(*args)
        graphdef, state = nnx.split(self)
        return jitted_forward(graphdef, state, *(None if a is None else jnp.asarray(a) for a in args))

    def _call_with_options(self, input_ids, pixel_values, attention_mask, position_ids, labels, *,
                           inputs_embeds=None, vision_feature_layer=None, vision_feature_layers=None,
                           output_hidden_states=False, output_attentions=False,
                           output_image_hidden_states=False, past_key_values=None,
                           use_cache=False, cache_length=None) -> VipLlavaOutput:
        """`__call__` with keyword options: checked here, then one compiled program per set."""
        if vision_feature_layers is not None:  # transformers' older name
            if vision_feature_layer is not None:
                raise VipLlavaError("give vision_feature_layer or vision_feature_layers, not both")
            vision_feature_layer = vision_feature_layers
        layers = check_feature_layers(self.config, vision_feature_layer)
        if (input_ids is None) == (inputs_embeds is None):
            raise VipLlavaError("give exactly one of input_ids and inputs_embeds")
        shape = np.shape(input_ids if inputs_embeds is None else inputs_embeds)[:2]
        cached = use_cache or past_key_values is not None
        if cached and (output_hidden_states or output_attentions):
            raise VipLlavaError("output_hidden_states / output_attentions are computed without a cache: "
                                "run the whole sequence (prompt + tokens so far) once with them")
        if past_key_values is not None:
            check_room(past_key_values, *shape)
            if attention_mask is not None and np.shape(attention_mask)[1:] != shape[1:]:
                past = int(past_key_values.length)
                if np.shape(attention_mask)[1:] != (past + shape[1],):
                    raise VipLlavaError(f"attention_mask has shape {np.shape(attention_mask)}: give the new "
                                        f"tokens' [{shape[0]}, {shape[1]}] or the past and new [{shape[0]}, {past + shape[1]}]")
                attention_mask = attention_mask[:, past:]  # transformers' mask covers the past too
        if inputs_embeds is None:
            check_inputs(self.config, input_ids, pixel_values, attention_mask, labels)
        else:
            self._check_embeds(inputs_embeds, pixel_values, attention_mask, labels)
        if past_key_values is None and use_cache:
            cache_length = shape[1] + 128 if cache_length is None else int(cache_length)
            if cache_length < shape[1]:
                raise VipLlavaError(f"cache_length {cache_length} is shorter than the {shape[1]} input tokens")
        else:
            cache_length = None
        opts = dict(vision_feature_layer=layers, output_hidden_states=bool(output_hidden_states),
                    output_attentions=bool(output_attentions),
                    output_image_hidden_states=bool(output_image_hidden_states),
                    use_cache=bool(use_cache), cache_length=cache_length)
        args = (input_ids, pixel_values, attention_mask, position_ids, labels, inputs_embeds, past_key_values)
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
            return self.forward_with_options(*args[:5], inputs_embeds=inputs_embeds,
                                             past_key_values=past_key_values, **opts)
        args = jax.tree.map(jnp.asarray, args)
        graphdef, state = nnx.split(self)
        return jitted_outputs(graphdef, state, *args, tuple(sorted(opts.items())))

    def _check_embeds(self, inputs_embeds, pixel_values, attention_mask, labels) -> None:
        """`check_inputs` for `inputs_embeds`: shapes, and the image positions (rows equal to
        the image token's embedding) against the image features, on concrete arrays."""
        shape = np.shape(inputs_embeds)
        d = self.config.text_config.hidden_size
        if len(shape) != 3 or shape[2] != d:
            raise VipLlavaError(f"inputs_embeds must be [batch, seq, {d}], got shape {shape}")
        image_token = self.config.image_token_index
        if pixel_values is not None and image_token >= self.config.text_config.vocab_size:
            raise VipLlavaError(f"inputs_embeds with pixel_values needs the image token ({image_token}) "
                                "in the embedding table; merge the features yourself (embed) instead")
        marks = np.zeros(shape[:2], np.int64)
        if pixel_values is not None and not isinstance(inputs_embeds, jax.core.Tracer):
            marks = np.where(np.asarray(self._image_positions(jnp.asarray(inputs_embeds))), image_token, 0)
        check_inputs(self.config, marks, pixel_values, attention_mask, labels)

    def _image_positions(self, inputs_embeds: jax.Array) -> jax.Array:
        """bool `[B, T]`: the rows equal to the image token's embedding (transformers'
        `get_placeholder_mask` without input_ids)."""
        table = self.language_model.embed_tokens
        row = table(jnp.int32(self.config.image_token_index)).astype(inputs_embeds.dtype)
        return jnp.all(inputs_embeds == row, axis=-1)

    def forward_with_options(
        self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, labels=None, *,
        inputs_embeds=None, vision_feature_layer: tuple[int, ...] | None = None,
        output_hidden_states: bool = False, output_attentions: bool = False,
        output_image_hidden_states: bool = False, past_key_values: Cache | None = None,
        use_cache: bool = False, cache_length: int | None = None,
        attention: Mapping[str, str | None] | None = None,
    ) -> VipLlavaOutput:
        """The traceable forward behind `__call__`'s keyword options (no input validation;
        the flags, `vision_feature_layer` and `cache_length` are static)."""
        kernels = check_attention(attention, self.attention_dtypes(), type(self).__name__)
        image_token = self.config.image_token_index
        if inputs_embeds is None:
            is_image = input_ids == image_token
            embeds = self.language_model.embed_tokens(jnp.where(is_image, 0, input_ids))
        else:
            embeds = inputs_embeds.astype(self.dtype)
            is_image = self._image_positions(embeds) if pixel_values is not None else None
        b, t, _ = embeds.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        features = None
        if pixel_values is not None:
            features = self.get_image_features(pixel_values, kernel=kernels.get("vision_tower"),
                                               vision_feature_layer=vision_feature_layer)
            embeds = merge_image_features(jnp.where(is_image, image_token, 0), embeds, features, image_token)
        hidden_states = attentions = cache = None
        if use_cache or past_key_values is not None:
            cache = new_cache(self, b, cache_length) if past_key_values is None else past_key_values
            hidden, cache = extend_cache(self, cache, embeds, attention_mask, position_ids)
        else:
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
            out = self.language_model(embeds, attention_mask, position_ids,
                                      kernel=kernels.get("language_model"),
                                      output_hidden_states=output_hidden_states,
                                      output_attentions=output_attentions)
            if isinstance(out, LlamaOutput):
                hidden, hidden_states, attentions = out.last_hidden_state, out.hidden_states, out.attentions
            else:
                hidden = out
        logits = self.logits_from_hidden(hidden)
        return VipLlavaOutput(
            logits=logits, loss=None if labels is None else causal_lm_loss(logits, labels),
            hidden_states=hidden_states, attentions=attentions,
            image_hidden_states=features if output_image_hidden_states else None,
            past_key_values=cache,
        )

    def forward(
        self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, labels=None, *,
        attention: Mapping[str, str | None] | None = None, remat: Callable[..., bool] | None = None,
    ) -> VipLlavaOutput:
        """The traceable forward pass behind `__call__` (no input validation).

        attention: part ("vision_tower", "language_model") -> its attention kernel
          (`ATTENTION_KERNELS`); a part not named, or None, computes with dense masks. A fused
          kernel needs right-padded rows (the training loaders make them).
        remat: a `jax.checkpoint` policy for each decoder layer (None: keep every activation).
          The vision tower is not rematerialised: frozen in most stages, it keeps no
          activations for the backward.
        """
        kernels = check_attention(attention, self.attention_dtypes(), type(self).__name__)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        embeds = self.embed(input_ids, pixel_values, vision_kernel=kernels.get("vision_tower"))
        hidden = self.language_model(embeds, attention_mask, position_ids,
                                     kernel=kernels.get("language_model"), remat=remat)
        logits = self.logits_from_hidden(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return VipLlavaOutput(logits=logits, loss=loss)

    def attention_dtypes(self) -> dict[str, jnp.dtype]:
        """The parts with a fused attention path, each with its compute dtype (what decides
        which kernels it can run)."""
        return {"vision_tower": jnp.dtype(self.vision_tower.dtype),
                "language_model": jnp.dtype(self.language_model.dtype)}

    def loss_terms(
        self, batch: dict[str, jax.Array], *, attention: Mapping[str, str | None] | None = None,
        remat: Callable[..., bool] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """What the train step needs of a batch (`vipllava_jax.train.step`): (summed next-token
        NLL, counted tokens), so that the mean is taken once over the whole global batch.
        `attention` and `remat` as in `forward`."""
        out = self.forward(batch["input_ids"], batch.get("pixel_values"), batch.get("attention_mask"),
                           batch.get("position_ids"), attention=attention, remat=remat)
        return token_nll(out.logits, batch["labels"])

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int = 64,
        do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None, pad_token_id: int = 0, seed: int = 0,
        streamer=None, stop_strings: str | list[str] | None = None, tokenizer=None,
    ) -> np.ndarray:
        """Greedy or sampled continuation, KV-cached, in one compiled program per shape.

        Returns `[B, prompt_len + max_new_tokens]`: the prompt, then the new tokens, with
        `pad_token_id` after a row's EOS (`eos_token_id` defaults to the config's). Sampling
        applies temperature, top-k (0 = off) and top-p (1.0 = off), seeded by `seed`.
        `streamer(tokens [B, n])` is called with each chunk of new tokens as it is produced.

        `stop_strings` (with the `tokenizer=` that reads tokens as text) end a row where one of
        them is completed, as transformers' `generate(stop_strings=..., tokenizer=...)`: the
        token completing it is kept, pad follows. A chat turn's end is the template's
        separator: `stop_strings=processing.prompts.TEMPLATES[name].seps[1]` ("###" for
        "vipllava"); `processing.prompts.cut_answer` then drops it from the decoded text.
        """
        return generate(
            self, input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, streamer=streamer,
            stop_strings=stop_strings, tokenizer=tokenizer,
        )

    def generate_stream(self, input_ids, pixel_values=None, attention_mask=None, **kwargs):
        """Yields new tokens `[B, n]` chunk by chunk (same arguments as `generate`)."""
        yield from generate_stream(self, input_ids, pixel_values, attention_mask, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def jitted_forward(graphdef, state, *args) -> VipLlavaOutput:
    return nnx.merge(graphdef, state).forward(*args)


@functools.partial(jax.jit, static_argnums=(0, 9))
def jitted_outputs(graphdef, state, input_ids, pixel_values, attention_mask, position_ids, labels,
                    inputs_embeds, past_key_values, options) -> VipLlavaOutput:
    """`forward_with_options`, one compiled program per `options` (sorted (name, value) pairs)."""
    return nnx.merge(graphdef, state).forward_with_options(
        input_ids, pixel_values, attention_mask, position_ids, labels, inputs_embeds=inputs_embeds,
        past_key_values=past_key_values, **dict(options))
